"""The embedded default model family shipped in ``data/models`` (see issue: embedded default).

``--model`` defaults to these wherever that makes sense, so sdtune runs offline out of the box.
"""
from __future__ import annotations

from pathlib import Path

from sdtune import DATA_DIR
from sdtune.errors import SdtuneError

MODELS_DIR = DATA_DIR / "models"
KINDS = ("base", "inpaint", "depth")


def embedded_model(kind: str = "base") -> Path:
    """Path of the embedded ``base``/``inpaint``/``depth`` model, or a clear error if not built."""
    if kind not in KINDS:
        raise ValueError(f"unknown embedded model kind {kind!r}")
    path = MODELS_DIR / kind
    if not (path / "model_index.json").is_file():
        raise SdtuneError(f"the embedded {kind} model is missing at {path}; pass a model (--model PATH, or model=PATH in training) "
                          "or rebuild the family (see README: 'Rebuilding the embedded models')")
    return path


def has_embedded(kind: str = "base") -> bool:
    return (MODELS_DIR / kind / "model_index.json").is_file()
