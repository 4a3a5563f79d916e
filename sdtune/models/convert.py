"""Export a diffusers Stable Diffusion model as one original-layout ``.safetensors`` file.

A1111, ComfyUI, kohya and the original CompVis/Stability code read checkpoints in the latent-
diffusion (LDM) layout: one file, UNet under ``model.diffusion_model.``, VAE under
``first_stage_model.``, text encoder under ``cond_stage_model.``. sdtune trains and saves in the
diffusers layout; this module writes the inverse of the renaming that diffusers' single-file loader
applies, so a full fine-tune can be taken to those tools (and read back by ``load_pipeline(file,
config=folder)``).

Text encoders: SD 1.x's CLIP ViT-L is stored as HF CLIP under ``cond_stage_model.transformer.``;
SD 2.x's OpenCLIP ViT-H under ``cond_stage_model.model.`` with fused q/k/v (``in_proj``). diffusers
keeps 23 of OpenCLIP's 24 layers (SD 2 conditions on the penultimate one), so an SD 2 export holds
23 layers; OpenCLIP-based loaders then report the unused last layer as missing.

SDXL (base or inpainting): UNet and VAE as above (the added ``text_time`` embedding under
``label_emb.0.``), the first text encoder (CLIP ViT-L) as HF CLIP under
``conditioner.embedders.0.transformer.``, the second (OpenCLIP bigG) under ``conditioner.embedders.1.model.``
with fused q/k/v and its ``text_projection`` as OpenCLIP's (hidden, projection) matrix.

SD 3.x: the transformer and VAE in Stability's SD 3.5 layout, without text encoders (``sd3_convert``).

Usage: ``python -m sdtune.models.convert FOLDER OUT.safetensors [--dtype fp16]``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from sdtune.errors import SdtuneError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: HF CLIPTextModel inside
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL: HF CLIPTextModel
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL: OpenCLIP bigG with its projection

# diffusers ResnetBlock2D names -> LDM ResBlock names (UNet: in_layers/out_layers are Sequentials)
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
               "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_TOP = {"conv_norm_out": "norm_out"}  # the rest of the encoder/decoder top level keeps its names
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split(key: str, prefix: str) -> tuple[int, str]:
    """'down_blocks.3.rest' with prefix 'down_blocks.' -> (3, 'rest')."""
    number, rest = key[len(prefix):].split(".", 1)
    return int(number), rest


def _rename_head(rest: str, table: dict) -> str:
    """Rename the leading module name of ``rest`` ('norm1.weight' -> 'in_layers.0.weight')."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    raise KeyError(rest)


def unet_to_ldm(state: dict, config) -> dict:
    """diffusers UNet2DConditionModel weights -> LDM ``UNetModel`` names (without prefix)."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise SdtuneError("cannot export a UNet with per-block layer counts; only SD 1.x/2.x layouts are supported")
    # In LDM every resnet(+attention) is one numbered entry of input_blocks/output_blocks; each down
    # block adds one more entry for its downsampler, each up block hides its upsampler in its last entry.
    stride = per_block + 1
    up_has_attention = {i: "CrossAttn" in t for i, t in enumerate(config["up_block_types"])}
    out = {}
    for key, value in state.items():
        head = key.rsplit(".", 1)[0]
        if head in UNET_TOP:
            new = UNET_TOP[head] + key[len(head):]
        elif key.startswith(("down_blocks.", "up_blocks.")):
            down = key.startswith("down_blocks.")
            b, rest = _split(key, "down_blocks." if down else "up_blocks.")
            kind, rest = rest.split(".", 1)
            j, rest = _split(rest, "")
            where = "input_blocks" if down else "output_blocks"
            entry = (1 if down else 0) + b * stride  # input_blocks.0 is conv_in
            if kind == "resnets":
                new = f"{where}.{entry + j}.0.{_rename_head(rest, UNET_RESNET)}"
            elif kind == "attentions":
                new = f"{where}.{entry + j}.1.{rest}"
            elif kind == "downsamplers" and down:  # an entry of its own; rest = 'conv.weight'
                new = f"{where}.{entry + per_block}.0.op.{rest.split('.', 1)[1]}"
            elif kind == "upsamplers" and not down:  # in the last entry, after the attention when the block has one
                new = f"{where}.{entry + per_block}.{2 if up_has_attention[b] else 1}.{rest}"
            else:
                raise KeyError(key)
        elif key.startswith("mid_block."):
            kind, rest = key[len("mid_block."):].split(".", 1)
            j, rest = _split(rest, "")
            if kind == "resnets":  # resnet, attention, resnet
                new = f"middle_block.{2 * j}.{_rename_head(rest, UNET_RESNET)}"
            elif kind == "attentions":
                new = f"middle_block.1.{rest}"
            else:
                raise KeyError(key)
        else:
            raise SdtuneError(f"cannot export UNet weight {key!r}: not part of the SD 1.x/2.x layout")
        out[new] = value
    return out


def vae_to_ldm(state: dict, config) -> dict:
    """diffusers AutoencoderKL weights -> LDM ``AutoencoderKL`` names (without prefix)."""
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        part, rest = key.split(".", 1) if "." in key else ("", key)
        if part not in {"encoder", "decoder"}:  # quant_conv, post_quant_conv
            out[key] = value
            continue
        if rest.startswith("down_blocks.") or rest.startswith("up_blocks."):
            up = rest.startswith("up_blocks.")
            i, rest2 = _split(rest, "up_blocks." if up else "down_blocks.")
            # LDM numbers decoder levels from the lowest resolution up; diffusers from the top.
            level = f"up.{n_up - 1 - i}" if up else f"down.{i}"
            kind, rest2 = rest2.split(".", 1)
            if kind == "resnets":
                j, rest3 = _split(rest2, "")
                new = f"{level}.block.{j}.{rest3.replace('conv_shortcut', 'nin_shortcut')}"
            elif kind in {"downsamplers", "upsamplers"}:  # rest2 = '0.conv.weight'
                new = f"{level}.{'upsample' if up else 'downsample'}.{rest2.split('.', 1)[1]}"
            else:
                raise KeyError(key)
        elif rest.startswith("mid_block.resnets."):
            j, rest2 = _split(rest, "mid_block.resnets.")
            new = f"mid.block_{j + 1}.{rest2}"
        elif rest.startswith("mid_block.attentions.0."):
            new = "mid.attn_1." + _rename_head(rest[len("mid_block.attentions.0."):], VAE_ATTN)
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        else:
            head = rest.rsplit(".", 1)[0]
            new = VAE_TOP.get(head, head) + rest[len(head):]
        out[f"{part}.{new}"] = value
    return out


def clip_to_ldm(state: dict) -> dict:
    """SD 1.x: HF CLIPTextModel weights under ``text_model.`` (newer transformers drop that level)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in state.items() if not k.endswith("position_ids")}


