"""No wasted work: VAE latents and prompt embeddings computed once while those models are frozen.

DreamBooth repeats 3-5 instance images (and a fixed set of class images) for hundreds of steps, and the
VAE and (usually) the text encoder never change, so encoding them every step - as diffusers' example
scripts do - repeats identical work.

* ``LatentSource`` keeps, per example key ``(image SHA-256, bucket, flip)``, the VAE posterior (mean, std)
  and draws a fresh latent from it each step with the step's generator - exactly what an uncached run does,
  only without running the encoder again. With ``cache_dir`` the posteriors also persist as safetensors
  files, one per key, under a folder named by the VAE's own fingerprint (its config and weights): the next
  run - or a rerun - reuses them, and any change of image content, bucket, flip or VAE is a different
  file, so nothing stale is ever read. Random crops (a ``None`` key) give new pixels every step: encoded
  every step, never cached.
* ``PromptEncoder`` encodes each distinct prompt (including the empty prompt used for caption dropout)
  once, unless the text encoder is being trained - then it runs every step, with gradients. Captions of any
  length are read whole, in windows of 75 tokens as at inference (``sdtune.models.prompts``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from sdtune.models.prompts import encode_batch


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


class CachedPrompts:
    """The per-prompt cache a prompt encoder keeps while its text encoders are frozen: ``fill`` encodes each prompt
    not seen yet (and the empty prompt, caption dropout's) once, alone, and keeps what ``_one`` makes of it."""

    def __init__(self):
        self._cached: dict[str, object] = {}
        self.encoder_calls = 0

    def _one(self, prompt: str):
        raise NotImplementedError

    def fill(self, prompts: list[str]) -> None:
        missing = sorted({p for p in [*prompts, ""] if p not in self._cached})
        with torch.no_grad():
            for prompt in missing:
                self._cached[prompt] = self._one(prompt)


class PromptEncoder(CachedPrompts):
    """prompts -> text embeddings [N, 77 x windows, D]; cached per prompt when ``cache`` (frozen encoder)."""

    def __init__(self, tokenizer, text_encoder, device, cache: bool):
        super().__init__()
        self.tokenizer, self.text_encoder, self.device, self.cache = tokenizer, text_encoder, device, cache

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        self.encoder_calls += 1
        return encode_batch(self.tokenizer, self.text_encoder, prompts, self.device)

    def _one(self, prompt: str) -> torch.Tensor:
        return self._encode([prompt])[0].detach()

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if not self.cache:
            return self._encode(prompts)
        self.fill(prompts)
        longest = max(self._cached[p].shape[0] for p in prompts)
        empty = self._cached[""]  # one empty window: what a shorter caption is padded with
        return torch.stack([torch.cat([self._cached[p]] + [empty] * ((longest - self._cached[p].shape[0])
                                                                         // empty.shape[0])) for p in prompts])


def vae_fingerprint(vae) -> str:
    """A short hash of the VAE's config and weights: latents cached under it belong to this VAE only."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class LatentSource:
    """pixels (+ their example keys) -> scaled VAE latents, drawing from cached posteriors when enabled."""

    def __init__(self, vae, device, dtype: torch.dtype, enabled: bool, cache_dir: str | os.PathLike | None = None):
        self.vae, self.device, self.dtype, self.enabled = vae, device, dtype, enabled
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self._posteriors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoded_images = 0
        self.loaded_from_disk = 0
        self.folder = Path(cache_dir) / vae_fingerprint(vae) if (cache_dir is not None and enabled) else None

    @torch.no_grad()
    def _posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.encoded_images += pixels.shape[0]
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _file(self, key: tuple) -> Path:
        sha, (w, h), flip = key
        return self.folder / f"{sha[:32]}-{w}x{h}-{'flip' if flip else 'plain'}.safetensors"

    def _from_disk(self, key: tuple) -> bool:
        from safetensors.torch import load_file

        path = self._file(key)
        if not path.is_file():
            return False
        try:
            saved = load_file(str(path))
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
            return False
        self._posteriors[key] = (saved["mean"].to(self.device), saved["std"].to(self.device))
        self.loaded_from_disk += 1
        return True

    def _to_disk(self, key: tuple, mean: torch.Tensor, std: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self._file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        try:
            save_file({"mean": mean.detach().cpu().contiguous(), "std": std.detach().cpu().contiguous()}, tmp)
            os.replace(tmp, path)  # whole or not at all: a killed run leaves no half file under the name
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def __call__(self, pixels: torch.Tensor, keys: list, generator: torch.Generator) -> torch.Tensor:
        if self.enabled and all(k is not None for k in keys):
            missing = [i for i, k in enumerate(keys) if k not in self._posteriors
                       and not (self.folder is not None and self._from_disk(k))]
            if missing:
                mean, std = self._posterior(pixels[missing])
                for j, i in enumerate(missing):
                    self._posteriors[keys[i]] = (mean[j], std[j])
                    if self.folder is not None:
                        self._to_disk(keys[i], mean[j], std[j])
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
