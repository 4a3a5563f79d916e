"""The training machinery of ``train/build_family.py``: per-step generators, the learning-rate schedule,
checkpoints (module weights + AdamW moments as safetensors, the step in JSON) and the resumable loop.

Every random draw of a training step comes from a generator seeded by (seed, stage, step) and the learning
rate is a function of the step, so an interrupted stage resumes from its last checkpoint and ends with the
same weights.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from family_stages import Build

DONE = "done.json"


# ----------------------------------------------------------------------------------------------
# small utilities


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator of one training step: a pure function of (seed, stage, step), so resume is exact."""
    digest = hashlib.sha256(f"{seed}/{stage}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def stage_seed(seed: int, stage: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{stage}/init".encode()).digest()[:4], "little")


def lr_factor(step: int, steps: int, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_component(model, folder: Path) -> None:
    """``save_pretrained`` (safetensors) into a temporary sibling folder, then swap it in whole."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# checkpoints: module weights + AdamW moments as safetensors, the step in JSON


def save_checkpoint(folder: Path, step: int, modules: dict, opt: torch.optim.Optimizer, keep: int = 2) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=folder))
    for name, module in modules.items():
        save_file({k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
    moments = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            moments[f"{i}.{key}"] = torch.as_tensor(value).detach().contiguous().clone()
    save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")
    os.replace(tmp, folder / f"checkpoint-{step}")
    for old in sorted(checkpoints(folder))[:-keep]:
        shutil.rmtree(folder / f"checkpoint-{old}", ignore_errors=True)


def checkpoints(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return [int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if (p / "state.json").is_file()]


def load_checkpoint(folder: Path, modules: dict, opt: torch.optim.Optimizer) -> int:
    """Restore the newest checkpoint under ``folder``; return its step (0 when there is none)."""
    from safetensors.torch import load_file

    found = checkpoints(folder)
    if not found:
        return 0
    ck = folder / f"checkpoint-{max(found)}"
    for name, module in modules.items():
        module.load_state_dict(load_file(str(ck / f"{name}.safetensors")))
    moments = load_file(str(ck / "optimizer.safetensors"))
    params = [p for g in opt.param_groups for p in g["params"]]
    for key, value in moments.items():
        i, name = key.split(".", 1)
        # A fresh copy: tensors read from the file may sit at unaligned addresses, where CPU kernels take
        # a different (non-FMA) path and the resumed run would drift from the uninterrupted one by ~1e-8.
        opt.state[params[int(i)]][name] = value.clone()
    return int(json.loads((ck / "state.json").read_text())["step"])


def train_loop(build: Build, stage: str, modules: dict, groups: list[dict], steps: int, loss_fn) -> dict:
    """AdamW over ``groups`` for ``steps`` steps of ``loss_fn(step, generator)``; checkpointed, resumable."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    ckdir = build.work / stage
    start = load_checkpoint(ckdir, modules, opt)
    every = int(build.cfg["train"]["checkpoint_every"])
    params = [p for g in opt.param_groups for p in g["params"]]
    for m in modules.values():
        m.train()
    losses, t0, c0 = [], time.time(), time.process_time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=stage, mininterval=10, file=sys.stdout)
    for step in bar:
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * lr_factor(step, steps)
        loss = loss_fn(step, step_generator(build.seed, stage, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if len(losses) % 25 == 0:
            # CPU seconds per step (all threads): on shared cores, wall time says more about the neighbours.
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", cpu=f"{(time.process_time() - c0) / len(losses):.2f}s")
        if (step + 1) % every == 0 and step + 1 < steps:
            save_checkpoint(ckdir, step + 1, modules, opt)
    seconds, cpu = time.time() - t0, time.process_time() - c0
    for m in modules.values():
        m.eval()
    ran = steps - start
    return {"steps": steps, "resumed_from": start, "seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / ran, 3) if ran else None,
            "cpu_seconds_per_step": round(cpu / ran, 3) if ran else None,
            "loss_first_50": round(float(np.mean(losses[:50])), 5) if losses else None,
            "loss_last_50": round(float(np.mean(losses[-50:])), 5) if losses else None}
