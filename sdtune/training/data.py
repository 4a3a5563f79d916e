"""DreamBooth training data: finding the subject's images, turning them into tensors, batching.

Images are checked up front (``find_images`` opens every one), so a corrupt file is reported before any
model is loaded. Every image - any size, RGBA, L, CMYK, 16-bit, EXIF-rotated - becomes a [3, R, R] float
tensor in [-1, 1]: shorter side resized to R, then a center (or random) crop, then an optional flip.

Randomness (flip, random crop) is a pure function of (seed, epoch, kind, index), not of a running RNG, so
a resumed run, skipped batches or DataLoader workers see exactly the flips an uninterrupted run sees.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from sdtune.console import SdtuneWarning
from sdtune.errors import SdtuneError
from sdtune.imageio import IMAGE_SUFFIXES, open_image


def list_image_files(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(files with an image suffix, other visible files) in ``folder``, sorted; nothing is opened.

    Hidden files are ignored silently: they are OS litter (.DS_Store) or sdtune's own half-written
    temporaries (``.name.partial``), never user data.
    """
    images, others = [], []
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        (images if p.suffix.lower() in IMAGE_SUFFIXES else others).append(p)
    return images, others


def find_images(folder: str | os.PathLike | None, what: str = "instance_dir", min_side: int = 0) -> list[Path]:
    """Sorted image files in ``folder``, every one opened once to prove it is readable.

    Missing/empty folder or no images -> ``SdtuneError``; non-image files are skipped with a warning;
    a corrupt image, or one whose shorter side is under ``min_side`` pixels -> ``SdtuneError`` naming it.
    """
    if folder is None or not str(folder).strip():
        raise SdtuneError(f"{what} is not set; set it to a folder of images")
    p = Path(folder).expanduser()
    if not p.exists():
        raise SdtuneError(f"{what} not found: {p}; create it and put the images there")
    if not p.is_dir():
        raise SdtuneError(f"{what} {p} is not a folder; point it at a folder of images")
    try:
        images, others = list_image_files(p)
    except OSError as exc:
        raise SdtuneError(f"{what} {p} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if others:
        names = ", ".join(o.name for o in others[:5]) + (" ..." if len(others) > 5 else "")
        message = f"{what} {p}: skipping {len(others)} non-image file(s): {names}"
        warnings.warn(message, SdtuneWarning, stacklevel=2)
    if not images:
        raise SdtuneError(f"{what} {p} holds no images (need .png/.jpg/.webp files; "
                          f"{'found only ' + str(len(others)) + ' other file(s)' if others else 'it is empty'})")
    for image in images:
        w, h = open_image(image, "RGB", what=f"{what} image").size  # raises naming the corrupt file
        if min(w, h) < min_side:
            raise SdtuneError(f"{what} image {image} is {w}x{h} pixels, too small to train at this resolution "
                              f"(the shorter side must be at least {min_side} px, min_image_fraction of resolution); "
                              "use a larger photo, remove it, or lower min_image_fraction")
    return images


def check_output_dir(path: str | os.PathLike, what: str = "output_dir") -> Path:
    """Create ``path`` if needed and prove it is writable, before any work; clear error otherwise."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise SdtuneError(f"{what} {p} is a file, not a folder; choose another {what}")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".sdtune-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SdtuneError(f"{what} {p} is not writable ({reason}); choose another {what}") from None
    return p


def _resize_shorter_side(img: Image.Image, resolution: int) -> Image.Image:
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size == (w, h):
        return img
    # Lanczos keeps detail when shrinking photos; bicubic rings less when enlarging small images.
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return img.resize(size, resample=resample)


def _crop_flip_to_tensor(img: Image.Image, resolution: int, center_crop: bool, flip: bool,
                         generator: torch.Generator | None) -> torch.Tensor:
    w, h = img.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = ImageOps.mirror(img)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def load_pixels(path: str | os.PathLike, resolution: int, center_crop: bool = True, flip: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One image as a [3, R, R] float32 tensor in [-1, 1] (``generator`` drives the random crop)."""
    img = _resize_shorter_side(open_image(path, "RGB", what="image"), resolution)
    return _crop_flip_to_tensor(img, resolution, center_crop, flip, generator)


def example_generator(seed: int, epoch: int, kind: str, index: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch, kind, index) - see the module docstring."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{kind}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images (and class images with prior preservation) paired by index.

    Length is max(#instance, #class); item i pairs instance i % n_inst with class i % n_cls, so every
    class image is seen once per epoch and the few instance images repeat.

    Random flips/crops are drawn from ``example_generator(seed, epoch, kind, index)``. Call
    ``set_epoch(e)`` at the start of each epoch (like DistributedSampler) for exact reproducibility
    under resume and workers; without it, the epoch is how often this object has served that item.
    """

    def __init__(self, instance_images: Sequence[str | os.PathLike], instance_prompt: str,
                 class_images: Sequence[str | os.PathLike] | None = None, class_prompt: str | None = None, *,
                 resolution: int, center_crop: bool = True, random_flip: bool = False, seed: int = 0):
        if not instance_images:
            raise SdtuneError("no instance images given")
        self.instance_images = [Path(p) for p in instance_images]
        self.instance_prompt = instance_prompt
        self.class_images = [Path(p) for p in class_images] if class_images else None
        if self.class_images is not None and not class_prompt:
            raise SdtuneError("class images were given without a class_prompt")
        self.class_prompt = class_prompt
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self._epoch: int | None = None
        self._visits: dict[tuple[str, int], int] = defaultdict(int)
        self._resized: dict[Path, Image.Image] = {}  # decoded + resized once; crops/flips are cheap

    @property
    def with_prior(self) -> bool:
        return self.class_images is not None

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images or ()))

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def _image(self, path: Path) -> Image.Image:
        if path not in self._resized:
            self._resized[path] = _resize_shorter_side(open_image(path, "RGB", what="image"), self.resolution)
        return self._resized[path]

    def _example(self, kind: str, paths: list[Path], i: int) -> tuple[tuple[int, bool], torch.Tensor]:
        index = i % len(paths)
        if self._epoch is None:
            epoch = self._visits[kind, i]
            self._visits[kind, i] += 1
        else:
            epoch = self._epoch
        gen = example_generator(self.seed, epoch, kind, i)
        flip = bool(self.random_flip and torch.rand((), generator=gen) < 0.5)
        pixels = _crop_flip_to_tensor(self._image(paths[index]), self.resolution, self.center_crop, flip, gen)
        return (index, flip), pixels

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        key, pixels = self._example("instance", self.instance_images, i)
        item = {"instance_key": key, "instance_pixels": pixels, "instance_prompt": self.instance_prompt}
        if self.class_images is not None:
            key, pixels = self._example("class", self.class_images, i)
            item.update(class_key=key, class_pixels=pixels, class_prompt=self.class_prompt)
        return item


def collate(examples: Sequence[dict], with_prior: bool) -> dict:
    """Stack a list of dataset items: all instance examples first, then all class examples.

    Returns {"pixels": [B or 2B, 3, R, R], "prompts": [...], "is_class": BoolTensor,
    "keys": [(kind, index, flip), ...]} so the loss can split the batch by ``is_class`` (or chunk in two).
    """
    kinds = ("instance", "class") if with_prior else ("instance",)
    pixels, prompts, is_class, keys = [], [], [], []
    for kind in kinds:
        for ex in examples:
            if f"{kind}_pixels" not in ex:
                raise ValueError("collate(with_prior=True) needs a dataset built with class images")
            index, flip = ex[f"{kind}_key"]
            pixels.append(ex[f"{kind}_pixels"])
            prompts.append(ex[f"{kind}_prompt"])
            is_class.append(kind == "class")
            keys.append((kind, index, flip))
    return {"pixels": torch.stack(pixels).contiguous(), "prompts": prompts,
            "is_class": torch.tensor(is_class, dtype=torch.bool), "keys": keys}


def caption_dropout_mask(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool[n]: True where an example trains on the empty prompt (probability ``p`` each, independent)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1), got {p}")
    return torch.rand(n, generator=generator) < p
