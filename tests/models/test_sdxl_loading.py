"""SDXL loading on tiny random SDXL models: folders, single files, refiners refused, ControlNets, estimators."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdtune.errors import SdtuneError


def _image(pipe, **kw):
    return pipe(prompt="a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw).images


def test_sdxl_folders_are_recognised_from_their_config(tiny_sdxl):
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    from sdtune.models.loading import describe, load_pipeline

    base = load_pipeline(tiny_sdxl["sdxl"])
    assert type(base) is StableDiffusionXLPipeline
    info = describe(base)
    assert (info.family, info.mode, info.prediction_type) == ("sdxl", "txt2img", "epsilon")
    inpaint = load_pipeline(tiny_sdxl["sdxl_inpaint"])
    assert type(inpaint) is StableDiffusionXLInpaintPipeline and describe(inpaint).mode == "inpaint"


def test_sdxl_is_read_from_the_unet_when_model_index_says_nothing(tiny_sdxl, tmp_path):
    """A folder whose model_index names a generic class: the UNet's text_time conditioning still says SDXL."""
    from sdtune.models.loading import is_sdxl_config

    index = json.loads((tiny_sdxl["sdxl"] / "model_index.json").read_text())
    unet = json.loads((tiny_sdxl["sdxl"] / "unet" / "config.json").read_text())
    assert is_sdxl_config(index, unet)
    assert is_sdxl_config({"_class_name": "DiffusionPipeline"}, unet)
    assert is_sdxl_config({"_class_name": "DiffusionPipeline", "text_encoder_2": ["transformers", "X"]}, {})
    assert not is_sdxl_config({"_class_name": "StableDiffusionPipeline", "text_encoder_2": [None, None]},
                              {"addition_embed_type": None})


def test_refiner_folder_is_refused_in_one_line(tiny_sdxl):
    from sdtune.models.loading import load_pipeline

    with pytest.raises(SdtuneError, match="SDXL refiner") as err:
        load_pipeline(tiny_sdxl["sdxl_refiner"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("variant", ["sdxl", "sdxl_inpaint"])
def test_single_sdxl_file_with_config_gives_same_weights_and_pixels(tiny_sdxl, tmp_path, variant):
    from sdtune.models.convert import export_single_file
    from sdtune.models.loading import load_pipeline

    pipe = load_pipeline(tiny_sdxl[variant])
    file = export_single_file(pipe, tmp_path / f"{variant}.safetensors")
    again = load_pipeline(file, config=tiny_sdxl[variant])
    assert type(again) is type(pipe)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, part).state_dict(), getattr(again, part).state_dict()
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), part
    if variant == "sdxl":
        assert np.array_equal(_image(pipe), _image(again))


def test_single_file_layout_is_sdxls_original_one(tiny_sdxl, tmp_path):
    from safetensors import safe_open

    from sdtune.models.convert import export_single_file

    with safe_open(str(export_single_file(tiny_sdxl["sdxl"], tmp_path / "x.safetensors")), framework="pt") as f:
        keys = set(f.keys())
        proj = f.get_tensor("conditioner.embedders.1.model.text_projection")
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # the text_time embedding
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert tuple(proj.shape) == (48, 32)  # OpenCLIP's (hidden, projection)


def test_single_file_family_and_refiner_checks(tiny_sdxl, tiny_models, tmp_path):
    from safetensors.torch import save_file

    from sdtune.models.convert import export_single_file
    from sdtune.models.loading import load_pipeline

    xl = export_single_file(tiny_sdxl["sdxl"], tmp_path / "xl.safetensors")
    with pytest.raises(SdtuneError, match="SDXL checkpoint but --config .* SD 1.x/2.x folder"):
        load_pipeline(xl, config=tiny_models["sd1"])
    sd = export_single_file(tiny_models["sd1"], tmp_path / "sd.safetensors")
    with pytest.raises(SdtuneError, match="SD 1.x/2.x checkpoint but --config .* SDXL folder"):
        load_pipeline(sd, config=tiny_sdxl["sdxl"])
    refiner = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.text_projection": torch.zeros(4, 4)}, str(refiner))
    with pytest.raises(SdtuneError, match="SDXL refiner checkpoint"):
        load_pipeline(refiner, config=tiny_sdxl["sdxl"])
    with pytest.raises(SdtuneError, match="pass --config"):
        load_pipeline(xl)


