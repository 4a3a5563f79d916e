"""Prompt encoding without a silent 77-token cut.

CLIP's text encoder sees 77 positions: <|startoftext|>, up to 75 tokens, <|endoftext|>/padding.
The stock pipelines truncate longer prompts (with only a log line). Like the A1111 and kohya tools,
sdtune instead splits the tokens into windows of 75, wraps each window with BOS/EOS and padding to
77, encodes each window on its own and concatenates the embeddings along the sequence axis
(77 -> 154 -> 231 ...). Cross-attention accepts any sequence length, so the UNet sees every token.
The negative prompt is padded with empty windows to the same length, as CFG concatenates both.

A prompt of <= 75 tokens gives exactly the stock pipeline's embedding (one window, same padding).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("sdtune")

CHUNK = "chunk"
TRUNCATE = "truncate"


@dataclass
class EncodedPrompts:
    prompt_embeds: torch.Tensor  # (1, 77 * windows, dim)
    negative_prompt_embeds: torch.Tensor  # same shape
    prompt_tokens: int  # content tokens, BOS/EOS excluded
    windows: int
    truncated: bool


def token_ids(tokenizer, text: str) -> list[int]:
    """The prompt's content token ids (no BOS/EOS, no padding, no truncation)."""
    ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    return list(ids)


def _windows(ids: list[int], width: int) -> list[list[int]]:
    if not ids:
        return [[]]
    return [ids[i:i + width] for i in range(0, len(ids), width)]


def _window_batch(tokenizer, windows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + window + EOS, padded with the tokenizer's own pad id to model_max_length (as the stock path)."""
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, masks = [], []
    for w in windows:
        ids = [tokenizer.bos_token_id, *w, tokenizer.eos_token_id]
        mask = [1] * len(ids) + [0] * (length - len(ids))
        rows.append(ids + [pad] * (length - len(ids)))
        masks.append(mask)
    return torch.tensor(rows), torch.tensor(masks)


@torch.no_grad()
def _encode_windows(tokenizer, text_encoder, windows: list[list[int]], device) -> torch.Tensor:
    return _windows_through(tokenizer, text_encoder, [windows], device)


def _windows_through(tokenizer, text_encoder, per_prompt: list[list[list[int]]], device) -> torch.Tensor:
    """Prompts' windows (each prompt the same number) through the encoder: (prompts, windows * 77, dim)."""
    n, w = len(per_prompt), len(per_prompt[0])
    ids, mask = _window_batch(tokenizer, [win for windows in per_prompt for win in windows])
    use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
    out = text_encoder(ids.to(device), attention_mask=mask.to(device) if use_mask else None)[0]
    # (prompts * windows, 77, dim) -> (prompts, windows * 77, dim): each prompt's windows side by side.
    return out.reshape(n, w * out.shape[1], out.shape[-1]).to(dtype=text_encoder.dtype)


def encode_batch(tokenizer, text_encoder, prompts: list[str], device=None) -> torch.Tensor:
    """Training's view of a batch of captions: (N, 77 x windows, dim), every caption read whole.

    Each caption is split into windows of 75 tokens exactly as at inference (a caption of <= 75 tokens is the
    stock 77-token embedding); captions with fewer windows than the batch's longest get empty windows, as the
    negative prompt does at inference. Gradients flow, so a text-encoder LoRA trains through it.
    """
    device = device or text_encoder.device
    width = tokenizer.model_max_length - 2
    windows = [_windows(token_ids(tokenizer, p or ""), width) for p in prompts]
    n = max(len(w) for w in windows)
    return _windows_through(tokenizer, text_encoder, [w + [[]] * (n - len(w)) for w in windows], device)


def prompt_pair_ids(tokenizer, prompt: str, negative_prompt: str, long_prompt: str = CHUNK,
                    reader: str = "the text encoder reads") -> tuple[list[int], list[int], int, bool]:
    """Token ids of a prompt and its negative, the encoder's window width, and whether anything was cut: whole
    for ``chunk``, cut to one window (with a warning naming what was dropped) for ``truncate``."""
    if long_prompt not in (CHUNK, TRUNCATE):
        raise ValueError(f"long_prompt must be {CHUNK!r} or {TRUNCATE!r}")
    width = tokenizer.model_max_length - 2
    pos, neg = token_ids(tokenizer, prompt or ""), token_ids(tokenizer, negative_prompt or "")
    truncated = False
    if long_prompt == TRUNCATE:
        for name, ids in (("prompt", pos), ("negative prompt", neg)):
            if len(ids) > width:
                log.warning("%s has %d tokens; %s %d, so this was cut: %r", name, len(ids), reader, width,
                            tokenizer.decode(ids[width:]))
                truncated = True
        pos, neg = pos[:width], neg[:width]
    return pos, neg, width, truncated


def encode_prompts(tokenizer, text_encoder, prompt: str, negative_prompt: str = "", *,
                   long_prompt: str = CHUNK, device=None) -> EncodedPrompts:
    """Embeddings for ``prompt`` and ``negative_prompt``; long prompts chunked or truncated (with a warning)."""
    device = device or text_encoder.device
    pos, neg, width, truncated = prompt_pair_ids(tokenizer, prompt, negative_prompt, long_prompt)
    pos_w, neg_w = _windows(pos, width), _windows(neg, width)
    n = max(len(pos_w), len(neg_w))
    # Pad the shorter side with empty windows (BOS EOS pad...), as A1111 does, so both have equal length.
    pos_w += [[]] * (n - len(pos_w))
    neg_w += [[]] * (n - len(neg_w))
    return EncodedPrompts(
        prompt_embeds=_encode_windows(tokenizer, text_encoder, pos_w, device),
        negative_prompt_embeds=_encode_windows(tokenizer, text_encoder, neg_w, device),
        prompt_tokens=len(pos), windows=n, truncated=truncated,
    )
