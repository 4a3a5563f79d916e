"""Generation requests, checked without a model: every parameter's range, the input images readable, the mask's size.

``validate`` normalises one request's parameters; ``check_request`` is what a caller runs before loading a model
(the CLI and the web UI: a bad input then fails in a second, not after the load). A refused value raises
``ParameterError``, whose one line names the parameter as Python spells it (``num_images must be at least 1``);
the command line words the same error with its flags (``--num-images``) through ``ParameterError.worded``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image

from sdtune.errors import ParameterError, SdtuneError  # noqa: F401 - ParameterError is this module's API
from sdtune.guidance_interval import parse_interval
from sdtune.imageio import open_image
from sdtune.models.prompts import CHUNK, TRUNCATE
from sdtune.models.schedulers import scheduler_names

MODES = ("txt2img", "img2img", "inpaint", "depth2img")
DEFAULT_SCHEDULER = "default"  # the model's own scheduler, as saved with it
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0, "depth2img": 0.8}
MAX_SEED = 2**63 - 1
MAX_STEPS = 1000  # the schedulers' num_train_timesteps: more inference steps than that have no timesteps to take
MAX_SIDE = 16384  # pixels per side: 8x SDXL's native size; beyond it tensors outgrow what torch allocates


def cli_flag(name: str) -> str:
    """A parameter's command-line flag: ``num_images`` -> ``--num-images`` (``sdtune infer``'s flags are spelled so)."""
    return "--" + name.replace("_", "-")


def check_request(mode, **request) -> None:
    """Validate a generation request without a model: parameters, input images readable, mask size.

    The CLI calls it before loading the model so a bad input fails in a second, not after the load.
    """
    if mode not in MODES:
        raise SdtuneError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    request.setdefault("long_prompt", CHUNK)
    req = validate(mode, **request)
    load_inputs(mode, req)


def check_request_as_flags(mode, **request) -> None:
    """``check_request`` with a refused parameter worded as its command-line flag (``--steps must be ...``): for the
    web UI, whose messages have named the CLI's flags."""
    try:
        check_request(mode, **request)
    except ParameterError as exc:
        raise SdtuneError(exc.worded(cli_flag)) from None


