"""Stable Diffusion 3 / 3.5: recognising the family from its own config, loading it, and its prompts.

SD3 is an MMDiT (``SD3Transformer2DModel``, the pipeline's ``transformer``) trained with flow matching,
with a 16-channel VAE (latents ``(x - shift_factor) * scaling_factor``) and three text encoders:
CLIP-L (``text_encoder``), CLIP-G (``text_encoder_2``), both ``CLIPTextModelWithProjection``, and T5
(``text_encoder_3``). It is recognised from the model's own config, never its name: ``model_index.json``'s
``_class_name`` (``StableDiffusion3...``) or a ``transformer`` entry naming ``SD3Transformer2DModel``, or
a ``transformer/config.json`` of that class; a single original-layout file by its ``joint_blocks`` keys.

T5 is the largest part of the model (4.7B parameters of SD 3.5's 8B with Large; 9.5 GB in bf16): diffusers'
SD3 pipelines run without it (``text_encoder_3=None``: its part of the sequence is zeros), which
``load_sd3`` offers as ``drop_t5``.

Prompts (``encode_prompts_sd3``) are the stock pipeline's own ``encode_prompt``: CLIP-L's and CLIP-G's
penultimate hidden states side by side, zero-padded to T5's width, followed along the sequence by T5's
states (up to ``max_sequence_length`` = 256 tokens); the pooled embedding is both CLIP projections side by
side. The negative prompt is encoded like the prompt (SD3's pipelines never use zeros for it). Long
prompts: the CLIP encoders read the first 77 tokens (as every SD3 pipeline does), T5 the first 256; the
prompt is never split into windows (there is no SD3 convention for it), and a prompt longer than CLIP's
window is said in one logged line.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtune.errors import SdtuneError
from sdtune.models.prompts import EncodedPrompts, token_ids

log = logging.getLogger("sdtune")

SD3_FILE_KEY_PREFIX = "model.diffusion_model.joint_blocks."  # an original-layout SD3 checkpoint's MMDiT
T5_MAX_TOKENS = 256  # diffusers' default max_sequence_length for SD3


def is_sd3_index(index: dict) -> bool:
    """SD3 from a pipeline's model_index.json: its class, or an SD3 transformer entry."""
    transformer = index.get("transformer")
    named = isinstance(transformer, (list, tuple)) and len(transformer) == 2 and transformer[1] == "SD3Transformer2DModel"
    return str(index.get("_class_name", "")).startswith("StableDiffusion3") or named


def is_sd3_folder(folder: Path) -> bool:
    folder = Path(folder)
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    cfg = folder / "transformer" / "config.json"
    return is_sd3_index(index) or (cfg.is_file() and
                                   json.loads(cfg.read_text()).get("_class_name") == "SD3Transformer2DModel")


def file_is_sd3(keys) -> bool:
    """An original-layout checkpoint's keys say SD3 (its MMDiT's joint blocks)."""
    return any(k.startswith(SD3_FILE_KEY_PREFIX) for k in keys)


def transformer_config(folder: Path) -> dict:
    cfg = Path(folder) / "transformer" / "config.json"
    if not cfg.is_file():
        raise SdtuneError(f"{folder} is an SD3 folder without transformer/config.json; is it complete?")
    return json.loads(cfg.read_text())


def pipeline_class(transformer_in_channels: int = 16):
    """SD3's txt2img pipeline; a 33-channel inpainting transformer is not served (none is published)."""
    from diffusers import StableDiffusion3Pipeline

    if int(transformer_in_channels) != 16:
        raise SdtuneError(f"an SD3 transformer with {transformer_in_channels} input channels is not supported; "
                          "sdtune serves SD3 models with 16 (txt2img, img2img, inpaint and a depth ControlNet)")
    return StableDiffusion3Pipeline


def no_t5_kwargs(drop_t5: bool) -> dict:
    """``from_pretrained``/``from_single_file`` arguments that leave T5 out (``drop_t5``), as diffusers allows."""
    return {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}


