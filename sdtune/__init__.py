"""sdtune: DreamBooth fine-tuning for Stable Diffusion, and one inference module for all four modes.

The library is organised by concern; imports run one way, from the top of this list down:

* ``sdtune.commands``   - the ``sdtune`` command line (one module per subcommand)
* ``sdtune.world``      - the built-in world: scenes, judge, evaluation, embedded family, main job
* ``sdtune.training``   - the DreamBooth recipe's components (config, data, adapters, objective, ...)
* ``sdtune.generation`` - the engine serving txt2img, img2img, inpainting and depth2img
* ``sdtune.models``     - loading, LoRA files, conversion, schedulers, tiny fixtures
* shared modules        - ``errors``, ``devices``, ``imageio``, ``console``

(``training`` and ``generation`` sit side by side and do not import each other.) Recipes runnable
with ``accelerate launch`` live in ``train/``, generation entry points in ``infer/``; both are thin.
Imports here stay light on purpose: ``import sdtune`` and ``sdtune --help`` must not pay for torch.
"""
from pathlib import Path

__version__ = "0.1.0"

# The source checkout sdtune runs from: configs/, data/ and the train/ recipes sit beside the package.
ROOT = Path(__file__).resolve().parent.parent
# Where the shipped data lives (tokenizer files, the embedded model family, subjects, the judge).
DATA_DIR = ROOT / "data"
