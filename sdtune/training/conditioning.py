"""What the UNet reads besides the noisy latents and the timesteps, one encoder per model family.

The training step asks a ``Conditioner`` for the UNet inputs of a batch of prompts and never branches on the
family: SD 1.x/2.x condition on the text embeddings alone; SDXL also on its pooled embedding and the six
size/crop time ids of each example (``sdtune.training.sdxl``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtune.training import sdxl as sdxl_parts
from sdtune.training.caching import PromptEncoder


@dataclass
class UNetInputs:
    """The UNet's conditioning for a batch: cross-attention context, plus SDXL's added conditioning."""
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict | None = None

    def kwargs(self, dtype: torch.dtype) -> dict:
        out = {"encoder_hidden_states": self.encoder_hidden_states.to(dtype)}
        if self.added_cond_kwargs is not None:
            out["added_cond_kwargs"] = self.added_cond_kwargs
        return out


class Conditioner:
    """prompts (+ each example's SDXL time ids) -> ``UNetInputs``; ``encoder_calls`` counts text-encoder runs."""

    def __init__(self, encode, weight_dtype: torch.dtype, sdxl: bool):
        self.encode, self.weight_dtype, self.sdxl = encode, weight_dtype, sdxl

    @property
    def encoder_calls(self) -> int:
        return self.encode.encoder_calls

    def __call__(self, prompts: list[str], time_ids: torch.Tensor | None) -> UNetInputs:
        if not self.sdxl:
            return UNetInputs(self.encode(prompts))
        embeddings, pooled = self.encode(prompts)
        return UNetInputs(embeddings, sdxl_parts.added_cond(pooled, time_ids, self.weight_dtype))


def make_conditioner(pipe, text_encoders: list, device, *, cache: bool, weight_dtype: torch.dtype,
                     sdxl: bool) -> Conditioner:
    """The model family's conditioner over ``text_encoders`` (the training modules, or the base's own).

    ``cache``: encode each distinct prompt once (the encoders are frozen). SDXL gives dropped captions zeros when
    the model's ``force_zeros_for_empty_prompt`` is set, as its pipelines do for the unconditional branch."""
    if sdxl:
        encode = sdxl_parts.XLPromptEncoder(
            [pipe.tokenizer, pipe.tokenizer_2], text_encoders, device, cache=cache,
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)))
    else:
        encode = PromptEncoder(pipe.tokenizer, text_encoders[0], device, cache=cache)
    return Conditioner(encode, weight_dtype, sdxl)
