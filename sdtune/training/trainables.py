"""What trains and how: the base model's precision, the adapters (or full weights), and the optimizer's groups over
them (the optimizer itself: ``sdtune.training.optimizers``).
"""
from __future__ import annotations

import torch

from sdtune.errors import SdtuneError
from sdtune.training import adapters, identifier
from sdtune.training import sdxl as sdxl_parts
from sdtune.training.config import TrainConfig


def text_encoder_trains(cfg: TrainConfig) -> bool:
    """Whether the text encoder has trainable weights: its LoRA (``train_text_encoder``), or only the identifier's
    embedding rows (``train_identifier_embedding`` alone: pivotal tuning with every other word frozen)."""
    return cfg.train_text_encoder or (cfg.method == "lora" and cfg.train_identifier_embedding)


def weight_dtype_of(cfg: TrainConfig) -> torch.dtype:
    """The precision of what is frozen (the trained weights stay fp32 masters)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)


def prepare_models(cfg: TrainConfig, pipe, sdxl: bool, identifiers: list[str]) -> torch.dtype:
    """Set up what trains in ``pipe``, in place: half precision for what is frozen, the adapters (or full weights)
    trainable in fp32, gradient checkpointing, train/eval modes. Returns the VAE's dtype."""
    from diffusers.training_utils import cast_training_params

    vae, unet, text_encoder = pipe.vae, pipe.unet, pipe.text_encoder
    text_encoders = [text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    weight_dtype, te_trains = weight_dtype_of(cfg), text_encoder_trains(cfg)
    half = weight_dtype != torch.float32
    # SDXL's VAE overflows in fp16 (its config says force_upcast, as the SDXL pipelines honour): keep it fp32.
    vae_dtype = torch.float32 if sdxl and vae.config.get("force_upcast", False) else weight_dtype
    vae.requires_grad_(False)
    for te in text_encoders:
        te.requires_grad_(False)
    if half:
        vae.to(dtype=vae_dtype)
        if cfg.method == "lora" or not cfg.train_text_encoder:
            for te in text_encoders:
                te.to(dtype=weight_dtype)
    if cfg.method == "lora":
        if half:
            unet.to(dtype=weight_dtype)  # frozen base in half precision; the adapters stay fp32 below
        adapters.add_unet_adapter(unet, cfg)
        if cfg.train_text_encoder:
            for te in text_encoders:
                adapters.add_text_encoder_adapter(te, cfg)
        if cfg.train_identifier_embedding:  # the identifier's own embedding rows (pivotal tuning)
            if sdxl:
                raise SdtuneError("train_identifier_embedding works with SD 1.x/2.x models so far, not SDXL; "
                                  "set train_identifier_embedding: false")
            identifier.attach(text_encoder, pipe.tokenizer, identifiers)
        cast_training_params([unet, *text_encoders] if te_trains else [unet], dtype=torch.float32)
    else:
        unet.requires_grad_(True)
        for te in text_encoders:
            te.requires_grad_(cfg.train_text_encoder)
    if sdxl and cfg.train_text_encoder:
        sdxl_parts.freeze_unread_layers(text_encoder)  # SDXL reads its penultimate layer only
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if te_trains:
            for te in text_encoders:
                te.gradient_checkpointing_enable()
    unet.train()
    for te in text_encoders:
        te.train(te_trains)
    return vae_dtype


def param_groups(cfg: TrainConfig, unet, text_encoders: list) -> list[dict]:
    """The optimizer's groups: the UNet's trainables; the text encoders' (their own learning rate); the
    identifier's embedding rows (their own learning rate, no weight decay)."""
    groups = [{"params": adapters.trainable_parameters(unet), "lr": cfg.learning_rate}]
    if text_encoder_trains(cfg):
        rows = identifier.rows_of(text_encoders[0])
        rows = [rows.identifier_rows] if rows is not None else []
        lora_params = [p for te in text_encoders for p in adapters.trainable_parameters(te)
                       if not any(p is r for r in rows)]
        if lora_params:
            groups.append({"params": lora_params, "lr": cfg.text_encoder_learning_rate or cfg.learning_rate})
        if rows:  # no weight decay: it would pull the identifier towards the zero vector, not towards a word
            groups.append({"params": rows, "lr": cfg.identifier_learning_rate or cfg.learning_rate,
                           "weight_decay": 0.0})
    return groups
