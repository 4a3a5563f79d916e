"""The shared inference engine on tiny random models: modes, schedulers, determinism, metadata, LoRA."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.errors import SdtuneError

STEPS = 2


def pixels(result_or_image) -> np.ndarray:
    img = getattr(result_or_image, "image", result_or_image)
    return np.asarray(img, dtype=np.int16)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, write_inputs):
    """A 32x32 input image, a mask (white square = repaint) and two different depth maps, as files."""
    d = tmp_path_factory.mktemp("inputs")
    mask2 = Image.new("L", (32, 32), 0)
    mask2.paste(255, (0, 0, 16, 32))
    mask2.save(d / "mask2.png")
    Image.open(write_inputs(d)["depth_lr"]).transpose(Image.Transpose.TRANSPOSE).save(d / "depth_tb.png")
    return {p.stem: str(p) for p in d.iterdir()}


@pytest.fixture(scope="module")
def engine(tiny_models):
    from sdtune.generation.engine import Engine

    return Engine.load(tiny_models["sd1"], inpaint_model=tiny_models["inpaint"], depth_model=tiny_models["depth"])


@pytest.fixture(scope="module")
def plain_engine(tiny_models):
    """Only the ordinary model: inpaint runs on its 4-channel UNet."""
    from sdtune.generation.engine import Engine

    return Engine.load(tiny_models["sd1"])


def make_lora(unet, text_encoder, out_dir, seed=0):
    """A diffusers-format LoRA file (UNet + text encoder), non-zero, as save_lora_weights writes it.

    The text encoder gets peft's in-place injection (transformers' add_adapter needs peft >= 0.22).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                            text_encoder)
    for model in (unet, text_encoder):
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero: randomise so the LoRA does something
                torch.nn.init.normal_(p, std=0.3)
    te_sd = {k.replace(".default.", "."): v.detach().clone() for k, v in text_encoder.state_dict().items()
             if ".lora_A." in k or ".lora_B." in k}
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(te_sd), safe_serialization=True)
    # The file, and the text encoder's peft-keyed A/B tensors (to compute expected fused weights).
    return out_dir / "pytorch_lora_weights.safetensors", te_sd


TE_LORA: dict = {}  # LoRA file -> its text-encoder A/B tensors


@pytest.fixture(scope="module")
def lora_file(tiny_models, tmp_path_factory):
    from sdtune.models.loading import load_pipeline

    pipe = load_pipeline(tiny_models["sd1"])
    path, te_lora = make_lora(pipe.unet, pipe.text_encoder, tmp_path_factory.mktemp("lora"))
    TE_LORA[path] = te_lora
    return path


# ------------------------------------------------------------------ one engine, four modes

def test_modes_share_vae_text_encoder_and_tokenizer(engine):
    pipes = {m: engine.pipeline(m) for m in ("txt2img", "img2img", "inpaint", "depth2img")}
    for pipe in pipes.values():
        assert pipe.vae is engine.vae
        assert pipe.text_encoder is engine.text_encoder
        assert pipe.tokenizer is engine.tokenizer
    assert pipes["txt2img"].unet is pipes["img2img"].unet
    assert pipes["inpaint"].unet.config.in_channels == 9
    assert pipes["depth2img"].unet.config.in_channels == 5
    assert engine.pipeline("txt2img") is pipes["txt2img"]  # cached, not rebuilt


def test_txt2img_defaults_to_native_size_and_is_finite(engine):
    (r,) = engine.generate("txt2img", prompt="a cat", steps=STEPS)
    assert r.image.size == engine.native_size == (32, 32)
    arr = pixels(r)
    assert arr.std() > 0  # not a blank image
    assert r.params["width"] == 32 and r.params["unet"] == "ordinary 4-channel"


def test_img2img_strength_changes_result(engine, inputs):
    a = engine.generate("img2img", prompt="a cat", steps=4, image=inputs["image"], strength=0.5)[0]
    b = engine.generate("img2img", prompt="a cat", steps=4, image=inputs["image"], strength=1.0)[0]
    assert a.image.size == (32, 32)
    assert not np.array_equal(pixels(a), pixels(b))
    assert a.params["strength"] == 0.5 and a.params["image"] == inputs["image"]


