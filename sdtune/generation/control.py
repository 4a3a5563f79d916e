"""Depth images for a depth ControlNet: from a depth estimator, or from a depth map the user gives.

A depth ControlNet reads an RGB image of the depth (white = near, as MiDaS/DPT predict), at the size of
the image being generated. The estimator path is the one diffusers' ControlNet depth examples use: the
estimator's ``predicted_depth`` resized (bicubic) to the image's size, min-max normalised to [0, 1], the
same value in all three channels. A given greyscale map gets the same resize and normalisation, so only
relative values matter (as for the 5-channel depth model); a flat map is refused.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sdtune.errors import SdtuneError


def _to_rgb(depth: torch.Tensor) -> Image.Image:
    """(H, W) depth -> min-max normalised 8-bit RGB image."""
    lo, hi = depth.min(), depth.max()
    if float(hi - lo) == 0.0:
        raise SdtuneError("depth map is a single flat value; it carries no depth (white = near, black = far)")
    norm = ((depth - lo) / (hi - lo)).clamp(0, 1)
    arr = (norm.cpu().float().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(np.stack([arr] * 3, axis=-1), mode="RGB")


@torch.no_grad()
def depth_from_estimator(image: Image.Image, estimator, processor) -> Image.Image:
    """Estimate ``image``'s depth with a transformers depth model; the ControlNet's image at ``image``'s size."""
    pixels = processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
    param = next(estimator.parameters())
    predicted = estimator(pixels.to(param.device, param.dtype)).predicted_depth  # (1, h, w)
    depth = torch.nn.functional.interpolate(predicted[:, None].float(), size=(image.height, image.width),
                                            mode="bicubic", align_corners=False)[0, 0]
    return _to_rgb(depth)


def depth_from_map(depth: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A greyscale depth map (white = near) as the ControlNet's image at ``size`` (width, height)."""
    grey = depth.convert("L")
    if grey.size != tuple(size):
        grey = grey.resize(tuple(size), Image.BICUBIC)
    return _to_rgb(torch.from_numpy(np.asarray(grey, dtype=np.float32)))
