"""Train the judge (sdtune/world/judge.py) on fresh renders of the built-in world; reproducible from a seed.

    python train/judge.py --out data/judge            # the shipped judge (minutes on 2 CPU cores)

Each round renders a fresh batch of scenes (a share of them the subject), trains a few passes over
it with light augmentation - blur, noise, a down/up-sampling, small shifts and brightness changes,
so the judge also reads imperfect generations - then the judge is scored on held-out renders
from another seed and saved as fp16 safetensors + config.json (with its measured accuracy).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdtune.imageio import atomic_path, write_text_atomic  # noqa: E402
from sdtune.world import scenes  # noqa: E402
from sdtune.world.judge import CONFIG, WEIGHTS, Judge, JudgeNet, default_config, to_tensor  # noqa: E402

IGNORE = -100


def labels_of(renders, heads) -> dict[str, torch.Tensor]:
    """Integer targets per head; a subject has no generic colour, so its colour is ignored."""
    out = {name: [] for name in heads}
    for r in renders:
        attrs = r.scene.attrs()
        for name in heads:
            if name == "subject":
                out[name].append(heads[name].index(r.subject or "none"))
            elif name == "colour" and r.subject:
                out[name].append(IGNORE)
            else:
                out[name].append(heads[name].index(attrs[name]))
    return {k: torch.tensor(v) for k, v in out.items()}


def clutter(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` images that are no world scene: smooth colour fields at random scales plus pixel noise, like what
    an untrained or broken model draws. They teach the subject head to say "none" to anything unlike a
    subject, so noise never counts as one (the other heads ignore them)."""
    out = []
    for _ in range(n):
        cells = int(torch.randint(2, 17, (1,), generator=gen))
        field = torch.randn(1, 3, cells, cells, generator=gen)
        x = F.interpolate(field, size=size, mode="bilinear", align_corners=False)
        x = x * torch.rand(1, generator=gen) + torch.randn(1, 3, size, size, generator=gen) * torch.rand(1, generator=gen) * 0.5
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light, label-preserving damage: shifts <= 2 px, brightness/contrast, blur, down/up-sampling, noise."""
    n = x.shape[0]
    rand = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    # Small shift (reflect-padded crop): position anchors are 15 px apart, so 2 px keeps the label.
    dx, dy = (torch.randint(-2, 3, (2,), generator=gen)).tolist()
    x = F.pad(x, (2, 2, 2, 2), mode="replicate")[:, :, 2 + dy : 2 + dy + x.shape[2], 2 + dx : 2 + dx + x.shape[3]]
    # Brightness/contrast: scale around the image mean by +-10%, shift +-0.08.
    scale = 1 + (rand(n, 1, 1, 1) - 0.5) * 0.2
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * scale + mean + (rand(n, 1, 1, 1) - 0.5) * 0.16
    # Blur a third of the images with a 3x3 Gaussian of random strength.
    blur = rand(n) < 0.33
    if blur.any():
        sigma = 0.4 + rand(1).item() * 0.8
        k1 = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * sigma * sigma))
        k = (k1[:, None] * k1[None, :]) / k1.sum() ** 2
        k = k.expand(3, 1, 3, 3).contiguous()
        xb = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k, groups=3)
        x = x.clone()
        x[blur] = xb
    # Down/up-sample a fifth of them (a soft, low-detail generation).
    soft = rand(n) < 0.2
    if soft.any():
        size = x.shape[-1]
        xs = F.interpolate(F.interpolate(x[soft], size=size // 2, mode="area"), size=size, mode="bilinear", align_corners=False)
        x = x.clone()
        x[soft] = xs
    # Gaussian noise of random strength.
    x = x + torch.randn(x.shape, generator=gen) * rand(n, 1, 1, 1) * 0.12
    return x.clamp(-1.2, 1.2)


def evaluate(judge: Judge, n: int, seed: int, subject_share: float) -> dict[str, float]:
    """Per-attribute accuracy on ``n`` fresh renders from ``seed`` (colour scored on non-subjects)."""
    renders = list(scenes.dataset(n, seed, subject_share=subject_share))
    preds = judge.predict([r.image for r in renders])
    acc = {}
    for name in judge.labels:
        hits = []
        for r, p in zip(renders, preds):
            if name == "subject":
                hits.append(p["subject"] == r.subject)
            elif name == "colour" and r.subject:
                continue
            else:
                hits.append(p[name] == r.scene.attrs()[name])
        acc[name] = float(np.mean(hits))
    return acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/judge")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=4, help="fresh render sets")
    ap.add_argument("--per-round", type=int, default=3000, help="renders per round")
    ap.add_argument("--passes", type=int, default=2, help="passes over each round's renders")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--subject-share", type=float, default=0.2)
    ap.add_argument("--clutter-share", type=float, default=0.05, help="share of non-world images (subject: none)")
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--eval-seed", type=int, default=12345)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    config = default_config()
    heads = config["heads"]
    net = JudgeNet(config)
    steps_per_round = args.passes * ((args.per_round + int(args.clutter_share * args.per_round)) // args.batch_size)
    total = args.rounds * steps_per_round
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15)

    t0 = time.time()
    render_s = 0.0
    step = 0
    for rnd in range(args.rounds):
        tr = time.time()
        # Each round's renders come from their own seed, derived from the run seed.
        renders = list(scenes.dataset(args.per_round, seed=args.seed * 1000 + rnd + 1, subject_share=args.subject_share))
        x_all = to_tensor([r.image for r in renders], config["image_size"])
        y_all = labels_of(renders, heads)
        n_clutter = int(args.clutter_share * len(renders))
        if n_clutter:
            x_all = torch.cat([x_all, clutter(n_clutter, config["image_size"], gen)])
            for name in heads:
                fill = heads[name].index("none") if name == "subject" else IGNORE
                y_all[name] = torch.cat([y_all[name], torch.full((n_clutter,), fill)])
        render_s += time.time() - tr
        net.train()
        for _ in range(args.passes):
            order = torch.randperm(len(x_all), generator=gen)
            for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
                idx = order[i : i + args.batch_size]
                out = net(augment(x_all[idx], gen))
                loss = sum(F.cross_entropy(out[name], y_all[name][idx], ignore_index=IGNORE) for name in heads)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step % 50 == 0 or step == total:
                    print(f"step {step}/{total} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0

    judge = Judge(net.eval(), config)
    acc = evaluate(judge, args.eval_images, args.eval_seed, args.subject_share)
    print("held-out accuracy:", json.dumps(acc))

    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items() if v.is_floating_point()}
    state.update({k: v for k, v in net.state_dict().items() if not v.is_floating_point()})
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    record = dict(config)
    record["training"] = {
        "recipe": "python train/judge.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "passes": args.passes,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "subject_share": args.subject_share,
        "clutter_share": args.clutter_share,
        "steps": total,
        "seconds": round(train_s, 1),
        "render_seconds": round(render_s, 1),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "heldout": {"images": args.eval_images, "seed": args.eval_seed, "accuracy": acc},
    }
    write_text_atomic(out / CONFIG, json.dumps(record, indent=2) + "\n")
    print(f"saved {out} in {train_s:.0f}s (rendering {render_s:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
