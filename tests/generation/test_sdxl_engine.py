"""SDXL in the one engine, on tiny random SDXL models: every mode equals the stock diffusers SDXL pipeline's
pixels, modes share the loaded components, LoRAs reach all four modes, metadata regenerates, long prompts."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.errors import SdtuneError

STEPS = 2
PROMPT = "a photo of a red cat"


def pixels(result_or_image) -> np.ndarray:
    return np.asarray(getattr(result_or_image, "image", result_or_image).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, write_inputs):
    return write_inputs(tmp_path_factory.mktemp("xl_inputs"))


@pytest.fixture(scope="module")
def engine(tiny_sdxl):
    from sdtune.generation.engine import Engine

    return Engine.load(tiny_sdxl["sdxl"], inpaint_model=tiny_sdxl["sdxl_inpaint"],
                       controlnet=tiny_sdxl["sdxl_controlnet"], depth_estimator=tiny_sdxl["depth_estimator"])


def _gen():
    return torch.Generator("cpu").manual_seed(3)


def _stock(tiny_sdxl, mode):
    from diffusers import (
        ControlNetModel,
        StableDiffusionXLControlNetImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    if mode == "txt2img":
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl["sdxl"])
    elif mode == "img2img":
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl["sdxl"])
    elif mode == "inpaint":
        pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_sdxl["sdxl_inpaint"])
    else:
        pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(
            tiny_sdxl["sdxl"], controlnet=ControlNetModel.from_pretrained(tiny_sdxl["sdxl_controlnet"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_image(pipe, mode, inputs, engine, negative=None, depth_map=None):
    init = Image.open(inputs["image"]).convert("RGB")
    kw = dict(prompt=PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.5,
              generator=_gen())
    if mode in ("txt2img", "inpaint"):
        kw.update(width=32, height=32)
    if mode != "txt2img":
        kw.update(image=init, strength={"img2img": 0.8, "inpaint": 1.0, "depth2img": 0.8}[mode])
    if mode == "inpaint":
        kw.update(mask_image=Image.open(inputs["mask"]).convert("L"))
    if mode == "depth2img":
        depth = Image.open(depth_map).convert("L") if depth_map else None
        kw.update(control_image=engine.control_image(init, depth))
    return pipe(**kw).images[0]


def _ours(engine, mode, inputs, negative="", depth_map=None):
    kw = dict(prompt=PROMPT, negative_prompt=negative, steps=STEPS, seed=3, guidance=7.5)
    if mode == "txt2img":
        kw.update(width=32, height=32)
    else:
        kw.update(image=inputs["image"])
    if mode == "inpaint":
        kw.update(mask=inputs["mask"])
    if mode == "depth2img" and depth_map:
        kw.update(depth_map=depth_map)
    return engine.generate(mode, **kw)[0]


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint", "depth2img"])
def test_every_sdxl_mode_equals_the_stock_pipeline(tiny_sdxl, engine, inputs, mode):
    stock = _stock(tiny_sdxl, mode)
    ours = _ours(engine, mode, inputs)
    assert np.array_equal(pixels(ours), pixels(_stock_image(stock, mode, inputs, engine)))
    # A negative prompt is encoded by both encoders (an empty one is zeros, as the stock pipeline does).
    ours_neg = _ours(engine, mode, inputs, negative="blurry")
    assert np.array_equal(pixels(ours_neg), pixels(_stock_image(stock, mode, inputs, engine, negative="blurry")))
    assert not np.array_equal(pixels(ours_neg), pixels(ours))
    assert ours.params["family"] == "sdxl"


def test_sdxl_depth_map_path_equals_stock_and_differs_from_the_estimator(tiny_sdxl, engine, inputs):
    stock = _stock(tiny_sdxl, "depth2img")
    ours = _ours(engine, "depth2img", inputs, depth_map=inputs["depth_lr"])
    ref = _stock_image(stock, "depth2img", inputs, engine, depth_map=inputs["depth_lr"])
    assert np.array_equal(pixels(ours), pixels(ref))
    assert ours.params["depth_source"] == "depth_map"
    assert not np.array_equal(pixels(ours), pixels(_ours(engine, "depth2img", inputs)))


def test_modes_share_every_loaded_component(engine):
    pipes = {m: engine.pipeline(m) for m in engine.modes()}
    assert set(pipes) == {"txt2img", "img2img", "inpaint", "depth2img"}
    for pipe in pipes.values():
        assert pipe.vae is engine.vae and pipe.text_encoder is engine.text_encoder
        assert pipe.text_encoder_2 is engine.text_encoder_2 and pipe.tokenizer_2 is engine.tokenizer_2
    assert pipes["txt2img"].unet is pipes["img2img"].unet is pipes["depth2img"].unet is engine.unets["base"]
    assert pipes["inpaint"].unet is engine.unets["inpaint"] and pipes["inpaint"].unet.config.in_channels == 9
    assert pipes["depth2img"].controlnet is engine.controlnet
    assert all(engine.pipeline(m) is p for m, p in pipes.items())  # built once, then reused


def test_long_prompt_is_chunked_for_both_encoders(engine, caplog):
    from sdtune.models.sdxl import encode_prompts_xl

    toks, tes = [engine.tokenizer, engine.tokenizer_2], [engine.text_encoder, engine.text_encoder_2]
    long = ", ".join(f"word{i}" for i in range(60))
    chunked = encode_prompts_xl(toks, tes, long, "")
    with caplog.at_level(logging.WARNING, logger="sdtune"):
        cut = encode_prompts_xl(toks, tes, long, "", long_prompt="truncate")
    assert "cut" in caplog.text
    assert chunked.windows >= 2 and chunked.prompt_embeds.shape == (1, 77 * chunked.windows, 32 + 48)
    assert cut.prompt_embeds.shape == (1, 77, 80) and cut.truncated
    assert torch.equal(chunked.prompt_embeds[:, :77], cut.prompt_embeds)  # the first window is the cut prompt
    assert torch.allclose(chunked.pooled_prompt_embeds, cut.pooled_prompt_embeds, atol=1e-6)  # the first window's
    assert chunked.negative_prompt_embeds.shape == chunked.prompt_embeds.shape
    # Short prompts: exactly the stock pipeline's four tensors.
    ours = encode_prompts_xl(toks, tes, PROMPT, "ugly")
    pos, neg, pooled, neg_pooled = engine.pipeline("txt2img").encode_prompt(PROMPT, device="cpu",
                                                                            negative_prompt="ugly")
    for a, b in ((ours.prompt_embeds, pos), (ours.negative_prompt_embeds, neg),
                 (ours.pooled_prompt_embeds, pooled), (ours.negative_pooled_prompt_embeds, neg_pooled)):
        assert torch.equal(a, b)
    a = engine.generate("txt2img", prompt=long, steps=STEPS)[0]
    b = engine.generate("txt2img", prompt=long, steps=STEPS, long_prompt="truncate")[0]
    assert a.params["prompt_windows"] >= 2 and not np.array_equal(pixels(a), pixels(b))


def test_sdxl_metadata_regenerates_the_same_pixels(engine, inputs, tmp_path):
    from sdtune.generation.engine import regenerate
    from sdtune.generation.metadata import read_params, save_results

    for mode, extra in (("inpaint", dict(mask=inputs["mask"])), ("depth2img", {})):
        results = engine.generate(mode, prompt="a dog", negative_prompt="blurry", steps=STEPS, seed=11,
                                  image=inputs["image"], **extra)
        (path,) = save_results(results, tmp_path / mode)
        params = read_params(path)
        assert params["controlnet"] and params["depth_estimator"] and params["inpaint_model"]
        (again,) = regenerate(params)  # a fresh engine, loaded from what the PNG says
        assert np.array_equal(pixels(again), np.asarray(Image.open(path).convert("RGB"), dtype=np.int16))


def make_sdxl_lora(pipe, out_dir, seed=0):
    """A diffusers-format SDXL LoRA (UNet + both text encoders), non-zero, as save_lora_weights writes it."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = {}
    for name in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, name)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj",
                                                                               "out_proj"]), te)
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.3)
    for name in ("text_encoder", "text_encoder_2"):
        layers[name] = convert_state_dict_to_diffusers(
            {k.replace(".default.", "."): v.detach().clone() for k, v in getattr(pipe, name).state_dict().items()
             if ".lora_A." in k or ".lora_B." in k})
    StableDiffusionXLPipeline.save_lora_weights(
        out_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=layers["text_encoder"], text_encoder_2_lora_layers=layers["text_encoder_2"],
        safe_serialization=True)
    return out_dir / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl, tmp_path_factory):
    from sdtune.models.loading import load_pipeline

    return make_sdxl_lora(load_pipeline(tiny_sdxl["sdxl"]), tmp_path_factory.mktemp("xl_lora"))


