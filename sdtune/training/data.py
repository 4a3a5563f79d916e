"""DreamBooth training data: checking images, turning them into tensors, deciding what each step draws.

Images are checked up front (every one is opened), so a corrupt file is reported before any model is loaded.
Every image - any size, RGBA, L, CMYK, 16-bit, EXIF-rotated - becomes a [3, H, W] float tensor in [-1, 1]:
scaled to cover its bucket (``sdtune.training.buckets``; without buckets, a square of the resolution), a
center (or random) crop, an optional flip.

``TrainingData`` holds the run's instance examples (every concept's, each repeated ``repeats`` times) and
class examples, each assigned to a bucket. Each micro-step draws one bucket (in proportion to how many
examples it holds) and the next ``batch`` examples of that bucket's shuffled stream - separately for the
instance and the class examples, so prior preservation pairs B instance with B class examples every step.
Every choice (bucket, order, flip, random crop) is a pure function of (seed, kind, global micro-step), not
of a running RNG, so a resumed run, skipped batches or several processes see exactly what an uninterrupted
run sees.
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


METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # the `datasets` imagefolder convention's captions
# Files that belong in an image folder without being images or captions: no warning for them.
QUIET_FILES = {*METADATA_FILES, "subject.json", "Thumbs.db"}


def list_image_files(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(files with an image suffix, stray files) in ``folder``, sorted; nothing is opened.

    Not stray: an image's same-name ``.txt`` caption and ``QUIET_FILES``. Hidden files are ignored silently:
    they are OS litter (.DS_Store) or sdtune's own half-written temporaries (``.name.partial``), never user data.
    """
    images, others = [], []
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        (images if p.suffix.lower() in IMAGE_SUFFIXES else others).append(p)
    stems = {p.stem for p in images}
    strays = [p for p in others if p.name not in QUIET_FILES and not (p.suffix.lower() == ".txt" and p.stem in stems)]
    return images, strays


