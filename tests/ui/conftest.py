"""Fixtures of the web UI's tests: a sandboxed outputs folder and the checker-box subject's images."""
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture
def sandbox(tmp_path):
    from sdtune.ui.safety import Sandbox

    return Sandbox(tmp_path / "outputs")


@pytest.fixture
def subject_images():
    from uihelpers import SUBJECT

    return sorted(str(p) for p in SUBJECT.glob("*.png"))
