"""Aspect-ratio buckets: train on photos in their own shape instead of a square crop.

A square crop of a 2:1 photo throws away half of it - often half of the subject. kohya's sd-scripts (and
diffusers' newer scripts) instead sort images into *buckets*: sizes of about ``resolution``² pixels in
several aspect ratios. Each image is scaled to cover the bucket nearest its own aspect ratio and cropped
by the few pixels that remain; a batch is drawn from one bucket, so its tensors share one shape.

* ``bucket_sizes(resolution, step, max_aspect)``: every (width, height) that is a multiple of ``step``, has
  at most ``resolution``² pixels (the most that fit for its width) and an aspect ratio within ``max_aspect``.
* ``nearest_bucket(size, buckets)``: the bucket whose aspect ratio is closest (in log space) to the image's.
* ``fit(img, bucket, ...)``: scale to cover, then a center (or random) crop to exactly the bucket.

``buckets: null`` (the default) is plain square training at ``resolution``; ``buckets: auto`` uses
``bucket_sizes``; an explicit list ``[[768, 384], [512, 512], ...]`` is taken as given.
"""
from __future__ import annotations

import math

import torch
from PIL import Image

from sdtune.errors import SdtuneError


def default_step(resolution: int) -> int:
    """Bucket sides move in steps of 1/8 of the resolution (64 px at 512, as kohya's default), at least 8."""
    return max(8, resolution // 8)


def bucket_sizes(resolution: int, step: int | None = None, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets of at most ``resolution``² pixels, sides multiples of ``step``, aspect <= ``max_aspect``."""
    step = step or default_step(resolution)
    if resolution % step:
        raise SdtuneError(f"bucket_step {step} must divide resolution {resolution}")
    if max_aspect < 1:
        raise SdtuneError(f"max_aspect must be >= 1 (2 allows 2:1 and 1:2), got {max_aspect}")
    area = resolution * resolution
    found = set()
    widest = min(resolution * math.sqrt(max_aspect), area / step)  # no bucket is narrower than one step
    for width in range(step, int(widest) + step, step):
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect + 1e-9:
            found.add((width, height))
    return sorted(found, key=lambda wh: wh[0] / wh[1])


def parse_buckets(value, resolution: int, step: int | None, max_aspect: float) -> list[tuple[int, int]] | None:
    """The config's ``buckets`` (null, "auto" or a list of [width, height]) as a list of sizes, or None (square)."""
    if value is None:
        return None
    if value == "auto":
        return bucket_sizes(resolution, step, max_aspect)
    if not isinstance(value, (list, tuple)) or not value:
        raise SdtuneError(f"buckets must be null, auto or a list of [width, height] pairs; got {value!r}")
    sizes = []
    for item in value:
        if (not isinstance(item, (list, tuple)) or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 8 == 0 for v in item)):
            raise SdtuneError(f"each bucket is [width, height], positive multiples of 8; got {item!r}")
        sizes.append((int(item[0]), int(item[1])))
    return sorted(set(sizes), key=lambda wh: wh[0] / wh[1])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (``size`` = width, height)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) an image of ``size`` is scaled to so that it covers ``bucket``."""
    (bw, bh), (w, h) = bucket, size
    scale = max(bw / w, bh / h)
    return max(bw, round(w * scale)), max(bh, round(h * scale))


def fit(img: Image.Image, bucket: tuple[int, int], center_crop: bool = True,
        generator: torch.Generator | None = None, with_box: bool = False):
    """Scale ``img`` to cover ``bucket`` (keeping its aspect ratio), then crop it to exactly the bucket.

    ``with_box``: also return (left, top) of the crop in the scaled image (SDXL's crop conditioning).
    """
    bw, bh = bucket
    w, h = img.size
    scale = max(bw / w, bh / h)
    size = cover_size((w, h), bucket)
    if size != (w, h):
        img = img.resize(size, resample=Image.LANCZOS if scale < 1 else Image.BICUBIC)
    w, h = size
    if center_crop:
        left, top = (w - bw) // 2, (h - bh) // 2
    else:
        left = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
    out = img.crop((left, top, left + bw, top + bh))
    return (out, (left, top)) if with_box else out
