"""SD 3.5 recognised from its own config and loaded with diffusers' SD3 classes, on tiny random models built in code."""
from __future__ import annotations

import json
import shutil

import pytest

from sdtune.errors import SdtuneError


def test_tiny_sd3_fixture_has_sd35_parts(tiny_sd3):
    index = json.loads((tiny_sd3["sd3"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    transformer = json.loads((tiny_sd3["sd3"] / "transformer" / "config.json").read_text())
    assert transformer["qk_norm"] == "rms_norm" and transformer["dual_attention_layers"] == [0]
    vae = json.loads((tiny_sd3["sd3"] / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and vae["shift_factor"] == pytest.approx(0.0609)
    assert json.loads((tiny_sd3["sd3_controlnet"] / "config.json").read_text())["_class_name"] == "SD3ControlNetModel"


def test_sd3_folder_is_recognised_and_loaded(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    from sdtune.models.loading import describe, load_pipeline, peek_model

    pipe = load_pipeline(tiny_sd3["sd3"])
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is not None
    info = describe(pipe)
    assert (info.family, info.prediction_type, info.unet_in_channels, info.mode) == ("sd3", "flow_matching", 16,
                                                                                    "txt2img")
    peek = peek_model(tiny_sd3["sd3"])
    assert peek.sd3 and not peek.sdxl and peek.native_resolution == 32


def test_sd3_recognised_by_its_transformer_config_alone(tiny_sd3, tmp_path):
    """A folder whose model_index.json names no SD3 class still is SD3 when its transformer is an SD3 MMDiT."""
    from sdtune.models import sd3

    folder = tmp_path / "renamed"
    shutil.copytree(tiny_sd3["sd3"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "DiffusionPipeline"
    index["transformer"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert sd3.is_sd3_folder(folder)


def test_sd3_loads_without_t5(tiny_sd3):
    from sdtune.models.loading import load_pipeline

    pipe = load_pipeline(tiny_sd3["sd3"], drop_t5=True)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None


def test_sd3_controlnet_loads_as_its_class_and_misfits_are_one_line(tiny_sd3, tiny_sdxl):
    from sdtune.generation.engine import Engine
    from sdtune.models.loading import load_controlnet

    net = load_controlnet(tiny_sd3["sd3_controlnet"])
    assert type(net).__name__ == "SD3ControlNetModel"
    with pytest.raises(SdtuneError, match="not an SD3 ControlNet") as err:
        Engine.load(tiny_sd3["sd3"], controlnet=tiny_sdxl["sdxl_controlnet"], no_t5=True)
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(SdtuneError, match="not used with SD 3.x"):
        Engine.load(tiny_sd3["sd3"], inpaint_model=tiny_sdxl["sdxl_inpaint"])


def test_single_file_of_another_family_against_an_sd3_config_is_refused(tiny_sd3, tiny_sdxl, tmp_path):
    from sdtune.models.convert import export_single_file
    from sdtune.models.loading import load_pipeline

    file = export_single_file(tiny_sdxl["sdxl"], tmp_path / "xl.safetensors")
    with pytest.raises(SdtuneError, match="is an SDXL checkpoint but --config .* is an SD 3.x folder") as err:
        load_pipeline(file, config=tiny_sd3["sd3"])
    assert len(str(err.value).splitlines()) == 1


def test_sd3_single_file_round_trip(tiny_sd3, tmp_path):
    """sdtune writes Stability's SD 3.5 file layout (MMDiT + VAE); diffusers' from_single_file reads it back to the
    same weights, the text encoders coming from --config (T5 left out with drop_t5)."""
    import torch

    from sdtune.generation.engine import Engine
    from sdtune.models.convert import export_single_file
    from sdtune.models.loading import load_pipeline, peek_model

    file = export_single_file(tiny_sd3["sd3"], tmp_path / "sd35.safetensors")
    assert peek_model(file).sd3
    folder, single = load_pipeline(tiny_sd3["sd3"]), load_pipeline(file, config=tiny_sd3["sd3"])
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    engine = Engine.load(file, config=tiny_sd3["sd3"], no_t5=True)
    assert type(engine).__name__ == "SD3Engine" and engine.text_encoder_3 is None


def test_full_size_sd35_medium_layout_on_the_meta_device():
    """SD 3.5 Medium's real architecture (random, meta device): the original-layout names sdtune writes are the ones
    diffusers' single-file converter reads, every weight with its shape."""
    import torch
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from sdtune.models.sd3_convert import PREFIX, transformer_to_original

    with torch.device("meta"):
        model = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    state = model.state_dict()
    original = transformer_to_original(state, model.config)
    assert "joint_blocks.12.x_block.attn2.qkv.weight" in original and "joint_blocks.23.x_block.attn.ln_q.weight" in original
    back = convert_sd3_transformer_checkpoint_to_diffusers({PREFIX + k: v for k, v in original.items()})
    assert back.keys() == state.keys()
    assert all(back[k].shape == state[k].shape for k in state)
