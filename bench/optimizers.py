"""Optimizers and EMA on the embedded world: every shipped subject trained at equal steps with each optimizer (and
EMA on and off), judged as the demo judges its LoRA.

    python bench/optimizers.py                                   # the embedded family, every subject, --steps 1500
    python bench/optimizers.py --steps 600 --runs adamw,prodigy,adamw+ema --subjects checker_box
    python bench/optimizers.py --tiny --steps 2 --prompts 2 --sample-steps 2 --class-images 2   # smoke (a minute)

Each run is configs/demo.yaml's recipe for the subject (``demo_config`` with ``FIXED_STEPS``: no evaluation, no early
stop, so every run trains exactly ``--steps``) with one entry of ``RUNS`` on top: the optimizer at its usual
settings (Prodigy at learning rate 1, Lion at a fifth of AdamW's rate with five times its weight decay). The class
images are drawn once per subject and shared by its runs. Each run trains in its own process, so its peak RSS (and
peak VRAM on CUDA) is its own; its time is the training loop's (``TrainResult.loop_s``: no loading, caching or
saving). Its LoRA then draws ``--prompts`` subject prompts in new contexts and as many class prompts (``--sample-steps``
steps at the demo's subject guidance, the same seeds for every run), and the world's judge gives:

* subject fidelity: the share of subject-prompt images that show the subject;
* prompt fidelity: the share whose stated context (size, position, background) is honoured;
* prior preservation: the share of class-prompt images that show the class and not the subject.

One table per run and subject, then each run's mean over the subjects; ``--out FILE`` writes it all as JSON. On a
shared CPU wall times vary; the judge's shares do not (fixed seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

# name -> training overrides on top of the demo's recipe (learning_rate 5e-4, adam_weight_decay 1e-2, constant)
RUNS = {
    "adamw": [],
    "adamw+ema": ["ema_decay=0.99"],
    "prodigy": ["optimizer=prodigy", "learning_rate=1"],
    "prodigy+ema": ["optimizer=prodigy", "learning_rate=1", "ema_decay=0.99"],
    "adafactor": ["optimizer=adafactor"],
    "schedulefree": ["optimizer=schedulefree"],
    "lion": ["optimizer=lion", "learning_rate=1e-4", "adam_weight_decay=5e-2"],
}
DEFAULT_RUNS = ("adamw", "adamw+ema", "prodigy", "adafactor", "schedulefree", "lion")
METRICS = ("subject_fidelity", "prompt_fidelity", "prior_preservation")


def child(config_json: str, threads: int) -> None:
    """Train one config (a JSON file of its keys); print what it took as one JSON line."""
    import torch

    from bench_training import peak_rss_mb
    from sdtune.training import dreambooth
    from sdtune.training.config import config_from_dict

    torch.set_num_threads(threads)
    cfg = config_from_dict(json.loads(Path(config_json).read_text()))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = dreambooth.train(cfg)
    print("RESULT " + json.dumps({
        "steps": result.global_step, "train_s": round(result.loop_s, 2),
        "final_loss": round(sum(result.losses[-10:]) / len(result.losses[-10:]), 4),
        "peak_rss_mb": round(peak_rss_mb()),
        "peak_vram_mb": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None}))


def train_in_child(cfg, work: Path, threads: int) -> dict:
    from sdtune.training.config import config_to_dict

    path = work / "config.json"
    path.write_text(json.dumps(config_to_dict(cfg)))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(path),
                           "--threads", str(threads)], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"training {cfg.output_dir} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def measure(model: str, subject_dirs, work: Path, runs=DEFAULT_RUNS, steps: int = 1500, prompts: int = 16,
            sample_steps: int = 25, class_images: int | None = None, threads: int = 2, say=print) -> dict:
    """Train every (subject, run) pair at ``steps`` and judge its LoRA; return the rows and each run's means."""
    from sdtune.generation.engine import Engine
    from sdtune.training.class_images import ensure_class_images
    from sdtune.world import demo
    from sdtune.world import evaluation as ev
    from sdtune.world.demo_plan import FIXED_STEPS
    from sdtune.world.judge import Judge
    from sdtune.world.scenes import SUBJECTS

    judge = Judge.load()
    guidance = demo.demo_plan(False).subject_guidance
    rows = []
    for folder in subject_dirs:
        subj = demo.load_subject(folder)
        base = Engine.load(model)
        resolution = base.native_size[0]
        subject_prompts = [demo.subject_prompt(subj, s) for s in demo.new_contexts(subj, prompts)]
        class_prompts = demo.class_prompts(subj, prompts)
        fixed = [*FIXED_STEPS, f"max_steps={steps}"] + ([f"num_class_images={class_images}"] if class_images else [])
        ensure_class_images(demo.demo_config(subj, model, work / subj.name, resolution, False, fixed),
                            pipeline=base.pipeline("txt2img"))
        del base

        def draw(engine, ps, seed0):
            reqs = [dict(prompt=p, seed=seed0 + i) for i, p in enumerate(ps)]
            return [r.image for r in engine.generate_many("txt2img", reqs, steps=sample_steps, guidance=guidance,
                                                          batch_size=16)]

        for name in runs:
            out = work / subj.name / name
            out.mkdir(parents=True, exist_ok=True)
            cfg = demo.demo_config(subj, model, work / subj.name, resolution, False,
                                   [*fixed, *RUNS[name], f"output_dir={out / 'lora'}"])
            trained = train_in_child(cfg, out, threads)
            engine = Engine.load(model, lora=cfg.output_dir)
            subject_images, class_images_ = draw(engine, subject_prompts, 100), draw(engine, class_prompts, 500)
            del engine
            scores = {
                "subject_fidelity": ev.subject_fidelity(subject_images, judge, subj.class_noun,
                                                        subject=subj.name if subj.name in SUBJECTS else None),
                "prompt_fidelity": ev.prompt_fidelity(subject_images, subject_prompts, judge, subj.identifier),
                "prior_preservation": ev.prior_preservation(class_images_, subj.class_noun, judge)}
            row = {"subject": subj.name, "run": name, **{k: round(v, 4) for k, v in scores.items()}, **trained}
            rows.append(row)
            say(format_row(row))
    means = {}
    for name in runs:
        mine = [r for r in rows if r["run"] == name]
        means[name] = {k: round(sum(r[k] for r in mine) / len(mine), 4)
                       for k in (*METRICS, "train_s", "peak_rss_mb")}
    return {"model": model, "steps": steps, "prompts": prompts, "sample_steps": sample_steps, "guidance": guidance,
            "overrides": {n: RUNS[n] for n in runs}, "rows": rows, "means": means}


