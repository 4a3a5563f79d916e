"""The course's teaching tools as library functions (``sdtune inspect`` is their thin CLI).

Each one shows one part of Stable Diffusion on a real loaded pipeline, the way the course does:
the tokenizer's ids and the text embedding's shape, a VAE round trip, the noise schedule, the
UNet's input/output shapes, and side-by-side grids comparing guidance scales and schedulers for
one seed. Every function returns data (shapes, numbers, images); ``format_*`` turns it into the
lines the course prints. Generation here uses the stock diffusers pipeline on purpose: the tools
show what the library does, not what sdtune adds.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from sdtune.errors import SdtuneError
from sdtune.imageio import atomic_path

# Tiles in comparison grids are scaled up (nearest neighbour, so pixels stay visible) to at least
# this size: the tiny test models make 32 px images, on which a label would not fit.
MIN_TILE = 128


# --------------------------------------------------------------------------- tokens
@dataclass
class TokenReport:
    text: str
    ids: list[int]
    tokens: list[str]
    real_shape: tuple  # encoder output for the real tokens only, e.g. (1, 8, 1024)
    padded_shape: tuple  # what the pipeline feeds the UNet: padded to 77 positions


def inspect_tokens(pipe, text: str) -> TokenReport:
    """Tokenize ``text`` without padding (as the course does) and encode it both ways."""
    ids = pipe.tokenizer([text])["input_ids"][0]
    tokens = [pipe.tokenizer.decode(i) for i in ids]
    device = pipe.unet.device
    # The encoder has 77 positions; a longer prompt is shown in full but encoded as the encoder
    # would see it without chunking (its first 77 tokens).
    seen = ids[:pipe.tokenizer.model_max_length]
    with torch.no_grad():
        real = pipe.text_encoder(torch.tensor([seen], device=device))["last_hidden_state"]
        # The pipeline pads every prompt to the tokenizer's 77 positions (model_max_length).
        padded = pipe.encode_prompt(prompt=text, device=device, num_images_per_prompt=1,
                                    do_classifier_free_guidance=False, negative_prompt="")[0]
    return TokenReport(text, list(ids), tokens, tuple(real.shape), tuple(padded.shape))


def format_tokens(report: TokenReport) -> str:
    lines = ["Input ID -> decoded token"]
    lines += [f"{i} -> {tok}" for i, tok in zip(report.ids, report.tokens)]
    if len(report.ids) > report.padded_shape[1]:
        lines.append(f"({len(report.ids)} tokens: more than the text encoder's {report.padded_shape[1]} positions; "
                     "one pass sees only the first ones - `sdtune infer` encodes long prompts in chunks)")
    lines.append(f"Text embeddings shape: torch.Size({list(report.real_shape)})  (real tokens only)")
    lines.append(f"Text embeddings shape: torch.Size({list(report.padded_shape)})  "
                 f"(padded to {report.padded_shape[1]}, as the pipeline feeds the UNet)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- VAE round trip
def pattern_image(size: int) -> Image.Image:
    """A deterministic RGB picture with smooth ramps, hard edges and a disc (no file needed)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    checker = ((np.floor(x * 8) + np.floor(y * 8)) % 2).astype(np.float32)
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.09).astype(np.float32)
    rgb = np.stack([x, y, 0.25 + 0.5 * checker], axis=-1)
    rgb = rgb * (1 - disc[..., None]) + disc[..., None] * np.array([0.95, 0.85, 0.1], np.float32)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


@dataclass
class VaeReport:
    input_shape: tuple
    latent_shape: tuple
    decoded_shape: tuple
    scaling_factor: float
    mse: float  # on pixels in [0, 1]
    psnr: float  # dB, peak 1.0
    input_image: Image.Image = field(repr=False)
    decoded_image: Image.Image = field(repr=False)


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1  # (1, 3, H, W) in [-1, 1]


