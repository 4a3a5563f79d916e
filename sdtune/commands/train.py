"""``sdtune train [CONFIG] [key=value ...]``: the DreamBooth recipe (sdtune.training.dreambooth), in this process.

Its arguments are the recipe's own (``sdtune.training.launch``), shared with ``accelerate launch -m``.
"""
from __future__ import annotations

import argparse

from sdtune.training import launch


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="DreamBooth fine-tuning (LoRA or full), from key=value settings or a "
                                            "YAML config")
    launch.add_arguments(p)
    p.set_defaults(func=launch.run)
    return p
