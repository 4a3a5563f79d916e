"""The hand-written sampling loop must reproduce the stock pipeline pixel for pixel."""
import numpy as np
import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.generation.sampling import sample
from sdtune.models.loading import load_pipeline
from sdtune.models.schedulers import make_scheduler, scheduler_names

SETTINGS = dict(steps=4, guidance=7.0, seed=3, width=32, height=48)
# One deterministic, one ancestral (per-step noise), one sigma-based multistep, and the defaults;
# the rest of the table runs under the slow mark.
CORE = {"pndm", "ddim", "euler_a", "dpm++2m_karras"}
SCHEDULER_PARAMS = [pytest.param(n, marks=() if n in CORE else pytest.mark.slow) for n in scheduler_names()]


def _pipeline_image(pipe, prompt, negative, steps, guidance, seed, width, height):
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
               width=width, height=height, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return out.images[0]


@pytest.fixture(scope="module")
def pipes(tiny_models):
    return {v: load_pipeline(tiny_models[v]) for v in ("sd1", "sd2v")}


@pytest.mark.parametrize("variant", ["sd1", "sd2v"])
@pytest.mark.parametrize("scheduler", SCHEDULER_PARAMS)
def test_loop_equals_pipeline(pipes, variant, scheduler):
    pipe = pipes[variant]
    own = pipe.scheduler
    # Each side gets a fresh scheduler: a used one carries state (sigmas of its last
    # set_timesteps) that could hide an ordering mistake in the loop.
    mine = sample(pipe, "a red fox", "blurry", scheduler=make_scheduler(scheduler, own.config),
                  output_type="np", **SETTINGS)
    pipe.scheduler = make_scheduler(scheduler, own.config)
    try:
        ref = _pipeline_image(pipe, "a red fox", "blurry", **SETTINGS)
    finally:
        pipe.scheduler = own
    assert mine.shape == ref.shape == (48, 32, 3)
    assert np.abs(mine - ref).max() < 1e-4


def test_scheduler_by_name_and_components_dict(pipes):
    pipe = pipes["sd2v"]
    parts = {k: getattr(pipe, k) for k in ("tokenizer", "text_encoder", "unet", "scheduler", "vae")}
    mine = sample(parts, "a red fox", "", scheduler="euler", output_type="np", **SETTINGS)
    base = pipe.scheduler
    pipe.scheduler = make_scheduler("euler", base.config)
    try:
        ref = _pipeline_image(pipe, "a red fox", "", **SETTINGS)
    finally:
        pipe.scheduler = base
    assert np.abs(mine - ref).max() < 1e-4


def test_guidance_one_runs_without_uncond_branch_like_pipeline(pipes):
    pipe = pipes["sd1"]
    settings = dict(SETTINGS, guidance=1.0)
    ref = _pipeline_image(pipe, "a red fox", "ignored at guidance 1", **settings)
    mine = sample(pipe, "a red fox", "ignored at guidance 1", output_type="np", **settings)
    assert np.abs(mine - ref).max() < 1e-4


def test_seed_prompt_and_guidance_change_the_image(pipes):
    pipe = pipes["sd1"]
    a = sample(pipe, "a red fox", output_type="np", **SETTINGS)
    assert np.abs(a - sample(pipe, "a red fox", output_type="np", **dict(SETTINGS, seed=4))).max() > 1e-3
    assert np.abs(a - sample(pipe, "a blue car", output_type="np", **SETTINGS)).max() > 1e-4
    assert np.abs(a - sample(pipe, "a red fox", output_type="np", **dict(SETTINGS, guidance=2.0))).max() > 1e-4


def test_pil_output_and_errors(pipes, tiny_models):
    img = sample(pipes["sd1"], "a red fox", **SETTINGS)
    assert img.mode == "RGB" and img.size == (32, 48)
    with pytest.raises(SdtuneError, match="multiples of 2"):
        sample(pipes["sd1"], "x", **dict(SETTINGS, width=33))
    with pytest.raises(SdtuneError, match="missing component"):
        sample({"unet": pipes["sd1"].unet}, "x", **SETTINGS)
    with pytest.raises(SdtuneError, match="text-to-image only"):
        sample(load_pipeline(tiny_models["inpaint"]), "x", **SETTINGS)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_clipping_schedulers_do_not_clip_latents_unless_the_config_says_so(name):
    # A PNDM config saved without clip_sample (the embedded family's): DDIM/DDPM default to clipping x0 to
    # [-1, 1], which is for pixels; SD's latents range wider, and clipped they sample noise.
    from diffusers import PNDMScheduler

    bare = PNDMScheduler(beta_schedule="scaled_linear", skip_prk_steps=True).config
    assert make_scheduler(name, bare).config.clip_sample is False
    said = PNDMScheduler.from_config({**bare, "clip_sample": True}).config  # a config that asks for it keeps it
    assert make_scheduler(name, said).config.clip_sample is True
