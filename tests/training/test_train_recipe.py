"""The DreamBooth recipe end to end on tiny random models (32 px, a few steps, CPU)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.training import adapters, checkpointing
from sdtune.training.config import TrainConfig, config_from_dict
from sdtune.training import dreambooth

recipe = dreambooth
ROOT = Path(__file__).resolve().parents[2]


def make_images(folder: Path, n: int, seed: int = 0, size=(36, 40)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = np.zeros((size[1], size[0], 3), np.uint8)
        a[:, : size[0] // 2] = rng.integers(0, 255, 3)  # a two-tone "subject", different per image
        a[size[1] // 3: size[1] // 2] = 255
        Image.fromarray(a).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def subject(tmp_path):
    return make_images(tmp_path / "subject", 3)


def config(tiny_models, subject, out, **overrides) -> TrainConfig:
    base = dict(model=str(tiny_models["sd1"]), instance_dir=str(subject), instance_prompt="a photo of sks dog",
                resolution=32, max_steps=3, train_batch_size=1, learning_rate=1e-3, caption_dropout=0.0,
                output_dir=str(out), seed=0)
    base.update(overrides)
    return config_from_dict(base)


def sample(pipe, prompt="a photo of sks dog"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def stock(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def test_lora_run_with_prior_and_text_encoder_loads_into_stock_diffusers(tiny_models, subject, tmp_path):
    class_dir = make_images(tmp_path / "class", 2, seed=1)
    out = tmp_path / "out"
    cfg = config(tiny_models, subject, out, train_text_encoder=True, with_prior_preservation=True,
                 class_prompt="a photo of dog", class_dir=str(class_dir), num_class_images=2,
                 prior_loss_weight=0.5, caption_dropout=0.3, random_flip=True, lora_rank=4, lora_alpha=8,
                 validation_prompts=["a sks dog"], validation_steps=2, checkpoint_every=2)
    result = recipe.train(cfg)
    assert result.global_step == 3 and all(np.isfinite(result.losses))

    for name in ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md",
                 "checkpoint-2/sdtune_state.json", "samples/final-0.png"]:
        assert (out / name).is_file(), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent)).Reload()
    assert {"loss", "instance_loss", "prior_loss", "lr"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("loss")) == 3 and "validation" in events.Tags()["images"]
    with safe_open(str(out / adapters.LORA_FILE), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert json.loads(meta[adapters.CONFIG_METADATA_KEY])["max_steps"] == 3
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    card = (out / "README.md").read_text()
    assert "a photo of sks dog" in card and "3 steps" in card and "samples/final-0.png" in card

    base = sample(stock(tiny_models["sd1"]))
    # What training ended with, sampled through a stock pipeline around the in-memory modules...
    trained = stock(tiny_models["sd1"])
    trained.unet, trained.text_encoder = result.unet, result.text_encoder
    expected = sample(trained)
    # ...equals what stock diffusers gets from the saved folder, and from the kohya export.
    pipe = stock(tiny_models["sd1"])
    pipe.load_lora_weights(out)
    got = sample(pipe)
    kohya = stock(tiny_models["sd1"])
    kohya.load_lora_weights(out, weight_name=adapters.KOHYA_FILE)
    got_kohya = sample(kohya)
    assert np.abs(got - base).max() > 1e-3, "the LoRA did not change the image"
    np.testing.assert_allclose(got, expected, atol=2e-4)
    np.testing.assert_allclose(got_kohya, expected, atol=2e-4)
    k = load_file(str(out / adapters.KOHYA_FILE))
    assert any(n.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down") for n in k)
    assert k["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha"].item() == 8.0


def test_full_v_prediction_run_saves_a_complete_pipeline(tiny_models, subject, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "full"
    cfg = config(tiny_models, subject, out, model=str(tiny_models["sd2v"]), method="full", max_steps=2,
                 learning_rate=1e-4, snr_gamma=5.0, noise_offset=0.05, gradient_checkpointing=True)
    result = recipe.train(cfg)
    assert all(np.isfinite(result.losses))
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    base = StableDiffusionPipeline.from_pretrained(tiny_models["sd2v"]).unet.state_dict()
    saved, trained = pipe.unet.state_dict(), result.unet.state_dict()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(saved[name], trained[name]) and not torch.equal(saved[name], base[name])
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[adapters.CONFIG_METADATA_KEY])["method"] == "full"
    assert "fine-tune" in (out / "README.md").read_text()
    assert not list(out.glob(".*partial*")), "temporary files left behind"


@pytest.mark.slow
def test_loss_falls_when_overfitting_one_image(tiny_models, tmp_path):
    one = make_images(tmp_path / "one", 1)
    cfg = config(tiny_models, one, tmp_path / "fit", method="full", max_steps=10, learning_rate=2e-3,
                 train_batch_size=2)
    losses = recipe.train(cfg).losses
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses  # measured: ~0.5


def test_a_loop_that_dies_gives_the_signal_handlers_back(tiny_models, tmp_path, monkeypatch):
    """The loop's stop-and-checkpoint handlers must not outlive a run that failed of something else."""
    one = make_images(tmp_path / "one", 1)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def broken(*args, **kwargs):
        assert signal.getsignal(signal.SIGINT) not in before  # the loop's own handler is installed
        raise RuntimeError("broken step")

    from sdtune.training import objectives

    monkeypatch.setattr(objectives, "per_example_mse", broken)
    with pytest.raises(RuntimeError, match="broken step"):
        recipe.train(config(tiny_models, one, tmp_path / "out", max_steps=2))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_cache_reuses_latents_and_prompts_and_changes_nothing(tiny_models, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    calls = {"n": 0}
    original = AutoencoderKL.encode

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    one = make_images(tmp_path / "one", 1)
    runs = {}
    for cache in (True, False):
        calls["n"] = 0
        cfg = config(tiny_models, one, tmp_path / f"c{cache}", max_steps=4, caption_dropout=0.5, cache_latents=cache)
        runs[cache] = (recipe.train(cfg), calls["n"])
    (cached, cached_calls), (stock_run, stock_calls) = runs[True], runs[False]
    assert cached_calls == 1 and cached.latent_encodes == 1  # one image, no flips: encoded once
    assert stock_calls == 4  # the stock way: every step
    assert cached.prompt_encodes <= 2 < stock_run.prompt_encodes  # "a photo..." and "" once each
    # Caching is exact: the same posterior draws, so the same trained weights.
    a, b = adapters.unet_lora_state_dict(cached.unet), adapters.unet_lora_state_dict(stock_run.unet)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_latents_persist_on_disk_and_are_rebuilt_when_anything_they_depend_on_changes(tiny_models, tmp_path):
    from sdtune.models.loading import load_pipeline

    images = make_images(tmp_path / "imgs", 2)
    shared = tmp_path / "latents"

    def run(name, **kw):
        cfg = config(tiny_models, images, tmp_path / name, max_steps=2, latent_cache_dir=str(shared), **kw)
        return recipe.train(cfg).latent_encodes

    assert run("first") == 2  # two images, encoded once each and written to disk
    files = sorted(p.name for p in shared.rglob("*.safetensors"))
    assert len(files) == 2
    assert run("again") == 0  # a new run reads them back: no encoder call
    Image.fromarray(np.full((40, 36, 3), 7, np.uint8)).save(images / "img0.png")  # new content
    assert run("changed_image") == 1  # only the changed image
    assert run("flipped", random_flip=True) >= 1  # a flip is another augmentation: new entries
    assert run("other_bucket", resolution=24) == 2  # another size, another entry
    vae_dir = tmp_path / "other_vae"
    pipe = load_pipeline(str(tiny_models["sd1"]), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in pipe.vae.parameters():
            p.mul_(1.01)
    pipe.save_pretrained(vae_dir, safe_serialization=True)
    cfg = config(tiny_models, images, tmp_path / "new_vae", max_steps=2, latent_cache_dir=str(shared),
                 model=str(vae_dir))
    assert recipe.train(cfg).latent_encodes == 2  # another VAE: nothing of the old one is reused
    assert len({p.parent.name for p in shared.rglob("*.safetensors")}) == 2  # one folder per VAE fingerprint
    assert not list(shared.rglob("*.partial"))


def test_dry_run_shows_images_buckets_class_images_and_parameters_without_training(tiny_models, tmp_path, capsys):
    from sdtune.commands.cli import main

    images = make_images(tmp_path / "imgs", 2)
    Image.fromarray(np.zeros((40, 80, 3), np.uint8)).save(images / "wide.png")
    (images / "wide.txt").write_text("sks dog, wide")
    out = tmp_path / "out"
    argv = ["train", str(ROOT / "configs" / "dreambooth_lora.yaml"), "--dry-run", f"model={tiny_models['sd1']}",
            f"instance_dir={images}", "resolution=32", "buckets=auto", f"output_dir={out}",
            f"class_dir={tmp_path / 'cls'}", "num_class_images=3"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "3 image(s)" in text and "80x40 -> bucket 40x24" in text and "'sks dog, wide'" in text
    assert "3 still to generate" in text and "trainable parameters: UNet" in text
    assert "resolved config:" in text and "  buckets: auto" in text and "  resolution: 32" in text  # overrides applied
    assert not out.exists() and not (tmp_path / "cls").exists()  # nothing trained, generated or written
    assert main([*argv, "class_prompts=[a dog on a sofa, a dog at night]"]) == 0
    assert "class images: drawn from 2 class prompts ('a dog on a sofa', ...)" in capsys.readouterr().out
    # a bad input shows in the dry run first, as one line
    (images / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(images / "bad.png")
    assert main(argv) == 2
    assert "bad.txt is not UTF-8" in capsys.readouterr().err


DRIVER = """
import os, signal, sys
import torch
torch.set_num_threads(1)  # as in this test process: same kernels, same float rounding
from sdtune.training import dreambooth
from sdtune.training import checkpointing
from sdtune.training.config import load_config
original = checkpointing.save_checkpoint
def save_then_die(accelerator, output_dir, step, keep):
    path = original(accelerator, output_dir, step, keep)
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # a hard crash right after a checkpoint landed
    return path
checkpointing.save_checkpoint = save_then_die
dreambooth.train(load_config(sys.argv[1], sys.argv[2:]))
"""


def killed_at_checkpoint_2(tmp_path, common: dict, driver: str) -> Path:
    """Run the config ``common`` in a process (``driver``, a template with {kill_at}) that is killed at its second
    checkpoint write; return its output folder, which holds checkpoint-2 and nothing later."""
    out = tmp_path / "killed"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({**common, "output_dir": str(out)}))
    driver_path = tmp_path / "driver.py"
    driver_path.write_text(driver.format(kill_at=2))
    proc = subprocess.run([sys.executable, str(driver_path), str(cfg_path)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert checkpointing.latest_checkpoint(out) == out / "checkpoint-2"
    return out


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(tiny_models, subject, tmp_path):

    class_dir = make_images(tmp_path / "class", 2, seed=1)
    common = dict(model=str(tiny_models["sd1"]), instance_dir=str(subject), instance_prompt="a photo of sks dog",
                  resolution=32, max_steps=4, learning_rate=1e-3, with_prior_preservation=True,
                  class_prompt="a photo of dog", class_dir=str(class_dir), num_class_images=2,
                  caption_dropout=0.3, random_flip=True, train_text_encoder=True, gradient_accumulation_steps=2,
                  lr_scheduler="linear", checkpoint_every=2, checkpoints_keep=1, seed=7)
    whole = recipe.train(config_from_dict({**common, "output_dir": str(tmp_path / "whole")}))

    out = killed_at_checkpoint_2(tmp_path, common, DRIVER)
    assert not (out / adapters.LORA_FILE).exists()

    resumed = recipe.train(config_from_dict({**common, "output_dir": str(out), "resume": "latest"}))
    assert resumed.global_step == 4 and len(resumed.losses) == 2
    np.testing.assert_allclose(resumed.losses, whole.losses[2:], rtol=1e-4)
    with pytest.raises(SdtuneError, match="other trainable weights"):  # a checkpoint of another kind of run
        recipe.train(config_from_dict({**common, "output_dir": str(out), "resume": str(out / "checkpoint-2"),
                                       "train_text_encoder": False}))
    for get in (lambda r: adapters.unet_lora_state_dict(r.unet),
                lambda r: adapters.text_encoder_lora_state_dict(r.text_encoder)):
        a, b = get(whole), get(resumed)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


def test_checkpoints_are_atomic_pruned_and_found(tmp_path, monkeypatch):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(2, 2))
    out = tmp_path / "ck"
    for step in (1, 2, 3):
        checkpointing.save_checkpoint(acc, out, step, keep=2)
    assert [s for s, _ in checkpointing.list_checkpoints(out)] == [2, 3]

    def crash(*args, **kwargs):
        (Path(args[0]) / "half-written").parent.mkdir(parents=True, exist_ok=True)
        (Path(args[0]) / "half-written").write_text("x")
        raise KeyboardInterrupt  # killed mid-save

    monkeypatch.setattr(acc, "save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(acc, out, 4, keep=2)
    (out / "checkpoint-9").mkdir()  # no state file: not a checkpoint
    assert checkpointing.resolve_resume("latest", out) == out / "checkpoint-3"
    assert checkpointing.checkpoint_step(out / "checkpoint-3") == 3
    assert (out / ".checkpoint-4.partial").exists()
    checkpointing.remove_partials(out)
    assert not (out / ".checkpoint-4.partial").exists() and (out / "checkpoint-3").is_dir()
    assert checkpointing.resolve_resume("latest", tmp_path / "empty") is None
    with pytest.raises(SdtuneError, match="not an sdtune checkpoint"):
        checkpointing.resolve_resume(str(out / "checkpoint-9"), out)
    del model


def test_adamw8bit_is_refused_off_cuda():
    cfg = TrainConfig(optimizer="adamw8bit")
    with pytest.raises(SdtuneError, match="CUDA"):
        recipe.make_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], torch.device("cpu"))


def test_micro_steps_are_numbered_across_processes_and_accumulation():
    seen = [recipe.micro_step(step, micro, rank, 2, 3) for step in range(2) for micro in range(3) for rank in (0, 1)]
    assert seen == list(range(12))  # every process's every micro-step its own index, none twice


def test_cli_train_help_bad_config_and_a_real_run(tiny_models, subject, tmp_path, capsys):
    from sdtune.commands.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "accelerate launch" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("instance_dir: x\ninstance_prompt: a sks dog\nlearning_rat: 1e-4\n")
    assert main(["train", str(bad)]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(f"model: {tiny_models['sd1']}\ninstance_dir: {subject}\ninstance_prompt: a sks dog\n"
                    f"resolution: 32\nmax_steps: 5\noutput_dir: {tmp_path / 'cli'}\n")
    assert main(["train", str(good), "max_steps=1", "method=full"]) == 0
    assert (tmp_path / "cli" / "model_index.json").is_file() and "done: 1 steps" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["dreambooth_lora", "dreambooth_full", "sd15_lora", "sd21_v_lora"])
def test_example_configs_are_valid(name):
    from sdtune.training.config import load_config

    path = ROOT / "configs" / f"{name}.yaml"
    # adamw8bit is CUDA-only and refused here by design; everything else must validate as shipped.
    cfg = load_config(path, [] if torch.cuda.is_available() else ["optimizer=adamw"])
    assert cfg.instance_prompt and cfg.output_dir


@pytest.mark.slow
def test_compiled_unet_trains_the_same_lora(tiny_models, subject, tmp_path):
    """compile: true changes how the UNet runs, not what it learns or the names it saves under."""
    plain = recipe.train(config(tiny_models, subject, tmp_path / "plain"))
    compiled = recipe.train(config(tiny_models, subject, tmp_path / "compiled", compile=True))
    a = load_file(str(tmp_path / "plain" / adapters.LORA_FILE))
    b = load_file(str(tmp_path / "compiled" / adapters.LORA_FILE))
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    # Adam divides by the gradient's own size, so where a gradient is near zero the compiled kernels'
    # rounding can flip single updates (each about the learning rate); the weights as a whole agree.
    flat = lambda w: torch.cat([w[k].flatten() for k in sorted(w)])  # noqa: E731
    assert (flat(b) - flat(a)).norm() < 0.05 * flat(a).norm()
    np.testing.assert_allclose(compiled.losses, plain.losses, rtol=1e-3)


def test_lora_targets_all_reaches_resnets_and_loads_into_stock_diffusers(tiny_models, subject, tmp_path):
    out = tmp_path / "out"
    result = recipe.train(config(tiny_models, subject, out, lora_targets="all", lora_rank=2))
    keys = list(load_file(str(out / adapters.LORA_FILE)))
    assert any(".resnets." in k and ".conv1." in k for k in keys) and any(".ff.net.2." in k for k in keys)
    kohya = list(load_file(str(out / adapters.KOHYA_FILE)))
    assert any(k.startswith("lora_unet_") and "_resnets_0_conv1.lora_down" in k for k in kohya)
    trained = stock(tiny_models["sd1"])
    trained.unet = result.unet
    pipe = stock(tiny_models["sd1"])
    pipe.load_lora_weights(out)
    np.testing.assert_allclose(sample(pipe), sample(trained), atol=2e-4)


def test_masked_loss_weighs_the_instance_loss_by_each_images_alpha(tiny_models, tmp_path):
    rgb_dir, rgba_dir = make_images(tmp_path / "rgb", 2), tmp_path / "rgba"
    rgba_dir.mkdir()
    for p in sorted(rgb_dir.iterdir()):  # the same pixels, with the left half opaque
        a = np.asarray(Image.open(p).convert("RGB"))
        alpha = np.zeros(a.shape[:2], np.uint8)
        alpha[:, : a.shape[1] // 2] = 255
        Image.fromarray(np.dstack([a, alpha]), "RGBA").save(rgba_dir / p.name)

    def losses(folder, out, **kw):
        return recipe.train(config(tiny_models, folder, tmp_path / out, max_steps=2, **kw)).losses

    plain = losses(rgb_dir, "plain")
    # floor 1 counts every pixel: the RGBA run is then the plain run, so the pixels under alpha 0 are the file's own
    assert np.allclose(losses(rgba_dir, "floor1", masked_loss=True, masked_loss_floor=1.0), plain, rtol=1e-5)
    masked = losses(rgba_dir, "masked", masked_loss=True, masked_loss_floor=0.0)
    assert not np.allclose(masked, plain, rtol=1e-3), (masked, plain)
    # kohya's mean over the pixels: the first step (same weights, same draws) is exactly half, the share unmasked
    by_pixels = losses(rgba_dir, "pixels", masked_loss=True, masked_loss_floor=0.0, masked_loss_mean="pixels")
    assert np.isclose(by_pixels[0], 0.5 * masked[0], rtol=1e-4), (by_pixels, masked)
    shown = recipe.format_dry_run(recipe.dry_run(config(tiny_models, rgba_dir, tmp_path / "dry", masked_loss=True)))
    assert shown.count("mask: alpha") == 2
    with pytest.warns(UserWarning, match="masked_loss is on but no instance image has a mask"):
        losses(rgb_dir, "none", masked_loss=True)
    with pytest.raises(SdtuneError, match="masked_loss_floor must be in"):
        config(tiny_models, rgba_dir, tmp_path / "bad", masked_loss=True, masked_loss_floor=1.5)


def test_output_preservation_adds_the_class_prompts_distance_from_the_base_model(tiny_models, subject, tmp_path):
    def run(out, **kw):
        return recipe.train(config(tiny_models, subject, tmp_path / out, max_steps=3, train_text_encoder=True,
                                   lora_rank=2, class_prompt="a photo of a dog", **kw))

    plain, kept = run("plain"), run("kept", output_preservation_weight=1.0)
    # Step 1: the LoRA starts as a no-op, so the class prompt predicts exactly what the base does - nothing is added,
    # and that term's gradient is zero there too. From step 2 on the LoRA has moved both predictions apart.
    assert np.isclose(kept.losses[0], plain.losses[0], rtol=1e-5), (kept.losses, plain.losses)
    assert kept.losses[1] > plain.losses[1] * (1 + 1e-6) and kept.losses[2] != plain.losses[2]
    shown = recipe.format_dry_run(recipe.dry_run(config(tiny_models, subject, tmp_path / "dry", class_prompt="a photo "
                                                        "of a dog", output_preservation_weight=1.0)))
    assert "output preservation on 'a photo of a dog'" in shown, shown
    card = (tmp_path / "kept" / "README.md").read_text()
    assert "output preservation (weight 1.0)" in card and "output preservation" not in (
        tmp_path / "plain" / "README.md").read_text()
    with pytest.raises(SdtuneError, match="output_preservation_weight compares the model with its LoRA switched off"):
        config(tiny_models, subject, tmp_path / "bad", method="full", output_preservation_weight=1.0)
    with pytest.raises(SdtuneError, match="output_preservation_weight needs class_prompt"):
        config(tiny_models, subject, tmp_path / "bad", output_preservation_weight=1.0)


def test_conditional_pull_adds_p_times_the_distance_to_the_unconditional_prediction(tiny_models, subject, tmp_path):
    def run(out, **kw):
        return recipe.train(config(tiny_models, subject, tmp_path / out, max_steps=2, lora_rank=2, **kw))

    plain, one, two = run("plain"), run("one", conditional_pull=1.0), run("two", conditional_pull=2.0)
    # Step 1 runs the same weights on the same draws, so the pull's term is the only difference, and it scales
    # with p: it is the distance to the unconditional prediction, which a random model's prompt moves away from.
    added = one.losses[0] - plain.losses[0]
    assert added > 1e-6 * plain.losses[0], (one.losses, plain.losses)
    assert np.isclose(two.losses[0] - plain.losses[0], 2 * added, rtol=1e-3), (two.losses, one.losses, plain.losses)
    assert "conditional pull 1.0" in (tmp_path / "one" / "README.md").read_text()
    assert "conditional pull" not in (tmp_path / "plain" / "README.md").read_text()
    with pytest.raises(SdtuneError, match="conditional_pull must be"):
        config(tiny_models, subject, tmp_path / "bad", conditional_pull=-1)


def test_disabled_adapters_give_the_base_models_output_and_come_back(tiny_models):
    base = stock(tiny_models["sd1"]).unet
    unet = stock(tiny_models["sd1"]).unet
    adapters.add_unet_lora(unet, 2, None)
    with torch.no_grad():
        for p in adapters.trainable_parameters(unet):
            p.add_(0.1 * torch.randn_like(p))  # a LoRA that does something
    lora_params = adapters.trainable_parameters(unet)
    x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    text = torch.randn(1, 77, base.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        on = unet(x, t, text).sample
        with adapters.disabled(unet):
            off = unet(x, t, text).sample
        expected = base(x, t, text).sample
    torch.testing.assert_close(off, expected)
    assert not torch.allclose(on, expected, atol=1e-4)
    assert adapters.trainable_parameters(unet) == lora_params  # every adapter weight trains again afterwards