def _tensor_to_pil(t: torch.Tensor) -> Image.Image:
    arr = ((t[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def vae_roundtrip(pipe, image: Image.Image | None = None, size: int | None = None) -> VaeReport:
    """Encode an image to latents (x scaling factor, as the course does) and decode it back.

    The image is centre-cropped to a square and resized to ``size`` (default: the VAE's native
    sample size); without an image a deterministic test pattern is used.
    """
    from PIL import ImageOps

    vae = pipe.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = int(size or vae.config.sample_size)
    if size < factor or size % factor:
        raise SdtuneError(f"--size must be a positive multiple of {factor} (the VAE's downsampling); got {size}")
    image = pattern_image(size) if image is None else ImageOps.fit(image.convert("RGB"), (size, size),
                                                                  Image.Resampling.BICUBIC)
    scaling = float(vae.config.scaling_factor)
    x = _pil_to_tensor(image).to(vae.device, vae.dtype)
    with torch.no_grad():
        latents = scaling * vae.encode(x).latent_dist.mean
        decoded = vae.decode(latents / scaling).sample
    a = (x.float().clamp(-1, 1) + 1) / 2
    b = (decoded.float().clamp(-1, 1) + 1) / 2
    mse = float(((a - b) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
    return VaeReport(tuple(x.shape), tuple(latents.shape), tuple(decoded.shape), scaling, mse, psnr,
                     image, _tensor_to_pil(decoded))


def format_vae(report: VaeReport) -> str:
    return "\n".join([
        f"Input images shape: torch.Size({list(report.input_shape)})",
        f"Encoded latents shape: torch.Size({list(report.latent_shape)})  "
        f"(latent_dist.mean x scaling factor {report.scaling_factor:g} from the VAE config)",
        f"Decoded images shape: torch.Size({list(report.decoded_shape)})",
        f"Reconstruction error: MSE {report.mse:.6f}, PSNR {report.psnr:.2f} dB (pixels in [0, 1])",
    ])


# --------------------------------------------------------------------------- noise schedule
def plot_schedule(scheduler, out: str | os.PathLike) -> Path:
    """Plot ``scheduler.alphas_cumprod`` (the course's noise-schedule figure) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise SdtuneError(f"{type(scheduler).__name__} has no alphas_cumprod to plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(torch.as_tensor(alphas).float().numpy(), label=r"$\bar{\alpha}$")
    # The course labels this axis "high noise to low noise ->"; alphas_cumprod falls as t grows,
    # so the axis in fact runs from low noise (t=0) to high noise, and the label says so.
    ax.set_xlabel("Timestep (low noise to high noise ->)")
    ax.set_title("Noise schedule")
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out


def format_scheduler(scheduler) -> str:
    return f"Scheduler config: {scheduler}"


# --------------------------------------------------------------------------- UNet
def unet_dummy_call(pipe, seed: int = 0, steps: int = 50) -> dict:
    """The course's dummy UNet call: random latents, the first timestep, random text embeddings.

    The timesteps are set for ``steps`` first: a freshly loaded scheduler (PNDM) has none yet.
    """
    unet = pipe.unet
    gen = torch.Generator("cpu").manual_seed(seed)
    side = unet.config.sample_size
    side = side if isinstance(side, int) else side[0]
    cross = unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    max_len = getattr(pipe.tokenizer, "model_max_length", 77)
    pipe.scheduler.set_timesteps(steps)
    timestep = pipe.scheduler.timesteps[0]
    latents = torch.randn(1, unet.config.in_channels, side, side, generator=gen).to(unet.device, unet.dtype)
    text = torch.randn(1, max_len, cross, generator=gen).to(unet.device, unet.dtype)
    extra = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: a pooled text embedding and six size/crop time ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        size = side * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=gen).to(unet.device, unet.dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]], device=unet.device, dtype=unet.dtype)}
    with torch.no_grad():
        out = unet(latents, timestep, text, **extra).sample
    return {"timestep": int(timestep), "latents_shape": tuple(latents.shape),
            "text_embeddings_shape": tuple(text.shape), "output_shape": tuple(out.shape)}


def format_unet(info: dict) -> str:
    return "\n".join([
        f"Timestep: {info['timestep']}",
        f"Latents shape: torch.Size({list(info['latents_shape'])})",
        f"Text embeddings shape: torch.Size({list(info['text_embeddings_shape'])})",
        f"UNet output shape: torch.Size({list(info['output_shape'])})",
    ])


# --------------------------------------------------------------------------- grids
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def labelled_grid(images: list[Image.Image], labels: list[str], columns: int | None = None) -> Image.Image:
    """Images side by side (``columns`` per row, default all), each with its label above it."""
    if not images or len(images) != len(labels):
        raise ValueError("labelled_grid needs one label per image")
    columns = columns or len(images)
    w, h = images[0].size
    scale = max(1, math.ceil(MIN_TILE / min(w, h)))
    tw, th = w * scale, h * scale
    font = _font(max(12, min(28, tw // 12)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = max(probe.textbbox((0, 0), lab, font=font)[3] for lab in labels) + 10
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * tw, rows * (th + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (img, label) in enumerate(zip(images, labels)):
        x, y = (k % columns) * tw, (k // columns) * (th + text_h)
        box = draw.textbbox((0, 0), label, font=font)
        draw.text((x + max(0, (tw - (box[2] - box[0])) // 2), y + 5), label, fill="black", font=font)
        grid.paste(img.convert("RGB").resize((tw, th), Image.Resampling.NEAREST), (x, y + text_h))
    return grid


def _require_txt2img(pipe) -> None:
    from sdtune.models.loading import describe

    mode = describe(pipe).mode
    if mode != "txt2img":
        raise SdtuneError(f"this comparison needs a text-to-image model; the given model is a {mode} model "
                          "(its UNet takes extra input channels)")


def _check_generation(steps: int, width, height) -> None:
    if steps < 1:
        raise SdtuneError(f"--steps must be at least 1; got {steps}")
    for name, value in (("width", width), ("height", height)):
        if value is not None and (value < 8 or value % 8):
            raise SdtuneError(f"--{name} must be a positive multiple of 8; got {value}")


def _generate(pipe, prompt, negative_prompt, guidance, seed, steps, width, height) -> Image.Image:
    return pipe(prompt, negative_prompt=negative_prompt or None, guidance_scale=guidance,
                num_inference_steps=steps, width=width, height=height,
                generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def guidance_grid(pipe, prompt: str, scales=(1.1, 8, 12), *, seed: int = 42, steps: int = 35,
                  width: int | None = None, height: int | None = None, negative_prompt: str = ""):
    """One image per guidance scale, same seed; returns (grid, images)."""
    _require_txt2img(pipe)
    _check_generation(steps, width, height)
    images = [_generate(pipe, prompt, negative_prompt, float(s), seed, steps, width, height) for s in scales]
    return labelled_grid(images, [f"CFG Scale {s:g}" for s in scales]), images


def scheduler_grid(pipe, prompt: str, names, *, seed: int = 42, steps: int = 35, guidance: float = 8.0,
                   width: int | None = None, height: int | None = None, negative_prompt: str = ""):
    """One image per scheduler (all built from the model's own scheduler config), same seed."""
    from sdtune.models.schedulers import make_scheduler

    _require_txt2img(pipe)
    _check_generation(steps, width, height)
    own = pipe.scheduler
    schedulers = [make_scheduler(n, own.config) for n in names]  # all names checked before any work
    images = []
    try:
        for sch in schedulers:
            pipe.scheduler = sch
            images.append(_generate(pipe, prompt, negative_prompt, guidance, seed, steps, width, height))
    finally:
        pipe.scheduler = own
    return labelled_grid(images, list(names)), images
