"""The embedded model family in data/models: stock diffusers loads it offline, and it draws the world."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sdtune.models import embedded
from sdtune.world import scenes

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not embedded.has_embedded("base"), reason="data/models is not built")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_the_family_is_fp16_safetensors_and_small():
    files = [p for p in (ROOT / "data").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 50 * 2**20, "data/ must stay under 50 MB"
    weights = [p for p in (ROOT / "data" / "models").rglob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    assert not weights, f"pickle weights shipped: {weights}"
    for kind in ("base", "inpaint", "depth"):
        for path in (ROOT / "data" / "models" / kind).rglob("*.safetensors"):
            with safe_open(str(path), framework="pt") as f:
                dtypes = {f.get_tensor(k).dtype for k in f.keys()}
            assert dtypes <= {torch.float16}, (path, dtypes)


@pytest.mark.parametrize("kind,cls,in_channels", [
    ("base", "StableDiffusionPipeline", 4),
    ("inpaint", "StableDiffusionInpaintPipeline", 9),
    ("depth", "StableDiffusionDepth2ImgPipeline", 5),
])
def test_stock_diffusers_loads_each_member_offline(kind, cls, in_channels):
    import diffusers

    # fp16 on disk; fp32 for a CPU (transformers would otherwise keep the text encoder in fp16).
    pipe = getattr(diffusers, cls).from_pretrained(embedded.MODELS_DIR / kind, local_files_only=True,
                                                   dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == in_channels
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert json.loads((embedded.MODELS_DIR / kind / "model_index.json").read_text())["_class_name"] == cls
    from PIL import Image

    scene = scenes.render(scenes.Scene(kind="box", colour="blue", size="large", position="center", background="sand"),
                         size=64).image
    call = dict(prompt="a photo of a blue box on sand", num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(0))
    if kind == "inpaint":
        call.update(image=scene, mask_image=Image.new("L", (64, 64), 255), height=64, width=64)
    elif kind == "depth":
        call.update(image=scene, strength=0.9)
    else:
        call.update(height=64, width=64)
    image = pipe(**call).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_the_tokenizer_is_real_clip():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(embedded.MODELS_DIR / "base", subfolder="tokenizer")
    # The ids the course prints for this prompt with SD 1.x's tokenizer.
    assert tok("A painting of a flooble").input_ids == [49406, 320, 3086, 539, 320, 4062, 1059, 49407]
    assert tok("sks").input_ids == [49406, 48136, 49407]  # the DreamBooth identifier is one rare token
    assert len(tok) == 49408


def test_all_four_modes_run_through_one_engine_and_draw_the_prompt():
    from sdtune.generation.engine import Engine
    from sdtune.world.judge import Judge

    engine = Engine.load(embedded.embedded_model("base"), inpaint_model=embedded.embedded_model("inpaint"),
                         depth_model=embedded.embedded_model("depth"))
    assert set(engine.modes()) == {"txt2img", "img2img", "inpaint", "depth2img"}
    scene = scenes.Scene(kind="ball", colour="red", size="large", position="center", background="snow", seed=3)
    render = scenes.render(scene, size=64)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    from PIL import Image

    out = {
        "txt2img": engine.generate("txt2img", prompt="a photo of a large red ball in the center, on snow", steps=20,
                                   seed=0)[0].image,
        "img2img": engine.generate("img2img", prompt="a photo of a ball on snow", image=render.image, strength=0.5,
                                   steps=20, seed=0)[0].image,
        "inpaint": engine.generate("inpaint", prompt="a photo of a large red ball in the center, on snow",
                                   image=scenes.render(scenes.Scene(**{**scene.attrs(), "kind": "box"}), size=64).image,
                                   mask=Image.fromarray(mask, "L"), steps=20, seed=0)[0].image,
        "depth2img": engine.generate("depth2img", prompt="a photo of a ball on snow", image=render.image, strength=0.9,
                                     steps=20, seed=0)[0].image,
    }
    judge = Judge.load()
    for mode, image in out.items():
        assert image.size == (64, 64), mode
        assert np.asarray(image).std() > 5, f"{mode} drew a flat image"
        # Every mode keeps or draws the stated background: the world's easiest attribute, so a model that
        # failed to load or to condition on the prompt would miss it.
        assert judge.predict([image])[0]["background"] == "snow", mode
