"""sdtune: DreamBooth fine-tuning for Stable Diffusion, and one inference module for all four modes.

Imports here stay light on purpose: ``sdtune --help`` must not pay for torch/diffusers.
"""
from pathlib import Path

__version__ = "0.1.0"

# Where the shipped data lives (tokenizer files, the embedded model family, subjects).
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
