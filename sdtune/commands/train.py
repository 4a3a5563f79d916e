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
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """The recipe's own command line; on the embedded family its in-loop evaluation also reads the world's judge."""
    from sdtune.world.judge_scorer import world_scorers

    return launch.run(args, scorer_factory=world_scorers)