def test_img2img_resizes_input_to_requested_size(engine, inputs):
    (r,) = engine.generate("img2img", prompt="x", steps=STEPS, image=inputs["image"], width=48, height=40)
    assert r.image.size == (48, 40)


@pytest.mark.parametrize("which", ["dedicated 9-channel", "ordinary 4-channel"])
def test_inpaint_uses_the_mask(engine, plain_engine, inputs, which):
    eng = engine if which.startswith("dedicated") else plain_engine
    a = eng.generate("inpaint", prompt="a hat", steps=STEPS, image=inputs["image"], mask=inputs["mask"])[0]
    b = eng.generate("inpaint", prompt="a hat", steps=STEPS, image=inputs["image"], mask=inputs["mask2"])[0]
    assert a.params["unet"].startswith(which.split()[0] if which.startswith("ordinary") else "inpainting")
    assert not np.array_equal(pixels(a), pixels(b))


def test_inpaint_paste_back_keeps_the_input_outside_the_mask_exactly(engine, inputs):
    plain = engine.generate("inpaint", prompt="a hat", steps=STEPS, image=inputs["image"], mask=inputs["mask"])[0]
    kept = engine.generate("inpaint", prompt="a hat", steps=STEPS, image=inputs["image"], mask=inputs["mask"],
                           paste_back=True)[0]
    src = np.asarray(Image.open(inputs["image"]).convert("RGB"))
    outside = np.asarray(Image.open(inputs["mask"])) < 128
    assert np.array_equal(pixels(kept)[outside], src[outside])  # the input's own pixels, untouched
    assert not np.array_equal(pixels(plain)[outside], src[outside])  # without it the VAE round trip changes them
    assert np.array_equal(pixels(kept)[~outside], pixels(plain)[~outside])  # the repainted region is the same
    assert kept.params["paste_back"] is True and plain.params["paste_back"] is False
    with pytest.raises(SdtuneError, match="^paste_back is only used by inpaint"):
        engine.generate("img2img", prompt="a hat", steps=STEPS, image=inputs["image"], paste_back=True)


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint", "depth2img"])
def test_generate_many_equals_one_at_a_time(engine, inputs, mode):
    extra = {"txt2img": {}, "img2img": {"image": inputs["image"]},
             "inpaint": {"image": inputs["image"], "mask": inputs["mask"]},
             "depth2img": {"image": inputs["image"], "depth_map": inputs["depth_lr"]}}[mode]
    long = "a photo of " + "a very long prompt " * 20  # two windows: runs in its own pipeline call
    prompts = ["a red hat", "a blue hat", long, "a green hat"]
    requests = [dict(prompt=p, seed=10 + i, **extra) for i, p in enumerate(prompts)]
    batched = engine.generate_many(mode, requests, steps=STEPS, batch_size=4)
    assert [r.params.get("generated_in_batch_of", 1) for r in batched] == [2, 2, 1, 1]
    for req, got in zip(requests, batched):
        one = engine.generate(mode, steps=STEPS, **req)[0]
        assert got.params["prompt"] == req["prompt"] and got.params["seed"] == req["seed"]
        assert np.abs(pixels(got) - pixels(one)).max() <= 2  # float rounding of a batched matmul, nothing more
    assert not np.array_equal(pixels(batched[0]), pixels(batched[1]))  # each image its own prompt and seed


def test_generate_many_checks_every_request_first(engine, inputs):
    with pytest.raises(SdtuneError, match="needs an input image"):
        engine.generate_many("img2img", [dict(prompt="a", image=inputs["image"]), dict(prompt="b")], steps=STEPS)
    with pytest.raises(SdtuneError, match="batch_size"):
        engine.generate_many("txt2img", [dict(prompt="a")], steps=STEPS, batch_size=0)


