"""Rebuild the embedded model family (base, inpaint, depth) from nothing, reproducibly from a seed.

    python train/build_family.py --stage all --out data/models

Stages, in order (``all`` runs those not done yet; each can also be run alone once its inputs exist):

* ``vae``       AutoencoderKL on world renders (L1 + tiny KL); ``scaling_factor`` = 1 / std of the latents.
* ``base``      CLIP text encoder + cross-attention UNet, jointly from scratch, on world captions with
                10% caption dropout -> ``<out>/base`` (StableDiffusionPipeline).
* ``guidance``  the base continued with the conditional pull (``Build.diffusion_loss``), so that SD's
                guidance 7.5 suits it -> ``<out>/base``, which the next stages continue.
* ``inpaint``   9-channel UNet from the guided base UNet, random masks (object boxes, random boxes, everything)
                -> ``<out>/inpaint`` (StableDiffusionInpaintPipeline).
* ``estimator`` small DPTForDepthEstimation on the ground-truth disparity of the renders.
* ``depth``     5-channel UNet from the guided base UNet, conditioned on normalised disparity
                -> ``<out>/depth`` (StableDiffusionDepth2ImgPipeline).

Renders, latents and masked-image latents are computed once and cached under ``--work``. Every
random draw of a training step comes from a generator seeded by (seed, stage, step) and the
learning rate is a function of the step, so an interrupted stage resumes from its last checkpoint
(``<work>/<stage>/checkpoint-N``, safetensors, no pickle) and ends with the same weights.
Config: ``configs/family.yaml``; override any key with ``--set train.base.steps=300``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The build's parts sit next to this file (importable also when it is loaded by path, as the tests do).
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from family_grids import GRID_PROMPTS, sample_grids  # noqa: E402
from family_loop import (  # noqa: E402
    DONE,
    checkpoints,
    file_digest,
    load_checkpoint,
    lr_factor,
    save_checkpoint,
    save_component,
    stage_seed,
    step_generator,
    train_loop,
)
from family_stages import Build  # noqa: E402

from sdtune import console  # noqa: E402
from sdtune.imageio import write_text_atomic  # noqa: E402
from sdtune.world import family  # noqa: E402

STAGES = ("vae", "base", "guidance", "inpaint", "estimator", "depth")
__all__ = ["DONE", "GRID_PROMPTS", "STAGES", "Build", "checkpoints", "file_digest", "load_checkpoint", "lr_factor",
           "main", "sample_grids", "save_checkpoint", "save_component", "stage_seed", "step_generator", "train_loop"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="all", choices=("all",) + STAGES)
    ap.add_argument("--out", default=str(ROOT / "data" / "models"), help="where the pipeline folders go")
    ap.add_argument("--work", default=None, help="caches and checkpoints (default: build/family-work)")
    ap.add_argument("--config", default=None, help="family config (default: configs/family.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--force", action="store_true", help="rerun stages that are already done")
    ap.add_argument("--samples", default=None, help="after the build, write base/inpaint/depth sample grids (PNG) here")
    ap.add_argument("--verbose", action="store_true", help="also show the libraries' notices and warnings")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console.setup(verbose=args.verbose)  # the build's own lines and bars; diffusers' dtype notices only with --verbose
    cfg = family.load_config(args.config, args.set)
    torch.set_num_threads(int(cfg.get("threads", 2)))
    out = Path(args.out)
    work = Path(args.work) if args.work else ROOT / "build" / "family-work"
    build = Build(cfg, out, work)
    todo = STAGES if args.stage == "all" else (args.stage,)
    records, t0 = {}, time.time()
    for stage in todo:
        done = work / stage / DONE
        if done.is_file() and not args.force:
            print(f"stage {stage}: already done ({done}); --force reruns it", flush=True)
            records[stage] = json.loads(done.read_text())
            continue
        if args.force:
            shutil.rmtree(work / stage, ignore_errors=True)
        start = time.time()
        records[stage] = getattr(build, f"stage_{stage}")()
        records[stage]["stage_seconds"] = round(time.time() - start, 1)
        write_text_atomic(done, json.dumps(records[stage], indent=2) + "\n")
    if all((work / s / DONE).is_file() for s in STAGES):
        info = {"seed": cfg["seed"], "config": cfg, "stages": {s: json.loads((work / s / DONE).read_text()) for s in STAGES},
                "sizes_bytes": {k: family.folder_size(out / k) for k in family.PIPELINES if (out / k).is_dir()},
                "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
        write_text_atomic(out / "build_info.json", json.dumps(info, indent=2) + "\n")
    print(f"build: {', '.join(todo)} in {time.time() - t0:.0f}s -> {out}", flush=True)
    if args.samples:
        for path in sample_grids(out, Path(args.samples)):
            print("samples:", path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
