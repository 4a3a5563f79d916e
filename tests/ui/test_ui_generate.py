"""The Generate tab's handler on the embedded family: the Engine's own pixels, one engine reused, PNG restore."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from uihelpers import needs_embedded

from sdtune.errors import SdtuneError


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
    (dict(mode="txt2img", guidance_interval="0.8,0.2"), "--guidance-interval must be two noise levels"),
])
def test_bad_inputs_are_one_line_errors(gen, kwargs, message):
    loads = gen.loads
    with pytest.raises(SdtuneError, match=message):
        gen.generate(kwargs.pop("mode"), prompt="x", **{"steps": 4, **kwargs})
    assert gen.loads == loads


def test_the_page_handler_reports_errors_in_the_status_line(gen):
    from sdtune.ui.app import State, generate_handler

    state = State(gen.sandbox, gen, None)
    gallery, params, status, depth, kept, table = generate_handler(
        state, "inpaint", None, "", "", "", 1.0, "p", "", 4, 7.5, 0, 0, 0, "default", 1, 0.8, None, None, [])
    assert status == "sdtune: error: inpaint needs an input image: upload one in the image box"
    gallery, params, status, depth, kept, table = generate_handler(
        state, "txt2img", None, "", "", "", 1.0, "p", "", 4, 7.5, 0, 0, 0, "default", 1, 0.8, None, None, [])
    # the status says what finished and when: a new image is visibly new
    assert re.match(r"txt2img done at \d\d:\d\d:\d\d in [0-9.]+ s: 1 image\(s\) \(64x64, seed 0\)", status), status
    assert len(gallery) == 1 and json.loads(params)["steps"] == 4
    assert gallery[0][1] == "txt2img · seed 0 · no LoRA" and "| steps | 4 |" in table and "null" not in table


def test_seed_minus_one_draws_a_seed_and_records_it(gen):
    """AUTOMATIC1111's -1: a random seed, the one drawn in the parameters and the caption (so it can be redone)."""
    from sdtune.ui.app import State, generate_handler

    gallery, params, status, *_ = generate_handler(State(gen.sandbox, gen, None), "txt2img", None, "", "", "", 1.0,
                                                   "p", "", 2, 7.5, -1, 0, 0, "default", 1, 0.8, None, None, [])
    seed = json.loads(params)["seed"]
    assert 0 <= seed < 2**32 and gallery[0][1] == f"txt2img · seed {seed} · no LoRA" and f"seed {seed})" in status


def test_a_painted_mask_is_the_editors_layers():
    from sdtune.ui.generate import mask_from_editor

    bg = Image.new("RGBA", (32, 32), (10, 20, 30, 255))
    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (4, 4, 12, 12))
    image, mask = mask_from_editor({"background": bg, "layers": [layer], "composite": bg})
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (10, 20, 30)
    assert mask.getbbox() == (4, 4, 12, 12) and mask.getpixel((5, 5)) == 255
    assert mask_from_editor({"background": bg, "layers": [], "composite": bg})[1] is None


def _random_lora(base: str, out_dir, seed: int):
    """A rank-4 LoRA (UNet + text encoder) for ``base`` with small random weights, saved as training does."""
    from sdtune.models.loading import load_pipeline
    from sdtune.training import adapters

    pipe = load_pipeline(base)
    adapters.add_unet_lora(pipe.unet, rank=4, alpha=4.0)
    adapters.add_text_encoder_lora(pipe.text_encoder, rank=4, alpha=4.0)
    torch.manual_seed(seed)
    for model in (pipe.unet, pipe.text_encoder):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    return str(adapters.save_diffusers_lora(out_dir, pipe.unet, pipe.text_encoder).parent)


def test_switching_loras_keeps_the_engine_and_gives_a_fresh_loads_pixels(gen):
    from sdtune.generation.engine import Engine
    from sdtune.models.embedded import embedded_model

    base = str(embedded_model("base"))
    a = _random_lora(base, gen.sandbox.outputs / "lora_a", 1)
    b = _random_lora(base, gen.sandbox.outputs / "lora_b", 2)
    req = dict(prompt="a photo of a red ball", steps=6, seed=9)
    loads = gen.loads
    plain = gen.generate("txt2img", **req)[0][1]
    with_a = gen.generate("txt2img", lora=a, **req)[0]
    with_b_half = gen.generate("txt2img", lora=b, lora_scale=0.5, **req)[0]
    again_plain = gen.generate("txt2img", lora="", **req)[0][1]
    again_a = gen.generate("txt2img", lora=a, **req)[0][1]
    assert gen.loads == loads and gen.lora_switches >= 3  # the model was never read again

    def same(x, y):
        return np.array_equal(np.asarray(x), np.asarray(y))

    fresh_a = Engine.load(base, lora=a).generate("txt2img", **req)[0].image
    fresh_b = Engine.load(base, lora=b, lora_scale=0.5).generate("txt2img", **req)[0].image
    assert same(with_a[1], fresh_a) and same(again_a, fresh_a) and same(with_b_half[1], fresh_b)
    assert same(again_plain, plain) and not same(plain, fresh_a)
    assert with_a[2]["lora"] == str(Path(a).resolve()) and with_b_half[2]["lora_scale"] == 0.5
    with pytest.raises(SdtuneError):
        gen.generate("txt2img", lora=str(gen.sandbox.outputs / "missing"), **req)
    assert same(gen.generate("txt2img", **req)[0][1], plain)  # a refused LoRA left the engine as it was


