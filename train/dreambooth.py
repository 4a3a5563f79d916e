"""DreamBooth for Stable Diffusion: the recipe ``sdtune.training.dreambooth``, as a script to launch.

    accelerate launch train/dreambooth.py CONFIG [key=value ...]
    accelerate launch -m sdtune.training.dreambooth CONFIG [key=value ...]   # the same, from an installed package
    sdtune train CONFIG [key=value ...]                                     # the same, one process

The recipe itself lives in the library (``sdtune/training/dreambooth.py``); this file only runs it.
"""
import sys

from sdtune.training.launch import main

if __name__ == "__main__":
    sys.exit(main())
