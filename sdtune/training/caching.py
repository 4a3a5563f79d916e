"""No wasted work: VAE latents and prompt embeddings computed once while those models are frozen.

DreamBooth repeats 3-5 instance images (and a fixed set of class images) for hundreds of steps, and the
VAE and (usually) the text encoder never change, so encoding them every step - as diffusers' example
scripts do - repeats identical work.

* ``LatentSource`` keeps, per example key ``(kind, index, flip)``, the VAE posterior (mean, std) and
  draws a fresh latent from it each step with the step's generator - exactly what an uncached run
  does, only without running the encoder again. A flipped image is a different key (one entry per
  flip). With random crops every step sees different pixels, so there is nothing to reuse and the
  encoder runs every step (``enabled=False``). Entries are filled lazily, on first use.
* ``PromptEncoder`` encodes each distinct prompt (including the empty prompt used for caption
  dropout) once, unless the text encoder is being trained - then it runs every step, with gradients.
"""
from __future__ import annotations

import torch


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


class PromptEncoder:
    """prompts -> text embeddings [N, 77, D]; cached per prompt when ``cache`` (frozen encoder)."""

    def __init__(self, tokenizer, text_encoder, device, cache: bool):
        self.tokenizer, self.text_encoder, self.device, self.cache = tokenizer, text_encoder, device, cache
        self._embeddings: dict[str, torch.Tensor] = {}
        self.encoder_calls = 0

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        self.encoder_calls += 1
        ids = tokenize(self.tokenizer, prompts).to(self.device)
        return self.text_encoder(ids, return_dict=False)[0]

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if not self.cache:
            return self._encode(prompts)
        missing = sorted({p for p in prompts if p not in self._embeddings})
        if missing:
            with torch.no_grad():
                for prompt, emb in zip(missing, self._encode(missing)):
                    self._embeddings[prompt] = emb.detach()
        return torch.stack([self._embeddings[p] for p in prompts])


class LatentSource:
    """pixels (+ their example keys) -> scaled VAE latents, drawing from cached posteriors when enabled."""

    def __init__(self, vae, device, dtype: torch.dtype, enabled: bool):
        self.vae, self.device, self.dtype, self.enabled = vae, device, dtype, enabled
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self._posteriors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoded_images = 0

    @torch.no_grad()
    def _posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.encoded_images += pixels.shape[0]
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def __call__(self, pixels: torch.Tensor, keys: list[tuple], generator: torch.Generator) -> torch.Tensor:
        if self.enabled:
            missing = [i for i, k in enumerate(keys) if k not in self._posteriors]
            if missing:
                mean, std = self._posterior(pixels[missing])
                for j, i in enumerate(missing):
                    self._posteriors[keys[i]] = (mean[j], std[j])
            mean = torch.stack([self._posteriors[k][0] for k in keys])
            std = torch.stack([self._posteriors[k][1] for k in keys])
        else:
            mean, std = self._posterior(pixels)
        # The same draw with or without the cache: the noise comes from the step's CPU generator.
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        latents = (mean + std * eps - self.shift_factor) * self.scaling_factor
        return latents.to(self.dtype)

    @property
    def cached_entries(self) -> int:
        return len(self._posteriors)
