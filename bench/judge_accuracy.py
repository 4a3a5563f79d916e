"""How well the judge reads the world: held-out renders, and the same renders after the embedded VAE.

    python bench/judge_accuracy.py [--n 600] [--vae data/models/base/vae]

Prints, per attribute and for the subject head (which subject, or none), the judge's accuracy on held-out
renders (a seed the judge never trained on, a third of them showing one of the subjects) and on their VAE
reconstructions - so the figures the demo reports can be read knowing what the judge itself can see.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(n: int, vae_path: str, seed: int = 777) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from sdtune.world import scenes
    from sdtune.world.judge import Judge

    renders = list(scenes.dataset(n, seed=seed, subject_share=1 / 3))
    judge = Judge.load()
    vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32).eval()
    recon = []
    with torch.no_grad():
        for i in range(0, n, 50):
            batch = torch.stack([torch.from_numpy(np.asarray(r.image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                                 for r in renders[i:i + 50]])
            out = vae.decode(vae.encode(batch).latent_dist.mode()).sample
            arr = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            recon += [Image.fromarray(a) for a in arr]
    truth = [{**r.scene.attrs(), "subject": r.subject} for r in renders]
    result = {}
    for name, images in (("renders", [r.image for r in renders]), ("vae_reconstructions", recon)):
        preds = judge.predict(images)
        keys = [k for k in truth[0] if k != "colour"] + ["colour"]
        acc = {}
        for k in keys:
            pairs = [(p[k], t[k]) for p, t in zip(preds, truth) if not (k == "colour" and t["subject"])]
            acc[k] = round(sum(a == b for a, b in pairs) / len(pairs), 4)
        for s in scenes.SUBJECTS:  # recall per subject: renders of s judged to be s
            mine = [p["subject"] == s for p, t in zip(preds, truth) if t["subject"] == s]
            acc[f"subject={s}"] = round(sum(mine) / max(1, len(mine)), 4)
        result[name] = acc
    result["n"] = n
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--vae", default=str(ROOT / "data" / "models" / "base" / "vae"))
    args = ap.parse_args()
    print(json.dumps(measure(args.n, args.vae), indent=2))


if __name__ == "__main__":
    main()
