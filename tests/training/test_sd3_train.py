"""DreamBooth LoRA on SD 3.5 on tiny random SD3 models (32 px, a few steps, CPU): flow matching with diffusers'
densities and weightings, prior preservation, caption dropout, the LoRA read by stock diffusers to the engine's
pixels and changing the image, exact resume, one-line refusals."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.training import dreambooth
from sdtune.training.config import config_from_dict

from test_train_recipe import make_images

PROMPT = "a photo of sks dog"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def config(model, subject, out, **overrides):
    base = dict(model=str(model), instance_dir=str(subject), instance_prompt=PROMPT, resolution=32, max_steps=3,
                train_batch_size=1, learning_rate=5e-3, caption_dropout=0.0, output_dir=str(out), seed=0,
                lora_rank=4)
    base.update(overrides)
    return config_from_dict(base)


@pytest.fixture(scope="module")
def run(tiny_sd3, tmp_path_factory):
    """One SD3 LoRA run: prior preservation, caption dropout, logit-normal sigmas, a checkpoint at step 2."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("sd3_run")
    subject, class_dir = make_images(tmp / "subject", 3), make_images(tmp / "class", 2, seed=1)
    cfg = config(tiny_sd3["sd3"], subject, tmp / "out", with_prior_preservation=True, class_prompt="a photo of dog",
                 class_dir=str(class_dir), num_class_images=2, caption_dropout=0.3, weighting_scheme="logit_normal",
                 lora_targets="all", checkpoint_every=2, validation_prompts=["a sks dog"], validation_steps=2)
    return dreambooth.train(cfg), cfg, tmp


def test_sd3_lora_run_writes_a_diffusers_sd3_lora(run):
    result, cfg, tmp = run
    out = tmp / "out"
    assert result.global_step == 3 and all(np.isfinite(result.losses)) and len(result.losses) == 3
    state = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert state and all(k.startswith("transformer.") for k in state)
    for part in ("attn.to_q", "attn.add_q_proj", "attn.to_add_out", "attn2.to_q", "ff.net.2", "ff_context.net.0"):
        assert any(f".{part}." in k for k in state), part
    assert (out / "checkpoint-2").is_dir() and (out / "samples" / "final-0.png").is_file()
    assert result.prompt_encodes == 3  # the instance prompt, the class prompt and "" once each: cached


def test_stock_load_lora_weights_gives_the_engines_pixels_and_changes_the_image(run, tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    from sdtune.generation.engine import Engine

    out = run[2] / "out"
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_sd3["sd3"])
    stock.set_progress_bar_config(disable=True)

    def draw():
        return np.asarray(stock(PROMPT, num_inference_steps=2, height=32, width=32, guidance_scale=5.0,
                                generator=torch.Generator("cpu").manual_seed(0)).images[0], dtype=np.int16)

    before = draw()
    stock.load_lora_weights(str(out))
    after = draw()
    assert np.abs(after - before).max() > 8  # the LoRA changes the image
    engine = Engine.load(tiny_sd3["sd3"], lora=out)
    ours = engine.generate("txt2img", prompt=PROMPT, steps=2, guidance=5.0, seed=0, width=32, height=32)[0]
    assert np.abs(np.asarray(ours.image, dtype=np.int16) - after).max() <= 1
    assert ours.params["lora"] is not None and ours.params["lora_fused"] is False


