"""What the recipe trains reaches the shared inference engine in all four modes (tiny models, 32 px, few steps).

* A LoRA from train/dreambooth.py, loaded by ``Engine`` with dedicated inpaint and depth models,
  changes every mode's output against the same engine at lora_scale=0, and txt2img equals what
  the trained in-memory UNet draws through a stock diffusers pipeline.
* A full fine-tune, loaded with ``--base``, reaches the dedicated inpaint/depth UNets by add
  difference: their outputs change against the dedicated models alone.
"""
import warnings

import numpy as np
import pytest
import torch

from sdtune.generation.engine import MODES, Engine
from sdtune.training.config import config_from_dict
from sdtune.training import dreambooth
from sdtune.world import scenes
from sdtune.world.demo import DEFAULT_SUBJECT, box_mask

STEPS = 2
SIZE = 32
PROMPT = "a photo of sks box on the left, on snow"


def pixels(results) -> np.ndarray:
    return np.asarray(results[0].image, dtype=np.int16)


@pytest.fixture(scope="module")
def inputs():
    scene = scenes.Scene(kind="box", colour="red", position="left", background="snow", seed=3)
    return {"image": scenes.render(scene, size=SIZE).image, "mask": box_mask("left", SIZE)}


def request(mode, inputs) -> dict:
    kw = dict(prompt=PROMPT, steps=STEPS, guidance=5.0, seed=7)
    if mode != "txt2img":
        kw["image"] = inputs["image"]
    if mode == "inpaint":
        kw["mask"] = inputs["mask"]
    return kw


def train(tiny_models, out, **overrides):
    cfg = dict(model=str(tiny_models["sd1"]), instance_dir=str(DEFAULT_SUBJECT), instance_prompt="a photo of sks box",
               resolution=SIZE, max_steps=3, train_batch_size=1, caption_dropout=0.0, seed=0, output_dir=str(out))
    cfg.update(overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*non-image file")  # subject.json beside the images
        return dreambooth.train(config_from_dict(cfg))


def test_trained_lora_changes_every_mode_of_the_engine(tiny_models, inputs, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora"
    result = train(tiny_models, out, method="lora", learning_rate=1e-2)
    dedicated = dict(inpaint_model=tiny_models["inpaint"], depth_model=tiny_models["depth"])
    on = Engine.load(tiny_models["sd1"], lora=out, lora_scale=1.0, **dedicated)
    off = Engine.load(tiny_models["sd1"], lora=out, lora_scale=0.0, **dedicated)
    assert on.modes() == list(MODES)
    for mode in MODES:
        a, b = pixels(on.generate(mode, **request(mode, inputs))), pixels(off.generate(mode, **request(mode, inputs)))
        assert np.abs(a - b).max() > 0, f"the trained LoRA did not change {mode}"

    # The engine applies exactly what training ended with: the in-memory UNet through a stock pipeline.
    stock = StableDiffusionPipeline.from_pretrained(tiny_models["sd1"], safety_checker=None,
                                                    requires_safety_checker=False)
    stock.unet = result.unet.eval()
    stock.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = stock(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE,
                    generator=torch.Generator("cpu").manual_seed(7)).images[0]
    got = pixels(on.generate("txt2img", **request("txt2img", inputs)))
    assert np.abs(got - np.asarray(ref, dtype=np.int16)).max() <= 2


def test_full_fine_tune_reaches_dedicated_models_by_add_difference(tiny_models, inputs, tmp_path):
    out = tmp_path / "full"
    train(tiny_models, out, method="full", max_steps=2, learning_rate=1e-3)
    dedicated = dict(inpaint_model=tiny_models["inpaint"], depth_model=tiny_models["depth"])
    alone = Engine.load(out, **dedicated)  # no --base: the dedicated UNets as shipped
    merged = Engine.load(out, base=tiny_models["sd1"], **dedicated)
    untouched = Engine.load(tiny_models["sd1"], **dedicated)
    for mode in ("inpaint", "depth2img"):
        a = pixels(merged.generate(mode, **request(mode, inputs)))
        b = pixels(alone.generate(mode, **request(mode, inputs)))
        assert np.abs(a - b).max() > 0, f"add difference did not reach the {mode} UNet"
        # Without --base the dedicated model really is alone (the text encoder was not trained).
        assert np.array_equal(b, pixels(untouched.generate(mode, **request(mode, inputs))))
    # txt2img is the fine-tuned model itself either way, and differs from the base.
    t_merged = pixels(merged.generate("txt2img", **request("txt2img", inputs)))
    assert np.array_equal(t_merged, pixels(alone.generate("txt2img", **request("txt2img", inputs))))
    assert not np.array_equal(t_merged, pixels(untouched.generate("txt2img", **request("txt2img", inputs))))


@pytest.mark.parametrize("kind", ["loha", "dora"])
def test_other_adapters_change_every_mode_of_the_engine(tiny_models, inputs, tmp_path, kind):
    """A LoHa (peft's file) and a DoRA (the diffusers file) reach the dedicated inpaint and depth UNets too."""
    out = tmp_path / kind
    train(tiny_models, out, method="lora", adapter=kind, learning_rate=3e-2)
    dedicated = dict(inpaint_model=tiny_models["inpaint"], depth_model=tiny_models["depth"])
    on = Engine.load(tiny_models["sd1"], lora=out, lora_scale=1.0, **dedicated)
    plain = Engine.load(tiny_models["sd1"], **dedicated)
    for mode in MODES:
        a, b = pixels(on.generate(mode, **request(mode, inputs))), pixels(plain.generate(mode, **request(mode, inputs)))
        assert np.abs(a - b).max() > 0, f"the trained {kind} did not change {mode}"