def openclip_to_ldm(state: dict) -> dict:
    """SD 2.x: HF CLIPTextModel weights -> OpenCLIP names, q/k/v fused into ``in_proj``."""
    out, qkv = {}, {}
    if "text_projection.weight" in state:  # SDXL's second encoder: OpenCLIP stores x @ P, HF a Linear (P.T)
        out["text_projection"] = state["text_projection.weight"].T.contiguous()
    state = {k.removeprefix("text_model."): v for k, v in state.items()
             if not k.endswith("position_ids") and k != "text_projection.weight"}
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        if not key.startswith("encoder.layers."):
            raise SdtuneError(f"cannot export text-encoder weight {key!r} in the OpenCLIP layout")
        n, rest = _split(key, "encoder.layers.")
        base = f"transformer.resblocks.{n}."
        proj = rest.split(".")[1] if rest.startswith("self_attn.") else ""
        if proj in {"q_proj", "k_proj", "v_proj"}:
            kind = rest.rsplit(".", 1)[1]  # weight | bias
            qkv.setdefault((base, kind), {})[proj[0]] = value
        else:
            out[base + _rename_head(rest, layer_names)] = value
    for (base, kind), parts in qkv.items():
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def to_ldm_state_dict(pipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole model (UNet, VAE, text encoder) in the original single-file layout."""
    from sdtune.models.loading import describe

    info = describe(pipe)
    if info.family == "sd3":  # SD 3.x: the MMDiT and VAE in Stability's layout (sdtune.models.sd3_convert)
        from sdtune.models.sd3_convert import to_original_state_dict

        return to_original_state_dict(pipe, dtype)
    if info.family not in {"sd1", "sd2", "sdxl"}:
        raise SdtuneError(f"single-file export supports SD 1.x, 2.x and SDXL; this model is {info.family}")
    parts = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if info.family == "sdxl" else ())
    for part in parts:
        if any("lora_" in k or ".base_layer." in k for k in getattr(pipe, part).state_dict()):
            raise SdtuneError(f"the {part} carries unfused LoRA layers; fuse them into the weights first "
                              "(pipe.fuse_lora(); pipe.unload_lora_weights()) so the export holds plain weights")
    text = pipe.text_encoder.state_dict()
    if info.family == "sdxl":
        text_part = {SDXL_CLIP_PREFIX + k: v for k, v in clip_to_ldm(text).items()}
        second = openclip_to_ldm(pipe.text_encoder_2.state_dict())
        text_part.update({SDXL_OPENCLIP_PREFIX + k: v for k, v in second.items()})
    elif info.family == "sd1":
        text_part = {CLIP_PREFIX + k: v for k, v in clip_to_ldm(text).items()}
    else:
        text_part = {OPENCLIP_PREFIX + k: v for k, v in openclip_to_ldm(text).items()}
    state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})
    state.update(text_part)
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}


def export_single_file(pipe_or_folder, out_path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``pipe_or_folder`` (a loaded pipeline or a diffusers folder) as one LDM-layout .safetensors."""
    from safetensors.torch import save_file

    from sdtune.imageio import atomic_path
    from sdtune.models.loading import load_pipeline

    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise SdtuneError(f"output {out_path} must end in .safetensors")
    pipe = pipe_or_folder
    if isinstance(pipe_or_folder, (str, os.PathLike)):
        pipe = load_pipeline(pipe_or_folder, device="cpu", dtype=torch.float32)
    state = to_ldm_state_dict(pipe, dtype)
    with atomic_path(out_path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "written_by": "sdtune.models.convert"})
    return out_path


def main(argv: list[str] | None = None) -> int:
    from sdtune.devices import DTYPES

    parser = argparse.ArgumentParser(prog="python -m sdtune.models.convert",
                                     description="Write a diffusers Stable Diffusion folder as one original-layout "
                                                 ".safetensors file (for A1111, ComfyUI, kohya).")
    parser.add_argument("folder", help="diffusers pipeline folder (model_index.json inside)")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="store weights in this dtype (default: as loaded, fp32)")
    args = parser.parse_args(argv)
    try:
        path = export_single_file(args.folder, args.out, DTYPES[args.dtype] if args.dtype else None)
    except SdtuneError as exc:
        print(f"sdtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
