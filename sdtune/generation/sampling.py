"""The course's hand-written sampling loop, readable top to bottom.

This is the "DIY sampling loop" of the course made exact: it builds an image from the five
components (tokenizer, text encoder, UNet, scheduler, VAE) step by step, and for the same seed
and settings gives the same pixels as the stock ``StableDiffusionPipeline``. The inference engine
does not use it - it exists to teach what the pipeline does, and the tests hold it to that.

Epsilon and v-prediction models both work unchanged: the UNet's output is interpreted by the
scheduler, which knows the model's ``prediction_type`` from its config.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch
from PIL import Image

from sdtune.errors import SdtuneError

PARTS = ("tokenizer", "text_encoder", "unet", "scheduler", "vae")


def _parts(pipe_or_components) -> dict:
    """The five components from a pipeline (attributes) or a dict of them."""
    get = pipe_or_components.get if isinstance(pipe_or_components, dict) else (
        lambda name: getattr(pipe_or_components, name, None))
    parts = {name: get(name) for name in PARTS}
    missing = [name for name, part in parts.items() if part is None]
    if missing:
        raise SdtuneError(f"cannot sample: missing component(s) {', '.join(missing)}; pass a Stable Diffusion "
                          "pipeline or a dict with tokenizer, text_encoder, unet, scheduler and vae")
    return parts


def encode_text(tokenizer, text_encoder, texts: list[str], device) -> torch.Tensor:
    """Token ids padded to the encoder's 77 positions -> the last hidden state, (len(texts), 77, D)."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(device))[0]


@torch.no_grad()
def sample(pipe_or_components, prompt: str, negative_prompt: str = "", *, steps: int = 30,
           guidance: float = 7.5, seed: int = 0, width: int = 512, height: int = 512,
           scheduler=None, output_type: str = "pil"):
    """Generate one image with an explicit loop; ``output_type`` "pil" or "np" (float HxWx3 in [0, 1]).

    ``scheduler`` may be None (the model's own), a name from ``sdtune.models.schedulers`` or a scheduler object.
    """
    parts = _parts(pipe_or_components)
    tokenizer, text_encoder, unet, vae = parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["vae"]
    if scheduler is None:
        scheduler = parts["scheduler"]
    elif isinstance(scheduler, str):
        from sdtune.models.schedulers import make_scheduler
        scheduler = make_scheduler(scheduler, parts["scheduler"].config)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SD, 2 for the tiny test models
    if width % vae_factor or height % vae_factor:
        raise SdtuneError(f"width and height must be multiples of {vae_factor}; got {width}x{height}")
    if unet.config.in_channels != vae.config.latent_channels:
        raise SdtuneError(f"the hand-written loop is text-to-image only; this UNet takes {unet.config.in_channels} "
                          "input channels (an inpainting or depth model)")
    device = unet.device
    # Classifier-free guidance needs the unconditional prediction too; at guidance <= 1 it would
    # change nothing, so (like the pipeline) the loop then runs the conditional branch alone.
    use_cfg = guidance > 1.0

    # 1. Encode the prompt; with CFG the batch is [negative (uncond), prompt (cond)].
    texts = [negative_prompt or "", prompt] if use_cfg else [prompt]
    text_embeddings = encode_text(tokenizer, text_encoder, texts, device).to(text_encoder.dtype)

    # 2. Choose the timesteps for this many steps. This comes BEFORE the noise (the course does it
    #    after): for sigma-based samplers (Euler, LMS, Heun, DPM++ ...) ``init_noise_sigma`` is the
    #    largest sigma of the chosen steps, which is only known once the timesteps are set.
    scheduler.set_timesteps(steps, device=device)

    # 3. Initial noise, scaled to the scheduler's starting noise level. The pipeline draws it from
    #    the generator on the generator's device (the CPU here, so a seed gives the same noise on
    #    every machine) in the text embeddings' dtype, then moves it to the UNet's device;
    #    stochastic samplers keep drawing their per-step noise from the same generator.
    generator = torch.Generator("cpu").manual_seed(int(seed))
    shape = (1, unet.config.in_channels, height // vae_factor, width // vae_factor)
    latents = torch.randn(shape, generator=generator, dtype=text_embeddings.dtype).to(device)
    latents = latents * scheduler.init_noise_sigma

    step_kwargs = {}
    step_params = inspect.signature(scheduler.step).parameters
    if "generator" in step_params:  # euler_a, ddpm ... add fresh noise each step
        step_kwargs["generator"] = generator
    if "eta" in step_params:  # DDIM's eta; 0 (deterministic) is the pipeline's default
        step_kwargs["eta"] = 0.0

    # 4. Denoise step by step.
    for t in scheduler.timesteps:
        latent_model_input = torch.cat([latents] * 2) if use_cfg else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
        if use_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample

    # 5. Decode: undo the latent scaling (0.18215 for SD), VAE-decode, map [-1, 1] -> [0, 1].
    image = vae.decode(latents / vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    array = image[0].permute(1, 2, 0).float().cpu().numpy()
    if output_type == "np":
        return array
    return Image.fromarray((array * 255).round().astype(np.uint8))
