"""Do buckets cost speed? 100 images in 5 aspect-ratio buckets vs the same 100 as one square bucket.

Both runs train sdtune's recipe (LoRA, batch 2, no prior preservation) on the same model for the same steps,
each once to fill its on-disk latent cache and once more timed, so the timed run measures steps, not first
encodes. The figure is steps per second of the training loop (``TrainResult.loop_s``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, resolution: int, n: int = 100) -> list[tuple[int, int]]:
    """``n`` images spread evenly over the ``auto`` buckets of ``resolution`` (each image exactly a bucket)."""
    from sdtune.training.buckets import bucket_sizes

    buckets = bucket_sizes(resolution)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = buckets[i % len(buckets)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return buckets


def measure(model: str, work: Path, resolution: int, steps: int = 200, n: int = 100) -> dict:
    from sdtune.training.config import config_from_dict
    from sdtune.training import dreambooth

    buckets = make_images(work / "images", resolution, n)
    rows = {}
    for name, value in (("one square bucket", None), (f"{len(buckets)} buckets", "auto")):
        common = dict(model=model, instance_dir=str(work / "images"), instance_prompt="a photo of sks thing",
                      resolution=resolution, buckets=value, train_batch_size=2, max_steps=steps, learning_rate=1e-4,
                      caption_dropout=0.0, lora_rank=4, latent_cache_dir=str(work / "latents"), seed=0)
        dreambooth.train(config_from_dict({**common, "output_dir": str(work / f"warm-{value}")}))
        result = dreambooth.train(config_from_dict({**common, "output_dir": str(work / f"timed-{value}")}))
        rows[name] = {"steps_per_s": round(steps / result.loop_s, 2), "latent_encodes": result.latent_encodes}
    single, multi = rows["one square bucket"], rows[f"{len(buckets)} buckets"]
    return {"images": n, "buckets": [list(b) for b in buckets], "steps": steps, "resolution": resolution, "runs": rows,
            "ratio": round(multi["steps_per_s"] / single["steps_per_s"], 3)}