def test_uncached_sdxl_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    from sdtune.models.loading import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SdtuneError, match="could not get model stabilityai/stable-diffusion-xl-base-1.0"):
        load_pipeline("stabilityai/stable-diffusion-xl-base-1.0")


def test_controlnet_and_depth_estimator_load(tiny_sdxl, tmp_path):
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from sdtune.models.loading import load_controlnet, load_depth_estimator

    net = load_controlnet(tiny_sdxl["sdxl_controlnet"])
    assert isinstance(net, ControlNetModel) and net.config.addition_embed_type == "text_time"
    model, processor = load_depth_estimator(tiny_sdxl["depth_estimator"])
    assert model.config.model_type == "dpt" and processor is not None
    with pytest.raises(SdtuneError, match="not a diffusers ControlNet folder"):
        load_controlnet(tiny_sdxl["sdxl"])
    single = tmp_path / "cn.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(single))
    with pytest.raises(SdtuneError, match="--controlnet-config"):
        load_controlnet(single)
    again = load_controlnet(single, config=tiny_sdxl["sdxl_controlnet"])
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())
    with pytest.raises(SdtuneError, match="not a transformers model folder"):
        load_depth_estimator(tmp_path)


def _meta_sdxl():
    """SDXL base 1.0's UNet and second text encoder at their real sizes, on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            use_linear_projection=True, transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280))
    return unet, te2


def test_full_size_sdxl_layout_matches_diffusers_reader():
    """At SDXL's real sizes (UNet 2.6B), diffusers' single-file reader inverts our export key for key."""
    from diffusers.loaders import single_file_utils as sfu

    from sdtune.models import convert

    unet, te2 = _meta_sdxl()
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base 1.0's UNet
    state = unet.state_dict()
    ldm = convert.unet_to_ldm(state, unet.config)
    assert len(ldm) == len(state)
    for landmark in ("label_emb.0.0.weight", "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
                     "middle_block.1.transformer_blocks.9.ff.net.2.weight", "output_blocks.2.2.conv.weight",
                     "out.2.bias"):
        assert landmark in ldm, landmark
    back = sfu.convert_ldm_unet_checkpoint({convert.UNET_PREFIX + k: v for k, v in ldm.items()}, dict(unet.config))
    assert back.keys() == state.keys() and all(back[k].shape == state[k].shape for k in state)
    second = convert.openclip_to_ldm(te2.state_dict())
    assert second["text_projection"].shape == (1280, 1280)
    assert second["transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    back = sfu.convert_open_clip_checkpoint(te2, {convert.SDXL_OPENCLIP_PREFIX + k: v for k, v in second.items()},
                                            prefix=convert.SDXL_OPENCLIP_PREFIX)
    want = {k for k in te2.state_dict() if not k.endswith("position_ids")}
    assert set(back) == want


def test_full_size_sdxl_kohya_names_map_back_through_diffusers():
    """kohya's SDXL LoRA names (original UNet blocks) for every target of lora_targets: all, at SDXL's real
    layout, come back through diffusers' kohya conversion as the modules they were made from."""
    from diffusers import StableDiffusionXLPipeline

    from sdtune.training import adapters

    unet, _ = _meta_sdxl()
    targets = [n for n, m in unet.named_modules()
               if any(n == t or n.endswith("." + t) for t in adapters.UNET_TARGETS_ALL) and hasattr(m, "weight")]
    peft_sd = {}
    for name in targets:
        peft_sd[f"{name}.lora_A.weight"] = torch.zeros(1, 1)
        peft_sd[f"{name}.lora_B.weight"] = torch.zeros(1, 1)
    kohya = adapters.kohya_state_dict(peft_sd, None, alpha=1.0, unet_config=unet.config)
    assert not any("down_blocks" in k or "up_blocks" in k for k in kohya)
    from diffusers.utils import convert_unet_state_dict_to_peft

    back, _ = StableDiffusionXLPipeline.lora_state_dict(kohya, unet_config=unet.config)
    back = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in back.items()})  # as the loader
    modules = {k.rsplit(".lora_", 1)[0] for k in back}
    assert modules == set(targets), sorted(set(targets) ^ modules)[:5]
