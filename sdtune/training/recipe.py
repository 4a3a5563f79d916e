"""The DreamBooth recipe, ``train/dreambooth.py``, as a module the library can call.

The recipe is a script beside the package (readable top to bottom, runnable with ``accelerate launch``);
``sdtune train``, the demo and its ablations run the very same file in-process through ``load_recipe``.
"""
from __future__ import annotations

import importlib.util
import sys

from sdtune import ROOT
from sdtune.errors import SdtuneError

RECIPE = ROOT / "train" / "dreambooth.py"


def load_recipe():
    """Import train/dreambooth.py once (later calls return the same module)."""
    if not RECIPE.is_file():
        raise SdtuneError(f"the training recipe {RECIPE} is missing; run sdtune from a source checkout "
                          "(pip install -e .)")
    name = "sdtune_dreambooth_recipe"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
