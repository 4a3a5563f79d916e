"""The embedded-family recipe at micro scale: stock pipelines load its folders, and it is reproducible."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.world import family

ROOT = Path(__file__).resolve().parents[2]

# Tiny sizes, 32 px, a couple of steps per stage: exercises every stage and the folders, not quality.
MICRO = [
    "image_size=32", "threads=1", "renders.count=24", "renders.subject_share=0.2",
    "vae.block_out_channels=[8,16]", "vae.norm_num_groups=4",
    "text_encoder.hidden_size=16", "text_encoder.intermediate_size=32", "text_encoder.num_hidden_layers=1",
    "text_encoder.num_attention_heads=2",
    "unet.block_out_channels=[16,32]", "unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
    "unet.up_block_types=[CrossAttnUpBlock2D,UpBlock2D]", "unet.norm_num_groups=8",
    "depth_estimator.hidden_size=16", "depth_estimator.num_attention_heads=2", "depth_estimator.intermediate_size=16",
    "depth_estimator.neck_hidden_sizes=[8,8,8,8]", "depth_estimator.fusion_hidden_size=8",
    "train.checkpoint_every=2",
] + [f"train.{s}.{k}" for s in ("vae", "base", "guidance", "inpaint", "estimator", "depth") for k in ("steps=3", "batch_size=2")]


def load_recipe():
    name = "sdtune_build_family_recipe"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "train" / "build_family.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def build(out: Path, work: Path, *args: str, overrides=()) -> None:
    sets = [x for o in list(MICRO) + list(overrides) for x in ("--set", o)]
    assert load_recipe().main(["--out", str(out), "--work", str(work), *sets, *args]) == 0


@pytest.fixture(scope="module")
def micro_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    build(root / "out", root / "work")
    return root


def tensors(path: Path) -> dict:
    return load_file(str(path))


def test_three_folders_share_vae_and_text_encoder_in_fp16(micro_family):
    out = micro_family / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["base", "depth", "inpaint"]
    for shared in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        base = tensors(out / "base" / shared)
        for kind in ("inpaint", "depth"):
            other = tensors(out / kind / shared)
            assert base.keys() == other.keys()
            assert all(torch.equal(base[k], other[k]) for k in base)
    for weights in out.rglob("*.safetensors"):
        with safe_open(str(weights), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, weights
    # The tokenizer is CLIP's BPE pair with the real ids, not a 3.6 MB tokenizer.json.
    assert sorted(p.name for p in (out / "base" / "tokenizer").iterdir()) == ["merges.txt", "tokenizer_config.json",
                                                                          "vocab.json"]
    # The inpaint and depth folders ship the shared components once: relative links into base/.
    for kind in ("inpaint", "depth"):
        for shared in family.SHARED:
            link = out / kind / shared
            assert link.is_symlink() and Path(link.readlink()) == Path("..") / "base" / shared, link
        assert family.folder_size(out / kind) < family.folder_size(out / "base")  # its UNet, not base's VAE/CLIP again
    info = json.loads((out / "build_info.json").read_text())
    assert set(info["stages"]) == {"vae", "base", "guidance", "inpaint", "estimator", "depth"}
    # The shipped base is the guided one (the base stage's UNet continued with the conditional pull).
    work = micro_family / "work"
    shipped = tensors(out / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    guided = tensors(work / "guidance" / "unet" / "diffusion_pytorch_model.safetensors")
    plain = tensors(work / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(shipped[k], guided[k].half()) for k in shipped)
    assert not all(torch.equal(shipped[k], plain[k].half()) for k in shipped)
    assert info["stages"]["guidance"]["conditional_pull"] == 1.5


def test_vae_scaling_factor_is_measured(micro_family):
    cfg = json.loads((micro_family / "out" / "base" / "vae" / "config.json").read_text())
    assert cfg["scaling_factor"] != 0.18215 and cfg["scaling_factor"] > 0  # 0.18215 is diffusers' default
    assert (json.loads((micro_family / "work" / "vae" / "done.json").read_text())["scaling_factor"]
            == cfg["scaling_factor"])


def test_stock_pipelines_run_all_four_modes(micro_family):
    from diffusers import (
        StableDiffusionDepth2ImgPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )
    from transformers import CLIPTokenizer

    out = micro_family / "out"
    kw = dict(num_inference_steps=2, output_type="np")
    init = Image.fromarray(np.full((32, 32, 3), 120, np.uint8))
    mask = Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    base = StableDiffusionPipeline.from_pretrained(out / "base", safety_checker=None, requires_safety_checker=False,
                                                   dtype=torch.float32)
    assert base.unet.config.in_channels == 4 and base.scheduler.config.beta_schedule == "scaled_linear"
    assert base.scheduler.config.prediction_type == "v_prediction"  # configs/family.yaml
    assert type(base.scheduler).__name__ == "PNDMScheduler"  # the course's default sampler
    ids = CLIPTokenizer.from_pretrained(out / "base" / "tokenizer")("a photo of sks box").input_ids
    assert ids == [49406, 320, 1125, 539, 48136, 2063, 49407]  # the real CLIP ids
    images = {
        "txt2img": base("a photo of a red ball", height=32, width=32, generator=gen(), **kw).images,
        "img2img": StableDiffusionImg2ImgPipeline(**base.components)("a red ball", image=init, strength=0.6,
                                                                     generator=gen(), **kw).images,
        "inpaint": StableDiffusionInpaintPipeline.from_pretrained(
            out / "inpaint", safety_checker=None, requires_safety_checker=False, dtype=torch.float32)(
            "a red ball", image=init, mask_image=mask, height=32, width=32, generator=gen(), **kw).images,
        "depth2img": StableDiffusionDepth2ImgPipeline.from_pretrained(out / "depth", dtype=torch.float32)(
            "a red ball", image=init, strength=0.8, generator=gen(), **kw).images,
    }
    for mode, img in images.items():
        assert img.shape == (1, 32, 32, 3), mode
        assert np.isfinite(img).all(), mode


def test_same_seed_same_weights_and_resume_is_exact(micro_family, tmp_path):
    # A second build from the same seed gives bit-identical weights.
    build(tmp_path / "out", tmp_path / "work", "--stage", "vae")
    build(tmp_path / "out", tmp_path / "work", "--stage", "base")
    ref = micro_family / "work"
    for part in ("vae/vae/diffusion_pytorch_model.safetensors", "base/unet/diffusion_pytorch_model.safetensors",
                 "base/text_encoder/model.safetensors"):
        a, b = tensors(ref / part), tensors(tmp_path / "work" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    # Interrupted after its step-2 checkpoint, the base stage resumes there and ends where the
    # uninterrupted run did: to float rounding (a few float32 ulps, measured up to 1.2e-7: CPU kernels round
    # differently on a fresh process's first calls), far below one step's update (> 1e-5).
    base = tmp_path / "work" / "base"
    assert [p.name for p in base.glob("checkpoint-*")] == ["checkpoint-2"]
    for p in ("done.json", "unet", "text_encoder"):
        shutil.rmtree(base / p) if (base / p).is_dir() else (base / p).unlink()
    build(tmp_path / "out", tmp_path / "work", "--stage", "base")
    assert json.loads((base / "done.json").read_text())["resumed_from"] == 2
    a, b = tensors(ref / "base/unet/diffusion_pytorch_model.safetensors"), tensors(base / "unet/diffusion_pytorch_model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    first = tensors(ref / "base/checkpoint-2/unet.safetensors")  # one step earlier: clearly different
    assert max((first[k] - a[k]).abs().max().item() for k in a) > 1e-5
    # A different seed gives different weights.
    build(tmp_path / "out2", tmp_path / "work2", "--stage", "vae", overrides=["seed=1"])
    a, b = tensors(ref / "vae/vae/diffusion_pytorch_model.safetensors"), tensors(
        tmp_path / "work2/vae/vae/diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_build_prints_its_own_lines_only(tmp_path, capfd):
    # diffusers warns when a pipeline is cast to fp16 for saving ("modules ... should be kept in float32"); the build
    # shows only its own lines and bars unless --verbose, as every sdtune command does.
    import diffusers

    diffusers.utils.logging.set_verbosity_warning()  # as a fresh process starts, whatever earlier tests set
    build(tmp_path / "out", tmp_path / "work", "--stage", "vae")
    build(tmp_path / "out", tmp_path / "work", "--stage", "base")
    captured = capfd.readouterr()
    assert "float32" not in captured.out + captured.err
    assert "stage" in captured.out  # the build's own record lines are still there


def test_widen_unet_keeps_the_base_function():
    cfg = family.load_config(overrides=MICRO)
    torch.manual_seed(0)
    base = family.build_unet(cfg).eval()
    wide = family.widen_unet(base, 9).eval()
    x, emb = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 16)
    extra = torch.randn(2, 5, 16, 16)
    with torch.no_grad():
        assert torch.allclose(base(x, 10, emb).sample, wide(torch.cat([x, extra], 1), 10, emb).sample, atol=1e-5)


def test_config_overrides_reject_unknown_keys():
    with pytest.raises(SdtuneError, match="unknown key"):
        family.load_config(overrides=["train.base.stepz=3"])
    with pytest.raises(SdtuneError, match="key=value"):
        family.load_config(overrides=["train.base.steps"])
    assert family.load_config(overrides=["train.base.steps=7"])["train"]["base"]["steps"] == 7


def test_config_overrides_use_the_shared_parser(tmp_path):
    with pytest.raises(SdtuneError, match=r"unknown key 'train.base.stepz'; did you mean 'train.base.steps'\? "
                                          r"valid keys: train.base.steps, "):
        family.load_config(overrides=["train.base.stepz=3"])
    with pytest.raises(SdtuneError, match=r"unknown key 'trian.base'; did you mean 'train.base'\? valid keys: seed, "):
        family.load_config(overrides=["trian.base=3"])
    with pytest.raises(SdtuneError, match=r"'\[8' is not a YAML value"):
        family.load_config(overrides=["unet.block_out_channels=[8"])
    assert family.load_config(overrides=["unet.block_out_channels=[8, 16]"])["unet"]["block_out_channels"] == [8, 16]
    bad = tmp_path / "family.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(SdtuneError, match="must be a mapping"):
        family.load_config(bad)
    bad.write_text("seed: [1\n")
    with pytest.raises(SdtuneError, match="is not valid YAML at line"):
        family.load_config(bad)


def test_conditional_pull_adds_the_weighted_distance_to_the_unconditional_prediction(tmp_path):
    # loss = MSE(pred, target) + p * MSE(pred, sg(unconditional pred)): zero extra where the prompt changes nothing,
    # exactly p times the gap otherwise, still differentiable, and an error without the empty prompt's embeddings.
    recipe = load_recipe()
    cfg = family.load_config(overrides=MICRO)
    build = recipe.Build(cfg, tmp_path / "out", tmp_path / "work")
    torch.manual_seed(0)
    unet = family.build_unet(cfg)
    latents, emb, free = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 16), torch.randn(1, 77, 16)
    t = {"leak_free_from": 900, "high_noise_share": 0.5}

    def loss(tt, uncond=None):
        return build.diffusion_loss(unet, latents, None, emb, torch.Generator().manual_seed(7), tt, uncond=uncond)

    plain = loss(t)
    same = build.diffusion_loss(unet, latents, None, free.expand(3, -1, -1), torch.Generator().manual_seed(7),
                                {**t, "conditional_pull": 2.0}, uncond=free)
    assert torch.allclose(same, build.diffusion_loss(unet, latents, None, free.expand(3, -1, -1),
                                                     torch.Generator().manual_seed(7), t), atol=1e-7)
    # Rebuild x_t and the timesteps as diffusion_loss draws them, to compute the gap by hand.
    gen = torch.Generator().manual_seed(7)
    from sdtune.training import objectives
    sched = build.scheduler()
    noise = objectives.sample_noise(latents, gen)
    steps = objectives.sample_timesteps(3, sched.config.num_train_timesteps, gen)
    high = torch.rand(3, generator=gen) < 0.5
    steps = torch.where(high, torch.randint(900, sched.config.num_train_timesteps, (3,), generator=gen), steps)
    noisy = torch.where((steps >= 900).view(-1, 1, 1, 1), noise, objectives.add_noise(sched, latents, noise, steps))
    with torch.no_grad():
        gap = objectives.per_example_mse(unet(noisy, steps, emb).sample,
                                         unet(noisy, steps, free.expand(3, -1, -1)).sample).mean()
    pulled = loss({**t, "conditional_pull": 2.0}, uncond=free)
    assert gap > 1e-6
    assert torch.allclose(pulled - plain, 2.0 * gap, rtol=1e-4, atol=1e-7)
    unet.zero_grad()
    pulled.backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="uncond"):
        loss({**t, "conditional_pull": 2.0})
