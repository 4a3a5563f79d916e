"""``sdtune infer`` with SD 3.5 on tiny random models: every mode, --from-png, --no-t5, one-line refusals."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdtune.commands.cli import main
from sdtune.generation.metadata import read_params


def run_cli(capsys, *argv):
    code = main(["infer", *map(str, argv), "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint", "depth2img"])
def test_sd3_infer_every_mode_and_from_png(tiny_sd3, write_inputs, tmp_path, capsys, mode):
    inputs = write_inputs(tmp_path)
    args = [mode, "--model", tiny_sd3["sd3"], "--prompt", "a red cat", "--steps", 2, "--out", tmp_path / "a"]
    if mode != "txt2img":
        args += ["--image", inputs["image"]]
    if mode == "inpaint":
        args += ["--mask", inputs["mask"]]
    if mode == "depth2img":
        args += ["--controlnet", tiny_sd3["sd3_controlnet"], "--depth-estimator", tiny_sd3["depth_estimator"]]
    if mode == "img2img":
        args += ["--no-t5"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    (first,) = [line for line in out.splitlines() if line.endswith(".png")]
    params = read_params(first)
    assert params["family"] == "sd3" and params["no_t5"] is (mode == "img2img")
    code, out, err = run_cli(capsys, "--from-png", first, "--out", tmp_path / "b")
    assert code == 0, err
    (again,) = [line for line in out.splitlines() if line.endswith(".png")]
    assert np.array_equal(png(first), png(again))


def test_sd3_refusals_are_one_line(tiny_sd3, tmp_path, capsys):
    code, out, err = run_cli(capsys, "txt2img", "--model", tiny_sd3["sd3"], "--prompt", "a", "--scheduler", "ddim",
                             "--out", tmp_path / "o")
    assert code == 2 and "--scheduler ddim does not fit SD 3.x" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "depth2img", "--model", tiny_sd3["sd3"], "--prompt", "a", "--image",
                             tmp_path / "missing.png", "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1