def test_sdxl_lora_changes_all_four_modes_and_reaches_both_text_encoders(tiny_sdxl, engine, inputs, sdxl_lora):
    from sdtune.generation.engine import Engine

    with_lora = Engine.load(tiny_sdxl["sdxl"], inpaint_model=tiny_sdxl["sdxl_inpaint"],
                            controlnet=tiny_sdxl["sdxl_controlnet"], depth_estimator=tiny_sdxl["depth_estimator"],
                            lora=sdxl_lora)
    assert with_lora.lora_fused is True
    for part in ("text_encoder", "text_encoder_2"):
        a, b = getattr(engine, part).state_dict(), getattr(with_lora, part).state_dict()
        assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a), part
    for mode in ("txt2img", "img2img", "inpaint", "depth2img"):
        assert not np.array_equal(pixels(_ours(engine, mode, inputs)), pixels(_ours(with_lora, mode, inputs))), mode


def test_sdxl_lora_equals_stock_load_lora_weights(tiny_sdxl, sdxl_lora):
    from diffusers import StableDiffusionXLPipeline

    from sdtune.generation.engine import Engine

    eng = Engine.load(tiny_sdxl["sdxl"], lora=sdxl_lora)
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl["sdxl"])
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(sdxl_lora.parent))
    ref = stock(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, generator=_gen()).images[0]
    ours = eng.generate("txt2img", prompt=PROMPT, steps=STEPS, seed=3, guidance=7.5)[0]
    plain = Engine.load(tiny_sdxl["sdxl"]).generate("txt2img", prompt=PROMPT, steps=STEPS, seed=3, guidance=7.5)[0]
    assert np.abs(pixels(ours) - pixels(ref)).max() <= 1  # ours fused, stock unfused: float rounding at most
    assert np.abs(pixels(ours) - pixels(plain)).max() > 10