def validate(mode, *, steps, guidance, seed, width, height, scheduler, image, mask, strength, depth_map,
             num_images, long_prompt, guidance_interval=None) -> dict:
    """Check every parameter up front, one clear error per problem; return normalised values."""
    def _int(value, name):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value:
            raise ParameterError("{%s} must be a whole number, got {got!r}" % name, got=value)
        return int(value)

    steps = _int(steps, "steps")
    if not 1 <= steps <= MAX_STEPS:
        raise ParameterError("{steps} must be at least 1 and at most {most} (the noise schedule's length), got {got}",
                             most=MAX_STEPS, got=steps)
    num_images = _int(num_images, "num_images")
    if num_images < 1:
        raise ParameterError("{num_images} must be at least 1, got {got}", got=num_images)
    seed = _int(seed, "seed")
    if not 0 <= seed <= MAX_SEED - num_images:
        raise ParameterError("{seed} must be between 0 and {most}, got {got}", most=MAX_SEED - num_images, got=seed)
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise ParameterError("{guidance} must be a number, got {got!r}", got=guidance) from None
    if not math.isfinite(guidance) or guidance < 0:
        raise ParameterError("{guidance} must be a finite number >= 0 (1 = no guidance, 7.5 typical), got {got}",
                             got=guidance)
    for name, value in (("width", width), ("height", height)):
        if value is not None:
            v = _int(value, name)
            if v < 8 or v % 8:
                raise ParameterError("{%s} must be a positive multiple of 8 (the VAE works on 8-pixel blocks), "
                                     "got {got}; try {near}" % name, got=v, near=max(8, round(v / 8) * 8))
            if v > MAX_SIDE:
                raise ParameterError("{%s} {got} is larger than sdtune generates ({most} px at most); generate "
                                     "smaller and upscale" % name, got=v, most=MAX_SIDE)
    scheduler = scheduler or DEFAULT_SCHEDULER
    if not isinstance(scheduler, str):
        raise ParameterError("{scheduler} must be a name, got {got!r}; choose one of: {names}", got=scheduler,
                             names=", ".join(scheduler_names()))
    if scheduler != DEFAULT_SCHEDULER and scheduler.lower() not in scheduler_names():
        raise SdtuneError(f"unknown scheduler {scheduler!r}; choose one of: {', '.join(scheduler_names())}")
    scheduler = scheduler.lower()
    if long_prompt not in (CHUNK, TRUNCATE):
        raise ParameterError("{long_prompt} must be {chunk!r} or {truncate!r}", chunk=CHUNK, truncate=TRUNCATE)
    if mode != "txt2img":
        strength = DEFAULT_STRENGTH[mode] if strength is None else strength
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            raise ParameterError("{strength} must be a number in [0, 1], got {got!r}", got=strength) from None
        if not 0.0 <= strength <= 1.0:
            raise ParameterError("{strength} must be in [0, 1] (0 = keep the image, 1 = repaint fully), got {got}",
                                 got=strength)
        if int(steps * strength) < 1:
            raise ParameterError("{strength} {s} x {steps} {n} leaves no denoising step; raise {strength} or {steps}",
                                 s=strength, n=steps)
        if image is None:
            raise ParameterError("{mode} needs an input image: pass {image} PATH", mode=mode)
        if mode == "inpaint" and mask is None:
            raise ParameterError("inpaint needs a mask: pass {mask} PATH (white = repaint, black = keep)")
    if image is not None and mode == "txt2img":
        raise ParameterError("{image} is only used by img2img, inpaint and depth2img")
    if mask is not None and mode != "inpaint":
        raise ParameterError("{mask} is only used by inpaint")
    if depth_map is not None and mode != "depth2img":
        raise ParameterError("{depth_map} is only used by depth2img")
    return dict(steps=steps, guidance=guidance, seed=seed, scheduler=scheduler, image=image, mask=mask,
                strength=strength if mode != "txt2img" else None, depth_map=depth_map, num_images=num_images,
                long_prompt=long_prompt, guidance_interval=parse_interval(guidance_interval))


def input_name(value) -> str | None:
    """How an input is recorded in the metadata: a path made absolute, or ``<in-memory>`` for an image object."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return str(Path(value).expanduser().resolve())
    return "<in-memory>"


def _as_image(value, mode: str, what: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert(mode)
    return open_image(value, mode=mode, what=what)


def load_inputs(mode, req):
    """Open the request's input images (RGB image, L mask, L depth map); refuse a mask of another size."""
    if mode == "txt2img":
        return None, None, None
    init = _as_image(req["image"], "RGB", "image")
    mask = _as_image(req["mask"], "L", "mask") if mode == "inpaint" else None
    depth = _as_image(req["depth_map"], "L", "depth map") if req["depth_map"] is not None else None
    if mask is not None and mask.size != init.size:
        raise SdtuneError(f"mask is {mask.size[0]}x{mask.size[1]} but the image is {init.size[0]}x{init.size[1]};"
                          " give a mask of the same size (white = repaint, black = keep)")
    if depth is not None:
        depth_tensor(depth)  # refuses a flat map
    return init, mask, depth


def depth_tensor(depth: Image.Image):
    """A greyscale depth map (white = near, as MiDaS/DPT predict) as the (1, H, W) tensor diffusers expects.

    The pipeline rescales it to [-1, 1] by its own min/max, so only relative values matter.
    """
    import numpy as np
    import torch

    arr = np.asarray(depth, dtype=np.float32) / 255.0
    if float(arr.max() - arr.min()) == 0.0:
        raise SdtuneError("depth map is a single flat value; it carries no depth (white = near, black = far)")
    return torch.from_numpy(arr)[None]
