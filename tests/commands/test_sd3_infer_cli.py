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


def test_sd3_infer_with_a_lora_and_from_png(tiny_sd3, tmp_path, capsys):
    """A diffusers SD3 LoRA (as sdtune's SD3 recipe writes it) through ``--lora``; the PNG regenerates with it."""
    import torch

    from sdtune.models.loading import load_pipeline
    from sdtune.training.config import config_from_dict
    from sdtune.training.sd3 import add_lora, save_lora

    pipe = load_pipeline(tiny_sd3["sd3"])
    cfg = config_from_dict(dict(instance_dir="x", instance_prompt="p", lora_rank=2))
    torch.manual_seed(0)
    add_lora(pipe.transformer, cfg)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    save_lora(tmp_path / "lora", pipe.transformer, cfg, 0, tiny_sd3["sd3"])
    common = ["--model", tiny_sd3["sd3"], "--prompt", "a red cat", "--steps", 2, "--no-t5"]
    code, out, err = run_cli(capsys, "txt2img", *common, "--out", tmp_path / "plain")
    assert code == 0, err
    code, out, err = run_cli(capsys, "txt2img", *common, "--lora", tmp_path / "lora", "--out", tmp_path / "a")
    assert code == 0, err
    (first,) = [line for line in out.splitlines() if line.endswith(".png")]
    (plain,) = (tmp_path / "plain").glob("*.png")
    assert not np.array_equal(png(first), png(plain))  # the LoRA changes the image
    code, out, err = run_cli(capsys, "--from-png", first, "--out", tmp_path / "b")
    assert code == 0, err
    (again,) = [line for line in out.splitlines() if line.endswith(".png")]
    assert np.array_equal(png(first), png(again)) and read_params(first)["lora"]


def test_inspect_refuses_an_sd3_model_in_one_line(tiny_sd3, capsys):
    code = main(["inspect", "unet", "--model", str(tiny_sd3["sd3"])])
    err = capsys.readouterr().err
    assert code == 2 and "SD 3.x model" in err and len(err.strip().splitlines()) == 1
