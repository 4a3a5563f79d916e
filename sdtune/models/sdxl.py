"""SDXL's conditioning: prompts through both text encoders, the pooled embedding and the size/crop time ids.

SDXL reads a prompt with two CLIP text encoders (ViT-L, ``text_encoder``; OpenCLIP bigG,
``text_encoder_2``) and conditions the UNet on

* ``prompt_embeds``: the penultimate hidden states of both, concatenated along the feature axis
  (768 + 1280 = 2048 wide in SDXL), as cross-attention context;
* ``pooled_prompt_embeds``: ``text_encoder_2``'s projected pooled output (``text_embeds``);
* ``add_time_ids``: (original height, original width, crop top, crop left, target height, target width)
  of the training image - "micro-conditioning" on the size the image had before it was resized and on
  the crop taken from it.

Long prompts are chunked as for SD (``sdtune.models.prompts``): windows of 75 tokens, each wrapped in
BOS/EOS and padded to 77 by its own tokenizer, encoded on its own by both encoders, concatenated along the
sequence. The pooled embedding is the first window's, as A1111 and kohya's SDXL tools take it. A prompt of
<= 75 tokens gives exactly the stock pipeline's embeddings.

The unconditional embedding: SDXL's pipelines use zeros (for both the sequence and the pooled embedding)
when the negative prompt is empty and the model's ``force_zeros_for_empty_prompt`` is set (SDXL base and
inpainting set it: Stability trained SDXL's caption dropout by zeroing the embeddings), otherwise the
encoded empty prompt. sdtune does the same at inference (``encode_prompts_xl``) and for caption dropout in
training (``encode_batch_xl`` with ``dropped``), so classifier-free guidance sees what training learned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtune.models.prompts import CHUNK, EncodedPrompts, _window_batch, _windows, prompt_pair_ids, token_ids


@dataclass
class EncodedPromptsXL(EncodedPrompts):
    pooled_prompt_embeds: torch.Tensor | None = None  # (1, pooled dim)
    negative_pooled_prompt_embeds: torch.Tensor | None = None


def _hidden_and_pooled(tokenizer, text_encoder, per_prompt: list[list[list[int]]], device, want_pooled: bool):
    """Prompts' windows through one encoder: (prompts, windows * 77, dim) penultimate hidden states, and the
    pooled ``text_embeds`` of each prompt's first window (``want_pooled``: the encoder has a projection)."""
    n, w = len(per_prompt), len(per_prompt[0])
    ids, _ = _window_batch(tokenizer, [win for windows in per_prompt for win in windows])
    out = text_encoder(ids.to(device), output_hidden_states=True)
    hidden = out.hidden_states[-2]
    hidden = hidden.reshape(n, w * hidden.shape[1], hidden.shape[-1])
    pooled = out[0].reshape(n, w, -1)[:, 0] if want_pooled else None
    return hidden, pooled


def _encode_both(tokenizers, text_encoders, per_prompt, device):
    hiddens, pooled = [], None
    for i, (tok, te) in enumerate(zip(tokenizers, text_encoders)):
        h, p = _hidden_and_pooled(tok, te, per_prompt, device, want_pooled=i == len(text_encoders) - 1)
        hiddens.append(h)
        pooled = p
    return torch.cat(hiddens, dim=-1), pooled  # in the encoders' dtype (the stock pipelines cast to the second's)


def _pad_windows(lists: list[list[list[int]]]) -> list[list[list[int]]]:
    n = max(len(w) for w in lists)
    return [w + [[]] * (n - len(w)) for w in lists]


@torch.no_grad()
def encode_prompts_xl(tokenizers, text_encoders, prompt: str, negative_prompt: str = "", *,
                      long_prompt: str = CHUNK, force_zeros_for_empty_prompt: bool = True,
                      device=None) -> EncodedPromptsXL:
    """SDXL's embeddings (sequence + pooled) for ``prompt`` and ``negative_prompt``, as the stock pipeline
    computes them for prompts of <= 75 tokens; longer ones chunked, or cut with a warning (``truncate``)."""
    device = device or text_encoders[-1].device
    # Both SDXL tokenizers share CLIP's BPE vocabulary: the same tokens, the same windows for both encoders.
    pos, neg, width, truncated = prompt_pair_ids(tokenizers[0], prompt, negative_prompt, long_prompt,
                                                 reader="the text encoders read")
    pos_w, neg_w = _pad_windows([_windows(pos, width), _windows(neg, width)])
    embeds, pooled = _encode_both(tokenizers, text_encoders, [pos_w], device)
    if not (negative_prompt or "") and force_zeros_for_empty_prompt:
        neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        neg_embeds, neg_pooled = _encode_both(tokenizers, text_encoders, [neg_w], device)
    return EncodedPromptsXL(prompt_embeds=embeds, negative_prompt_embeds=neg_embeds, prompt_tokens=len(pos),
                            windows=len(pos_w), truncated=truncated, pooled_prompt_embeds=pooled,
                            negative_pooled_prompt_embeds=neg_pooled)


def encode_batch_xl(tokenizers, text_encoders, prompts: list[str], dropped: list[bool] | None = None,
                    force_zeros_for_empty_prompt: bool = True, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training's view of a batch of captions: (N, 77 x windows, dim) and (N, pooled dim), captions read whole.

    ``dropped[i]`` (caption dropout) makes example i unconditional: zeros when ``force_zeros_for_empty_prompt``
    (what SDXL's pipelines feed the unconditional branch), else the encoded empty prompt. Gradients flow through
    both encoders, so text-encoder LoRAs train through it.
    """
    device = device or text_encoders[-1].device
    dropped = dropped or [False] * len(prompts)
    zero = force_zeros_for_empty_prompt
    texts = ["" if d else (p or "") for p, d in zip(prompts, dropped)]
    width = tokenizers[0].model_max_length - 2
    windows = _pad_windows([_windows(token_ids(tokenizers[0], t), width) for t in texts])
    embeds, pooled = _encode_both(tokenizers, text_encoders, windows, device)
    if zero and any(dropped):
        keep = torch.tensor([not d for d in dropped], device=embeds.device, dtype=embeds.dtype)
        embeds = embeds * keep[:, None, None]
        pooled = pooled * keep[:, None]
    return embeds, pooled


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int],
             dtype=torch.float32, device=None) -> torch.Tensor:
    """SDXL's six add_time_ids, (original h, w, crop top, left, target h, w), as the pipelines build them."""
    return torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=dtype, device=device)


def check_time_ids_fit(unet, text_encoder_2) -> None:
    """The UNet's added-conditioning input must be 6 time ids x its time embedding + the pooled width."""
    from sdtune.errors import SdtuneError

    cfg = unet.config
    want = cfg.projection_class_embeddings_input_dim
    got = 6 * cfg.addition_time_embed_dim + int(text_encoder_2.config.projection_dim)
    if want != got:
        raise SdtuneError(f"the UNet expects {want}-wide added conditioning but 6 time ids and the pooled text "
                          f"embedding give {got} (an SDXL refiner, which conditions on an aesthetic score?); "
                          "use an SDXL base model")
