"""Helpers shared by the web UI's tests (imported by name: tests/ui is on sys.path under pytest)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBJECT = ROOT / "data" / "subjects" / "checker_box"


def needs_embedded():
    from sdtune.models.embedded import has_embedded

    if not all(has_embedded(k) for k in ("base", "inpaint", "depth")):
        pytest.skip("the embedded model family is not built in data/models")