HEADER = (f"{'subject':14} {'run':13} {'subject fid.':>12} {'prompt fid.':>11} {'prior pres.':>11} {'train s':>8} "
          f"{'peak RSS MB':>11} {'peak VRAM MB':>12}")


def format_row(row: dict) -> str:
    vram = row.get("peak_vram_mb")
    return (f"{row.get('subject', 'mean'):14} {row['run']:13} {row['subject_fidelity']:12.3f} "
            f"{row['prompt_fidelity']:11.3f} {row['prior_preservation']:11.3f} {row['train_s']:8.1f} "
            f"{row['peak_rss_mb']:11.0f} {'-' if vram is None else f'{vram:.0f}':>12}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="base model (default: the embedded family's base)")
    p.add_argument("--tiny", action="store_true", help="tiny random models instead (a smoke run: scores mean nothing)")
    p.add_argument("--subjects", help="comma-separated subject names (default: every shipped subject)")
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--steps", type=int, default=1500, help="training steps of every run (the demo's max_steps)")
    p.add_argument("--prompts", type=int, default=16, help="subject prompts and class prompts judged per run")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--class-images", type=int, help="class images per subject (default: the demo's)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each training process")
    p.add_argument("--work", help="folder for class images and runs (default: a fresh temporary one)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.threads)
        return 0
    import tempfile

    from sdtune.world.subjects import subject_folders

    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        p.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="sdtune-bench-optimizers-"))
    if args.tiny:
        from sdtune.models.fixtures import tiny_family

        model = str(tiny_family(work / "tiny_models")["sd1"])
    else:
        from sdtune.models.embedded import embedded_model

        model = args.model or str(embedded_model("base"))
    folders = subject_folders()
    if args.subjects:
        wanted = [s.strip() for s in args.subjects.split(",")]
        folders = [f for f in folders if f.name in wanted]
        if len(folders) != len(wanted):
            p.error(f"--subjects: the shipped subjects are {', '.join(f.name for f in subject_folders())}")
    print(HEADER)
    start = time.perf_counter()
    result = measure(model, folders, work, runs, args.steps, args.prompts, args.sample_steps, args.class_images,
                     args.threads)
    print("\nmeans over the subjects:")
    for name, m in result["means"].items():
        print(format_row({"subject": "mean", "run": name, **m}))
    print(f"\n{len(result['rows'])} runs of {args.steps} steps in {time.perf_counter() - start:.0f} s; work: {work}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
