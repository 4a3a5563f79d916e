"""Sample grids to look at after a build of the embedded family (``train/build_family.py --samples``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdtune.world import scenes

GRID_PROMPTS = ("a photo of a large red ball in the center, on grass", "a photo of a small blue box on the left, on snow",
                "a photo of a large yellow star at the top, at night", "a photo of a large green cone on the right, on sand",
                "a photo of a purple ring at the bottom, on grass", "a photo of a orange box", "")


def sample_grids(out: Path, folder: Path, seed: int = 0, steps: int = 25, guidance: float = 7.5) -> list[Path]:
    """PNG grids to look at after a build: base samples (a row per prompt, the last one unconditional),
    inpainting (scene | mask | 3 repaints) and depth2img (scene | 3 restyles keeping its layout)."""
    from diffusers import (
        StableDiffusionDepth2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )
    from PIL import Image

    def save(rows, name):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([np.concatenate([np.asarray(im.convert("RGB")) for im in r], 1) for r in rows])).save(path)
        return path

    kw = dict(num_inference_steps=steps, guidance_scale=guidance)
    written = []
    if (out / "base").is_dir():
        pipe = StableDiffusionPipeline.from_pretrained(out / "base", dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        rows = [pipe([p] * 4, height=64, width=64, generator=torch.Generator().manual_seed(seed + i), **kw).images
                for i, p in enumerate(GRID_PROMPTS)]
        written.append(save(rows, "base.png"))
    grid_scenes = [scenes.Scene("ball", "red", "large", "left", "grass", seed=1), scenes.Scene("cone", "blue", "small", "right", "snow", seed=2)]
    renders = [scenes.render(sc) for sc in grid_scenes]
    if (out / "inpaint").is_dir():
        pipe = StableDiffusionInpaintPipeline.from_pretrained(out / "inpaint", dtype=torch.float32, safety_checker=None,
                                                              requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 34:62] = 255  # repaint the right half: the new object must appear there
        mask_img = Image.fromarray(mask)
        rows = []
        for r, prompt in zip(renders, ("a photo of a large yellow star on the right, on grass",
                                       "a photo of a large purple box on the right, on snow")):
            out_imgs = pipe([prompt] * 3, image=r.image, mask_image=mask_img, height=64, width=64,
                            generator=torch.Generator().manual_seed(seed), **kw).images
            rows.append([r.image, mask_img, *out_imgs])
        written.append(save(rows, "inpaint.png"))
    if (out / "depth").is_dir():
        pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(out / "depth", dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        rows = []
        for r, prompt in zip(renders, ("a photo of a large green ball on the left, on sand",
                                       "a photo of a small orange cone on the right, at night")):
            out_imgs = pipe([prompt] * 3, image=[r.image] * 3, strength=1.0, generator=torch.Generator().manual_seed(seed),
                            **kw).images
            rows.append([r.image, *out_imgs])
        written.append(save(rows, "depth.png"))
    return written
