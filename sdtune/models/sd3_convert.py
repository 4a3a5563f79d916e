"""SD 3.x as one original-layout file, the layout of Stability's ``sd3.5_medium.safetensors``/``sd3.5_large``.

The MMDiT under ``model.diffusion_model.`` (``joint_blocks.N.x_block``/``context_block`` with fused ``qkv``,
``x_embedder``, ``t_embedder``, ``y_embedder``, ``context_embedder``, ``final_layer``) and the VAE under
``first_stage_model.``; the text encoders are not in the file (as in Stability's SD 3.5 files, which ship
them apart): ``load_pipeline(file, config=FOLDER)`` takes them from the config folder, as diffusers'
``from_single_file`` does. This is the exact inverse of diffusers'
``convert_sd3_transformer_checkpoint_to_diffusers`` (tested: the file read back by diffusers gives the same
weights), written here because diffusers has only the reading direction.
"""
from __future__ import annotations

import torch

from sdtune.errors import SdtuneError

PREFIX = "model.diffusion_model."
TOP = {  # diffusers name -> original name, weights and biases alike
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """diffusers' ``swap_scale_shift`` (its own inverse): AdaLayerNormContinuous keeps (scale, shift), MMDiT
    (shift, scale)."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def transformer_to_original(state: dict, config) -> dict:
    """``SD3Transformer2DModel`` weights -> the original MMDiT names (without prefix)."""
    n = int(config["num_layers"])
    dual = set(config.get("dual_attention_layers") or ())
    out, used = {"pos_embed": state["pos_embed.pos_embed"]}, {"pos_embed.pos_embed"}

    def take(key):
        used.add(key)
        return state[key]

    for d, o in TOP.items():
        for p in ("weight", "bias"):
            out[f"{o}.{p}"] = take(f"{d}.{p}")
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap_halves(take(f"norm_out.linear.{p}"))
    for i in range(n):
        b, o, last = f"transformer_blocks.{i}.", f"joint_blocks.{i}.", i == n - 1
        for p in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{p}"] = torch.cat([take(f"{b}attn.to_{x}.{p}") for x in "qkv"])
            out[f"{o}context_block.attn.qkv.{p}"] = torch.cat([take(f"{b}attn.add_{x}_proj.{p}") for x in "qkv"])
            out[f"{o}x_block.attn.proj.{p}"] = take(f"{b}attn.to_out.0.{p}")
            out[f"{o}x_block.adaLN_modulation.1.{p}"] = take(f"{b}norm1.linear.{p}")
            ctx = take(f"{b}norm1_context.linear.{p}")
            out[f"{o}context_block.adaLN_modulation.1.{p}"] = _swap_halves(ctx) if last else ctx
            out[f"{o}x_block.mlp.fc1.{p}"] = take(f"{b}ff.net.0.proj.{p}")
            out[f"{o}x_block.mlp.fc2.{p}"] = take(f"{b}ff.net.2.{p}")
            if not last:  # the last block's context stream ends before its attention output
                out[f"{o}context_block.attn.proj.{p}"] = take(f"{b}attn.to_add_out.{p}")
                out[f"{o}context_block.mlp.fc1.{p}"] = take(f"{b}ff_context.net.0.proj.{p}")
                out[f"{o}context_block.mlp.fc2.{p}"] = take(f"{b}ff_context.net.2.{p}")
            if i in dual:  # SD 3.5 Medium's second self-attention on the image stream
                out[f"{o}x_block.attn2.qkv.{p}"] = torch.cat([take(f"{b}attn2.to_{x}.{p}") for x in "qkv"])
                out[f"{o}x_block.attn2.proj.{p}"] = take(f"{b}attn2.to_out.0.{p}")
        if config.get("qk_norm"):
            for d, x in (("norm_q", "x_block.attn.ln_q"), ("norm_k", "x_block.attn.ln_k"),
                         ("norm_added_q", "context_block.attn.ln_q"), ("norm_added_k", "context_block.attn.ln_k")):
                out[f"{o}{x}.weight"] = take(f"{b}attn.{d}.weight")
            if i in dual:
                out[f"{o}x_block.attn2.ln_q.weight"] = take(f"{b}attn2.norm_q.weight")
                out[f"{o}x_block.attn2.ln_k.weight"] = take(f"{b}attn2.norm_k.weight")
    left = sorted(set(state) - used)
    if left:
        raise SdtuneError(f"cannot export SD3 transformer weight {left[0]!r} in the original layout "
                          f"({len(left)} such weights)")
    return out


def to_original_state_dict(pipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """An SD 3.x pipeline's transformer and VAE in the original single-file layout."""
    from sdtune.models.convert import VAE_PREFIX, vae_to_ldm

    for part in ("transformer", "vae"):
        if any("lora_" in k or ".base_layer." in k for k in getattr(pipe, part).state_dict()):
            raise SdtuneError(f"the {part} carries unfused LoRA layers; fuse them into the weights first "
                              "(pipe.fuse_lora(); pipe.unload_lora_weights()) so the export holds plain weights")
    t = pipe.transformer
    state = {PREFIX + k: v for k, v in transformer_to_original(t.state_dict(), t.config).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
