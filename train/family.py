"""Rebuild the embedded model family from nothing, on renders of the built-in world.

    python train/family.py --stage vae [--config configs/family/vae.yaml] [--out build/family]

Stages (one config each under configs/family/): ``vae`` - a small diffusers ``AutoencoderKL`` for
64 px images (16x16x4 latents), trained with an L1 reconstruction loss and a tiny KL term. Its
``scaling_factor`` is measured on held-out latents (1 / their std, SD's convention), so the
denoiser that follows sees unit-variance latents. Later stages (text encoder, UNets, depth) are
not written yet.

Every stage is reproducible from its config's seed and logs PSNR against wall time to
``<out>/<stage>/train_log.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdtune import world  # noqa: E402
from sdtune.imageio import write_text_atomic  # noqa: E402


def render_tensor(n: int, seed: int, size: int, subject_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` world renders: images [n,3,size,size] in [-1, 1] (SD's VAE input range), object masks [n,1,size,size]."""
    renders = list(world.dataset(n, seed, size=size, subject_share=subject_share))
    arr = np.stack([np.asarray(r.image, np.float32) for r in renders])
    masks = np.stack([r.mask for r in renders]).astype(np.float32)[:, None]
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0, torch.from_numpy(masks)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of images in [-1, 1] (compared in [0, 1]); with ``mask``, over the masked pixels only."""
    err = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2)
    if mask is not None:
        mse = (err * mask).sum().item() / max(mask.sum().item() * err.shape[1], 1.0)
    else:
        mse = err.mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def build_vae(cfg: dict):
    from diffusers import AutoencoderKL

    v = cfg["vae"]
    n = len(v["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(v["block_out_channels"]),
        layers_per_block=v["layers_per_block"],
        latent_channels=v["latent_channels"],
        norm_num_groups=v["norm_num_groups"],
        sample_size=cfg["image_size"],
        mid_block_add_attention=v.get("mid_block_add_attention", True),
    )


def save_atomic(model, folder: Path) -> None:
    """save_pretrained into a temporary sibling folder, then swap it in whole."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def train_vae(cfg: dict, out: Path) -> dict:
    t = cfg["train"]
    torch.set_num_threads(t.get("threads", 2))
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    size = cfg["image_size"]

    t0 = time.time()
    data, data_mask = render_tensor(t["renders"], cfg["seed"] + 1, size, t["subject_share"])
    held, held_mask = render_tensor(t["eval_images"], t["eval_seed"], size, t["subject_share"])
    render_s = time.time() - t0

    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=t["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t["lr"], total_steps=t["steps"], pct_start=0.05)
    log = []

    def evaluate(step: int, elapsed: float):
        vae.eval()
        with torch.no_grad():
            post = vae.encode(held).latent_dist
            rec = vae.decode(post.mode()).sample
        vae.train()
        entry = {"step": step, "seconds": round(elapsed, 1), "psnr_db": round(psnr(rec, held), 2), "object_psnr_db": round(psnr(rec, held, held_mask), 2), "latent_std": round(post.mode().std().item(), 4)}
        log.append(entry)
        print(json.dumps(entry), flush=True)

    t1 = time.time()
    vae.train()
    for step in range(1, t["steps"] + 1):
        idx = torch.randint(0, data.shape[0], (t["batch_size"],), generator=gen)
        x = data[idx]
        # The object is a small share of the pixels but all of the meaning: weight its pixels up,
        # or the autoencoder learns the backgrounds and blurs the objects away (measured: it did).
        w = 1.0 + t.get("object_weight", 0.0) * data_mask[idx]
        # Horizontal flips would swap left/right; the world's layout is part of what it means, so no flips.
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)
        rec = vae.decode(z).sample
        loss = ((rec - x).abs() * w).mean() / w.mean() + t["kl_weight"] * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % t["eval_every"] == 0 or step == t["steps"]:
            evaluate(step, time.time() - t1)
    train_s = time.time() - t1

    # SD's convention: latents are multiplied by scaling_factor so the denoiser sees unit variance.
    vae.eval()
    with torch.no_grad():
        std = vae.encode(held).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    save_atomic(vae, out / "vae")
    record = {
        "stage": "vae",
        "config": cfg,
        "render_seconds": round(render_s, 1),
        "train_seconds": round(train_s, 1),
        "final_psnr_db": log[-1]["psnr_db"],
        "final_object_psnr_db": log[-1]["object_psnr_db"],
        "scaling_factor": vae.config.scaling_factor,
        "latent_shape": [cfg["vae"]["latent_channels"]] + [size // 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)] * 2,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "log": log,
    }
    write_text_atomic(out / "vae" / "train_log.json", json.dumps(record, indent=2) + "\n")
    return record


STAGES = {"vae": train_vae}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=sorted(STAGES), default="vae")
    ap.add_argument("--config", help="stage config (default: configs/family/<stage>.yaml)")
    ap.add_argument("--out", default=str(ROOT / "build" / "family"))
    ap.add_argument("--steps", type=int, help="override the config's step count")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = yaml.safe_load(Path(args.config or ROOT / "configs" / "family" / f"{args.stage}.yaml").read_text())
    if args.steps:
        cfg["train"]["steps"] = args.steps
    record = STAGES[args.stage](cfg, Path(args.out))
    print(f"stage {args.stage}: PSNR {record['final_psnr_db']} dB (objects {record['final_object_psnr_db']} dB) "
          f"after {record['train_seconds']}s of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
