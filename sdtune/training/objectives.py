"""The denoising objective of Stable Diffusion training, as small pure functions.

One training example: a clean latent x0, Gaussian noise eps and a timestep t give the noisy latent
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (``a_t`` = alphas_cumprod[t]). The UNet's target follows the
model's own scheduler config (``prediction_type``):

* ``epsilon``      -> eps (SD 1.x, SD 2 base 512)
* ``v_prediction`` -> v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (SD 2.x 768)
* ``sample``       -> x0

Options: min-SNR-gamma weighting (Hang et al. 2023) and noise offset (a per-channel constant added to
the noise so the model can learn very dark/bright images). Randomness always comes from an explicit
``torch.Generator`` so a step can be replayed exactly (resume, many processes).
"""
from __future__ import annotations

import torch

from sdtune.errors import SdtuneError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise shaped like ``latents``; plus ``noise_offset`` x N(0,1) per (example, channel)."""
    shape = latents.shape
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise.to(device=latents.device, dtype=latents.dtype)


def sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` timesteps uniform in [0, num_train_timesteps)."""
    return torch.randint(0, num_train_timesteps, (n,), generator=generator).to(device)


def _alphas_cumprod(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    return ac[timesteps]


def add_noise(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x_t from x0, eps and t (the scheduler's own forward process)."""
    return scheduler.add_noise(latents, noise, timesteps)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict, chosen by ``scheduler.config.prediction_type``."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        a = _alphas_cumprod(scheduler, timesteps).view(-1, 1, 1, 1)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()).to(latents.dtype)
    if kind == "sample":
        return latents
    raise SdtuneError(f"the model's scheduler has prediction_type '{kind}', which sdtune cannot train; "
                      f"expected one of {', '.join(PREDICTION_TYPES)}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) per timestep."""
    a = _alphas_cumprod(scheduler, timesteps)
    return a / (1 - a)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-example loss weights of min-SNR-gamma.

    For an epsilon target the x0-space weight min(SNR, gamma) becomes min(SNR, gamma) / SNR; for a
    v target it becomes min(SNR, gamma) / (SNR + 1). This caps the weight of the easy low-noise steps.
    """
    capped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "v_prediction":
        return capped / (snr_values + 1)
    if prediction_type == "epsilon":
        return capped / snr_values
    return capped  # "sample": the x0-space weight itself


def per_example_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                    mean_over: str = "weights") -> torch.Tensor:
    """Mean squared error per example, in float32 (half-precision MSE loses the small losses).

    ``weight`` [N, 1, h, w] (``mask_weights``), divided by ``mean_over``:
    * "weights" - the weighted mean, so an example's loss keeps its scale however much of it the mask covers
      (a small subject's pixels then count for more than the same pixels of an unmasked class image);
    * "pixels" - the weighted sum over the pixel count, kohya's ``masked_loss``: a small subject's loss shrinks
      with its area, and per pixel it counts as much as a class image's.
    """
    err = (pred.float() - target.float()).pow(2)
    dims = tuple(range(1, pred.ndim))
    if weight is None:
        return err.mean(dim=dims)
    weight = weight.to(err.device, err.dtype).expand_as(err)
    if mean_over == "pixels":
        return (err * weight).mean(dim=dims)
    if mean_over != "weights":
        raise ValueError(f"mean_over must be 'weights' or 'pixels', got {mean_over!r}")
    return (err * weight).sum(dim=dims) / weight.sum(dim=dims).clamp_min(1e-8)


def mask_weights(masks: torch.Tensor, latent_size, floor: float) -> torch.Tensor:
    """Image-space masks [N, 1, H, W] in [0, 1] -> latent-space loss weights [N, 1, h, w] in [floor, 1].

    Each latent pixel takes the mean of the image pixels it covers (area resampling); ``floor`` is what a fully
    transparent pixel still counts, so the background is learned a little instead of left free to drift.
    """
    small = torch.nn.functional.interpolate(masks.float(), size=tuple(latent_size), mode="area")
    return floor + (1.0 - floor) * small


def dreambooth_loss(per_example: torch.Tensor, is_class: torch.Tensor, prior_loss_weight: float,
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(total, instance_loss, prior_loss): total = instance + prior_loss_weight x prior.

    ``is_class`` marks the class (prior-preservation) examples; ``weights`` are optional per-example
    weights (min-SNR). Each part is the mean over its own examples, as in the DreamBooth paper; the prior
    loss is ``None`` when the batch has no class examples.
    """
    if weights is not None:
        per_example = per_example * weights.to(per_example.dtype)
    is_class = is_class.to(per_example.device)
    instance = per_example[~is_class].mean()
    if not bool(is_class.any()):
        return instance, instance, None
    prior = per_example[is_class].mean()
    return instance + prior_loss_weight * prior, instance, prior
