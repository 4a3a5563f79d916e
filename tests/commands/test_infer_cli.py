"""``sdtune infer`` end to end on tiny models: outputs, --from-png, defaults, and every user error."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.commands.cli import main
from sdtune.models import embedded

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory, write_inputs):
    d = tmp_path_factory.mktemp("cli_inputs")
    Image.new("L", (16, 16), 255).save(d / "small_mask.png")
    (d / "corrupt.png").write_bytes(b"this is not a png")
    Image.new("RGB", (8, 8)).save(d / "plain.png")
    found = write_inputs(d, seed=1)
    return {**found, "depth": found["depth_lr"]}


@pytest.fixture(scope="module")
def misfit_lora(tmp_path_factory):
    """A LoRA made for a UNet with another cross-attention width (another model family)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sdtune.models.fixtures import tiny_unet

    unet = tiny_unet(4, cross_dim=48)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    out = tmp_path_factory.mktemp("misfit")
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True)
    return str(out / "pytorch_lora_weights.safetensors")


def run_cli(capsys, *argv):
    code = main(["infer", *map(str, argv), "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def png_pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------ outputs and --from-png

def test_txt2img_writes_png_and_json_and_from_png_regenerates(tiny_models, tmp_path, capsys):
    from sdtune.generation.metadata import read_params

    code, out, err = run_cli(capsys, "txt2img", "--model", tiny_models["sd1"], "--prompt", "a lighthouse",
                             "--negative-prompt", "fog", "--steps", 3, "--seed", 5, "--num-images", 2,
                             "--scheduler", "euler_a", "--out", tmp_path / "a")
    assert code == 0, err
    paths = [Path(line) for line in out.split()]
    assert len(paths) == 2 and all(p.is_file() and p.with_suffix(".json").is_file() for p in paths)
    params = read_params(paths[1])
    assert (params["seed"], params["prompt"], params["negative_prompt"], params["scheduler"]) == \
        (6, "a lighthouse", "fog", "euler_a")
    code, out, err = run_cli(capsys, "--from-png", paths[1], "--out", tmp_path / "b")
    assert code == 0, err
    (again,) = [Path(line) for line in out.split()]
    assert np.array_equal(png_pixels(again), png_pixels(paths[1]))
    assert read_params(again)["seed"] == 6


@pytest.mark.slow
def test_img2img_from_png_uses_the_recorded_input_image(tiny_models, files, tmp_path, capsys):
    code, out, err = run_cli(capsys, "img2img", "--model", tiny_models["sd1"], "--prompt", "a boat",
                             "--image", files["image"], "--strength", 0.6, "--steps", 5, "--out", tmp_path / "a")
    assert code == 0, err
    first = Path(out.split()[0])
    code, out, err = run_cli(capsys, "--from-png", first, "--out", tmp_path / "b")
    assert code == 0, err
    assert np.array_equal(png_pixels(out.split()[0]), png_pixels(first))


def test_inpaint_and_depth2img_through_the_cli(tiny_models, files, tmp_path, capsys):
    from sdtune.generation.metadata import read_params

    code, out, err = run_cli(capsys, "inpaint", "--model", tiny_models["sd1"], "--inpaint-model",
                             tiny_models["inpaint"], "--prompt", "a hat", "--image", files["image"],
                             "--mask", files["mask"], "--steps", 2, "--out", tmp_path)
    assert code == 0, err
    assert read_params(out.split()[0])["unet"] == "inpainting 9-channel"
    code, out, err = run_cli(capsys, "depth2img", "--model", tiny_models["sd1"], "--depth-model",
                             tiny_models["depth"], "--prompt", "a room", "--image", files["image"],
                             "--depth-map", files["depth"], "--steps", 3, "--out", tmp_path)
    assert code == 0, err
    params = read_params(out.split()[0])
    assert params["depth_source"] == "depth_map" and params["depth_map"] == files["depth"]


@pytest.mark.slow
def test_model_defaults_to_the_embedded_family(tiny_models, files, tmp_path, capsys, monkeypatch):
    import sdtune.models.embedded as embedded
    from sdtune.generation.metadata import read_params

    fake = tmp_path / "models"
    fake.mkdir()
    for kind, variant in (("base", "sd1"), ("inpaint", "inpaint"), ("depth", "depth")):
        (fake / kind).symlink_to(tiny_models[variant], target_is_directory=True)
    monkeypatch.setattr(embedded, "MODELS_DIR", fake)
    code, out, err = run_cli(capsys, "inpaint", "--prompt", "x", "--image", files["image"], "--mask",
                             files["mask"], "--steps", 2, "--out", tmp_path / "o")
    assert code == 0, err
    params = read_params(out.split()[0])
    assert params["unet"] == "inpainting 9-channel" and params["depth_model"] is None
    assert Path(params["model"]) == Path(tiny_models["sd1"]).resolve()


# ------------------------------------------------------------------ errors: exit 2, one line, nothing written

ERRORS = {
    "missing image": (["img2img", "--image", "{missing}"], "image not found"),
    "unreadable image": (["img2img", "--image", "{corrupt}"], "could not be read"),
    "mask size mismatch": (["inpaint", "--image", "{image}", "--mask", "{small_mask}"], "same size"),
    "width not multiple of 8": (["txt2img", "--width", "30"], "multiple of 8"),
    "height not multiple of 8": (["txt2img", "--height", "44"], "multiple of 8"),
    "strength above 1": (["img2img", "--image", "{image}", "--strength", "1.5"], r"\[0, 1\]"),
    "strength below 0": (["img2img", "--image", "{image}", "--strength", "-0.1"], r"\[0, 1\]"),
    "steps below 1": (["txt2img", "--steps", "0"], "at least 1"),
    "unknown scheduler": (["txt2img", "--scheduler", "warp9"], "unknown scheduler"),
    "missing model path": (["txt2img", "--model", "./no/such/model"], "model not found"),
    "missing lora": (["txt2img", "--lora", "{missing}"], "LoRA not found"),
    "lora not fitting": (["txt2img", "--lora", "{misfit}"], "does not fit"),
    "png without metadata": (["--from-png", "{plain}"], "no sdtune parameters"),
    "image for txt2img": (["txt2img", "--image", "{image}"], "only used by"),
    "guidance interval reversed": (["txt2img", "--guidance-interval", "0.8,0.3"], "--guidance-interval"),
    "guidance interval not numbers": (["txt2img", "--guidance-interval", "mid"], "LO,HI"),
    # The library names its parameters (seed, num_images, inpaint_model ...); the command line words them as flags.
    "seed below 0": (["txt2img", "--seed", "-1"], "error: --seed must be between 0 and"),
    "no images": (["txt2img", "--num-images", "0"], "error: --num-images must be at least 1"),
    "missing inpaint model": (["inpaint", "--inpaint-model", "./no/such/model", "--image", "{image}", "--mask",
                               "{mask}"], "error: --inpaint-model: "),
    "depth estimator without controlnet": (["depth2img", "--image", "{image}", "--depth-estimator", "{image}"],
                                           "error: --depth-estimator is used by .* pass --controlnet too"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_exit_2_and_write_nothing(case, tiny_models, files, misfit_lora, tmp_path, capsys):
    argv, message = ERRORS[case]
    values = dict(files, missing=str(tmp_path / "missing.png"), misfit=misfit_lora)
    argv = [a.format(**values) for a in argv]
    if "--model" not in argv and "--from-png" not in argv:
        argv += ["--model", str(tiny_models["sd1"])]
    if "--from-png" not in argv:
        argv += ["--prompt", "x"]
    if "--steps" not in argv and "--from-png" not in argv:
        argv += ["--steps", "2"]
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, *argv, "--out", out_dir)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("sdtune: error:"), err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err and out == ""
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_entry_point_script_reports_errors_without_traceback(tmp_path):
    """infer/generate.py runs the same code; a bad flag value is one line and exit code 2."""
    proc = subprocess.run([sys.executable, str(ROOT / "infer" / "generate.py"), "txt2img", "--prompt", "x",
                           "--width", "30", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sdtune: error: --width must be a positive multiple of 8 (the VAE works on 8-pixel blocks), got 30; try 32"]
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not embedded.has_embedded("base"), reason="data/models is not built")
def test_vae_tiling_decodes_large_images_in_tiles_and_is_recorded(tmp_path, capsys):
    from sdtune.generation.metadata import read_params

    model = embedded.embedded_model("base")  # VAE sample size 64: a 192 px image is decoded in 3x3+ tiles
    # 10 steps: a 3-step picture is mostly noise, where each tile's own group-norm statistics show most
    args = ("txt2img", "--model", model, "--prompt", "a photo of a red ball on snow", "--steps", 10, "--seed", 1,
            "--width", 192, "--height", 192)
    code, out, err = run_cli(capsys, *args, "--out", tmp_path / "whole")
    assert code == 0, err
    (whole,) = [Path(line) for line in out.split()]
    code, out, err = run_cli(capsys, *args, "--vae-tiling", "--out", tmp_path / "tiled")
    assert code == 0, err
    (tiled,) = [Path(line) for line in out.split()]
    a, b = png_pixels(whole).astype(int), png_pixels(tiled).astype(int)
    assert read_params(tiled)["vae_tiling"] is True and read_params(whole)["vae_tiling"] is False
    assert 0 < np.abs(a - b).max()  # tiles really were used (blended seams differ)...
    assert np.abs(a - b).mean() < 10  # ...and the picture is the same one (v2 family measured: 7.4 of 255)
    code, out, err = run_cli(capsys, "--from-png", tiled, "--out", tmp_path / "again")
    assert code == 0, err
    assert np.array_equal(png_pixels(Path(out.split()[0])), png_pixels(tiled))


def test_compile_flag_compiles_the_engines_unets(tiny_models, tmp_path, capsys, monkeypatch):
    """--compile reaches Engine.compile_unets (the compiled output itself is checked in test_engine)."""
    from sdtune.generation.engine import Engine

    calls = []
    monkeypatch.setattr(Engine, "compile_unets", lambda self: calls.append(sorted(self.unets)))
    base = ("txt2img", "--model", tiny_models["sd1"], "--prompt", "a boat", "--steps", 2)
    code, _, err = run_cli(capsys, *base, "--out", tmp_path / "plain")
    assert code == 0, err
    assert calls == []
    code, _, err = run_cli(capsys, *base, "--compile", "--out", tmp_path / "compiled")
    assert code == 0, err
    assert calls == [["base"]]


def test_a_lora_without_model_generates_on_the_base_it_was_trained_on(tiny_models, files, tmp_path, capsys):
    """``sdtune infer --lora RUN`` with no --model takes the base the run recorded (here a tiny SD model, which
    the embedded default would not fit), and says so in one line."""
    from sdtune.training import dreambooth
    from sdtune.training.config import config_from_dict

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.open(files["image"]).rotate(90 * i).save(photos / f"{i}.png")
    run = tmp_path / "run"
    dreambooth.train(config_from_dict(dict(model=str(tiny_models["sd1"]), instance_dir=str(photos), resolution=32,
                                           instance_prompt="a photo of sks dog", max_steps=1, output_dir=str(run))))
    code, out, err = run_cli(capsys, "txt2img", "--lora", run, "--prompt", "a photo of sks dog", "--steps", 2,
                             "--out", tmp_path / "out")
    assert code == 0, err
    assert f"--model {tiny_models['sd1']} (the base the LoRA was trained on" in err
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