def test_depth2img_from_estimator_and_from_depth_map(engine, inputs):
    est = engine.generate("depth2img", prompt="a room", steps=4, image=inputs["image"], strength=1.0)[0]
    lr = engine.generate("depth2img", prompt="a room", steps=4, image=inputs["image"], strength=1.0,
                         depth_map=inputs["depth_lr"])[0]
    tb = engine.generate("depth2img", prompt="a room", steps=4, image=inputs["image"], strength=1.0,
                         depth_map=inputs["depth_tb"])[0]
    assert est.params["depth_source"] == "estimator" and lr.params["depth_source"] == "depth_map"
    assert not np.array_equal(pixels(lr), pixels(tb))  # the given depth conditions the UNet
    assert not np.array_equal(pixels(est), pixels(lr))


def test_mode_needing_a_model_that_is_absent_is_a_clear_error(plain_engine, tiny_models, inputs):
    from sdtune.generation.engine import Engine

    with pytest.raises(SdtuneError, match="depth2img is not available"):
        plain_engine.generate("depth2img", prompt="x", steps=STEPS, image=inputs["image"])
    only_inpaint = Engine.load(tiny_models["inpaint"])
    with pytest.raises(SdtuneError, match="txt2img is not available"):
        only_inpaint.generate("txt2img", prompt="x", steps=STEPS)
    (r,) = only_inpaint.generate("inpaint", prompt="x", steps=STEPS, image=inputs["image"], mask=inputs["mask"])
    assert r.params["unet"] == "inpainting 9-channel"


# ------------------------------------------------------------------ schedulers

@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm++2m",
                                  "dpm++2m_karras", "unipc", "ddpm"])
def test_every_scheduler_gives_a_finite_image(engine, name):
    from sdtune.models.schedulers import SCHEDULERS

    (r,) = engine.generate("txt2img", prompt="a cat", steps=2, scheduler=name)
    arr = pixels(r)
    assert arr.shape == (32, 32, 3) and arr.std() > 0
    assert r.params["scheduler"] == name
    assert r.params["scheduler_class"] == SCHEDULERS[name][0]


def test_unknown_scheduler_is_refused(engine):
    with pytest.raises(SdtuneError, match="unknown scheduler"):
        engine.generate("txt2img", prompt="x", steps=STEPS, scheduler="warp9")


# ------------------------------------------------------------------ determinism

@pytest.mark.parametrize("scheduler", [None, "euler_a"])  # euler_a draws fresh noise at every step
def test_same_seed_same_pixels_and_batch_image_equals_single_run(engine, scheduler):
    batch = engine.generate("txt2img", prompt="a dog", steps=3, seed=10, num_images=3, scheduler=scheduler)
    again = engine.generate("txt2img", prompt="a dog", steps=3, seed=10, scheduler=scheduler)
    single = engine.generate("txt2img", prompt="a dog", steps=3, seed=12, scheduler=scheduler)
    assert [r.params["seed"] for r in batch] == [10, 11, 12]
    assert np.array_equal(pixels(batch[0]), pixels(again[0]))
    assert np.array_equal(pixels(batch[2]), pixels(single[0]))
    assert not np.array_equal(pixels(batch[0]), pixels(batch[1]))


def test_img2img_batch_is_deterministic_per_image(engine, inputs):
    batch = engine.generate("img2img", prompt="a dog", steps=4, seed=3, num_images=2, image=inputs["image"])
    single = engine.generate("img2img", prompt="a dog", steps=4, seed=4, image=inputs["image"])
    assert np.array_equal(pixels(batch[1]), pixels(single[0]))


# ------------------------------------------------------------------ metadata

def test_metadata_round_trip_and_regeneration(engine, inputs, tmp_path):
    from sdtune.generation.engine import regenerate
    from sdtune.generation.metadata import read_params, save_results

    results = engine.generate("img2img", prompt="a red barn", negative_prompt="blurry", steps=4, seed=7,
                              guidance=5.0, scheduler="euler", image=inputs["image"], strength=0.75, num_images=2)
    paths = save_results(results, tmp_path)
    assert len(paths) == 2 and all(p.suffix == ".png" for p in paths)
    assert not list(tmp_path.glob("*.partial"))
    for path, result in zip(paths, results):
        params = read_params(path)
        assert params == json.loads(json.dumps(result.params))
        assert json.loads(path.with_suffix(".json").read_text()) == params
        for key in ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler", "width", "height",
                    "mode", "strength", "model", "lora", "lora_scale", "sdtune_version"):
            assert key in params
        assert "a red barn" in Image.open(path).info["parameters"]
    second = read_params(paths[1])
    assert second["seed"] == 8
    (again,) = regenerate(second, engine=engine)
    assert np.array_equal(pixels(again), np.asarray(Image.open(paths[1]).convert("RGB"), dtype=np.int16))


