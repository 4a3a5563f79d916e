"""DreamBooth for SDXL on tiny random SDXL models (32 px, a few steps, CPU): LoRA on the UNet and both text
encoders, full fine-tuning, time ids under buckets and crops, caption dropout's zeros, caches, outputs that stock
diffusers loads to the same image, and a LoRA from the recipe changing all four SDXL modes of the engine."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdtune.training.config import config_from_dict
from sdtune.training import dreambooth

from test_train_recipe import ROOT, make_images  # the same two-tone subjects as the SD tests

recipe = dreambooth
PROMPT = "a photo of sks dog"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def config(model, subject, out, **overrides):
    base = dict(model=str(model), instance_dir=str(subject), instance_prompt=PROMPT, resolution=32, max_steps=3,
                train_batch_size=1, learning_rate=1e-3, caption_dropout=0.0, output_dir=str(out), seed=0)
    base.update(overrides)
    return config_from_dict(base)


def sample(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=2, height=32, width=32, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl, tmp_path_factory):
    """One SDXL LoRA run (UNet + both text encoders, prior preservation, caption dropout, min-SNR, noise offset,
    flips and buckets), shared by the tests below."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("xl_lora_run")
    subject = make_images(tmp / "subject", 3)
    class_dir = make_images(tmp / "class", 2, seed=1)
    out = tmp / "out"
    cfg = config(tiny_sdxl["sdxl"], subject, out, train_text_encoder=True, with_prior_preservation=True,
                 class_prompt="a photo of dog", class_dir=str(class_dir), num_class_images=2, caption_dropout=0.3,
                 random_flip=True, lora_rank=4, lora_alpha=8, snr_gamma=5.0, noise_offset=0.05, max_steps=4,
                 learning_rate=5e-3, validation_prompts=["a sks dog"], validation_steps=2)
    return recipe.train(cfg), out


def test_sdxl_lora_trains_unet_and_both_text_encoders(lora_run):
    result, out = lora_run
    assert result.global_step == 4 and all(np.isfinite(result.losses))
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md", "samples/final-0.png"):
        assert (out / name).is_file(), name
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(prefix) for k in keys), prefix
    with safe_open(str(out / "lora_kohya.safetensors"), framework="pt") as f:
        kohya = list(f.keys())
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        assert any(k.startswith(prefix) for k in kohya), prefix
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)  # kohya's SDXL (original UNet) names
    assert not any(k.startswith("lora_unet_down_blocks_") for k in kohya)
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "stable-diffusion-xl" in card


def test_engine_reads_the_kohya_sdxl_file_as_the_diffusers_one(tiny_sdxl, lora_run):
    from sdtune.generation.engine import Engine
    from sdtune.models.loading import load_pipeline

    _, out = lora_run
    a = Engine.load(tiny_sdxl["sdxl"], lora=out / "pytorch_lora_weights.safetensors")
    b = Engine.load(tiny_sdxl["sdxl"], lora=out / "lora_kohya.safetensors")
    plain = load_pipeline(tiny_sdxl["sdxl"])
    for name, x, y, base in (("unet", a.unets["base"], b.unets["base"], plain.unet),
                             ("text_encoder", a.text_encoder, b.text_encoder, plain.text_encoder),
                             ("text_encoder_2", a.text_encoder_2, b.text_encoder_2, plain.text_encoder_2)):
        sa, sb, s0 = x.state_dict(), y.state_dict(), base.state_dict()
        assert sa.keys() == sb.keys() == s0.keys(), name
        assert any(not torch.equal(sa[k], s0[k]) for k in sa), name  # the LoRA reached it
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=1e-5, rtol=1e-5)


def test_sdxl_lora_loads_into_stock_diffusers_to_the_same_image_in_both_formats(tiny_sdxl, lora_run):
    from diffusers import StableDiffusionXLPipeline

    from sdtune.generation.engine import Engine

    _, out = lora_run
    plain = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl["sdxl"])
    before = sample(plain)
    images = {}
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl["sdxl"])
        pipe.load_lora_weights(str(out), weight_name=name)
        images[name] = sample(pipe)
    assert np.abs(images["pytorch_lora_weights.safetensors"] - before).max() > 0.02  # the LoRA does something
    assert np.abs(images["pytorch_lora_weights.safetensors"] - images["lora_kohya.safetensors"]).max() < 1e-4
    ours = Engine.load(tiny_sdxl["sdxl"], lora=out).generate("txt2img", prompt=PROMPT, steps=2, guidance=5.0,
                                                             seed=0)[0]
    stock_pixels = (images["pytorch_lora_weights.safetensors"][0] * 255).round()
    assert np.abs(np.asarray(ours.image, dtype=np.float64) - stock_pixels).max() <= 1