def test_resume_from_a_checkpoint_is_exact(run, tiny_sd3):
    _, cfg, tmp = run
    resumed_dir = tmp / "resumed"
    resumed_dir.mkdir()
    # what a run resumed in its own folder finds there: the checkpoint and the latent cache
    for name in ("checkpoint-2", "latent_cache"):
        shutil.copytree(tmp / "out" / name, resumed_dir / name)
    resumed = dreambooth.train(config_from_dict({**cfg.__dict__, "output_dir": str(resumed_dir), "resume": "latest",
                                                 "validation_prompts": []}))
    assert resumed.global_step == 3 and len(resumed.losses) == 1
    a = load_file(str(tmp / "out" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed_dir / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_flow_matching_objective_follows_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from sdtune.training import flow_matching as fm

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    for scheme in ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none"):
        cfg = config_from_dict(dict(instance_dir="x", instance_prompt="p", weighting_scheme=scheme))
        assert (cfg.logit_mean, cfg.logit_std, cfg.mode_scale) == (0.0, 1.0, 1.29)
        t, s = fm.sample_sigmas(scheduler, 6, cfg, torch.Generator().manual_seed(1))
        u = compute_density_for_timestep_sampling(scheme, 6, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(1))
        idx = (u * 1000).long()
        assert torch.equal(t, scheduler.timesteps[idx].float()) and torch.equal(s, scheduler.sigmas[idx].float())
        assert torch.allclose(fm.loss_weights(cfg, s), compute_loss_weighting_for_sd3(scheme, s).float())
    x0, noise, sig = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([0.25, 0.9])
    assert torch.allclose(fm.noisy_latents(x0, noise, sig)[1], 0.1 * x0[1] + 0.9 * noise[1])
    assert torch.equal(fm.velocity_target(x0, noise), noise - x0)
    assert config_from_dict(dict(instance_dir="x", instance_prompt="p")).weighting_scheme == "none"  # diffusers'


def test_unsupported_sd3_settings_are_one_line(tiny_sd3, tmp_path):
    subject = make_images(tmp_path / "s", 1)
    for key, value in (("method", "full"), ("adapter", "loha"), ("snr_gamma", 5.0)):
        with pytest.raises(SdtuneError, match="not supported for SD 3.x") as err:
            dreambooth.train(config(tiny_sd3["sd3"], subject, tmp_path / f"o_{key}", **{key: value}))
        assert len(str(err.value).splitlines()) == 1


def test_sdtune_train_without_a_yaml_takes_the_sd3_preset(tiny_sd3, tmp_path, capsys):
    """``sdtune train model=SD3_FOLDER ...`` names no config: the model's config says SD 3.x, configs/sd3_lora.yaml
    gives the defaults (its GPU-only settings replaced on a CPU), class images are drawn by the SD3 model."""
    from sdtune.commands.cli import main
    from sdtune.training.presets import load_run_config

    subject = make_images(tmp_path / "subject", 2)
    keys = [f"model={tiny_sd3['sd3']}", f"instance_dir={subject}", f"instance_prompt={PROMPT}",
            "class_prompt=a photo of dog", "num_class_images=1", "class_generation_steps=2", "max_steps=1",
            "validation_prompts=[]", "checkpoint_every=0", f"class_dir={tmp_path / 'class'}",
            f"output_dir={tmp_path / 'out'}"]
    cfg = load_run_config(None, keys)
    assert (cfg.weighting_scheme, cfg.lora_rank, cfg.resolution) == ("none", 16, 32)  # 32: the model's own size
    assert main(["train", *keys]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "class" / "class_0.png").is_file() or any((tmp_path / "class").glob("*.png"))


def test_no_t5_and_gradient_checkpointing(tiny_sd3, tmp_path):
    """``no_t5`` trains without T5 (its LoRA then reads to the same pixels in stock diffusers without T5 and in the
    engine with --no-t5); gradient checkpointing recomputes the same step."""
    from diffusers import StableDiffusion3Pipeline

    from sdtune.generation.engine import Engine

    subject = make_images(tmp_path / "subject", 2)
    plain = dreambooth.train(config(tiny_sd3["sd3"], subject, tmp_path / "a", no_t5=True, max_steps=1, lora_alpha=8))
    checkpointed = dreambooth.train(config(tiny_sd3["sd3"], subject, tmp_path / "b", no_t5=True, max_steps=1,
                                           lora_alpha=8, gradient_checkpointing=True))
    a, b = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert plain.losses == pytest.approx(checkpointed.losses, rel=1e-6)
    assert "no_t5: true" in (tmp_path / "a" / "sdtune_sd3_run.txt").read_text()
    def draw(pipe):
        pipe.set_progress_bar_config(disable=True)
        return np.asarray(pipe(PROMPT, num_inference_steps=2, height=32, width=32, guidance_scale=5.0,
                               generator=torch.Generator("cpu").manual_seed(0)).images[0], dtype=np.int16)

    # lora_alpha 8 on rank 4: the file (which has no alpha) must still give the trained model's pixels
    trained = draw(StableDiffusion3Pipeline.from_pretrained(tiny_sd3["sd3"], text_encoder_3=None, tokenizer_3=None,
                                                            transformer=plain.unet))
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_sd3["sd3"], text_encoder_3=None, tokenizer_3=None)
    stock.load_lora_weights(str(tmp_path / "a"))
    want = draw(stock)
    assert np.abs(want - trained).max() <= 1
    engine = Engine.load(tiny_sd3["sd3"], lora=tmp_path / "a", no_t5=True)
    got = engine.generate("txt2img", prompt=PROMPT, steps=2, guidance=5.0, seed=0, width=32, height=32)[0]
    assert np.abs(np.asarray(got.image, dtype=np.int16) - want).max() <= 1


def test_training_sizes_must_fit_the_patches():
    from types import SimpleNamespace

    from sdtune.training.sd3 import check_sizes

    pipe = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=[1, 2, 3, 4])),
                           transformer=SimpleNamespace(config=SimpleNamespace(patch_size=2)))  # SD3's 8 x 2 = 16
    check_sizes(config_from_dict(dict(instance_dir="x", instance_prompt="p", resolution=1024, buckets="auto")), pipe)
    with pytest.raises(SdtuneError, match="multiples of 16") as err:
        check_sizes(config_from_dict(dict(instance_dir="x", instance_prompt="p", resolution=1016)), pipe)
    assert len(str(err.value).splitlines()) == 1


