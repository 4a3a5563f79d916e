"""SD 3.5 in the one engine, on tiny random SD3 models: every mode equals the stock diffusers SD3 pipeline's pixels,
modes share the loaded components, T5 can be left out, metadata regenerates, long prompts are said in one line."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.errors import SdtuneError

STEPS = 2
PROMPT = "a photo of a red cat"
STRENGTH = {"img2img": 0.8, "inpaint": 1.0}


def pixels(result_or_image) -> np.ndarray:
    return np.asarray(getattr(result_or_image, "image", result_or_image).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, write_inputs):
    return write_inputs(tmp_path_factory.mktemp("sd3_inputs"))


@pytest.fixture(scope="module")
def engine(tiny_sd3):
    from sdtune.generation.engine import Engine

    return Engine.load(tiny_sd3["sd3"], controlnet=tiny_sd3["sd3_controlnet"],
                       depth_estimator=tiny_sd3["depth_estimator"])


def _stock(tiny_sd3, mode, **kw):
    from diffusers import (
        SD3ControlNetModel,
        StableDiffusion3ControlNetPipeline,
        StableDiffusion3Img2ImgPipeline,
        StableDiffusion3InpaintPipeline,
        StableDiffusion3Pipeline,
    )

    if mode == "depth2img":
        pipe = StableDiffusion3ControlNetPipeline.from_pretrained(
            tiny_sd3["sd3"], controlnet=SD3ControlNetModel.from_pretrained(tiny_sd3["sd3_controlnet"]), **kw)
    else:
        cls = {"txt2img": StableDiffusion3Pipeline, "img2img": StableDiffusion3Img2ImgPipeline,
               "inpaint": StableDiffusion3InpaintPipeline}[mode]
        pipe = cls.from_pretrained(tiny_sd3["sd3"], **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_image(pipe, mode, inputs, engine, negative="", depth_map=None, prompt=PROMPT, seed=3):
    init = Image.open(inputs["image"]).convert("RGB")
    kw = dict(prompt=prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.5,
              generator=torch.Generator("cpu").manual_seed(seed))
    if mode in ("txt2img", "inpaint", "depth2img"):
        kw.update(width=32, height=32)
    if mode in STRENGTH:
        kw.update(image=init, strength=STRENGTH[mode])
    if mode == "inpaint":
        kw.update(mask_image=Image.open(inputs["mask"]).convert("L"))
    if mode == "depth2img":
        depth = Image.open(depth_map).convert("L") if depth_map else None
        kw.update(control_image=engine.control_image(init, depth))
    torch.manual_seed(seed)  # SD3's ControlNet pipeline samples the control latent on the global generator
    return pipe(**kw).images[0]


def _ours(engine, mode, inputs, negative="", depth_map=None, prompt=PROMPT, **extra):
    kw = dict(prompt=prompt, negative_prompt=negative, steps=STEPS, seed=3, guidance=7.5, **extra)
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
def test_every_mode_matches_the_stock_sd3_pipeline(engine, tiny_sd3, inputs, mode):
    pipe = _stock(tiny_sd3, mode)
    for negative in ("", "blurry"):
        ours = _ours(engine, mode, inputs, negative)
        assert np.array_equal(pixels(ours), pixels(_stock_image(pipe, mode, inputs, engine, negative))), negative
        assert ours.params["family"] == "sd3" and ours.params["no_t5"] is False
    if mode == "depth2img":  # the depth controls the image: a given map gives the stock pixels, and other ones
        from_map = _ours(engine, mode, inputs, depth_map=inputs["depth_lr"])
        stock = _stock_image(pipe, mode, inputs, engine, depth_map=inputs["depth_lr"])
        assert np.array_equal(pixels(from_map), pixels(stock))
        assert not np.array_equal(pixels(from_map), pixels(ours))
        assert from_map.params["depth_source"] == "depth_map" and from_map.params["strength"] is None


def test_modes_share_one_vae_and_one_set_of_text_encoders(engine):
    pipes = [engine.pipeline(m) for m in ("txt2img", "img2img", "inpaint", "depth2img")]
    for name in ("vae", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert len({id(getattr(p, name)) for p in pipes}) == 1, name
    assert engine.modes() == ["txt2img", "img2img", "inpaint", "depth2img"]


def test_without_t5_matches_the_stock_pipeline_without_t5(tiny_sd3, inputs):
    from sdtune.generation.engine import Engine

    engine = Engine.load(tiny_sd3["sd3"], no_t5=True)
    assert engine.text_encoder_3 is None and engine.modes() == ["txt2img", "img2img", "inpaint"]
    pipe = _stock(tiny_sd3, "txt2img", text_encoder_3=None, tokenizer_3=None)
    ours = _ours(engine, "txt2img", inputs)
    assert np.array_equal(pixels(ours), pixels(_stock_image(pipe, "txt2img", inputs, engine)))
    assert ours.params["no_t5"] is True
    with pytest.raises(SdtuneError, match="depth ControlNet"):
        _ours(engine, "depth2img", inputs)


def test_batches_equal_single_images_and_metadata_regenerates(engine, inputs):
    from sdtune.generation.engine import regenerate

    for mode in ("txt2img", "depth2img"):
        kw = dict(prompt=PROMPT, steps=STEPS, seed=5, guidance=7.5)
        kw.update(width=32, height=32) if mode == "txt2img" else kw.update(image=inputs["image"])
        two = engine.generate(mode, num_images=2, **kw)
        second = engine.generate(mode, **dict(kw, seed=6))[0]
        assert np.array_equal(pixels(two[1]), pixels(second))
        again = regenerate(two[1].params, engine=engine)[0]
        assert np.array_equal(pixels(again), pixels(two[1]))


def test_bad_requests_are_one_line(engine, inputs):
    with pytest.raises(SdtuneError, match="does not fit SD 3.x") as err:
        engine.generate("txt2img", prompt="a", steps=1, scheduler="ddim", width=32, height=32)
    assert len(str(err.value).splitlines()) == 1
    assert engine._multiple == 4  # the tiny VAE's factor 2 x patch 2 (16 for SD3: checked beside the 8 every model has)
    with pytest.raises(SdtuneError, match="multiple of 8"):
        engine.generate("txt2img", prompt="a", steps=1, width=34, height=32)
    with pytest.raises(SdtuneError, match="SD 3.x depth2img runs through an SD3 depth ControlNet"):
        type(engine)._unet_kind(type("E", (), {"controlnet": None})(), "depth2img")


def test_long_prompts_are_said_in_one_line_and_match_stock(engine, tiny_sd3, inputs, caplog):
    prompt = ", ".join(["a photo of a red cat on a blue mat"] * 12)  # > 77 CLIP tokens
    with caplog.at_level(logging.WARNING, logger="sdtune"):
        ours = _ours(engine, "txt2img", inputs, prompt=prompt)
    lines = [r.getMessage() for r in caplog.records if "CLIP tokens" in r.getMessage()]
    assert len(lines) == 1 and "read the first 75" in lines[0] and ours.params["prompt_truncated"] is True
    pipe = _stock(tiny_sd3, "txt2img")
    assert np.array_equal(pixels(ours), pixels(_stock_image(pipe, "txt2img", inputs, engine, prompt=prompt)))


def test_a_lora_of_another_family_is_one_line(tiny_sd3, tmp_path):
    from safetensors.torch import save_file

    from sdtune.generation.engine import Engine

    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": torch.zeros(2, 32),
               "unet.down_blocks.0.attentions.0.proj_in.lora.up.weight": torch.zeros(32, 2)},
              str(tmp_path / "pytorch_lora_weights.safetensors"))
    with pytest.raises(SdtuneError) as err:
        Engine.load(tiny_sd3["sd3"], lora=tmp_path, no_t5=True)
    assert len(str(err.value).splitlines()) == 1 and "SD 3.x" in str(err.value)


def test_an_sd3_controlnet_on_another_family_is_one_line(tiny_sd3, tiny_models):
    from sdtune.generation.engine import Engine

    with pytest.raises(SdtuneError, match="is an SD 3.x ControlNet, but the model is not SD 3.x") as err:
        Engine.load(tiny_models["sd1"], controlnet=tiny_sd3["sd3_controlnet"])
    assert len(str(err.value).splitlines()) == 1


def test_a_lora_fused_or_not_and_applied_again(tiny_sd3, tmp_path, inputs):
    """A diffusers SD3 LoRA (as the recipe writes it) fused gives the unfused pixels (within 1/255); applying a
    LoRA again replaces the first; no dedicated model (None) is a no-op, a real one is refused in one line."""
    from sdtune.generation.engine import Engine
    from sdtune.models.loading import load_pipeline
    from sdtune.training.config import config_from_dict
    from sdtune.training.sd3 import add_lora, save_lora

    pipe = load_pipeline(tiny_sd3["sd3"], drop_t5=True)
    cfg = config_from_dict(dict(instance_dir="x", instance_prompt="p", lora_rank=2))
    torch.manual_seed(0)
    add_lora(pipe.transformer, cfg)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    save_lora(tmp_path, pipe.transformer, cfg, 0, tiny_sd3["sd3"])
    plain = Engine.load(tiny_sd3["sd3"], no_t5=True)
    unfused = Engine.load(tiny_sd3["sd3"], no_t5=True, lora=tmp_path)
    fused = Engine.load(tiny_sd3["sd3"], no_t5=True, lora=tmp_path, fuse_lora=True)
    assert (unfused.lora_fused, fused.lora_fused) == (False, True)
    a, b = (pixels(_ours(e, "img2img", inputs)) for e in (unfused, fused))
    assert np.abs(a - b).max() <= 1 and not np.array_equal(a, pixels(_ours(plain, "img2img", inputs)))
    unfused._apply_lora(tmp_path, 1.0, False, "auto")  # again: replaces, does not stack
    assert np.array_equal(pixels(_ours(unfused, "img2img", inputs)), a)
    unfused.replace_dedicated("inpaint", None)
    with pytest.raises(SdtuneError, match="not used with SD 3.x"):
        unfused.replace_dedicated("inpaint", tiny_sd3["sd3"])