def test_a_huge_image_from_the_editor_is_refused(gen):
    with pytest.raises(SdtuneError, match="the limit is"):
        gen.input_image(Image.new("RGB", (5000, 5000)))


def test_clicking_a_gallery_image_shows_its_parameters():
    from sdtune.ui.app import select_handler

    state = [("b.png", "b", {"seed": 2}), ("a.png", "a", {"seed": 1})]
    assert json.loads(select_handler(state, 1)) == {"seed": 1}
    assert select_handler(state, 5) is None and select_handler([], 0) is None


def test_inspect_tools_and_their_errors(gen):
    from sdtune.ui.app import State, inspect_grid_handler, inspect_schedule_handler, inspect_tokens_handler

    state = State(gen.sandbox, gen, None)
    assert "49406 -> <|startoftext|>" in inspect_tokens_handler(state, "a photo")
    path, text = inspect_schedule_handler(state, "lms")
    assert Path(path).is_file() and Path(path).parent == gen.sandbox.outputs / "ui" / "inspect" and "LMS" in text
    two, status = inspect_grid_handler(state, "schedulers", "a photo of a red ball", "pndm,euler", 3, 1)
    assert status.startswith("schedulers")
    three, status = inspect_grid_handler(state, "guidance", "a photo", "1,7.5,12", 3, 1)
    assert two.width * 3 == three.width * 2  # one tile per scheduler / per scale
    assert inspect_grid_handler(state, "schedulers", "x", "pndm,nope", 3, 1) == \
        (None, inspect_grid_handler(state, "schedulers", "x", "nope", 3, 1)[1])
    assert "unknown scheduler 'nope'" in inspect_grid_handler(state, "schedulers", "x", "nope", 3, 1)[1]
    assert inspect_grid_handler(state, "guidance", "x", "a,b", 3, 1)[1].startswith("sdtune: error: scales")
    assert inspect_grid_handler(state, "guidance", "x", "1", 0, 1)[1].startswith("sdtune: error: --steps")


def test_switching_an_unfused_lora_restores_the_weights_exactly(gen, monkeypatch):
    """Where fusing is not exact enough (fp16 on a GPU) the LoRA stays as adapter layers; taking it off must
    drop them and give the plain model's pixels again. Forced here on the CPU."""
    from sdtune.models import lora as lora_mod
    from sdtune.models.embedded import embedded_model

    monkeypatch.setattr(lora_mod, "FUSE_TOLERANCE", -1.0)  # never fuse
    a = _random_lora(str(embedded_model("base")), gen.sandbox.outputs / "lora_unfused", 3)
    req = dict(prompt="a photo of a blue ball", steps=5, seed=4)
    plain = gen.generate("txt2img", **req)[0][1]
    loads = gen.loads
    (_, tuned, params), = gen.generate("txt2img", lora=a, **req)
    assert params["lora_fused"] is False and lora_mod._lora_layers(gen.engine.unets["base"])
    again = gen.generate("txt2img", **req)[0][1]
    assert not lora_mod._lora_layers(gen.engine.unets["base"]) and not lora_mod._lora_layers(gen.engine.text_encoder)
    assert np.array_equal(np.asarray(again), np.asarray(plain)) and not np.array_equal(np.asarray(tuned),
                                                                                        np.asarray(plain))
    assert gen.loads == loads