def test_full_size_sd35_lora_keys_name_the_models_weights():
    """On SD 3.5 Medium's real architecture (meta device), every key of the LoRA file the recipe writes is
    ``transformer.`` + a diffusers module whose ``.weight`` the model has: the names stock diffusers loads and that
    ComfyUI maps for SD3 (its ``transformer.{diffusers name}`` LoRA keys)."""
    from diffusers import SD3Transformer2DModel
    from peft.utils import get_peft_model_state_dict

    from sdtune.training.sd3 import add_lora

    def medium():
        return SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            out_channels=16, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")

    with torch.device("meta"):
        weights = set(medium().state_dict())
        model = medium()
        add_lora(model, config_from_dict(dict(instance_dir="x", instance_prompt="p", lora_rank=4, lora_targets="all")))
    keys = list(get_peft_model_state_dict(model))
    modules = {k.rsplit(".lora_", 1)[0] for k in keys}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert all(m + ".weight" in weights for m in modules)
    # image attention, attn2 (dual blocks), context q/k/v (every block), its output and both feed-forwards (not in the
    # last block, whose context stream ends there)
    assert len(modules) == 24 * 4 + 13 * 4 + 24 * 3 + 23 + 24 * 2 + 23 * 2


def test_dry_run_counts_the_transformers_lora(tiny_sd3, tmp_path):
    from sdtune.training.dry_run import dry_run, format_dry_run

    subject = make_images(tmp_path / "subject", 2)
    report = dry_run(config(tiny_sd3["sd3"], subject, tmp_path / "o", lora_rank=2))
    tp = report["trainable_parameters"]
    assert tp["denoiser"] == "SD3 transformer" and tp["unet"] > 0 and tp["text_encoder"] == 0
    assert "trainable parameters: SD3 transformer" in format_dry_run(report)
    with_clip = dry_run(config(tiny_sd3["sd3"], subject, tmp_path / "o", lora_rank=2, train_text_encoder=True))
    assert with_clip["trainable_parameters"]["text_encoder"] > 0
    with pytest.raises(SdtuneError, match="not supported for SD 3.x"):
        dry_run(config(tiny_sd3["sd3"], subject, tmp_path / "o", method="full"))


