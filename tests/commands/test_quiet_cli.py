"""The command line shows sdtune's own lines and progress bars; --verbose brings the libraries' back.

Each command runs in a fresh process, as a user runs it, so import-time notices count too.
"""
from __future__ import annotations

import os
import re
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
# sdtune's own progress bars (tqdm lines start with their description).
OWN_BARS = ("steps", "class images", "sampling", "base images", "images")
# Library names, Python warning classes (UserWarning, FutureWarning ...), loading bars, indented source lines.
THIRD_PARTY = re.compile(r"transformers|diffusers|accelerate|huggingface|[A-Za-z]Warning\b|warnings\.warn"
                         r"|Loading (pipeline|weights)|^[ \t]+\S", re.MULTILINE)


def sdtune(*argv, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": ""}
    env.pop("TRANSFORMERS_VERBOSITY", None)  # the test suite's own quieting must not hide anything here
    env.pop("DIFFUSERS_VERBOSITY", None)
    return subprocess.run([sys.executable, "-m", "sdtune", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=600)


def foreign_lines(stderr: str) -> list[str]:
    """stderr lines that are neither 'sdtune: ...' nor one of sdtune's progress bars."""
    lines = [ln for chunk in stderr.split("\n") for ln in chunk.split("\r") if ln.strip()]
    return [ln for ln in lines if not ln.startswith("sdtune: ") and not ln.startswith(tuple(b + ":" for b in OWN_BARS))]


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quiet_subject")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.json").write_text("{}")  # a non-image file: sdtune warns about it, in one line
    return folder


@pytest.mark.slow
def test_train_and_infer_print_only_sdtune_lines(tiny_models, subject, tmp_path):
    out = tmp_path / "run"
    r = sdtune("train", ROOT / "configs" / "dreambooth_lora.yaml", f"model={tiny_models['sd1']}",
               f"instance_dir={subject}", "resolution=32", "max_steps=2", "with_prior_preservation=false",
               "validation_every=0", "checkpoint_every=0", f"output_dir={out}")
    assert r.returncode == 0, r.stderr
    assert foreign_lines(r.stderr) == [], r.stderr
    assert not THIRD_PARTY.search(r.stderr.replace(str(subject), "")), r.stderr
    # sdtune's own warning is one line, with no Python source line under it
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("sdtune: warning:")]
    assert len(warning) == 1 and "notes.json" in warning[0], r.stderr
    assert "steps:" in r.stderr  # the progress bar stays
    # the config says resume: latest and there is nothing to resume: one line says so
    assert f"sdtune: note: resume: latest found no checkpoint in {out}; starting from step 0" in r.stderr

    r = sdtune("infer", "txt2img", "--model", tiny_models["sd1"], "--lora", out, "--prompt", "a photo of sks dog",
               "--steps", "2", "--out", tmp_path / "images")
    assert r.returncode == 0, r.stderr
    assert foreign_lines(r.stderr) == [], r.stderr
    assert not THIRD_PARTY.search(r.stderr), r.stderr
    assert list((tmp_path / "images").glob("*.png"))


@pytest.mark.slow
def test_verbose_brings_the_libraries_back(tiny_models, tmp_path):
    r = sdtune("--verbose", "infer", "txt2img", "--model", tiny_models["sd1"], "--prompt", "a photo of a dog",
               "--steps", "2", "--out", tmp_path / "v")
    assert r.returncode == 0, r.stderr
    assert foreign_lines(r.stderr), "--verbose showed nothing from the libraries: " + r.stderr
    assert "Loading pipeline components" in r.stderr


def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path):
    r = sdtune("train", tmp_path / "missing.yaml")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"sdtune: error: config file not found: {tmp_path / 'missing.yaml'}"]


def test_a_one_pixel_instance_image_is_refused_before_any_work(tiny_models, subject, tmp_path):
    folder = tmp_path / "with_dot"
    folder.mkdir()
    for image in subject.glob("*.png"):
        (folder / image.name).write_bytes(image.read_bytes())
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    r = sdtune("train", ROOT / "configs" / "dreambooth_lora.yaml", f"model={tiny_models['sd1']}",
               f"instance_dir={folder}", "resolution=32", f"output_dir={tmp_path / 'run'}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"sdtune: error: instance_dir image {folder / 'dot.png'} is 1x1 pixels, too small to train at this resolution "
        "(the shorter side must be at least 8 px, min_image_fraction of resolution); use a larger photo, remove it, "
        "or lower min_image_fraction"]
    assert not (tmp_path / "run" / "logs").exists()  # nothing started


def test_huggingface_hub_notices_stay_quiet_unless_verbose():
    """huggingface_hub sets its own level when it is imported (inside console.setup, with diffusers); its retry
    notices ("Retrying in 8s") must not reach the command line of an offline user who named a hub model."""
    code = ("import logging; from sdtune import console; console.setup(verbose=False); "
            "print(logging.getLogger('huggingface_hub').getEffectiveLevel())")
    level = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert level == str(logging.ERROR)
