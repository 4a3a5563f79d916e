"""The Generate tab's handler on the embedded family: the Engine's own pixels, one engine reused, PNG restore."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.errors import SdtuneError

from uihelpers import needs_embedded


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    needs_embedded()
    from sdtune.ui.generate import Generator
    from sdtune.ui.safety import Sandbox

    torch.set_num_threads(1)
    return Generator(Sandbox(tmp_path_factory.mktemp("ui") / "outputs"))


def test_txt2img_through_the_handler_is_the_engines_image(gen):
    from sdtune.generation.engine import Engine
    from sdtune.models.embedded import embedded_model

    (path, image, params), = gen.generate("txt2img", prompt="a photo of a red ball", steps=8, seed=3)
    direct = Engine.load(str(embedded_model("base"))).generate("txt2img", prompt="a photo of a red ball", steps=8,
                                                               seed=3)[0].image
    assert np.array_equal(np.asarray(image), np.asarray(direct))
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(direct))
    assert path.parent == gen.images_dir and path.with_suffix(".json").is_file()


def test_one_engine_serves_every_mode_and_request(gen):
    loads = gen.loads
    gen.generate("txt2img", prompt="a photo of a blue cube", steps=4, seed=1, num_images=2)
    src = Image.new("RGB", (64, 64), (40, 160, 60))
    gen.generate("img2img", prompt="a photo of a red ball", steps=4, image=src, strength=0.5)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    (_, _, p), = gen.generate("inpaint", prompt="a photo of a red ball", steps=4, image=src, mask=mask)
    (_, _, d), = gen.generate("depth2img", prompt="a photo of a red ball", steps=4, image=src)
    assert gen.loads == max(loads, 1)  # no reload for a new prompt, size of batch or mode
    assert p["unet"] == "inpainting 9-channel" and d["unet"] == "depth 5-channel"
    depth = gen.estimate_depth(src, gen.key)
    assert depth.size == (64, 64) and depth.mode == "L"


def test_inputs_are_stored_so_the_png_regenerates(gen):
    from sdtune.generation.engine import regenerate

    src = Image.new("RGB", (64, 64), (200, 200, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    (path, image, params), = gen.generate("inpaint", prompt="a photo of a ball", steps=4, image=src, mask=mask, seed=5)
    assert params["mask"].startswith(str(gen.inputs_dir)) and params["image"].startswith(str(gen.inputs_dir))
    again = regenerate(json.loads(path.with_suffix(".json").read_text()), engine=gen.engine)[0].image
    assert np.array_equal(np.asarray(again), np.asarray(image))


def test_a_dropped_png_restores_its_settings(gen):
    from sdtune.ui.app import State, restore_handler

    (path, _, params), = gen.generate("txt2img", prompt="a photo of a green cone", negative_prompt="blurry",
                                      steps=6, guidance=5.0, seed=77, scheduler="euler")
    values = restore_handler(State(gen.sandbox, gen, None), str(path))
    mode, prompt, negative, steps, guidance, seed, width, height, scheduler, *_, status = values
    assert (mode, prompt, negative, steps, guidance, seed, scheduler) == \
        ("txt2img", "a photo of a green cone", "blurry", 6, 5.0, 77, "euler")
    assert status.startswith("restored")
    plain = gen.sandbox.outputs / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert "carries no sdtune parameters" in restore_handler(State(gen.sandbox, gen, None), str(plain))[-1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="txt2img", steps=0), "--steps must be at least 1"),
    (dict(mode="txt2img", width=60), "multiple of 8"),
    (dict(mode="txt2img", scheduler="nope"), "unknown scheduler"),
    (dict(mode="inpaint", image=Image.new("RGB", (64, 64))), "inpaint needs a mask"),
    (dict(mode="img2img"), "needs an input image"),
    (dict(mode="txt2img", model="../../etc"), "'..' is not allowed"),
    (dict(mode="txt2img", model="/etc"), "outside the folders"),
    (dict(mode="txt2img", lora="/tmp"), "outside the folders"),
])
def test_bad_inputs_are_one_line_errors(gen, kwargs, message):
    loads = gen.loads
    with pytest.raises(SdtuneError, match=message):
        gen.generate(kwargs.pop("mode"), prompt="x", **{"steps": 4, **kwargs})
    assert gen.loads == loads


def test_the_page_handler_reports_errors_in_the_status_line(gen):
    from sdtune.ui.app import State, generate_handler

    state = State(gen.sandbox, gen, None)
    gallery, params, status, depth, kept = generate_handler(
        state, "inpaint", None, "", "", "", 1.0, "p", "", 4, 7.5, 0, 0, 0, "default", 1, 0.8, None, None, [])
    assert status == "sdtune: error: inpaint needs an input image: upload one in the image box"
    gallery, params, status, depth, kept = generate_handler(
        state, "txt2img", None, "", "", "", 1.0, "p", "", 4, 7.5, 0, 0, 0, "default", 1, 0.8, None, None, [])
    assert status.startswith("done: 1 image") and len(gallery) == 1 and json.loads(params)["steps"] == 4


def test_a_painted_mask_is_the_editors_layers():
    from sdtune.ui.generate import mask_from_editor

    bg = Image.new("RGBA", (32, 32), (10, 20, 30, 255))
    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (4, 4, 12, 12))
    image, mask = mask_from_editor({"background": bg, "layers": [layer], "composite": bg})
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (10, 20, 30)
    assert mask.getbbox() == (4, 4, 12, 12) and mask.getpixel((5, 5)) == 255
    assert mask_from_editor({"background": bg, "layers": [], "composite": bg})[1] is None