def test_sdxl_lora_from_the_recipe_changes_all_four_modes(tiny_sdxl, lora_run, tmp_path):
    from sdtune.generation.engine import Engine

    _, out = lora_run
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(tmp_path / "in.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "mask.png")
    common = dict(inpaint_model=tiny_sdxl["sdxl_inpaint"], controlnet=tiny_sdxl["sdxl_controlnet"],
                  depth_estimator=tiny_sdxl["depth_estimator"])
    plain, tuned = Engine.load(tiny_sdxl["sdxl"], **common), Engine.load(tiny_sdxl["sdxl"], lora=out, **common)
    for mode in ("txt2img", "img2img", "inpaint", "depth2img"):
        kw = dict(prompt=PROMPT, steps=2, seed=1)
        if mode != "txt2img":
            kw["image"] = str(tmp_path / "in.png")
        if mode == "inpaint":
            kw["mask"] = str(tmp_path / "mask.png")
        a = np.asarray(plain.generate(mode, **kw)[0].image, dtype=np.int16)
        b = np.asarray(tuned.generate(mode, **kw)[0].image, dtype=np.int16)
        assert np.abs(a - b).max() > 2, mode


def test_time_ids_follow_the_image_its_bucket_crop_and_flip(tmp_path):
    """(original h, w, crop top, left, target h, w): 81x40 photo -> bucket 40x24 -> scaled to 49x24, cropped 4 px
    from the left (center); mirrored, the crop's left edge in the mirrored image is 49 - 4 - 40 = 5."""
    from sdtune.training.data import TrainingData, collate
    from sdtune.training.sources import Source, read_examples

    make_images(tmp_path / "wide", 1, size=(81, 40))
    examples = read_examples(Source(instance_dir=str(tmp_path / "wide")), default_caption=PROMPT)
    data = TrainingData(examples, resolution=32, buckets=[(40, 24), (32, 32)], center_crop=True, random_flip=True)
    seen = {}
    for epoch in range(12):
        ex = data.example("instance", 0, epoch)
        flipped = ex["key"][2]
        seen[flipped] = ex["time_ids"]
        assert tuple(ex["pixels"].shape) == (3, 24, 40)
    assert seen == {False: (40, 81, 0, 4, 24, 40), True: (40, 81, 0, 5, 24, 40)}
    square = TrainingData(examples, resolution=32, center_crop=True).example("instance", 0, 0)
    assert square["time_ids"] == (40, 81, 0, (65 - 32) // 2, 32, 32)  # 81x40 covers 32x32 at 65x32
    # Random crops: each draw's own offset, and the pixels are that crop of the image scaled to cover the bucket.
    from sdtune.training.data import to_tensor

    scaled = examples[0].image().resize((49, 24), Image.LANCZOS)
    random_data = TrainingData(examples, resolution=32, buckets=[(40, 24)], center_crop=False)
    lefts = set()
    for epoch in range(8):
        r = random_data.example("instance", 0, epoch)
        _, _, top, left, _, _ = r["time_ids"]
        lefts.add(left)
        assert top == 0 and 0 <= left <= 9
        assert torch.equal(r["pixels"], to_tensor(scaled.crop((left, 0, left + 40, 24))))
    assert len(lefts) > 1
    batch = collate([ex, ex])[0]
    assert batch["time_ids"].shape == (2, 6) and batch["time_ids"].dtype == torch.float32


def test_recipe_conditions_the_unet_on_each_examples_time_ids(tiny_sdxl, tmp_path, monkeypatch):
    from sdtune.training import sdxl as sdxl_parts

    seen = []
    original = sdxl_parts.added_cond

    def spy(pooled, time_ids, dtype):
        seen.append((pooled.shape, time_ids.tolist()))
        return original(pooled, time_ids, dtype)

    monkeypatch.setattr(sdxl_parts, "added_cond", spy)
    subject = make_images(tmp_path / "wide", 2, size=(81, 40))
    recipe.train(config(tiny_sdxl["sdxl"], subject, tmp_path / "out", buckets=[[40, 24]], max_steps=2,
                        train_batch_size=2))
    assert len(seen) == 2
    for pooled_shape, rows in seen:
        assert tuple(pooled_shape) == (2, 32)  # text_encoder_2's projection
        assert rows == [[40.0, 81.0, 0.0, 4.0, 24.0, 40.0]] * 2


def test_caption_dropout_uses_zeros_as_sdxls_pipelines_do(tiny_sdxl):
    from sdtune.models.loading import load_pipeline
    from sdtune.training.sdxl import XLPromptEncoder

    pipe = load_pipeline(tiny_sdxl["sdxl"])
    toks, tes = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    long = PROMPT + ", " + ", ".join(f"word{i}" for i in range(40))  # two windows
    prompts = [PROMPT, "", long]
    for zeros in (True, False):
        cached = XLPromptEncoder(toks, tes, "cpu", cache=True, force_zeros_for_empty_prompt=zeros)
        fresh = XLPromptEncoder(toks, tes, "cpu", cache=False, force_zeros_for_empty_prompt=zeros)
        (e1, p1), (e2, p2) = cached(prompts), fresh(prompts)
        assert e1.shape[0] == 3 and e1.shape[1] >= 154 and e1.shape[1] % 77 == 0 and e1.shape[2] == 80
        assert p1.shape == (3, 32)
        torch.testing.assert_close(e1, e2, atol=1e-5, rtol=1e-5)  # the cache changes nothing
        torch.testing.assert_close(p1, p2, atol=1e-5, rtol=1e-5)
        pos, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu")  # a caption: exactly the stock embedding
        torch.testing.assert_close(e1[0, :77], pos[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(p1[0], pooled[0], atol=1e-6, rtol=1e-6)
        if zeros:
            assert e1[1].abs().max() == 0 and p1[1].abs().max() == 0
        else:  # the encoded empty prompt, what the stock pipeline gives for negative_prompt=""
            _, neg, _, neg_pooled = pipe.encode_prompt(PROMPT, device="cpu", negative_prompt="")
            torch.testing.assert_close(e1[1, :77], neg[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(p1[1], neg_pooled[0], atol=1e-5, rtol=1e-5)
    # The stock pipeline's unconditional branch for an SDXL base (force_zeros_for_empty_prompt) is zeros too.
    assert pipe.config.force_zeros_for_empty_prompt
    _, neg, _, neg_pooled = pipe.encode_prompt(PROMPT, device="cpu")
    assert neg.abs().max() == 0 and neg_pooled.abs().max() == 0
    cached(prompts), fresh(prompts)  # a second step: the frozen encoders run again only without the cache
    assert cached.encoder_calls == 3 and fresh.encoder_calls == 2  # cached: each distinct caption once


def test_sdxl_caches_latents_and_both_encoders_and_changes_nothing(tiny_sdxl, tmp_path):
    from sdtune.training import adapters

    one = make_images(tmp_path / "one", 1)
    runs = {}
    for cache in (True, False):
        runs[cache] = recipe.train(config(tiny_sdxl["sdxl"], one, tmp_path / f"c{cache}", max_steps=3,
                                          caption_dropout=0.5, cache_latents=cache))
    cached, fresh = runs[True], runs[False]
    assert cached.latent_encodes == 1 and fresh.latent_encodes == 3
    assert cached.prompt_encodes <= 2 < fresh.prompt_encodes
    a, b = adapters.unet_lora_state_dict(cached.unet), adapters.unet_lora_state_dict(fresh.unet)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_full_v_prediction_sdxl_run_saves_a_complete_sdxl_folder(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sdtune.models.convert import export_single_file
    from sdtune.models.fixtures import tiny_sdxl_pipeline
    from sdtune.models.loading import describe, load_pipeline

    base = tmp_path / "vbase"
    tiny_sdxl_pipeline("sdxl", prediction_type="v_prediction").save_pretrained(base, safe_serialization=True)
    subject = make_images(tmp_path / "subject", 2)
    out = tmp_path / "full"
    result = recipe.train(config(base, subject, out, method="full", train_text_encoder=True, snr_gamma=5.0,
                                 noise_offset=0.1, max_steps=2, learning_rate=1e-3))
    assert all(np.isfinite(result.losses))
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (out / part).is_dir(), part
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    tuned = StableDiffusionXLPipeline.from_pretrained(out)
    assert describe(tuned).prediction_type == "v_prediction"
    plain = StableDiffusionXLPipeline.from_pretrained(base)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        a, b = getattr(plain, part).state_dict(), getattr(tuned, part).state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a), part  # every trained part moved
    assert np.abs(sample(tuned) - sample(plain)).max() > 0.01
    # One original-layout SDXL file, read back by diffusers' single-file loader to the same weights.
    single = export_single_file(out, tmp_path / "full.safetensors")
    again = load_pipeline(single, config=out)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(tuned, part).state_dict(), getattr(again, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_sdxl_example_config_is_valid():
    from sdtune.training.config import load_config
    
    cfg = load_config(ROOT / "configs" / "sdxl_lora.yaml",
                      [] if torch.cuda.is_available() else ["optimizer=adamw"])
    assert cfg.model == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.resolution == 1024
    assert cfg.buckets == "auto" and cfg.cache_latents


def test_lora_targets_all_sdxl_kohya_file_loads_like_the_diffusers_one(tiny_sdxl, tmp_path):
    """ResNet convolutions, time projections and feed-forward layers too: kohya's original-UNet names for them
    (in_layers_2, emb_layers_1, ...) come back through diffusers' conversion to the same weights."""
    from diffusers import StableDiffusionXLPipeline

    subject = make_images(tmp_path / "subject", 2)
    out = tmp_path / "all"
    recipe.train(config(tiny_sdxl["sdxl"], subject, out, lora_targets="all", max_steps=1, learning_rate=1e-2))
    with safe_open(str(out / "lora_kohya.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any("_in_layers_2." in k for k in keys) and any("_emb_layers_1." in k for k in keys)
    assert any("_ff_net_2." in k for k in keys)
    fused = {}
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl["sdxl"])
        pipe.load_lora_weights(str(out), weight_name=name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        fused[name] = pipe.unet.state_dict()
    plain = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl["sdxl"]).unet.state_dict()
    a, b = fused.values()
    moved = [k for k in a if not torch.equal(a[k], plain[k])]
    assert any("resnets" in k and "conv1" in k for k in moved) and any("time_emb_proj" in k for k in moved)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_sdxl_dry_run_counts_both_text_encoders(tiny_sdxl, tmp_path):
    subject = make_images(tmp_path / "subject", 2)
    lora = recipe.dry_run(config(tiny_sdxl["sdxl"], subject, tmp_path / "o", train_text_encoder=True))
    only_unet = recipe.dry_run(config(tiny_sdxl["sdxl"], subject, tmp_path / "o"))
    assert lora["trainable_parameters"]["unet"] == only_unet["trainable_parameters"]["unet"] > 0
    # rank 4 on q/k/v/out of 2 layers each: 32-wide and 48-wide encoders
    assert lora["trainable_parameters"]["text_encoder"] == 2 * 4 * (2 * 4 * 32) + 2 * 4 * (2 * 4 * 48)


def test_sdxl_class_images_are_generated_by_the_sdxl_base(tiny_sdxl, tmp_path):
    subject = make_images(tmp_path / "subject", 2)
    class_dir = make_images(tmp_path / "class", 1, seed=1)
    result = recipe.train(config(tiny_sdxl["sdxl"], subject, tmp_path / "out", with_prior_preservation=True,
                                 class_prompt="a photo of dog", class_dir=str(class_dir), num_class_images=3,
                                 class_generation_steps=2, max_steps=1))
    made = sorted(p.name for p in class_dir.iterdir())
    assert len(made) == 3 and result.global_step == 1
    assert all(Image.open(class_dir / n).size == (32, 32) for n in made if n.startswith("class_"))


def test_sdxl_output_preservation_runs_the_base_on_the_class_caption(tiny_sdxl, tmp_path):
    """SDXL's two encoders and time ids on the extra rows: step 1 adds nothing (the LoRA is a no-op), step 2 does."""
    one = make_images(tmp_path / "one", 2)
    runs = {w: recipe.train(config(tiny_sdxl["sdxl"], one, tmp_path / f"w{w}", max_steps=2, train_text_encoder=True,
                                   lora_rank=2, class_prompt="a photo of dog", output_preservation_weight=w))
            for w in (0.0, 1.0)}
    plain, kept = runs[0.0].losses, runs[1.0].losses
    assert np.isclose(kept[0], plain[0], rtol=1e-5) and kept[1] > plain[1] * (1 + 1e-6), (kept, plain)