def folder_images(folder: Path, what: str, stacklevel: int = 2) -> list[Path]:
    """``list_image_files`` of an existing folder, for a source: an unreadable folder or one without images ->
    ``SdtuneError``; stray files are skipped with a warning (``stacklevel`` as ``warnings.warn``'s, from the caller)."""
    try:
        images, others = list_image_files(folder)
    except OSError as exc:
        raise SdtuneError(f"{what} {folder} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if others:
        names = ", ".join(o.name for o in others[:5]) + (" ..." if len(others) > 5 else "")
        warnings.warn(f"{what} {folder}: skipping {len(others)} non-image file(s): {names}", SdtuneWarning,
                      stacklevel=stacklevel + 1)
    if not images:
        raise SdtuneError(f"{what} {folder} holds no images (need .png/.jpg/.webp files; "
                          f"{'found only ' + str(len(others)) + ' other file(s)' if others else 'it is empty'})")
    return images


def find_images(folder: str | os.PathLike | None, what: str = "instance_dir", min_side: int = 0) -> list[Path]:
    """Sorted image files in ``folder``, every one opened once to prove it is readable.

    Missing/empty folder or no images -> ``SdtuneError``; stray files (``list_image_files``) are skipped with a
    warning; a corrupt image, or one whose shorter side is under ``min_side`` pixels -> ``SdtuneError`` naming it.
    """
    if folder is None or not str(folder).strip():
        raise SdtuneError(f"{what} is not set; set it to a folder of images")
    p = Path(folder).expanduser()
    if not p.exists():
        raise SdtuneError(f"{what} not found: {p}; create it and put the images there")
    if not p.is_dir():
        raise SdtuneError(f"{what} {p} is not a folder; point it at a folder of images")
    images = folder_images(p, what, stacklevel=2)
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


def load_pixels(path: str | os.PathLike, resolution: int, center_crop: bool = True, flip: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One image as a [3, R, R] float32 tensor in [-1, 1] (``generator`` drives the random crop)."""
    from sdtune.training.buckets import fit

    img = fit(open_image(path, "RGB", what="image"), (resolution, resolution), center_crop, generator)
    return to_tensor(ImageOps.mirror(img) if flip else img)


def example_generator(seed: int, epoch: int, kind: str, index: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch, kind, index) - see the module docstring."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{kind}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _generator(*parts) -> torch.Generator:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a [3, H, W] float tensor in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class TrainingData:
    """The run's examples, their buckets, and the deterministic draw of every micro-step (see the module doc).

    ``instance``/``klass``: ``sdtune.training.sources.Example`` lists; ``repeats[c]`` repeats concept c's instance
    examples; ``buckets``: a list of (width, height), or None for squares of ``resolution``.
    """

    KINDS = ("instance", "class")

    def __init__(self, instance, klass=None, *, resolution: int, buckets=None, center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0, repeats: Sequence[int] | None = None,
                 masked_loss: bool = False):
        if not instance:
            raise SdtuneError("no instance images given")
        self.examples = {"instance": list(instance), "class": list(klass or [])}
        self.resolution, self.buckets = resolution, buckets
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed
        self.masked_loss = masked_loss  # instance examples carry their mask (file or alpha) as a loss weight
        rep = list(repeats or [])
        self.items: dict[str, list[int]] = {}  # kind -> example index of every stream position
        self.groups: dict[str, dict[tuple[int, int], list[int]]] = {}  # kind -> bucket -> stream positions
        for kind, exs in self.examples.items():
            items = [i for i, ex in enumerate(exs) for _ in range(rep[ex.concept] if ex.concept < len(rep) else 1)]
            groups: dict[tuple[int, int], list[int]] = defaultdict(list)
            for pos, i in enumerate(items):
                groups[self.bucket_of(exs[i])].append(pos)
            self.items[kind], self.groups[kind] = items, dict(sorted(groups.items()))
        self._draws: dict[str, list[tuple[tuple[int, int], int]]] = {k: [] for k in self.KINDS}
        self._uses: dict[str, dict] = {k: defaultdict(int) for k in self.KINDS}
        self._fitted: dict[tuple, Image.Image] = {}

    @property
    def with_prior(self) -> bool:
        return bool(self.examples["class"])

    def bucket_of(self, example) -> tuple[int, int]:
        if self.buckets is None:
            return (self.resolution, self.resolution)
        from sdtune.training.buckets import nearest_bucket

        return nearest_bucket(example.size, self.buckets)

    def bucket_counts(self, kind: str = "instance") -> dict[tuple[int, int], int]:
        """Stream positions per bucket (examples x repeats)."""
        return {b: len(members) for b, members in self.groups[kind].items()}

    def _draw(self, kind: str, g: int) -> tuple[tuple[int, int], int]:
        """(bucket, earlier draws of that bucket) of global micro-step ``g``; each g's bucket is its own pure draw."""
        draws, uses = self._draws[kind], self._uses[kind]
        buckets = list(self.groups[kind])
        weights = torch.tensor([len(self.groups[kind][b]) for b in buckets], dtype=torch.float64)
        while len(draws) <= g:
            k = len(draws)
            b = buckets[0] if len(buckets) == 1 else \
                buckets[int(torch.multinomial(weights, 1, generator=_generator("bucket", self.seed, kind, k)))]
            draws.append((b, uses[b]))
            uses[b] += 1
        return draws[g]

    def micro_batch(self, kind: str, g: int, batch: int) -> list[dict]:
        """The ``batch`` examples of ``kind`` for global micro-step ``g`` (all from one bucket)."""
        bucket, earlier = self._draw(kind, g)
        members = self.groups[kind][bucket]
        out = []
        for j in range(batch):
            epoch, offset = divmod(earlier * batch + j, len(members))
            order = torch.randperm(len(members), generator=_generator("order", self.seed, kind, bucket, epoch))
            out.append(self.example(kind, members[int(order[offset])], epoch, bucket))
        return out

    def example(self, kind: str, position: int, epoch: int, bucket=None) -> dict:
        """Stream position ``position`` of ``kind`` in ``epoch``: pixels, caption and its latent-cache key."""
        from sdtune.training.buckets import cover_size

        ex = self.examples[kind][self.items[kind][position]]
        bucket = bucket or self.bucket_of(ex)
        gen = example_generator(self.seed, epoch, kind, position)
        flip = bool(self.random_flip and torch.rand((), generator=gen) < 0.5)
        masked = self.masked_loss and kind == "instance"
        if self.center_crop:  # the same pixels every time: fitted once
            cache_key = (kind, self.items[kind][position], bucket)
            if cache_key not in self._fitted:
                self._fitted[cache_key] = _fit_with_mask(ex, bucket, True, None, masked)
            img, mask, (left, top) = self._fitted[cache_key]
        else:
            img, mask, (left, top) = _fit_with_mask(ex, bucket, False, gen, masked)
        if flip:
            img = ImageOps.mirror(img)
            mask = ImageOps.mirror(mask) if mask is not None else None
            left = cover_size(ex.size, bucket)[0] - left - bucket[0]  # the crop's left edge in the mirrored image
        key = (ex.key, bucket, flip) if self.center_crop else None
        # SDXL's size/crop conditioning: (original height, width, crop top, left, target height, width).
        time_ids = (ex.size[1], ex.size[0], top, left, bucket[1], bucket[0])
        return {"kind": kind, "pixels": to_tensor(img), "prompt": caption_variant(ex.caption, gen), "key": key,
                "name": ex.name, "mask": None if mask is None else mask_tensor(mask),
                "concept": ex.concept, "time_ids": time_ids}


def _fit_with_mask(ex, bucket, center_crop: bool, gen, masked: bool):
    """(image, its mask or None, crop box) fitted to ``bucket``; the mask is scaled and cropped exactly as the
    image (one box), so every masked pixel stays over its image pixel."""
    from sdtune.training.buckets import cover_size, fit

    if not masked:
        img, box = fit(ex.image(), bucket, center_crop, gen, with_box=True)
        return img, None, box
    img, mask = ex.image_and_mask()
    img, (left, top) = fit(img, bucket, center_crop, gen, with_box=True)
    if mask is not None:
        mask = mask.resize(cover_size(mask.size, bucket), resample=Image.BILINEAR)
        mask = mask.crop((left, top, left + bucket[0], top + bucket[1]))
    return img, mask, (left, top)


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """An L mask as a [1, H, W] float tensor in [0, 1] (opaque = 1: counts fully in a masked loss)."""
    return torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy()).float().div(255.0).unsqueeze(0)


def caption_variant(caption: str, gen: torch.Generator) -> str:
    """One line of a caption of several (its variants, e.g. with and without the context), drawn by ``gen``:
    the same line for the same (seed, epoch, example), so a resumed run draws what the uninterrupted one did."""
    lines = caption.split("\n")
    return lines[0] if len(lines) == 1 else lines[int(torch.randint(len(lines), (), generator=gen))]


def collate(instance: Sequence[dict], klass: Sequence[dict] = ()) -> list[dict]:
    """A micro-step's examples as forward passes: one when instance and class share a shape, else two.

    Each pass: {"pixels": [N, 3, H, W], "prompts", "keys", "is_class": BoolTensor, "concepts", "time_ids": [N, 6] (SDXL's
    original size, crop top-left and target size of each example), "masks": [N, 1, H, W] in [0, 1], or None
    when no example of the pass has one (an example without a mask counts everywhere: ones)}; instance
    examples first.
    """
    groups: list[list[dict]] = [list(instance)]
    if klass:
        if tuple(klass[0]["pixels"].shape) == tuple(instance[0]["pixels"].shape):
            groups[0] += list(klass)
        else:
            groups.append(list(klass))
    return [{"pixels": torch.stack([e["pixels"] for e in g]).contiguous(), "prompts": [e["prompt"] for e in g],
             "keys": [e["key"] for e in g], "is_class": torch.tensor([e["kind"] == "class" for e in g]),
             "concepts": [e["concept"] for e in g],
             "time_ids": torch.tensor([e["time_ids"] for e in g], dtype=torch.float32), "masks": _masks(g)}
            for g in groups]


def _masks(examples: Sequence[dict]) -> torch.Tensor | None:
    if all(e.get("mask") is None for e in examples):
        return None
    return torch.stack([e["mask"] if e.get("mask") is not None else torch.ones_like(e["pixels"][:1])
                        for e in examples])


def caption_dropout_mask(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool[n]: True where an example trains on the empty prompt (probability ``p`` each, independent)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1), got {p}")
    return torch.rand(n, generator=generator) < p


def drop_captions(prompts: Sequence[str], is_class: torch.Tensor, p: float, on: str = "all",
                  generator: torch.Generator | None = None) -> list[str]:
    """The prompts a pass trains on: each replaced by "" with probability ``p``, among all examples (``on="all"``)
    or the class images only (``on="class"``: the empty prompt then learns the class prior, never the subject).
    The random draw is the same either way, so a run's other randomness does not move with ``on``."""
    dropped = caption_dropout_mask(len(prompts), p, generator)
    if on == "class":
        dropped &= is_class  # both on the CPU: collate builds is_class, and the mask is drawn there
    return ["" if d else q for q, d in zip(prompts, dropped.tolist())]


def class_caption(caption: str, instance_prompt: str, class_prompt: str, identifier: str | None = None) -> str:
    """An instance caption said of the plain class, for ``output_preservation_weight``: the instance prompt inside it
    becomes the class prompt (``a photo of sks box, on sand`` -> ``a photo of a box, on sand``); else the identifier
    word is taken out (``sks box on grass`` -> ``box on grass``); a caption with neither is the class prompt itself.
    Without ``identifier``, the one word the instance prompt has and the class prompt lacks is taken for it."""
    import re

    if instance_prompt and instance_prompt in caption:
        return caption.replace(instance_prompt, class_prompt, 1)
    if not identifier:
        extra = set(instance_prompt.split()) - set(class_prompt.split())
        identifier = extra.pop() if len(extra) == 1 else None
    word = re.compile(rf"(?<!\S){re.escape(identifier)}(?!\S)") if identifier else None
    if word is None or not word.search(caption):
        return class_prompt
    return " ".join(word.sub("", caption).split())
