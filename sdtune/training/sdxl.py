"""The SDXL pieces of the DreamBooth recipe: two text encoders, the pooled embedding, size/crop time ids.

``sdtune.training.dreambooth`` trains SDXL with the same loop as SD; what differs lives here:

* ``XLPromptEncoder``: captions through both text encoders (``sdtune.models.sdxl.encode_batch_xl``),
  giving the cross-attention context and the pooled embedding; cached per caption while the encoders are
  frozen, run every step (with gradients) when they train.
* Caption dropout: a dropped caption arrives as the empty prompt, and its embeddings are **zeros** (both the
  sequence and the pooled one) when the model's ``force_zeros_for_empty_prompt`` is set (SDXL base and
  inpainting), else the encoded empty prompt. Zeros are what SDXL's pipelines put in the unconditional branch
  of classifier-free guidance when no negative prompt is given - and what Stability's own training did for
  dropped captions - so the dropout teaches exactly the unconditional prediction inference asks for.
* ``added_cond``: the UNet's ``added_cond_kwargs`` - the pooled embedding and the six time ids per example,
  (original height, original width, crop top, crop left, target height, target width), where "original" is
  the image's own size (after EXIF rotation), the crop is the one ``sdtune.training.buckets.fit`` took from the
  image scaled to cover its bucket (center or random; mirrored with the image when flipped), and the target is
  the bucket. At inference the pipelines pass (H, W, 0, 0, H, W): an uncropped image of the requested size.
* ``sdxl_pipeline``: a stock ``StableDiffusionXLPipeline`` around the training modules (validation samples,
  the full-weights folder).
"""
from __future__ import annotations

import torch

from sdtune.models.sdxl import check_time_ids_fit, encode_batch_xl
from sdtune.training.caching import CachedPrompts

__all__ = ["XLPromptEncoder", "added_cond", "sdxl_pipeline", "check_time_ids_fit"]


class XLPromptEncoder(CachedPrompts):
    """prompts -> (embeddings [N, 77 x windows, D1 + D2], pooled [N, P]); "" is the caption-dropout prompt."""

    def __init__(self, tokenizers, text_encoders, device, cache: bool, force_zeros_for_empty_prompt: bool = True):
        super().__init__()
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.device, self.cache, self.force_zeros = device, cache, bool(force_zeros_for_empty_prompt)
        self._window: torch.Tensor | None = None

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.encoder_calls += 1
        return encode_batch_xl(self.tokenizers, self.text_encoders, prompts, dropped=[p == "" for p in prompts],
                               force_zeros_for_empty_prompt=self.force_zeros, device=self.device)

    def _one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        emb, pooled = self._encode([prompt])
        return emb[0].detach(), pooled[0].detach()

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cache:
            return self._encode(prompts)
        self.fill(prompts)
        longest = max(self._cached[p][0].shape[0] for p in prompts)
        window = self._empty_window()  # what a shorter caption's missing windows hold, as encode_batch_xl pads
        rows = []
        for p in prompts:
            emb = self._cached[p][0]
            pad = torch.zeros_like(window) if (p == "" and self.force_zeros) else window  # dropped: zeros throughout
            rows.append(torch.cat([emb] + [pad] * ((longest - emb.shape[0]) // window.shape[0])))
        return torch.stack(rows), torch.stack([self._cached[p][1] for p in prompts])

    def _empty_window(self) -> torch.Tensor:
        """The encoded (not zeroed) empty window."""
        if not self.force_zeros:
            return self._cached[""][0]
        if self._window is None:
            with torch.no_grad():
                self._window = encode_batch_xl(self.tokenizers, self.text_encoders, [""], device=self.device)[0][0]
        return self._window


def freeze_unread_layers(text_encoder) -> list[str]:
    """Freeze what SDXL never reads of its first text encoder: the last layer and the final layer norm.

    SDXL conditions on the first encoder's penultimate hidden state (its pooled output is unused), so those
    weights get no gradient; left trainable they would only be dead weight in a LoRA and, under DDP, break
    gradient reduction (unused parameters). A LoRA there stays at its zero start. Returns the frozen names.
    """
    last = int(text_encoder.config.num_hidden_layers) - 1
    frozen = []
    for name, p in text_encoder.named_parameters():
        if p.requires_grad and (f"encoder.layers.{last}." in name or "final_layer_norm" in name):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def added_cond(pooled: torch.Tensor, time_ids: torch.Tensor, dtype: torch.dtype) -> dict:
    """The UNet's ``added_cond_kwargs`` for SDXL: pooled text embedding and the six size/crop time ids."""
    return {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(device=pooled.device, dtype=dtype)}


def sdxl_pipeline(pipe, unet, text_encoder, text_encoder_2, scheduler=None):
    """A stock StableDiffusionXLPipeline around the (training) modules, sharing the loaded VAE and tokenizers."""
    from diffusers import StableDiffusionXLPipeline

    out = StableDiffusionXLPipeline(
        vae=pipe.vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2, unet=unet, scheduler=scheduler or pipe.scheduler,
        force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
        add_watermarker=False)
    out.set_progress_bar_config(disable=True)
    return out