def test_save_results_numbers_files_without_overwriting(engine, tmp_path):
    from sdtune.generation.metadata import save_results

    results = engine.generate("txt2img", prompt="x", steps=STEPS)
    first = save_results(results, tmp_path)
    second = save_results(results, tmp_path)
    assert first[0] != second[0] and first[0].exists() and second[0].exists()


def test_read_params_refuses_a_png_without_metadata(tmp_path):
    from sdtune.generation.metadata import read_params

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(SdtuneError, match="no sdtune parameters"):
        read_params(tmp_path / "plain.png")


# ------------------------------------------------------------------ long prompts

def test_long_prompt_is_chunked_not_cut(engine, caplog):
    from sdtune.models.prompts import encode_prompts

    long = ", ".join(f"word{i}" for i in range(60))  # well over 75 tokens
    chunked = encode_prompts(engine.tokenizer, engine.text_encoder, long, "")
    with caplog.at_level(logging.WARNING, logger="sdtune"):
        cut = encode_prompts(engine.tokenizer, engine.text_encoder, long, "", long_prompt="truncate")
    assert chunked.windows >= 2 and chunked.prompt_embeds.shape[1] == 77 * chunked.windows
    assert cut.prompt_embeds.shape[1] == 77 and cut.truncated
    assert "cut" in caplog.text  # never silently
    assert chunked.negative_prompt_embeds.shape == chunked.prompt_embeds.shape  # negative padded to match
    # The first window is exactly the truncated prompt; the rest carries the tokens truncation drops.
    assert torch.equal(chunked.prompt_embeds[:, :77], cut.prompt_embeds)
    assert not torch.allclose(chunked.prompt_embeds[:, 77:154], chunked.negative_prompt_embeds[:, 77:154])
    a = engine.generate("txt2img", prompt=long, steps=STEPS)[0]
    b = engine.generate("txt2img", prompt=long, steps=STEPS, long_prompt="truncate")[0]
    assert a.params["prompt_windows"] >= 2 and not np.array_equal(pixels(a), pixels(b))


def test_short_prompt_embedding_equals_the_stock_pipeline(engine):
    from sdtune.models.prompts import encode_prompts

    ours = encode_prompts(engine.tokenizer, engine.text_encoder, "a photo of a cat", "ugly")
    pos, neg = engine.pipeline("txt2img").encode_prompt("a photo of a cat", "cpu", 1, True, "ugly")
    assert torch.allclose(ours.prompt_embeds, pos, atol=1e-6)
    assert torch.allclose(ours.negative_prompt_embeds, neg, atol=1e-6)


# ------------------------------------------------------------------ LoRA

def test_lora_changes_output_and_scale_zero_does_not(tiny_models, engine, lora_file):
    from sdtune.generation.engine import Engine

    plain = engine.generate("txt2img", prompt="a cat", steps=STEPS, seed=1)[0]
    on = Engine.load(tiny_models["sd1"], lora=lora_file, lora_scale=1.0)
    off = Engine.load(tiny_models["sd1"], lora=lora_file, lora_scale=0.0)
    with_lora = on.generate("txt2img", prompt="a cat", steps=STEPS, seed=1)[0]
    zero = off.generate("txt2img", prompt="a cat", steps=STEPS, seed=1)[0]
    assert not np.array_equal(pixels(with_lora), pixels(plain))
    assert np.array_equal(pixels(zero), pixels(plain))
    assert with_lora.params["lora"] == str(lora_file) and with_lora.params["lora_scale"] == 1.0
    assert with_lora.params["lora_fused"] is True  # fp32: fusing is exact enough


