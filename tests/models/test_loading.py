"""Model loading (sdtune.models.loading) and the single-file export it reads back (sdtune.models.convert)."""
import os
import pickle
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.models.convert import export_single_file
from sdtune.models.convert import main as convert_main
from sdtune.models.loading import describe, load_pipeline

EXPECTED = {
    # variant: (pipeline class, family, prediction type, UNet input channels)
    "sd1": ("StableDiffusionPipeline", "sd1", "epsilon", 4),
    "sd2v": ("StableDiffusionPipeline", "sd2", "v_prediction", 4),
    "inpaint": ("StableDiffusionInpaintPipeline", "sd1", "epsilon", 9),
    "depth": ("StableDiffusionDepth2ImgPipeline", "sd2", "v_prediction", 5),
}


def _pixels(pipe, seed=5):
    return pipe("a red fox", negative_prompt="blurry", num_inference_steps=2, guidance_scale=6.0, width=32,
                height=32, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_folder_gives_pipeline_class_and_description(tiny_models, variant):
    cls_name, family, prediction, channels = EXPECTED[variant]
    pipe = load_pipeline(tiny_models[variant])
    assert type(pipe).__name__ == cls_name
    info = describe(pipe)
    assert (info.family, info.prediction_type, info.unet_in_channels) == (family, prediction, channels)
    assert info.mode == {4: "txt2img", 9: "inpaint", 5: "depth2img"}[channels]
    assert info.vae_scale_factor == 2 and info.scaling_factor == pytest.approx(0.18215)
    assert info.text_dim == 32


def test_dtype_is_applied(tiny_models):
    pipe = load_pipeline(tiny_models["sd1"], dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16


def _pickle_folder(src, dst):
    """A copy of ``src`` whose UNet and VAE weights are .bin (pickle) files, as older folders have."""
    shutil.copytree(src, dst)
    for sub in ("unet", "vae"):
        st = dst / sub / "diffusion_pytorch_model.safetensors"
        torch.save(load_file(st), dst / sub / "diffusion_pytorch_model.bin")
        st.unlink()
    return dst


def test_pickle_weights_in_folder_refused_without_flag(tiny_models, tmp_path):
    folder = _pickle_folder(tiny_models["sd1"], tmp_path / "old")
    with pytest.raises(SdtuneError, match=r"pickle weights .* for unet, vae.*--allow-pickle"):
        load_pipeline(folder)
    trusted = load_pipeline(folder, allow_pickle=True)
    reference = load_file(tiny_models["sd1"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(trusted.unet.state_dict()[k], v) for k, v in reference.items())


class _Trap:
    """Unpickling this writes a marker file: proof that a refused checkpoint was never opened."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_ckpt_single_file_refused_without_flag_and_never_unpickled(tiny_models, tmp_path):
    marker = tmp_path / "was_unpickled"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": _Trap(str(marker))}))
    for suffix in (".ckpt", ".bin", ".pt", ".pth"):
        path = ckpt.with_suffix(suffix)
        if path != ckpt:
            shutil.copy(ckpt, path)
        with pytest.raises(SdtuneError, match="pickle checkpoint.*--allow-pickle"):
            load_pipeline(path, config=tiny_models["sd1"])
    assert not marker.exists()


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """Single-file LDM-layout exports of the tiny sd1, sd2v and inpaint models."""
    out = tmp_path_factory.mktemp("single")
    return {v: export_single_file(tiny_models[v], out / f"{v}.safetensors") for v in ("sd1", "sd2v", "inpaint")}


def test_single_safetensors_without_config_is_a_clear_error(exported):
    with pytest.raises(SdtuneError, match="single-file checkpoint; pass --config"):
        load_pipeline(exported["sd1"])


def test_single_file_config_must_be_a_diffusers_folder(exported, tmp_path):
    with pytest.raises(SdtuneError, match="not a diffusers folder"):
        load_pipeline(exported["sd1"], config=tmp_path)


@pytest.mark.parametrize("variant", ["sd1", "sd2v", "inpaint"])
def test_single_file_with_config_gives_same_pixels(tiny_models, exported, variant):
    from_folder = load_pipeline(tiny_models[variant])
    from_file = load_pipeline(exported[variant], config=tiny_models[variant])
    assert type(from_file) is type(from_folder)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(from_folder, part).state_dict(), getattr(from_file, part).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    if variant == "inpaint":
        return  # weights identical; the pixel check below needs txt2img inputs
    assert np.abs(_pixels(from_file) - _pixels(from_folder)).max() < 1e-6


def test_export_is_in_the_original_layout(exported):
    sd1 = load_file(exported["sd1"])
    sd2 = load_file(exported["sd2v"])
    prefixes = {k.split(".")[0] for k in sd1}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd1
    # one resnet per tiny down block: input_blocks 1 = resnet(+attention), 2 = block 0's downsampler
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in sd1
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in sd1
    assert sd1["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv, as in LDM
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd1
    # SD 2: OpenCLIP names with fused q/k/v.
    assert "cond_stage_model.model.token_embedding.weight" in sd2
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in sd2
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd2)


def _meta_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # full-size architectures, no memory
        return dict(
            unet1=UNet2DConditionModel(cross_attention_dim=768, sample_size=64),
            unet2=UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                       use_linear_projection=True, sample_size=96),
            vae=AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
            clip=CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12)),
            openclip=CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                                  num_attention_heads=16, hidden_act="gelu")),
        )


def test_full_size_layout_matches_diffusers_reader():
    """At SD's real sizes, diffusers' own single-file reader inverts our export key for key."""
    from diffusers.loaders import single_file_utils as sfu

    from sdtune.models import convert

    m = _meta_models()
    for name in ("unet1", "unet2"):
        state = m[name].state_dict()
        ldm = convert.unet_to_ldm(state, m[name].config)
        assert len(ldm) == len(state) == 686  # the SD 1.5/2.1 UNet's key count
        for landmark in ("input_blocks.11.0.in_layers.0.weight", "output_blocks.2.1.conv.weight",
                         "output_blocks.5.2.conv.weight", "middle_block.1.proj_in.weight", "out.2.bias"):
            assert landmark in ldm
        back = sfu.convert_ldm_unet_checkpoint({convert.UNET_PREFIX + k: v for k, v in ldm.items()},
                                               dict(m[name].config))
        assert back.keys() == state.keys()
        assert all(back[k].shape == state[k].shape for k in state)
    state = m["vae"].state_dict()
    ldm = convert.vae_to_ldm(state, m["vae"].config)
    assert len(ldm) == 248 and "decoder.up.3.upsample.conv.weight" in ldm and "decoder.up.0.block.2.conv2.bias" in ldm
    back = sfu.convert_ldm_vae_checkpoint({convert.VAE_PREFIX + k: v for k, v in ldm.items()}, dict(m["vae"].config))
    assert back.keys() == state.keys() and all(back[k].shape == state[k].shape for k in state)
    assert len(convert.clip_to_ldm(m["clip"].state_dict())) == 196  # SD 1.5's 197 less position_ids
    state = m["openclip"].state_dict()
    ldm = convert.openclip_to_ldm(state)
    assert ldm["transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)
    back = sfu.convert_open_clip_checkpoint(m["openclip"], {convert.OPENCLIP_PREFIX + k: v for k, v in ldm.items()})
    back = {k.removeprefix("text_model."): v for k, v in back.items()}
    assert back.keys() == {k for k in state if not k.endswith("position_ids")}
    assert all(back[k].shape == state[k].shape for k in back)


def test_convert_module_cli(tiny_models, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert convert_main([str(tiny_models["sd1"]), str(out), "--dtype", "fp16"]) == 0
    assert load_file(out)["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert convert_main([str(tiny_models["sd1"]), str(tmp_path / "m.ckpt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "missing"), str(tmp_path / "x.safetensors")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow  # a fresh interpreter importing torch + diffusers
def test_python_dash_m_convert(tiny_models, tmp_path):
    out = tmp_path / "cli.safetensors"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "sdtune.models.convert", str(tiny_models["sd2v"]), str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "cond_stage_model.model.positional_embedding" in load_file(out)


def test_single_file_depth_model(tiny_models, tmp_path):
    """diffusers has no single-file depth2img loader; sdtune reads UNet/VAE/text encoder from the file
    and the depth estimator from --config."""
    from sdtune.models.fixtures import tiny_pipeline

    finetuned = tiny_pipeline("depth", seed=1)  # other weights than the config folder's
    out = export_single_file(finetuned, tmp_path / "depth.safetensors")
    pipe = load_pipeline(out, config=tiny_models["depth"])
    assert type(pipe).__name__ == "StableDiffusionDepth2ImgPipeline" and pipe.unet.config.in_channels == 5
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(finetuned, part).state_dict(), getattr(pipe, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    folder_estimator = load_pipeline(tiny_models["depth"]).depth_estimator.state_dict()
    assert all(torch.equal(v, pipe.depth_estimator.state_dict()[k]) for k, v in folder_estimator.items())


@pytest.mark.parametrize("source", ["/no/such/folder", "./missing", "missing.safetensors", "a/b/c"])
def test_missing_path_is_a_clear_error(source):
    with pytest.raises(SdtuneError, match="model not found"):
        load_pipeline(source)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(SdtuneError, match="no model_index.json"):
        load_pipeline(tmp_path)


def test_uncached_hub_id_offline_fails_without_network(monkeypatch, tmp_path):
    attempts = []

    def no_connect(self, address, *a, **k):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    with pytest.raises(SdtuneError, match="not in the local cache and HF_HUB_OFFLINE is set"):
        load_pipeline("sdtune-tests/not-a-cached-model")
    assert attempts == []


def test_export_refuses_unfused_lora_and_carries_fused_weights(tiny_models, tmp_path):
    from peft import LoraConfig

    pipe = load_pipeline(tiny_models["sd1"])
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))  # random B: the LoRA changes the weights
    with pytest.raises(SdtuneError, match="unfused LoRA"):
        export_single_file(pipe, tmp_path / "lora.safetensors")
    assert not (tmp_path / "lora.safetensors").exists()
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    out = export_single_file(pipe, tmp_path / "fused.safetensors")
    back = load_pipeline(out, config=tiny_models["sd1"])
    fused, loaded = pipe.unet.state_dict(), back.unet.state_dict()
    assert all(torch.equal(fused[k], loaded[k]) for k in fused)
    base = load_file(tiny_models["sd1"] / "unet" / "diffusion_pytorch_model.safetensors")
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(loaded[key], base[key])  # the fine-tune reached the file
