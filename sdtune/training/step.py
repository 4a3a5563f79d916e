"""One training step of the DreamBooth recipe, in named parts (as kohya's ``call_unet`` and
``get_noise_pred_and_target``): the losses of a micro-batch are a function of that batch.

For each pass (one bucket's examples): encode latents, draw noise and timesteps, drop captions, noise the latents
(``noise_latents``); with output preservation, the base model's prediction on each instance example's class caption
(``preservation_targets``); the UNet's prediction and its target (``get_noise_pred_and_target``); each example's
loss, with the masked loss and the conditional pull (``example_losses``). ``micro_batch_losses`` sums the passes
into the DreamBooth loss: instance + prior_loss_weight x class + output_preservation_weight x preservation.

Every random draw comes from the micro-step's generator, in the order above, so a resumed run repeats them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtune.training import adapters
from sdtune.training import objectives as obj
from sdtune.training.conditioning import Conditioner, UNetInputs
from sdtune.training.config import Concept, TrainConfig
from sdtune.training.data import class_caption, drop_captions


@dataclass
class StepModels:
    """What a step reads, fixed for the run."""
    cfg: TrainConfig
    unet: torch.nn.Module  # as prepared by accelerate (it trains)
    condition: Conditioner  # over the training text encoders
    latents_of: object  # sdtune.training.caching.LatentSource
    noise_scheduler: object  # DDPMScheduler with the model's betas and prediction type
    weight_dtype: torch.dtype
    concepts: list[Concept]
    # output preservation: the unwrapped UNet and encoders (run with adapters off) and their cached conditioner
    base_unet: torch.nn.Module | None = None
    base_encoders: tuple = ()
    base_condition: Conditioner | None = None


@dataclass
class Losses:
    """A micro-batch's losses (the tensors ``backward`` runs on; the parts are for the log)."""
    loss: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None
    preservation: torch.Tensor | None


@dataclass
class NoisyPass:
    """One pass of examples, noised: the draws ``get_noise_pred_and_target`` works on."""
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    prompts: list[str]  # after caption dropout


def call_unet(unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: UNetInputs, dtype: torch.dtype):
    return unet(noisy.to(dtype), timesteps, return_dict=False, **cond.kwargs(dtype))[0]


def noise_latents(m: StepModels, batch: dict, gen: torch.Generator) -> NoisyPass:
    cfg = m.cfg
    latents = m.latents_of(batch["pixels"], batch["keys"], gen).float()
    noise = obj.sample_noise(latents, gen, cfg.noise_offset)
    timesteps = obj.sample_timesteps(len(batch["prompts"]), m.noise_scheduler.config.num_train_timesteps, gen,
                                     latents.device)
    prompts = drop_captions(batch["prompts"], batch["is_class"], cfg.caption_dropout, cfg.caption_dropout_on, gen)
    return NoisyPass(latents, noise, timesteps, obj.add_noise(m.noise_scheduler, latents, noise, timesteps), prompts)


def preservation_targets(m: StepModels, batch: dict, x: NoisyPass) -> tuple[list[int], list[str], torch.Tensor]:
    """Output preservation: each instance example once more, on its class caption; its target is what the base
    model (adapters off) predicts there. Returns (the examples, their class captions, the base's predictions)."""
    keep = [i for i, is_class in enumerate(batch["is_class"]) if not is_class]
    captions = [class_caption(batch["prompts"][i], m.concepts[c].instance_prompt, m.concepts[c].class_prompt,
                              m.concepts[c].identifier) for i, c in ((i, batch["concepts"][i]) for i in keep)]
    with torch.no_grad(), adapters.disabled(m.base_unet, *m.base_encoders):
        cond = m.base_condition(captions, batch["time_ids"][keep])
        base = call_unet(m.base_unet, x.noisy[keep], x.timesteps[keep], cond, m.weight_dtype)
    return keep, captions, base


def get_noise_pred_and_target(m: StepModels, batch: dict, x: NoisyPass, extra: tuple | None = None):
    """The UNet's prediction on the pass and the objective's target; ``extra`` = (examples, captions) to run once
    more in the same forward pass (output preservation), whose predictions come back third."""
    n = len(x.prompts)
    prompts, noisy, timesteps, time_ids = x.prompts, x.noisy, x.timesteps, batch["time_ids"]
    if extra:
        keep, captions = extra
        prompts = prompts + captions
        noisy, timesteps = torch.cat([noisy, noisy[keep]]), torch.cat([timesteps, timesteps[keep]])
        time_ids = torch.cat([time_ids, time_ids[keep]])
    pred = call_unet(m.unet, noisy, timesteps, m.condition(prompts, time_ids), m.weight_dtype)
    target = obj.training_target(m.noise_scheduler, x.latents, x.noise, x.timesteps)
    return pred[:n], target, (pred[n:] if extra else None)


def example_losses(m: StepModels, batch: dict, x: NoisyPass, pred, target) -> torch.Tensor:
    """Each example's loss: MSE to the target (masked where the example has a mask), plus the conditional pull."""
    cfg = m.cfg
    weight = (obj.mask_weights(batch["masks"], x.latents.shape[-2:], cfg.masked_loss_floor)
              if batch["masks"] is not None else None)
    loss = obj.per_example_mse(pred, target, weight, cfg.masked_loss_mean)
    if cfg.conditional_pull:
        # the base's own objective: also toward the model's unconditional prediction on the same x_t, which is
        # a target here, not a path for gradients
        with torch.no_grad():
            uncond = call_unet(m.unet, x.noisy, x.timesteps, m.condition([""] * len(x.prompts), batch["time_ids"]),
                               m.weight_dtype)
        loss = loss + cfg.conditional_pull * obj.per_example_mse(pred, uncond, weight, cfg.masked_loss_mean)
    return loss


def micro_batch_losses(m: StepModels, passes, gen: torch.Generator) -> Losses:
    """The DreamBooth loss of one micro-batch: one pass, or two when its class examples sit in another bucket."""
    cfg = m.cfg
    per_example, is_class, snr_weights, preserved = [], [], [], []
    for batch in passes:
        x = noise_latents(m, batch, gen)
        extra = base = None
        if m.base_condition is not None and not all(batch["is_class"]):
            keep, captions, base = preservation_targets(m, batch, x)
            extra = (keep, captions)
        pred, target, pred_class = get_noise_pred_and_target(m, batch, x, extra)
        if base is not None:
            preserved.append(obj.per_example_mse(pred_class, base))
        per_example.append(example_losses(m, batch, x, pred, target))
        is_class.append(batch["is_class"])
        if cfg.snr_gamma:
            snr_weights.append(obj.min_snr_weights(obj.snr(m.noise_scheduler, x.timesteps), cfg.snr_gamma,
                                                   m.noise_scheduler.config.prediction_type))
    loss, instance, prior = obj.dreambooth_loss(torch.cat(per_example), torch.cat(is_class), cfg.prior_loss_weight,
                                                torch.cat(snr_weights) if snr_weights else None)
    preservation = torch.cat(preserved).mean() if preserved else None
    if preservation is not None:
        loss = loss + cfg.output_preservation_weight * preservation
    return Losses(loss, instance, prior, preservation)
