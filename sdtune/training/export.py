"""What a run leaves behind: validation samples, and the final weights as LoRA files or a diffusers folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from sdtune.imageio import save_image_atomic
from sdtune.training import adapters, identifier
from sdtune.training import sdxl as sdxl_parts
from sdtune.training.config import TrainConfig, concepts_of, config_to_dict, resolve_model


def sampling_pipeline(pipe, unet, text_encoder, text_encoder_2=None):
    """A stock pipeline around the modules being trained (SDXL: ``text_encoder_2``, else the pipe's own)."""
    from diffusers import StableDiffusionPipeline

    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: its second encoder is trained in place
        return sdxl_parts.sdxl_pipeline(pipe, unet, text_encoder, text_encoder_2 or pipe.text_encoder_2)
    return StableDiffusionPipeline(vae=pipe.vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                                   scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def validation_images(cfg: TrainConfig, pipe, unet, text_encoder, accelerator) -> list:
    """Sample every validation prompt from the current weights with a stock pipeline, fixed seed."""
    sampler = sampling_pipeline(pipe, unet, text_encoder)
    sampler.set_progress_bar_config(disable=True)
    images = []
    with torch.no_grad(), accelerator.autocast():
        for k, prompt in enumerate(cfg.validation_prompts):
            generator = torch.Generator("cpu").manual_seed(cfg.seed + k)
            images += sampler(prompt, num_inference_steps=cfg.validation_steps, guidance_scale=cfg.validation_guidance,
                              height=cfg.resolution, width=cfg.resolution, generator=generator).images
    return images


def run_validation(cfg, pipe, unet, text_encoder, accelerator, step, output_dir, final=False) -> list[str]:
    """Main process: sample, save to output_dir/samples, log to TensorBoard; others wait."""
    names = []
    if accelerator.is_main_process:
        import numpy as np

        unet_m, te_m = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
        was_training = unet_m.training
        unet_m.eval()
        images = validation_images(cfg, pipe, unet_m, te_m, accelerator)
        unet_m.train(was_training)
        for k, image in enumerate(images):
            name = f"samples/{'final' if final else f'step-{step:06d}'}-{k}.png"
            save_image_atomic(image, output_dir / name)
            names.append(name)
        tracker = accelerator.get_tracker("tensorboard", unwrap=True)
        if images and tracker is not None and hasattr(tracker, "add_images"):
            tracker.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
    accelerator.wait_for_everyone()
    return names


def run_metadata(cfg: TrainConfig, steps: int) -> dict[str, str]:
    """What every weights file of a run carries: its config, its base model, its step."""
    return {**adapters.config_metadata(config_to_dict(cfg)), "sdtune_base_model": str(resolve_model(cfg)),
            "sdtune_steps": str(steps)}


def export_weights(folder: Path, cfg: TrainConfig, pipe, sdxl: bool, unet, text_encoder,
                   identifier_rows: dict, metadata: dict[str, str]) -> list[str]:
    """The run's weights into ``folder`` in every format it writes: LoRA files (diffusers + kohya, and the
    identifier's embedding) or a full diffusers pipeline. Returns the names written."""
    te2 = pipe.text_encoder_2 if sdxl and cfg.train_text_encoder else None  # trained in place
    if cfg.method != "lora":
        save_full_pipeline(folder, pipe, unet, text_encoder, metadata)
        files = ["model_index.json", "unet/", "text_encoder/", "vae/", "tokenizer/", "scheduler/"]
        if sdxl:
            files[3:3] = ["text_encoder_2/", "tokenizer_2/"]
        return files
    # Before the LoRA file, which the engine finds first: a LoRA file present has its embedding beside it.
    if identifier_rows:
        identifier.save(folder, identifier_rows, pipe.tokenizer, [c.identifier for c in concepts_of(cfg)], metadata)
    else:  # an earlier run's embedding in this folder would be loaded with this run's LoRA
        (folder / identifier.IDENTIFIER_FILE).unlink(missing_ok=True)
    files = adapters.save_lora_files(folder, unet, text_encoder if cfg.train_text_encoder else None, te2,
                                     rank=cfg.lora_rank, alpha=cfg.lora_alpha or cfg.lora_rank, metadata=metadata,
                                     sdxl=sdxl)
    return files + ([identifier.IDENTIFIER_FILE] if identifier_rows else [])


def save_full_pipeline(output_dir: Path, pipe, unet, text_encoder, metadata: dict[str, str]) -> None:
    """Write a complete diffusers folder into ``output_dir``: built aside, moved in, model_index.json last."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import save_file

    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: a complete SDXL folder, both encoders
        final = sdxl_parts.sdxl_pipeline(pipe, unet, text_encoder, pipe.text_encoder_2)
    else:
        final = StableDiffusionPipeline(vae=pipe.vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                                        scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    scratch = Path(tempfile.mkdtemp(prefix=".pipeline-", suffix=".partial", dir=output_dir))
    try:
        final.save_pretrained(scratch, safe_serialization=True)
        for weights in scratch.glob("*/*.safetensors"):  # the training config rides in every weights file
            with safe_open(str(weights), framework="pt") as f:
                meta = {**(f.metadata() or {}), **metadata}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            save_file(tensors, str(weights), metadata=meta)
        entries = sorted(scratch.iterdir(), key=lambda p: p.name == "model_index.json")
        for entry in entries:
            target = output_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def final_modules(accelerator, unet, text_encoder, cfg: TrainConfig):
    """The trained modules with full weights, on every process.

    Under DDP the unwrapped module is complete. FSDP (and DeepSpeed ZeRO-3) shard parameters, so
    the full state dict is gathered (a collective: all processes call it) into fresh copies.
    (Sharded paths follow accelerate's documented API; CI runs DDP only.)
    """
    from accelerate.utils import DistributedType

    unet_m, te_m = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED) or cfg.method != "full":
        return unet_m, te_m
    unet_state = accelerator.get_state_dict(unet)
    te_state = accelerator.get_state_dict(text_encoder) if cfg.train_text_encoder else None
    if accelerator.is_main_process:
        fresh = type(unet_m).from_config(unet_m.config)
        fresh.load_state_dict(unet_state)
        unet_m = fresh
        if te_state is not None:
            te_fresh = type(te_m)(te_m.config)
            te_fresh.load_state_dict(te_state)
            te_m = te_fresh
    return unet_m, te_m
