"""What a square crop throws away, and what aspect-ratio buckets keep, on the built-in world.

    python bench/bucket_coverage.py [--n 200]

Renders of a subject in wide (2:1) and tall (1:2) photos - a 128 px world render cut to 128x64 or 64x128, the
object at a position the shape leaves room for - go through the two training transforms at resolution 64:
sdtune's square center crop (``buckets: null``) and the ``auto`` bucket nearest their shape. Reported per
shape: the share of the object's pixels still in the training image (object-mask coverage), and the share of
training images the world's judge still recognises as the subject.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdtune.training.buckets import bucket_sizes, fit, nearest_bucket  # noqa: E402
from sdtune.world import scenes  # noqa: E402

SHAPES = {"wide 2:1": ("left", "right"), "tall 1:2": ("top", "bottom")}


def photo(scene: scenes.Scene, subject: str, shape: str):
    """(image, object mask) of ``scene`` as a 2:1 or 1:2 photo: a 128 px render cut to its middle band."""
    r = scenes.render(scene, size=128, subject=subject)
    box = (0, 32, 128, 96) if shape == "wide 2:1" else (32, 0, 96, 128)
    mask = Image.fromarray(r.mask.astype(np.uint8) * 255).crop(box)
    return r.image.crop(box), mask


def training_views(img: Image.Image, mask: Image.Image, resolution: int = 64):
    """{"center crop": (image, mask), "bucket": (image, mask)} as training sees them."""
    square = (resolution, resolution)
    bucket = nearest_bucket(img.size, bucket_sizes(resolution))
    return {"center crop": (fit(img, square), fit(mask, square)), "bucket": (fit(img, bucket), fit(mask, bucket))}


def measure(n: int = 200, subject: str = "checker_box", seed: int = 0, judge=None) -> dict:
    from sdtune.world.judge import Judge

    judge = judge or Judge.load()
    rng = np.random.default_rng(seed)
    out = {}
    for shape, positions in SHAPES.items():
        coverage = {"center crop": [], "bucket": []}
        images = {"center crop": [], "bucket": []}
        for i in range(n):
            base = scenes.sample_scene(rng)
            scene = scenes.Scene(**{**base.attrs(), "position": positions[i % 2]}, seed=base.seed)
            img, mask = photo(scene, subject, shape)
            total = (np.asarray(mask) > 127).sum()
            for name, (view, view_mask) in training_views(img, mask).items():
                # fit scales the image to cover the view first: count the kept pixels at the original scale
                scale = max(view.size[0] / img.size[0], view.size[1] / img.size[1])
                kept = (np.asarray(view_mask) > 127).sum() / scale ** 2
                coverage[name].append(min(1.0, kept / max(total, 1)))
                images[name].append(view)
        out[shape] = {name: {"object_coverage": round(float(np.mean(coverage[name])), 3),
                             "judged_the_subject": round(float(np.mean(
                                 [p["subject"] == subject for p in judge.predict(images[name])])), 3)}
                      for name in coverage}
    return {"subject": subject, "renders_per_shape": n, "resolution": 64, "shapes": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--subject", default="checker_box", choices=list(scenes.SUBJECTS))
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.n, args.subject), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
