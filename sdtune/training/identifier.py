"""Training the identifier's own embedding (pivotal tuning) beside the LoRA.

DreamBooth ties a subject to a rare word ("sks"). A LoRA on the text encoder's attention changes how every
word is read, and the UNet LoRA has to find the identifier among the prompt's tokens as the base model's
encoder reads it. ``train_identifier_embedding`` also trains the identifier's row(s) of the token-embedding
table, so the subject gets a vector of its own, as textual inversion gives one (diffusers' advanced DreamBooth
script does the same and calls it pivotal tuning). Only those rows change: every other word reads as before.

The rows live in ``IdentifierEmbedding``, a stand-in for the encoder's ``nn.Embedding`` that holds them as its
one parameter (checkpoints hold them with the LoRA and nothing of the 49k-row table). After training they go
back into the table and the file ``identifier_embedding.safetensors`` beside the LoRA holds them
(the engine reads it with the LoRA: ``sdtune.models.lora.read_identifier_embedding`` and ``load_identifier_embedding``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from sdtune.errors import SdtuneError
from sdtune.models.lora import IDENTIFIER_FILE, identifier_token_ids


class IdentifierEmbedding(torch.nn.Module):
    """``base`` (the token embedding) with the rows of ``token_ids`` replaced by a trainable copy."""

    def __init__(self, base: torch.nn.Embedding, token_ids: list[int]):
        super().__init__()
        self.base = base
        self.token_ids = list(token_ids)
        self.identifier_rows = torch.nn.Parameter(base.weight[self.token_ids].detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        """What readers of ``.weight`` (dtype, device, size) see: the base table."""
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        rows = self.identifier_rows.to(out.dtype)
        for k, token in enumerate(self.token_ids):  # one or a few tokens: a where per token is cheapest
            out = torch.where((input_ids == token).unsqueeze(-1), rows[k], out)
        return out


def attach(text_encoder, tokenizer, identifiers: list[str]) -> IdentifierEmbedding:
    """Put an ``IdentifierEmbedding`` for every identifier's tokens into ``text_encoder``; return it."""
    ids: list[int] = []
    for word in identifiers:
        ids += [i for i in identifier_token_ids(tokenizer, word) if i not in ids]
    module = IdentifierEmbedding(text_encoder.get_input_embeddings(), ids)
    text_encoder.set_input_embeddings(module)
    return module


def rows_of(text_encoder) -> IdentifierEmbedding | None:
    module = text_encoder.get_input_embeddings()
    return module if isinstance(module, IdentifierEmbedding) else None


def current_rows(text_encoder) -> dict[int, torch.Tensor]:
    """{token id: row} as training holds them now (the table left as it is)."""
    module = rows_of(text_encoder)
    if module is None:
        return {}
    return {token: module.identifier_rows[k].detach().float().cpu() for k, token in enumerate(module.token_ids)}


def detach(text_encoder) -> dict[int, torch.Tensor]:
    """Write the trained rows into the encoder's own table, put the table back; return {token id: row}."""
    module = rows_of(text_encoder)
    if module is None:
        return {}
    with torch.no_grad():
        for k, token in enumerate(module.token_ids):
            module.base.weight[token] = module.identifier_rows[k].to(module.base.weight.dtype)
    text_encoder.set_input_embeddings(module.base)
    return {token: module.identifier_rows[k].detach().float().cpu() for k, token in enumerate(module.token_ids)}


def save(output_dir: str | os.PathLike, rows: dict[int, torch.Tensor], tokenizer, identifiers: list[str],
         metadata: dict[str, str] | None = None) -> Path:
    """``output_dir/identifier_embedding.safetensors``: one tensor per identifier ([its tokens, width]), with
    the token ids in the metadata (checked against the tokenizer that loads it), written atomically."""
    from safetensors.torch import save_file

    from sdtune.imageio import atomic_path

    tensors, meta = {}, dict(metadata or {})
    for word in dict.fromkeys(identifiers):  # each word once, in order
        ids = identifier_token_ids(tokenizer, word)
        tensors[word] = torch.stack([rows[i] for i in ids]).contiguous()
        meta[f"token_ids.{word}"] = ",".join(map(str, ids))
    if not tensors:
        raise SdtuneError("train_identifier_embedding: no identifier to save")
    path = Path(output_dir) / IDENTIFIER_FILE
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path