@pytest.mark.slow
def test_lora_matches_stock_diffusers_and_hits_text_encoder_once(tiny_models, lora_file):
    """UNet weights equal diffusers' own LoRA load + fuse; the shared text encoder gets W + s*B@A exactly once."""
    from diffusers import StableDiffusionPipeline

    from sdtune.generation.engine import Engine
    from sdtune.models.loading import load_pipeline

    scale = 0.7
    eng = Engine.load(tiny_models["sd1"], inpaint_model=tiny_models["inpaint"], lora=lora_file, lora_scale=scale)
    ref = load_pipeline(tiny_models["sd1"])
    sd, alphas = StableDiffusionPipeline.lora_state_dict(str(lora_file.parent), weight_name=lora_file.name)
    StableDiffusionPipeline.load_lora_into_unet(sd, alphas, ref.unet)
    ref.unet.fuse_lora(lora_scale=scale)
    ref.unet.unload_lora()
    ours, stock = eng.unets["base"].state_dict(), ref.unet.state_dict()
    assert ours.keys() == stock.keys()
    for k in stock:
        assert torch.allclose(ours[k], stock[k], atol=1e-6), k
    # Text encoder: every targeted projection moved by scale * B @ A (alpha / r = 1), once.
    plain_te = ref.text_encoder.state_dict()
    te = eng.text_encoder.state_dict()
    assert te.keys() == plain_te.keys()  # adapters fused away, no LoRA layers left
    checked = 0
    for key, a in TE_LORA[lora_file].items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b = TE_LORA[lora_file][key.replace(".lora_A.", ".lora_B.")]
        wkey = next(k for k in te if k.endswith(module.removeprefix("text_model.") + ".weight"))
        assert torch.allclose(te[wkey], plain_te[wkey] + scale * (b @ a), atol=1e-5), wkey
        checked += 1
    assert checked == 2 * 4  # 2 layers x q/k/v/out
    # The dedicated inpaint UNet got the same attention deltas.
    plain_inpaint = load_pipeline(tiny_models["inpaint"]).unet.state_dict()
    plain_base = load_pipeline(tiny_models["sd1"]).unet.state_dict()
    key = next(k for k in plain_inpaint if k.endswith("attn1.to_q.weight"))
    delta_inpaint = eng.unets["inpaint"].state_dict()[key] - plain_inpaint[key]
    delta_base = stock[key] - plain_base[key]
    assert delta_base.abs().max() > 0
    assert torch.allclose(delta_inpaint, delta_base, atol=1e-6)


@pytest.mark.slow
def test_unfused_lora_gives_the_same_image(tiny_models, lora_file):
    from sdtune.generation.engine import Engine

    fused = Engine.load(tiny_models["sd1"], lora=lora_file, lora_scale=0.8)
    unfused = Engine.load(tiny_models["sd1"], lora=lora_file, lora_scale=0.8, fuse_lora=False)
    a = fused.generate("txt2img", prompt="a cat", steps=STEPS)[0]
    b = unfused.generate("txt2img", prompt="a cat", steps=STEPS)[0]
    assert a.params["lora_fused"] and not b.params["lora_fused"]
    assert np.abs(pixels(a) - pixels(b)).max() <= 2


@pytest.mark.slow
def test_compiled_engine_gives_the_same_images_with_a_lora(tiny_models, lora_file):
    """compile: the UNets run as inductor code with the fused LoRA frozen in; the pictures stay the same."""
    from sdtune.generation.engine import Engine

    plain = Engine.load(tiny_models["sd1"], inpaint_model=tiny_models["inpaint"], lora=lora_file)
    compiled = Engine.load(tiny_models["sd1"], inpaint_model=tiny_models["inpaint"], lora=lora_file, compile=True)
    assert compiled.compiled and not plain.compiled
    assert all(hasattr(u, "_compiled_call_impl") and u._compiled_call_impl is not None
               for u in compiled.unets.values())
    rng = np.random.RandomState(1)
    image = Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8"))
    for mode, extra in (("txt2img", {}), ("inpaint", dict(image=image, mask=Image.new("L", (32, 32), 255)))):
        a = plain.generate(mode, prompt="a cat", steps=STEPS, seed=3, **extra)[0]
        b = compiled.generate(mode, prompt="a cat", steps=STEPS, seed=3, **extra)[0]
        assert np.abs(pixels(a) - pixels(b)).max() <= 2, mode
    # The LoRA is in the compiled weights: without it the picture differs.
    bare = Engine.load(tiny_models["sd1"]).generate("txt2img", prompt="a cat", steps=STEPS, seed=3)[0]
    assert np.abs(pixels(bare) - pixels(compiled.generate("txt2img", prompt="a cat", steps=STEPS, seed=3)[0])).max() > 2