def is_sd3_pipeline(pipe) -> bool:
    return type(getattr(pipe, "transformer", None)).__name__ == "SD3Transformer2DModel"


def native_resolution(transformer_cfg: dict, vae_cfg: dict) -> int | None:
    """Pixels: the transformer's sample size (latent) x the VAE's downsampling."""
    size, blocks = transformer_cfg.get("sample_size"), vae_cfg.get("block_out_channels")
    return int(size) * 2 ** (len(blocks) - 1) if isinstance(size, int) and blocks else None


@dataclass
class EncodedPromptsSD3(EncodedPrompts):
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None


@torch.no_grad()
def encode_prompts_sd3(pipe, prompt: str, negative_prompt: str = "", *, long_prompt: str = "chunk",
                       device=None, max_sequence_length: int = T5_MAX_TOKENS) -> EncodedPromptsSD3:
    """SD3's embeddings for ``prompt``/``negative_prompt``: the stock pipeline's ``encode_prompt``, so the engine's
    pixels are the stock pipeline's. CLIP reads 77 tokens; a longer prompt is said in one logged line (for
    ``long_prompt`` "chunk" and "truncate" alike: SD3 has no windowing convention, T5 reads up to 256 tokens)."""
    tokens = len(token_ids(pipe.tokenizer, prompt or ""))
    width = pipe.tokenizer.model_max_length - 2
    truncated = tokens > width
    if truncated:
        t5 = "T5 reads up to %d" % max_sequence_length if pipe.text_encoder_3 is not None else "T5 is not loaded"
        log.warning("prompt has %d CLIP tokens: SD3's CLIP encoders read the first %d (%s)", tokens, width, t5)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompt or "", prompt_2=None, prompt_3=None, negative_prompt=negative_prompt or "",
        do_classifier_free_guidance=True, device=device or pipe.text_encoder.device,
        max_sequence_length=max_sequence_length)
    return EncodedPromptsSD3(prompt_embeds=embeds, negative_prompt_embeds=neg, prompt_tokens=tokens, windows=1,
                             truncated=truncated, pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)


TEXT_ENCODER_FILE_PREFIXES = {"text_encoder": "text_encoders.clip_l.", "text_encoder_2": "text_encoders.clip_g.",
                              "text_encoder_3": "text_encoders.t5xxl."}


def load_single_file(path: Path, config: Path, *, dtype, drop_t5: bool = False):
    """One original-layout SD3 file through ``StableDiffusion3Pipeline.from_single_file(file, config=FOLDER)``.

    Stability's SD 3.5 files hold the MMDiT and the VAE only: each text encoder the file lacks is loaded from the
    config folder (diffusers' loader would otherwise refuse), T5 not at all with ``drop_t5``."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors import safe_open
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    extra = no_t5_kwargs(drop_t5)
    classes = {"text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
               "text_encoder_3": T5EncoderModel}
    for name, prefix in TEXT_ENCODER_FILE_PREFIXES.items():
        if name in extra or any(k.startswith(prefix) for k in keys):
            continue
        if not (Path(config) / name / "config.json").is_file():
            raise SdtuneError(f"{path} holds no {name} weights and --config {config} has no {name}/; pass a config "
                              "folder with the text encoders" + (" (or --no-t5)" if name == "text_encoder_3" else ""))
        extra[name] = classes[name].from_pretrained(Path(config) / name, dtype=dtype, local_files_only=True,
                                                    use_safetensors=True)
    try:
        return StableDiffusion3Pipeline.from_single_file(str(path), config=str(config), dtype=dtype,
                                                         local_files_only=True, **extra)
    except (OSError, ValueError):  # load_pipeline words these
        raise
    except Exception as exc:  # diffusers' SingleFileComponentError and the like: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdtuneError(f"could not load SD3 checkpoint {path}: {first}") from exc
