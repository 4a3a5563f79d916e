"""sdtune: DreamBooth fine-tuning for Stable Diffusion, and one inference module for all four modes.

The library is organised by concern; imports run one way, from the top of this list down:

* ``sdtune.commands``   - the ``sdtune`` command line (one module per subcommand)
* ``sdtune.world``      - the built-in world: scenes, judge, evaluation, embedded family, main job
* ``sdtune.training``   - the DreamBooth recipe (``dreambooth``) and its components (config, data, adapters, step, ...)
* ``sdtune.generation`` - the engine serving txt2img, img2img, inpainting and depth2img
* ``sdtune.models``     - loading, LoRA files, conversion, schedulers, tiny fixtures
* ``sdtune.ui``         - the web UI (``sdtune ui``), at the level of the commands
* shared modules        - ``errors``, ``devices``, ``imageio``, ``console``, ``overrides`` (the one ``key=value``
  parser), ``yamlfile`` (config files read in one-line errors)

(``training`` and ``generation`` sit side by side and do not import each other.) The DreamBooth recipe is
``sdtune.training.dreambooth`` (``accelerate launch -m sdtune.training.dreambooth``); ``train/`` and ``infer/`` in a
source checkout hold thin entry points over the library. The shipped configs and data are ``CONFIGS_DIR`` and
``DATA_DIR`` below, found the same way in an installed wheel and in a checkout.
Imports here stay light on purpose: ``import sdtune`` and ``sdtune --help`` must not pay for torch.
"""
from importlib import resources
from pathlib import Path

__version__ = "0.2.0"


def _shipped(name: str) -> Path:
    """Where the shipped ``configs/`` or ``data/`` is: inside the installed package (a wheel carries them as
    ``sdtune/_configs`` and ``sdtune/_data``, see pyproject.toml), else beside the package in a source checkout."""
    # A wheel installs unpacked, so the package's resources are real folders that diffusers and PIL can open.
    packaged = Path(str(resources.files(__name__) / f"_{name}"))
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / name


# The shipped configs (one YAML per scenario: ``sdtune config list``) and data (tokenizer files, the embedded
# model family, subjects, the judge).
CONFIGS_DIR = _shipped("configs")
DATA_DIR = _shipped("data")