def test_sdtune_infer_finds_the_base_model_in_the_lora(run, tiny_sd3, capsys):
    """The LoRA file carries the run's base model (``sdtune_base_model``): ``sdtune infer --lora`` needs no --model."""
    from sdtune.commands.cli import main
    from sdtune.generation.metadata import read_params

    out = run[2] / "out"
    code = main(["infer", "txt2img", "--lora", str(out), "--prompt", PROMPT, "--steps", "2", "--out",
                 str(run[2] / "infer"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (png,) = [line for line in captured.out.splitlines() if line.endswith(".png")]
    params = read_params(png)
    assert params["family"] == "sd3" and params["model"] == str(tiny_sd3["sd3"].resolve())


def test_masked_loss_and_buckets(tiny_sd3, tmp_path):
    """The recipe's masked loss on the flow-matching loss: floor 1 is the plain run; kohya's mean over the pixels is
    half the weighted mean when half of each image is masked (the same draws); buckets and flips run."""
    from PIL import Image

    rgb_dir, rgba_dir = make_images(tmp_path / "rgb", 2), tmp_path / "rgba"
    rgba_dir.mkdir()
    for p in sorted(rgb_dir.iterdir()):
        a = np.asarray(Image.open(p).convert("RGB"))
        alpha = np.zeros(a.shape[:2], np.uint8)
        alpha[:, : a.shape[1] // 2] = 255
        Image.fromarray(np.dstack([a, alpha]), "RGBA").save(rgba_dir / p.name)

    def losses(folder, out, **kw):
        kw = {"max_steps": 1, "no_t5": True, **kw}
        return dreambooth.train(config(tiny_sd3["sd3"], folder, tmp_path / out, **kw)).losses

    plain = losses(rgb_dir, "plain")
    assert np.allclose(losses(rgba_dir, "floor1", masked_loss=True, masked_loss_floor=1.0), plain, rtol=1e-5)
    masked = losses(rgba_dir, "masked", masked_loss=True, masked_loss_floor=0.0)
    by_pixels = losses(rgba_dir, "pixels", masked_loss=True, masked_loss_floor=0.0, masked_loss_mean="pixels")
    assert not np.allclose(masked, plain, rtol=1e-3) and np.isclose(by_pixels[0], 0.5 * masked[0], rtol=1e-4)
    bucketed = losses(rgb_dir, "buckets", buckets="auto", random_flip=True, max_steps=2)
    assert len(bucketed) == 2 and all(np.isfinite(bucketed))


def test_clip_lora_with_train_text_encoder(tiny_sd3, tmp_path):
    """``train_text_encoder``: a LoRA on both CLIP encoders beside the transformer's; the training encoding is the stock
    ``encode_prompt``'s; the file (``transformer.``, ``text_encoder.``, ``text_encoder_2.`` keys, alpha folded in) read
    by stock diffusers gives the trained model's pixels and the engine's, and the CLIP LoRA changes the embeddings."""
    from diffusers import StableDiffusion3Pipeline

    from sdtune.generation.engine import Engine
    from sdtune.models.loading import load_pipeline
    from sdtune.training.sd3 import TrainedSD3Prompts

    base = load_pipeline(tiny_sd3["sd3"])
    with torch.no_grad():
        ours = TrainedSD3Prompts(base, [base.text_encoder, base.text_encoder_2], "cpu")([PROMPT, ""])
        stock = base.encode_prompt([PROMPT, ""], None, None, do_classifier_free_guidance=False)
    assert torch.equal(ours[0], stock[0]) and torch.equal(ours[1], stock[2])

    subject = make_images(tmp_path / "subject", 2)
    cfg = config(tiny_sd3["sd3"], subject, tmp_path / "out", train_text_encoder=True, text_encoder_learning_rate=2e-2,
                 lora_alpha=8, max_steps=2, caption_dropout=0.5, checkpoint_every=1)
    result = dreambooth.train(cfg)
    state = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    for prefix in ("transformer.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(prefix) for k in state), prefix
    (tmp_path / "resumed").mkdir()  # resumed from checkpoint-1 (three models' LoRAs), bit for bit
    for name in ("checkpoint-1", "latent_cache"):
        shutil.copytree(tmp_path / "out" / name, tmp_path / "resumed" / name)
    dreambooth.train(config_from_dict({**cfg.__dict__, "output_dir": str(tmp_path / "resumed"), "resume": "latest"}))
    again = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)

    def draw(pipe):
        pipe.set_progress_bar_config(disable=True)
        return np.asarray(pipe(PROMPT, num_inference_steps=2, height=32, width=32, guidance_scale=5.0,
                               generator=torch.Generator("cpu").manual_seed(0)).images[0], dtype=np.int16)

    trained_pipe = StableDiffusion3Pipeline.from_pretrained(
        tiny_sd3["sd3"], transformer=result.unet, text_encoder=result.text_encoder, text_encoder_2=result.text_encoder_2)
    trained = draw(trained_pipe)
    with torch.no_grad():
        assert not torch.allclose(trained_pipe.encode_prompt(PROMPT, None, None)[0], base.encode_prompt(PROMPT, None, None)[0])
    stock_pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3["sd3"])
    stock_pipe.load_lora_weights(str(tmp_path / "out"))
    stock_image = draw(stock_pipe)
    assert np.abs(stock_image - trained).max() <= 1
    engine = Engine.load(tiny_sd3["sd3"], lora=tmp_path / "out")
    got = engine.generate("txt2img", prompt=PROMPT, steps=2, guidance=5.0, seed=0, width=32, height=32)[0]
    assert np.abs(np.asarray(got.image, dtype=np.int16) - stock_image).max() <= 1
