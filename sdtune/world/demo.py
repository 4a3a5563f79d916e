"""The main job, end to end and offline: DreamBooth a subject, generate it in all four modes, score it.

Phases (``run_demo``):

1. models - the embedded family (base, inpaint, depth) when it is built; otherwise tiny RANDOM
   models, announced loudly and recorded as ``"models": "tiny-random"`` (their pictures are noise).
2. the family before training, once for every subject - the base model draws world prompts stating all
   five attributes at guidance 7.5 and 1.0 (``base_prompt_adherence``, per-attribute accuracy,
   ``guidance_gain``), at the LoRA's ``subject_guidance`` (reported) and, when the plan sets one, at 7.5 guided only in its
   ``guidance_interval`` of noise levels (the ``*_interval`` metrics); the inpainting model replaces a
   scene's object with a prompted one inside a mask (``inpaint_in_region``, and how much the pixels outside
   the mask change); the depth model redraws a scene from its depth (``depth_layout_kept``: the object stays
   where it was).
3. per subject, training - class images for prior preservation (OUT/class_images, reused by a rerun), the
   class prompts judged later drawn by the base too (``base_prior_preservation``: the prior to keep),
   then the DreamBooth recipe (train/dreambooth.py) with configs/demo.yaml; the LoRA goes to OUT/lora.
4. per subject, generation - ONE ``Engine`` with the LoRA applied serves txt2img (the subject in new
   contexts), img2img (a world render of another object), inpaint (that object replaced by the subject
   inside a mask), depth2img (its depth) and class prompts (prior preservation), in batches, at the plan's
   ``subject_guidance`` (3.0: the LoRA oversaturates at 7.5 on this family).
5. per subject, scoring - the judge reads every image back; metrics.json and report.md with image grids.

One subject writes into OUT; several (``subjects=[...]``, ``sdtune demo --subjects all``) write each into
OUT/<name>/ and a summary (OUT/metrics.json, OUT/report.md) with one row per subject.
Every file is written under a temporary name and renamed; each image group is built in a scratch
folder and swapped in whole, so a rerun into the same OUT replaces, never mixes, results.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sdtune.errors import SdtuneError
from sdtune.imageio import write_text_atomic
from sdtune.world.demo_groups import Group, class_group, family_groups, save_group, subject_groups
from sdtune.world.demo_plan import (
    DEMO_CONFIG,
    EVAL_PROMPTS,
    FULL,
    PLAN_PREFIX,
    QUICK,
    QUICK_TRAINING,
    TINY_NOTICE,
    Models,
    Plan,
    demo_config,
    demo_defaults,
    demo_plan,
    demo_yaml,
    resolve_models,
    tiny_models,
    training_overrides,
)
from sdtune.world.demo_prompts import (
    base_prompts,
    box_mask,
    captioned,
    class_prompts,
    has_captions,
    new_contexts,
    other_kind,
    prior_prompts,
    subject_class_prompts,
    subject_prompt,
    world_inpaint_checks,
)
from sdtune.world.demo_report import metrics_table, subject_report, write_grids, write_summary
from sdtune.world.demo_scoring import MODE_GROUPS, TARGETS, prior_before_after, score_family, score_subject, targets_met
from sdtune.world.judge_scorer import JudgeScorer
from sdtune.world.subjects import DEFAULT_SUBJECT, Subject, load_subject, subject_folders

# The names this module has always offered (ablations, together, bench/ and tests import them from here).
__all__ = [
    "DEFAULT_SUBJECT", "DEMO_CONFIG", "EVAL_PROMPTS", "FULL", "MODE_GROUPS", "PLAN_PREFIX", "QUICK", "QUICK_TRAINING",
    "TARGETS",
    "TINY_NOTICE", "DemoRun", "Group", "Models", "Plan", "Subject", "base_prompts", "box_mask", "captioned",
    "class_prompts", "demo_config", "demo_defaults", "demo_plan", "demo_yaml", "has_captions", "load_subject",
    "metrics_table", "new_contexts", "other_kind", "prior_before_after", "prior_prompts", "resolve_models",
    "resolve_subjects", "run_demo", "save_group", "subject_class_prompts", "subject_prompt", "targets_met",
    "tiny_models", "training_overrides", "world_inpaint_checks",
]


def resolve_subjects(subjects) -> list[Subject]:
    """``None`` -> the default subject; ``"all"`` -> every shipped subject; else folders. Checked before any work."""
    if subjects is None:
        folders = [DEFAULT_SUBJECT]
    elif subjects == "all" or subjects == ["all"]:
        folders = subject_folders()
    else:
        folders = [subjects] if isinstance(subjects, (str, os.PathLike)) else list(subjects)
    loaded = [load_subject(f) for f in folders]
    names = [s.name for s in loaded]
    if len(set(names)) != len(names):
        raise SdtuneError(f"subjects must have different names, got {', '.join(names)}")
    return loaded


def run_demo(out: str | os.PathLike = "outputs/demo", subject=None, model=None, inpaint_model=None, depth_model=None,
             quick: bool = False, overrides=(), plan: Plan | None = None, say: Callable[[str], None] = print,
             subjects=None) -> dict:
    """Run the main job into ``out``; return the metrics (also in out/metrics.json, with out/report.md).

    ``subject`` (one folder) or ``subjects`` (folders, or "all"): whom to teach; default the checker box.
    """
    from sdtune.training.data import check_output_dir

    t_start = time.perf_counter()
    plan = plan or demo_plan(quick, overrides)
    subjs = resolve_subjects(subjects if subjects is not None else subject)  # user errors first
    out = check_output_dir(out, what="--out")
    for s in subjs:  # bad key=value overrides fail now, not after loading
        demo_config(s, "<model>", out, 64, quick, overrides, check_only=True)
    single = len(subjs) == 1

    def phase(n: int, text: str) -> None:
        say(f"[{n}/5] {text}  (t={time.perf_counter() - t_start:.0f}s)")

    # --- 1. models -----------------------------------------------------------------------------
    phase(1, "models")
    t = time.perf_counter()
    models = resolve_models(model, inpaint_model, depth_model, out, say)
    from sdtune.generation.engine import Engine
    from sdtune.world.judge import Judge

    base_engine = Engine.load(models.base, inpaint_model=models.inpaint, depth_model=models.depth)
    resolution = base_engine.native_size[0]
    judge = Judge.load()
    say(f"      base {models.base} ({models.kind}), {resolution} px; inpaint {models.inpaint or '-'}; "
        f"depth {models.depth or '-'}")
    family_timings = {"models_s": time.perf_counter() - t}

    # --- 2. the family before training ---------------------------------------------------------------
    scales = ", ".join(str(g) for g in dict.fromkeys((plan.guidance, 1.0, plan.subject_guidance)))
    if plan.guidance_interval and plan.guidance > 1:
        scales += f" and {plan.guidance} in noise levels [{plan.guidance_interval[0]}, {plan.guidance_interval[1]})"
    phase(2, f"the family before training: {plan.base_prompts} world prompts at guidance {scales}, "
             f"{plan.world_checks} inpaint and depth2img checks")
    t = time.perf_counter()
    before = family_groups(base_engine, plan, resolution, say)
    family = score_family(judge, before)
    family_timings["family_generate_s"] = time.perf_counter() - t

    # --- 3-5. each subject ---------------------------------------------------------------------------
    run = DemoRun(models=models, base_engine=base_engine, resolution=resolution, judge=judge, plan=plan, quick=quick,
                  overrides=tuple(overrides), family=family, family_groups=before, family_timings=family_timings,
                  phase=phase, say=say, t_start=t_start)
    results = {}
    for k, subj in enumerate(subjs):
        where = out if single else out / subj.name
        tag = "" if single else f"{subj.name} ({k + 1}/{len(subjs)}): "
        results[subj.name] = _run_subject(run, subj, where, tag)
    del run, base_engine
    if single:
        metrics = results[subjs[0].name]
    else:
        metrics = write_summary(out, results, family, models, quick, time.perf_counter() - t_start)
    say(f"done in {time.perf_counter() - t_start:.0f}s: {out / 'report.md'}, {out / 'metrics.json'}"
        + (f" - WARNING: {TINY_NOTICE}" if models.kind == "tiny-random" else ""))
    return metrics


@dataclass
class DemoRun:
    """What every subject's phases (3-5) share in one run: the models and the base engine, the judge, the plan and
    the run's options, the family's scores and groups from phase 2, and how the run reports progress."""

    models: Models
    base_engine: object  # the base Engine (no LoRA): class images and the class prompts drawn before training
    resolution: int
    judge: object
    plan: Plan
    quick: bool
    overrides: tuple[str, ...]
    family: dict  # phase 2's metrics, the same for every subject
    family_groups: list[Group]
    family_timings: dict[str, float]
    phase: Callable[[int, str], None]
    say: Callable[[str], None]
    t_start: float


def _run_subject(run: DemoRun, subj: Subject, out: Path, tag: str) -> dict:
    """Phases 3-5 for one subject into ``out``: class images, training, generation, scoring, report. ``tag`` prefixes
    its phase lines when the run has several subjects."""
    import torch

    from sdtune.generation.engine import Engine
    from sdtune.training.class_images import ensure_class_images
    from sdtune.training import dreambooth

    models, plan, resolution, judge, phase, say = run.models, run.plan, run.resolution, run.judge, run.phase, run.say
    base_engine, quick = run.base_engine, run.quick
    timings = dict(run.family_timings)
    t_subject = time.perf_counter()
    cfg = demo_config(subj, models.base, out, resolution, quick, run.overrides)  # validated before any work
    if cfg.method != "lora":
        raise SdtuneError("the demo applies a LoRA; keep method=lora (use `sdtune train` for full fine-tuning)")

    # --- 3. training ----------------------------------------------------------------------------------
    phase(3, f"{tag}DreamBooth {cfg.adapter if cfg.method == 'lora' else cfg.method} on {subj.name}: {cfg.num_class_images} class images, {cfg.max_steps} "
             f"steps, prior preservation {'on' if cfg.with_prior_preservation else 'OFF'}, caption dropout "
             f"{cfg.caption_dropout}")
    if subj.training:
        say(f"      {subj.folder / 'subject.json'} sets " + ", ".join(f"{k}={v}" for k, v in subj.training.items())
            + " (a key=value on the command line wins)")
    t = time.perf_counter()
    drawn = (f"{len(cfg.class_prompts)} class prompts ('{cfg.class_prompts[0]}', ...)"
             if cfg.class_prompts else f"'{cfg.class_prompt}'")
    say(f"      class images: {cfg.num_class_images} of {drawn} in {cfg.class_dir} (kept on rerun)")
    ensure_class_images(cfg, pipeline=base_engine.pipeline("txt2img"))
    timings["class_images_s"] = time.perf_counter() - t
    # The class prompts drawn by the base as well, same prompts, seeds and guidance as after training: what the
    # prior was before training. The world's base does not draw its class every time (small objects of a kind
    # named without colour or size come out as another kind), which caps prior_preservation below 1 whatever the
    # recipe does; the difference between the two is what training did.
    t = time.perf_counter()
    base_class = class_group(base_engine, subj, plan, "base_class_prompts",
                             "Class prompts before training (the base model: the prior to preserve)")
    timings["base_class_prompts_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*non-image file")  # subject.json beside the images
        result = dreambooth.train(cfg, scorers=[JudgeScorer(judge)] if cfg.eval_every else ())
    timings["train_s"] = time.perf_counter() - t
    timings["eval_s"] = result.eval_s
    kept = kept_weights(Path(cfg.output_dir))

    # --- 4. generation with one engine, LoRA applied ---------------------------------------------------
    phase(4, f"{tag}generating with the LoRA: txt2img, img2img, inpaint, depth2img, class prompts")
    t = time.perf_counter()
    engine = Engine.load(models.base, inpaint_model=models.inpaint, depth_model=models.depth, lora=kept)
    groups = [*subject_groups(engine, subj, plan, resolution, say), base_class]
    del engine
    timings["generate_s"] = time.perf_counter() - t + timings["family_generate_s"]

    # --- 5. scoring and report ---------------------------------------------------------------------------
    phase(5, f"{tag}scoring with the judge, writing metrics.json and report.md")
    t = time.perf_counter()
    all_groups = [*run.family_groups, *groups]
    for g in all_groups:
        save_group(g.results, out / "images" / g.name)
    metrics = {**run.family, **score_subject(judge, subj, groups)}
    metrics.update(
        models=models.kind, model=models.base, inpaint_model=models.inpaint, depth_model=models.depth,
        subject=subj.name, instance_prompt=subj.instance_prompt, class_prompt=subj.class_prompt, quick=quick,
        resolution=resolution, steps=result.global_step, sample_steps=plan.sample_steps,
        kept_step=result.evaluation.get("kept_step", result.global_step), stopped_early=result.stopped_early,
        eval={k: result.evaluation.get(k) for k in ("verdict", "settings", "eval_seconds")} if result.evaluation
        else None,
        guidance=plan.guidance, subject_guidance=plan.subject_guidance,
        guidance_interval=list(plan.guidance_interval) if plan.guidance_interval else None,
        counts={g.name: len(g.results) for g in all_groups} | {"class_images": cfg.num_class_images,
                                                              "instance_images": len(subj.images)},
        training={"method": cfg.method, "adapter": cfg.adapter, "lora_rank": cfg.lora_rank, "lora_targets": cfg.lora_targets,
                  "train_text_encoder": cfg.train_text_encoder, "learning_rate": cfg.learning_rate,
                  "with_prior_preservation": cfg.with_prior_preservation, "caption_dropout": cfg.caption_dropout,
                  "masked_loss": cfg.masked_loss, "train_batch_size": cfg.train_batch_size,
                  "output_preservation_weight": cfg.output_preservation_weight,
                  "instance_captions": captioned(subj) if cfg.use_captions else 0,
                  "class_prompts": len(cfg.class_prompts or ()),
                  "first_loss": _round(result.losses[0]), "last_loss": _round(result.losses[-1])},
        torch_threads=torch.get_num_threads(), out=str(out))
    metrics["targets"] = TARGETS
    metrics["targets_met"] = targets_met(metrics)
    grids = write_grids(out, all_groups)
    timings["score_s"] = time.perf_counter() - t
    timings["subject_s"] = time.perf_counter() - t_subject
    timings["total_s"] = time.perf_counter() - run.t_start
    metrics["timings"] = {k: round(v, 1) for k, v in timings.items()}
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(out / "report.md", subject_report(metrics, grids, subj))
    return metrics


def kept_weights(lora_dir: Path) -> Path:
    """The run's kept weights: OUT/lora/best when keep_best exported them, else the last ones."""
    best = lora_dir / "best"
    return best if any((best / name).is_file() for name in ("pytorch_lora_weights.safetensors",
                                                             "adapter_model.safetensors")) else lora_dir


def _round(x):
    return None if x is None else round(float(x), 4)