def test_lora_that_does_not_fit_is_refused(tiny_models, tmp_path):
    from sdtune.generation.engine import Engine
    from sdtune.models.fixtures import tiny_text_encoder, tiny_unet

    other, _ = make_lora(tiny_unet(4, cross_dim=48), tiny_text_encoder(hidden=48), tmp_path)
    with pytest.raises(SdtuneError, match="does not fit"):
        Engine.load(tiny_models["sd1"], lora=other)


# ------------------------------------------------------------------ full weights: add difference

def test_add_difference_carries_fine_tuning_to_the_inpaint_unet(tiny_models, tmp_path):
    from sdtune.generation.engine import Engine
    from sdtune.models.fixtures import save_tiny_pipeline
    from sdtune.models.loading import load_pipeline

    finetuned = save_tiny_pipeline(tmp_path / "ft", "sd1", seed=1)  # same architecture, other weights
    eng = Engine.load(finetuned, inpaint_model=tiny_models["inpaint"], base=tiny_models["sd1"])
    ft = load_pipeline(finetuned).unet.state_dict()
    base = load_pipeline(tiny_models["sd1"]).unet.state_dict()
    dedicated = load_pipeline(tiny_models["inpaint"]).unet.state_dict()
    merged = eng.unets["inpaint"].state_dict()
    key = next(k for k in merged if k.endswith("attn2.to_k.weight"))
    assert torch.allclose(merged[key], dedicated[key] + ft[key] - base[key], atol=1e-6)
    assert not torch.allclose(merged[key], dedicated[key])
    assert torch.equal(merged["conv_in.weight"], dedicated["conv_in.weight"])  # 9-ch conv_in kept
    # The dedicated text encoder equals the base's, so the shared (fine-tuned) one serves inpaint too.
    assert eng.pipeline("inpaint").text_encoder is eng.text_encoder


def test_add_difference_refuses_a_base_of_another_architecture():
    from sdtune.generation.engine import add_difference

    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    with pytest.raises(SdtuneError, match="^base does not match"):
        add_difference(torch.nn.Linear(4, 4), a, torch.nn.Linear(5, 5))
    d = torch.nn.Linear(4, 4)
    expected = d.weight.detach() + a.weight.detach() - b.weight.detach()
    add_difference(d, a, b)
    assert torch.allclose(d.weight, expected)


# ------------------------------------------------------------------ parameter errors

@pytest.mark.parametrize("kwargs, message", [
    (dict(width=30), "multiple of 8"),
    (dict(height=0), "multiple of 8"),
    (dict(steps=0), "at least 1"),
    (dict(num_images=0), "at least 1"),
    (dict(guidance=float("nan")), "finite"),
    (dict(seed=-1), "seed must be between"),
])
def test_bad_parameters_raise_one_clear_error(engine, kwargs, message):
    with pytest.raises(SdtuneError, match=message):
        engine.generate("txt2img", prompt="x", **kwargs)


@pytest.mark.parametrize("mode, kwargs, message", [
    ("img2img", dict(strength=1.5), r"\[0, 1\]"),
    ("img2img", dict(strength=0.01), "no denoising step"),
    ("inpaint", dict(mask="mask_wrong_size"), "same size"),
    ("img2img", dict(image="/nonexistent.png"), "not found"),
    ("inpaint", dict(mask=None), "needs a mask"),
])
def test_bad_inputs_raise_one_clear_error(engine, inputs, tmp_path, mode, kwargs, message):
    kw = dict(image=inputs["image"], mask=inputs["mask"] if mode == "inpaint" else None)
    kw.update(kwargs)
    if kw.get("mask") == "mask_wrong_size":
        Image.new("L", (16, 16), 255).save(tmp_path / "m.png")
        kw["mask"] = str(tmp_path / "m.png")
    with pytest.raises(SdtuneError, match=message):
        engine.generate(mode, prompt="x", steps=4, **kw)