def test_switching_the_inpaint_model_loads_only_that_one(gen):
    """Another inpaint model: only it is read (the held engine keeps its VAE, text encoder and base UNet), the
    LoRA comes back on it, and the pixels are a fresh load's."""
    import shutil

    from sdtune.generation.engine import Engine
    from sdtune.models.embedded import embedded_model

    base = str(embedded_model("base"))
    other = gen.sandbox.outputs / "inpaint_copy"
    # another folder, the same weights (the links to the base's VAE and text encoder copied as files)
    shutil.copytree(embedded_model("inpaint"), other, symlinks=False, dirs_exist_ok=True)
    lora = _random_lora(base, gen.sandbox.outputs / "lora_c", 3)
    src = Image.new("RGB", (64, 64), (40, 160, 60))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    req = dict(prompt="a photo of a red ball", steps=4, seed=2, image=src, mask=mask, lora=lora)
    first = gen.generate("inpaint", **req)[0][1]
    loads, partial, shared = gen.loads, gen.partial_loads, (gen.engine.vae, gen.engine.unets["base"])
    switched = gen.generate("inpaint", inpaint_model=str(other), **req)[0]
    assert gen.loads == loads and gen.partial_loads == partial + 1
    assert (gen.engine.vae, gen.engine.unets["base"]) == shared
    assert switched[2]["inpaint_model"] == str(other.resolve()) and switched[2]["lora"] == str(Path(lora).resolve())
    fresh = Engine.load(base, inpaint_model=str(other), lora=lora).generate(
        "inpaint", **{k: v for k, v in req.items() if k != "lora"})[0].image
    assert np.array_equal(np.asarray(switched[1]), np.asarray(fresh))
    assert np.array_equal(np.asarray(switched[1]), np.asarray(first))  # same weights, another folder: same image
    back = gen.generate("inpaint", **req)[0][1]
    assert gen.loads == loads and np.array_equal(np.asarray(back), np.asarray(first))


def test_the_page_passes_the_guidance_interval_on_and_a_png_restores_it(gen):
    from sdtune.ui.app import State, generate_handler, restore_handler

    state = State(gen.sandbox, gen, None)
    gallery, params, status, depth, kept, _ = generate_handler(
        state, "txt2img", None, "", "", "", 1.0, "p", "", 4, 7.5, 0, 0, 0, "default", 1, 0.8, None, None, [],
        " 0.3,0.8 ")
    assert status.startswith("txt2img done at") and json.loads(params)["guidance_interval"] == [0.3, 0.8]
    *_, interval, status = restore_handler(state, kept[0][0])
    assert interval == "0.3,0.8" and status.startswith("restored")
    gallery, params, status, depth, kept, _ = generate_handler(
        state, "txt2img", None, "", "", "", 1.0, "p", "", 4, 7.5, 0, 0, 0, "default", 1, 0.8, None, None, kept, "")
    assert json.loads(params)["guidance_interval"] is None  # the empty box: every step guided


def write_lora(folder, recommended=None):
    """A tiny safetensors named as a LoRA folder holds it, with the sdtune_recommended metadata of a run's sweep."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"sdtune_recommended": json.dumps(recommended)} if recommended is not None else None
    save_file({"x": torch.zeros(1)}, str(folder / "pytorch_lora_weights.safetensors"), metadata=metadata)
    return folder


def test_picking_a_lora_with_recommended_settings_sets_the_sliders(sandbox):
    from sdtune.ui.app import State, lora_settings_handler

    state = State(sandbox, None, None)
    write_lora(sandbox.outputs / "dog", {"guidance": 3, "lora_scale": 1, "guidance_interval": None})
    assert lora_settings_handler(state, "dog") == [3.0, 1.0, "", "using the LoRA's recommended settings: guidance 3, "
                                                                  "LoRA scale 1 (change them to override)"]
    lora = write_lora(sandbox.outputs / "cat", {"guidance": 4.5, "lora_scale": 0.75, "guidance_interval": [0.2, 0.9]})
    guidance, scale, interval, status = lora_settings_handler(state, str(lora))
    assert (guidance, scale, interval) == (4.5, 0.75, "0.2,0.9")
    assert status == ("using the LoRA's recommended settings: guidance 4.5, LoRA scale 0.75, guidance interval "
                      "0.2,0.9 (change them to override)")


@pytest.mark.parametrize("lora", ["", "plain"])
def test_a_lora_without_recommended_settings_leaves_the_form_alone(sandbox, lora):
    """No LoRA, or one without the metadata: nothing changes, nothing fails."""
    from sdtune.ui.app import UNCHANGED, State, lora_settings_handler

    write_lora(sandbox.outputs / "plain")
    assert lora_settings_handler(State(sandbox, None, None), lora) == [UNCHANGED] * 4


@pytest.mark.parametrize("lora, message", [
    ("missing", "LoRA missing: not found (looked for "), ("/etc", "outside the folders the UI may use"),
    ("broken", "LoRA pytorch_lora_weights.safetensors: not a readable .safetensors file")])
def test_a_bad_lora_is_said_when_it_is_picked(sandbox, lora, message):
    """A missing LoRA, one outside the sandbox, a file that is no safetensors: said in the status line at the
    pick, not at Generate; the sliders stay as they are."""
    from sdtune.ui.app import UNCHANGED, State, lora_settings_handler

    (sandbox.outputs / "broken").mkdir()
    (sandbox.outputs / "broken" / "pytorch_lora_weights.safetensors").write_bytes(b"not safetensors at all")
    *fields, status = lora_settings_handler(State(sandbox, None, None), lora)
    assert fields == [UNCHANGED] * 3 and status.startswith("sdtune: error: ") and message in status
