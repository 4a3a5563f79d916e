"""The course's teaching tools (``sdtune inspect``) on the tiny models."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.commands.cli import main
from sdtune.errors import SdtuneError
from sdtune.generation import teaching
from sdtune.models.loading import load_pipeline
from sdtune.models.schedulers import make_scheduler

# The course's printout for this prompt; the tiny models use the real CLIP vocabulary.
COURSE_IDS = [49406, 320, 3086, 539, 320, 4062, 1059, 49407]
COURSE_TOKENS = ["<|startoftext|>", "a", "painting", "of", "a", "floo", "ble", "<|endoftext|>"]


@pytest.fixture(scope="module")
def sd2v(tiny_models):
    return load_pipeline(tiny_models["sd2v"])


def test_tokens_like_the_course(sd2v):
    report = teaching.inspect_tokens(sd2v, "A painting of a flooble")
    assert report.ids == COURSE_IDS
    assert report.tokens == COURSE_TOKENS
    dim = sd2v.text_encoder.config.hidden_size
    assert report.real_shape == (1, 8, dim)
    assert report.padded_shape == (1, 77, dim)
    text = teaching.format_tokens(report)
    assert "49406 -> <|startoftext|>" in text.splitlines()
    assert "4062 -> floo" in text.splitlines()


def test_tokens_of_a_prompt_longer_than_77(sd2v):
    report = teaching.inspect_tokens(sd2v, "red " * 100)
    assert len(report.ids) == 102 and report.real_shape[1] == 77 and report.padded_shape[1] == 77
    assert "102 tokens: more than the text encoder's 77" in teaching.format_tokens(report)


def test_tokens_cli_uses_embedded_model_by_default(tiny_models, monkeypatch, tmp_path, capsys):
    import sdtune.models.embedded as embedded

    (tmp_path / "base").symlink_to(tiny_models["sd1"], target_is_directory=True)
    monkeypatch.setattr(embedded, "MODELS_DIR", tmp_path)
    assert main(["inspect", "tokens", "A painting of a flooble"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Input ID -> decoded token"
    assert out[1:9] == [f"{i} -> {t}" for i, t in zip(COURSE_IDS, COURSE_TOKENS)]
    assert "torch.Size([1, 8, 32])" in out[9] and "torch.Size([1, 77, 32])" in out[10]


def test_missing_embedded_model_is_one_clear_line(monkeypatch, tmp_path, capsys):
    import sdtune.models.embedded as embedded

    monkeypatch.setattr(embedded, "MODELS_DIR", tmp_path)
    assert main(["inspect", "unet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdtune: error: the embedded base model is missing")


def test_vae_roundtrip_shapes_and_error(sd2v):
    report = teaching.vae_roundtrip(sd2v, size=32)
    assert report.input_shape == (1, 3, 32, 32)
    assert report.latent_shape == (1, 4, 16, 16)  # the tiny VAE downsamples by 2
    assert report.decoded_shape == (1, 3, 32, 32)
    assert report.scaling_factor == pytest.approx(sd2v.vae.config.scaling_factor) == pytest.approx(0.18215)
    # The error is measured, not made up: recompute it from the two images the report returns.
    a = np.asarray(report.input_image, np.float64) / 255
    b = np.asarray(report.decoded_image, np.float64) / 255
    assert report.mse == pytest.approx(((a - b) ** 2).mean(), abs=2e-3)
    assert report.psnr == pytest.approx(10 * math.log10(1 / report.mse))
    # The latent really is scaling_factor x the encoder's mean.
    x = teaching._pil_to_tensor(report.input_image)
    with torch.no_grad():
        mean = sd2v.vae.encode(x).latent_dist.mean
        decoded = sd2v.vae.decode(mean).sample
    assert np.abs(np.asarray(teaching._tensor_to_pil(decoded), int) - np.asarray(report.decoded_image, int)).max() <= 1
    with pytest.raises(SdtuneError, match="multiple of 2"):
        teaching.vae_roundtrip(sd2v, size=31)


def test_vae_cli_with_image_writes_files(tiny_models, tmp_path, capsys):
    src = Image.new("RGB", (80, 40), (200, 30, 30))
    src.paste((20, 20, 220), (40, 0, 80, 40))
    src.save(tmp_path / "in.png")
    out = tmp_path / "vae"
    assert main(["inspect", "vae", "--model", str(tiny_models["sd1"]), "--image", str(tmp_path / "in.png"),
                 "--size", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Encoded latents shape: torch.Size([1, 4, 8, 8])" in text and "0.18215" in text
    assert "PSNR" in text and "MSE" in text
    inp = Image.open(out / "input.png")
    assert inp.size == (16, 16)
    # Centre crop of a red|blue picture 80x40 -> the middle 40x40: left half red, right half blue.
    px = np.asarray(inp)
    assert px[8, 2, 0] > 150 and px[8, 13, 2] > 150
    assert Image.open(out / "decoded.png").size == (16, 16)
    pair = Image.open(out / "side_by_side.png")
    assert pair.width >= 2 * teaching.MIN_TILE
    assert not any(p.name.endswith(".partial") for p in out.iterdir())


def test_vae_cli_missing_image(tiny_models, tmp_path, capsys):
    rc = main(["inspect", "vae", "--model", str(tiny_models["sd1"]), "--image", str(tmp_path / "nope.png"),
               "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "image not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_schedule_plot_and_config(tiny_models, tmp_path, capsys):
    out = tmp_path / "schedule.png"
    assert main(["inspect", "schedule", "--model", str(tiny_models["sd2v"]), "--scheduler", "lms",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Scheduler config: LMSDiscreteScheduler {")
    assert '"prediction_type": "v_prediction"' in text  # carried over from the model's own config
    img = Image.open(out)
    assert img.format == "PNG" and img.width > 300
    # A plot, not a blank canvas: a good share of non-white pixels (curve, axes, labels).
    arr = np.asarray(img.convert("L"))
    assert (arr < 200).mean() > 0.01


def test_unet_dummy_call_shapes(tiny_models):
    pipe = load_pipeline(tiny_models["inpaint"])
    info = teaching.unet_dummy_call(pipe)
    assert info["latents_shape"] == (1, 9, 16, 16)  # latents + mask + masked-image latents
    assert info["text_embeddings_shape"] == (1, 77, 32)
    assert info["output_shape"] == (1, 4, 16, 16)  # the UNet predicts noise for the 4 latent channels
    assert info["timestep"] == int(pipe.scheduler.timesteps[0])
    assert "UNet output shape: torch.Size([1, 4, 16, 16])" in teaching.format_unet(info)


def test_guidance_grid_same_seed_per_scale(sd2v):
    grid, images = teaching.guidance_grid(sd2v, "a red fox", [1.1, 8, 12], seed=42, steps=2, width=32, height=32)
    assert len(images) == 3
    arrays = [np.asarray(im, int) for im in images]
    assert np.abs(arrays[0] - arrays[1]).max() > 0 and np.abs(arrays[1] - arrays[2]).max() > 0
    # Each tile is what the stock pipeline gives for that scale and seed 42.
    ref = sd2v("a red fox", guidance_scale=8, num_inference_steps=2, width=32, height=32,
               generator=torch.Generator("cpu").manual_seed(42)).images[0]
    assert np.array_equal(np.asarray(ref), np.asarray(images[1]))
    tile = teaching.MIN_TILE
    assert grid.width == 3 * tile and grid.height > tile
    # Upscaled tile 2 sits under its label strip, pixel for pixel (nearest neighbour).
    label_h = grid.height - tile
    crop = grid.crop((tile, label_h, 2 * tile, grid.height)).resize((32, 32), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(crop), np.asarray(images[1]))
    # The label strip carries text (dark pixels on white).
    assert (np.asarray(grid.crop((0, 0, tile, label_h)).convert("L")) < 128).any()


def test_scheduler_grid_restores_scheduler(sd2v):
    own = sd2v.scheduler
    grid, images = teaching.scheduler_grid(sd2v, "a red fox", ["ddim", "euler_a"], seed=1, steps=2,
                                           width=32, height=32)
    assert sd2v.scheduler is own
    assert np.abs(np.asarray(images[0], int) - np.asarray(images[1], int)).max() > 0
    sd2v.scheduler = make_scheduler("euler_a", own.config)
    try:
        ref = sd2v("a red fox", guidance_scale=8, num_inference_steps=2, width=32, height=32,
                   generator=torch.Generator("cpu").manual_seed(1)).images[0]
    finally:
        sd2v.scheduler = own
    assert np.array_equal(np.asarray(ref), np.asarray(images[1]))


def test_grid_clis_and_their_errors(tiny_models, tmp_path, capsys):
    model = str(tiny_models["sd1"])
    out = tmp_path / "cfg.png"
    assert main(["inspect", "guidance", "--model", model, "--prompt", "a fox", "--scales", "1.1,8",
                 "--steps", "1", "--width", "32", "--height", "32", "--out", str(out)]) == 0
    assert Image.open(out).width == 2 * teaching.MIN_TILE
    bad = [
        (["schedulers", "--names", "pndm,nope"], "unknown scheduler 'nope'"),
        (["guidance", "--scales", "1,x"], "not a comma-separated list of numbers"),
        (["guidance", "--width", "30"], "multiple of 8"),
        (["guidance", "--steps", "0"], "at least 1"),
    ]
    for extra, message in bad:
        rc = main(["inspect", extra[0], "--model", model, "--prompt", "p", "--out", str(tmp_path / "x.png"),
                   *extra[1:]])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (extra, err)
    assert not (tmp_path / "x.png").exists()
    rc = main(["inspect", "guidance", "--model", str(tiny_models["inpaint"]), "--prompt", "p", "--steps", "1",
               "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "text-to-image model" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.png")