@pytest.mark.slow
def test_trainer_lora_files_load_in_diffusers_and_kohya_format_alike(tiny_models, tmp_path):
    """The training side's two exports (diffusers + kohya, alpha != rank) give the same fused weights."""
    from sdtune.generation.engine import Engine
    from sdtune.models.loading import load_pipeline
    from sdtune.training import adapters

    pipe = load_pipeline(tiny_models["sd1"])
    adapters.add_unet_lora(pipe.unet, rank=4, alpha=2.0)
    adapters.add_text_encoder_lora(pipe.text_encoder, rank=4, alpha=2.0)
    torch.manual_seed(3)
    for model in (pipe.unet, pipe.text_encoder):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.3)
    diffusers_file = adapters.save_diffusers_lora(tmp_path / "d", pipe.unet, pipe.text_encoder)
    kohya_file = adapters.save_kohya_lora(tmp_path / "k.safetensors", pipe.unet, pipe.text_encoder, rank=4, alpha=2.0)
    a = Engine.load(tiny_models["sd1"], lora=diffusers_file.parent)  # the folder works too
    b = Engine.load(tiny_models["sd1"], lora=kohya_file)
    plain = load_pipeline(tiny_models["sd1"])
    for ours, theirs, base in ((a.unets["base"], b.unets["base"], plain.unet),
                               (a.text_encoder, b.text_encoder, plain.text_encoder)):
        sa, sb, s0 = ours.state_dict(), theirs.state_dict(), base.state_dict()
        assert sa.keys() == sb.keys() == s0.keys()
        moved = [k for k in sa if not torch.equal(sa[k], s0[k])]
        assert moved  # the LoRA did reach this model
        for k in sa:
            assert torch.allclose(sa[k], sb[k], atol=1e-5), k


def test_auto_fuse_refuses_when_low_precision_would_round_the_delta_away():
    from peft import LoraConfig, inject_adapter_in_model

    from sdtune.models import lora as lora_mod

    def model_with_delta(b_std):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 64))
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["0"]), net,
                                adapter_name=lora_mod.ADAPTER)
        torch.nn.init.normal_(net[0].lora_B[lora_mod.ADAPTER].weight, std=b_std)
        return net.to(torch.bfloat16)

    tiny = model_with_delta(1e-5)  # far below bf16's resolution of the base weights
    assert lora_mod.fuse_error(tiny) > lora_mod.FUSE_TOLERANCE
    assert lora_mod.scale_and_fuse([tiny], 1.0, "auto") is False
    assert any("lora" in n for n, _ in tiny.named_parameters())  # kept as separate layers
    big = model_with_delta(1.0)
    assert lora_mod.scale_and_fuse([big], 1.0, "auto") is True
    assert not any("lora" in n for n, _ in big.named_parameters())  # fused, adapters removed


def test_v_prediction_model_generates(tiny_models):
    from sdtune.generation.engine import Engine

    eng = Engine.load(tiny_models["sd2v"])
    (r,) = eng.generate("txt2img", prompt="a cat", steps=STEPS, scheduler="euler")
    assert pixels(r).std() > 0
    assert eng.pipeline("txt2img").scheduler.config.prediction_type == "v_prediction"


