"""``sdtune infer`` with SDXL on tiny random models: ControlNet depth2img, single files, --from-png."""
from __future__ import annotations

import numpy as np
from PIL import Image

from sdtune.commands.cli import main


def run_cli(capsys, *argv):
    code = main(["infer", *map(str, argv), "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_sdxl_depth2img_through_the_controlnet_and_from_png(tiny_sdxl, tmp_path, capsys):
    rng = np.random.RandomState(1)
    Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(tmp_path / "in.png")
    code, out, err = run_cli(capsys, "depth2img", "--model", tiny_sdxl["sdxl"], "--controlnet",
                             tiny_sdxl["sdxl_controlnet"], "--depth-estimator", tiny_sdxl["depth_estimator"],
                             "--image", tmp_path / "in.png", "--prompt", "a red cat", "--steps", 2,
                             "--out", tmp_path / "a")
    assert code == 0, err
    (first,) = [line for line in out.splitlines() if line.endswith(".png")]
    code, out, err = run_cli(capsys, "--from-png", first, "--out", tmp_path / "b")
    assert code == 0, err
    (again,) = [line for line in out.splitlines() if line.endswith(".png")]
    assert np.array_equal(png(first), png(again))


def test_sdxl_single_file_txt2img_and_refiner_refused(tiny_sdxl, tiny_models, tmp_path, capsys):
    from sdtune.models.convert import export_single_file

    file = export_single_file(tiny_sdxl["sdxl"], tmp_path / "xl.safetensors")
    code, out, err = run_cli(capsys, "txt2img", "--model", file, "--config", tiny_sdxl["sdxl"], "--prompt", "a cat",
                             "--steps", 2, "--out", tmp_path / "o")
    assert code == 0, err
    code, out, err = run_cli(capsys, "txt2img", "--model", tiny_sdxl["sdxl_refiner"], "--prompt", "a cat",
                             "--out", tmp_path / "r")
    assert code == 2 and "SDXL refiner" in err and len(err.strip().splitlines()) == 1


def test_inspect_tools_take_an_sdxl_model(tiny_sdxl, capsys):
    code = main(["inspect", "unet", "--model", str(tiny_sdxl["sdxl"])])
    out = capsys.readouterr().out
    assert code == 0 and "UNet output shape: torch.Size([1, 4, 16, 16])" in out
    assert "Text embeddings shape: torch.Size([1, 77, 80])" in out
    code = main(["inspect", "tokens", "a photo of a cat", "--model", str(tiny_sdxl["sdxl"])])
    assert code == 0 and "77" in capsys.readouterr().out