def test_sd_controlnet_depth_path_equals_stock(tiny_models, tiny_sdxl, inputs):
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline

    from sdtune.generation.engine import Engine

    eng = Engine.load(tiny_models["sd1"], controlnet=tiny_sdxl["sd1_controlnet"],
                      depth_estimator=tiny_sdxl["depth_estimator"])
    stock = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        tiny_models["sd1"], controlnet=ControlNetModel.from_pretrained(tiny_sdxl["sd1_controlnet"]),
        safety_checker=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    for depth_map in (None, inputs["depth_lr"]):
        ours = _ours(eng, "depth2img", inputs, negative="blurry", depth_map=depth_map)
        ref = _stock_image(stock, "depth2img", inputs, eng, negative="blurry", depth_map=depth_map)
        assert np.array_equal(pixels(ours), pixels(ref))
        assert ours.params["unet"] == "ordinary 4-channel + depth ControlNet"
    assert eng.pipeline("depth2img").unet is eng.pipeline("txt2img").unet


def test_sdxl_errors_are_one_clear_line(tiny_sdxl, tiny_models, engine, inputs, sdxl_lora):
    from sdtune.generation.engine import Engine

    cases = [
        (lambda: Engine.load(tiny_sdxl["sdxl"], depth_model=tiny_models["depth"]), "depth ControlNet"),
        (lambda: Engine.load(tiny_sdxl["sdxl"], inpaint_model=tiny_models["inpaint"]), "use one family"),
        (lambda: Engine.load(tiny_sdxl["sdxl"], controlnet=tiny_sdxl["sd1_controlnet"]), "does not fit"),
        (lambda: Engine.load(tiny_sdxl["sdxl"], depth_estimator=tiny_sdxl["depth_estimator"]), "pass controlnet too"),
        (lambda: Engine.load(tiny_models["sd1"], lora=sdxl_lora), "SDXL LoRA"),
        (lambda: Engine.load(tiny_sdxl["sdxl"]).generate("depth2img", image=inputs["image"]), "pass controlnet"),
        (lambda: Engine.load(tiny_sdxl["sdxl"], controlnet=tiny_sdxl["sdxl_controlnet"]).generate(
            "depth2img", image=inputs["image"], steps=STEPS), "depth_estimator"),
    ]
    for call, message in cases:
        with pytest.raises(SdtuneError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_sdxl_generate_many_equals_one_at_a_time(engine, inputs):
    for mode in ("txt2img", "depth2img"):
        image = inputs["image"] if mode != "txt2img" else None
        requests = [dict(prompt=PROMPT, seed=5, image=image), dict(prompt="a blue car", seed=6, image=image)]
        batch = engine.generate_many(mode, requests, steps=STEPS, batch_size=2)
        for req, got in zip(requests, batch):
            one = engine.generate(mode, prompt=req["prompt"], seed=req["seed"], steps=STEPS,
                                  image=req["image"] if mode != "txt2img" else None)[0]
            assert got.params["generated_in_batch_of"] == 2
            assert np.abs(pixels(got) - pixels(one)).max() <= 2, mode  # a batch sums in another order


def test_sdxl_hub_id_from_the_local_cache(tiny_sdxl, tmp_path, monkeypatch):
    """A hub id resolves offline from the Hugging Face cache: SDXL recognised, a refiner refused."""
    import shutil

    from diffusers import StableDiffusionXLPipeline

    from sdtune.models.loading import load_pipeline

    cache = tmp_path / "hub"
    for variant, repo in (("sdxl", "someone/tiny-sdxl"), ("sdxl_refiner", "someone/tiny-refiner")):
        root = cache / f"models--{repo.replace('/', '--')}"
        snapshot = root / "snapshots" / ("0" * 40)
        shutil.copytree(tiny_sdxl[variant], snapshot)
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    pipe = load_pipeline("someone/tiny-sdxl")
    assert type(pipe) is StableDiffusionXLPipeline
    with pytest.raises(SdtuneError, match="SDXL refiner"):
        load_pipeline("someone/tiny-refiner")


def test_sdxl_add_difference_carries_full_fine_tuning_to_the_inpaint_unet(tiny_sdxl, tmp_path):
    from sdtune.generation.engine import Engine
    from sdtune.models.fixtures import tiny_sdxl_pipeline
    from sdtune.models.loading import load_pipeline

    tuned = load_pipeline(tiny_sdxl["sdxl"])
    with torch.no_grad():  # a "fine-tune": every UNet weight moved a little
        for p in tuned.unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    tuned.save_pretrained(tmp_path / "ft", safe_serialization=True)
    eng = Engine.load(tmp_path / "ft", inpaint_model=tiny_sdxl["sdxl_inpaint"], base=tiny_sdxl["sdxl"])
    ft, base = tuned.unet.state_dict(), load_pipeline(tiny_sdxl["sdxl"]).unet.state_dict()
    dedicated = load_pipeline(tiny_sdxl["sdxl_inpaint"]).unet.state_dict()
    merged = eng.unets["inpaint"].state_dict()
    for key in (next(k for k in merged if k.endswith("attn2.to_k.weight")), "add_embedding.linear_1.weight"):
        assert torch.allclose(merged[key], dedicated[key] + ft[key] - base[key], atol=1e-6), key
        assert not torch.allclose(merged[key], dedicated[key])
    assert torch.equal(merged["conv_in.weight"], dedicated["conv_in.weight"])  # the 9-channel conv_in kept
    pipe = eng.pipeline("inpaint")
    assert pipe.text_encoder is eng.text_encoder and pipe.text_encoder_2 is eng.text_encoder_2
    own = tiny_sdxl_pipeline("sdxl_inpaint", seed=1)  # an inpainting model with text encoders of its own
    own.save_pretrained(tmp_path / "own", safe_serialization=True)
    with pytest.raises(SdtuneError, match="text encoders of its own"):
        Engine.load(tmp_path / "ft", inpaint_model=tmp_path / "own", base=tiny_sdxl["sdxl"])