@pytest.mark.slow
def test_single_file_inpaint_model_with_its_config(tiny_models, inputs, tmp_path):
    """A dedicated model given as one .safetensors file (architecture from --inpaint-config) gives the same image."""
    from sdtune.generation.engine import Engine
    from sdtune.models.convert import export_single_file

    single = export_single_file(tiny_models["inpaint"], tmp_path / "inpaint.safetensors")
    with pytest.raises(SdtuneError, match="config"):
        Engine.load(tiny_models["sd1"], inpaint_model=single)
    eng = Engine.load(tiny_models["sd1"], inpaint_model=single, inpaint_config=tiny_models["inpaint"])
    ref = Engine.load(tiny_models["sd1"], inpaint_model=tiny_models["inpaint"])
    kw = dict(prompt="a hat", steps=STEPS, image=inputs["image"], mask=inputs["mask"])
    a, b = eng.generate("inpaint", **kw)[0], ref.generate("inpaint", **kw)[0]
    assert a.params["inpaint_config"] == str(tiny_models["inpaint"].resolve())
    assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_replace_dedicated_loads_only_that_model_and_matches_a_fresh_load(tiny_models, engine, plain_engine, inputs):
    """The web UI's model switch: a dedicated inpaint/depth model swapped in (or out) on a held engine gives a
    fresh load's pixels, and the shared VAE, text encoder and base UNet stay the very same objects."""
    from sdtune.generation.engine import Engine

    held = Engine.load(tiny_models["sd1"])
    shared = (held.vae, held.text_encoder, held.unets["base"])
    inpaint = dict(prompt="a cat", steps=2, seed=3, image=inputs["image"], mask=inputs["mask"])
    depth = dict(prompt="a cat", steps=2, seed=3, image=inputs["image"], depth_map=inputs["depth_lr"])
    with pytest.raises(SdtuneError, match="depth2img needs a 5-channel depth model"):
        held.generate("depth2img", **depth)
    held.generate("inpaint", **inpaint)  # a pipeline built (and cached) around the base UNet first
    held.replace_dedicated("inpaint", tiny_models["inpaint"])
    held.replace_dedicated("depth", tiny_models["depth"])
    assert (held.vae, held.text_encoder, held.unets["base"]) == shared
    assert held.unets["inpaint"].config.in_channels == 9 and held.unets["depth"].config.in_channels == 5
    for mode, request in (("inpaint", inpaint), ("depth2img", depth)):
        assert np.array_equal(pixels(held.generate(mode, **request)[0]), pixels(engine.generate(mode, **request)[0]))
    assert held.sources["inpaint_model"] == engine.sources["inpaint_model"]
    held.replace_dedicated("inpaint", None)  # back to inpainting on the ordinary UNet
    assert np.array_equal(pixels(held.generate("inpaint", **inpaint)[0]),
                          pixels(plain_engine.generate("inpaint", **inpaint)[0]))
    with pytest.raises(SdtuneError, match="is not a 9-channel inpainting model"):
        held.replace_dedicated("inpaint", tiny_models["depth"])
    assert "inpaint" not in held.unets  # a refused swap changes nothing


def test_parameter_errors_name_parameters_and_word_flags_on_request():
    """A library error names the parameter as Python spells it; the command line words it as its flag."""
    from sdtune.generation.requests import ParameterError, check_request, cli_flag

    with pytest.raises(ParameterError) as err:
        check_request("txt2img", steps=4, guidance=7.5, seed=0, width=None, height=None, scheduler=None, image=None,
                      mask=None, strength=None, depth_map=None, num_images=0)
    assert str(err.value) == "num_images must be at least 1, got 0" and err.value.params == ("num_images",)
    assert err.value.worded(cli_flag) == "--num-images must be at least 1, got 0"
    # A value is never read as a parameter, even one spelled like a placeholder.
    odd = ParameterError("{scheduler} must be a name, got {got!r}", got="{steps}")
    assert odd.worded(cli_flag) == "--scheduler must be a name, got '{steps}'"


def test_engine_spec_is_what_load_takes(tiny_models):
    """Engine.load takes an EngineSpec (or its fields as keywords); regeneration rebuilds the spec from metadata."""
    from pathlib import Path

    from sdtune.generation.components import EngineSpec

    spec = EngineSpec(tiny_models["sd1"], lora_scale=0.5)
    assert spec.sources()["lora_scale"] is None  # no LoRA: no scale recorded
    again = EngineSpec.from_params({**spec.sources(), "lora_scale": None, "dtype": "fp32"})
    assert again.model == str(Path(tiny_models["sd1"]).resolve()) and again.lora_scale == 1.0 and again.dtype == "fp32"
    with pytest.raises(SdtuneError, match="^lora_scale must be a finite number"):
        EngineSpec(tiny_models["sd1"], lora_scale=float("nan")).check()
