"""The flow-matching objective of SD 3.x (rectified flow), as diffusers' ``train_dreambooth_lora_sd3.py`` trains it.

* sigmas: ``u`` from diffusers' ``compute_density_for_timestep_sampling`` (``weighting_scheme`` logit_normal with
  ``logit_mean``/``logit_std``, mode with ``mode_scale``, else uniform), an index ``u x num_train_timesteps`` into
  the model's own (shifted) ``FlowMatchEulerDiscreteScheduler`` schedule, whose timestep and sigma it takes;
* noisy latents: ``(1 - sigma) x0 + sigma noise``; target: the velocity ``noise - x0``;
* per-example weights: diffusers' ``compute_loss_weighting_for_sd3`` (cosmap, sigma_sqrt; else 1).

diffusers' LoRA script can also "precondition" the outputs (``--precondition_outputs``: compare
``x_t - sigma v`` to ``x0``, an MSE in x0 space, i.e. the velocity loss x sigma^2); sdtune trains on the velocity
itself, the objective SD3 was trained with. Every random draw comes from the step's generator.
"""
from __future__ import annotations

import torch


def training_scheduler(scheduler_config):
    """A fresh copy of the model's flow-matching scheduler at its full training schedule (never stepped)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)


def sample_sigmas(scheduler, n: int, cfg, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [n], sigmas [n]) drawn with the config's density (``weighting_scheme``, ``logit_mean``,
    ``logit_std``, ``mode_scale``), on the CPU from ``gen``."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(weighting_scheme=cfg.weighting_scheme, batch_size=n,
                                              logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                                              mode_scale=cfg.mode_scale, device="cpu", generator=gen)
    total = scheduler.config.num_train_timesteps
    indices = (u * total).long().clamp(0, total - 1)
    return scheduler.timesteps[indices].float(), scheduler.sigmas[indices].float()


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.to(x0.device, x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def loss_weights(cfg, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-example loss weights [n] of the config's ``weighting_scheme`` (diffusers' function)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme=cfg.weighting_scheme, sigmas=sigmas).float()
