"""Several subjects in one run: one LoRA learns them all, and each prompt draws its own subject only.

``run_together`` trains the demo's recipe once with ``concepts:`` - every subject with its own identifier,
class prompt and class images - then, with that one LoRA, draws each subject's prompts in new contexts and
its class prompts, and scores with the judge:

* ``subject_fidelity`` per subject: its prompts judged to be it (and of its class);
* ``cross_talk`` per subject: its prompts judged to be *another* of the trained subjects;
* ``prior_preservation`` per subject: its class prompts judged the class, no subject.

``sdtune demo --together --subjects A B --out OUT`` writes OUT/together.json and OUT/together.md.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from sdtune.errors import SdtuneError
from sdtune.imageio import save_image_atomic, write_text_atomic
from sdtune.world.report import make_grid, short


def agreed_training(subjects, given: set, defaults: dict, say: Callable[[str], None] = print) -> dict:
    """The training keys the subject folders recommend (subject.json "training") that one shared config can take.

    Subjects trained together share one config. A key the command line sets (``given``) is settled for all. Two
    folders recommending different values is a one-line error (the user settles it with key=VALUE). A key that
    only some folders recommend is a per-subject choice (the crescent's attention-only targets suit a silhouette,
    not the checker box's texture: in one LoRA of the three, box / crescent 0.625 / 0.812 with attention for all,
    0.812 / 0.688 with the demo's all): the folders that do not name it would train with the demo's value, so one
    LoRA keeps the demo's value, and a note names the key and the folder that asked otherwise. Checked before any
    work.
    """
    recommended: dict = {}
    for s in subjects:
        for key, value in s.training.items():
            if key in given:
                continue
            if recommended.setdefault(key, (value, s.name))[0] != value:
                raise SdtuneError(f"{recommended[key][1]} and {s.name} recommend different {key} "
                                  f"({recommended[key][0]} and {value}), and subjects trained together share one "
                                  f"config; choose with {key}=VALUE")
    training, kept = {}, []
    for key, (value, name) in recommended.items():
        others = [s.name for s in subjects if key not in s.training]
        if others and defaults.get(key, value) != value:
            kept.append(f"{key}={defaults[key]} (the demo's, for {', '.join(others)}; {name} recommends {value})")
        else:
            training[key] = value
    if training:
        say("the subject folders set " + ", ".join(f"{k}={v}" for k, v in training.items())
            + " for all of them (a key=value on the command line wins)")
    if kept:
        say("the subject folders differ, so one LoRA keeps " + "; ".join(kept) + " (a key=value on the command line "
            "chooses)")
    return training


def concept_curves(history: list[dict], names: list[str]) -> dict[str, list[dict]]:
    """Each concept's curve from the run's evaluations (``<name>/likeness``, ``<name>/crosstalk_judge``)."""
    return {n: [{"step": r["step"], "likeness": r.get(f"{n}/likeness"), "crosstalk": r.get(f"{n}/crosstalk_judge"),
                 "bleed": r.get(f"{n}/bleed")} for r in history] for n in names} if history else {}


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def run_together(out, subjects="all", model=None, quick: bool = False, overrides=(), prompts: int = 16,
                 say: Callable[[str], None] = print) -> dict:
    from sdtune.generation.engine import Engine
    from sdtune.training.class_images import ensure_class_images
    from sdtune.training.config import config_from_dict, parse_override
    from sdtune.training.data import check_output_dir
    from sdtune.training import dreambooth
    from sdtune.world import demo
    from sdtune.world import evaluation as ev
    from sdtune.world.judge import Judge
    from sdtune.world.demo_prompts import eval_prompts
    from sdtune.world.judge_scorer import JudgeScorer
    from sdtune.world.scenes import SUBJECTS

    t_start = time.perf_counter()
    subjs = demo.resolve_subjects(subjects)
    if len(subjs) < 2:
        raise SdtuneError("--together needs at least two subjects (--subjects A B, or all)")
    idents = [s.identifier for s in subjs]
    if len(set(idents)) != len(idents):
        raise SdtuneError(f"subjects trained together need different identifiers, got {', '.join(idents)}")
    training = agreed_training(subjs, {parse_override(text)[0] for text in demo.training_overrides(overrides)},
                               demo.demo_defaults(), say)
    out = check_output_dir(out, what="--out")
    models = demo.resolve_models(model, None, None, out, say)
    base = Engine.load(models.base)
    resolution = base.native_size[0]
    plan = demo.demo_plan(quick, overrides)
    if quick:
        prompts = 2

    # The demo's recipe, with one concept per subject instead of the single instance_dir.
    cfg = demo.demo_config(subjs[0], models.base, out, resolution, quick, overrides, training=training)
    data = {k: v for k, v in cfg.__dict__.items()}
    for key in ("instance_dir", "instance_prompt", "identifier", "class_prompt", "class_prompts", "class_dir",
                "eval_prompts", "eval_class_prompts"):
        data[key] = "" if key in ("instance_dir", "instance_prompt") else None
    data["concepts"] = [dict(instance_dir=str(s.folder), instance_prompt=s.instance_prompt, identifier=s.identifier,
                             class_prompt=s.class_prompt,
                             class_prompts=demo.subject_class_prompts(s, cfg.use_captions),
                             class_dir=str(out / "class_images" / s.class_noun), num_class_images=cfg.num_class_images,
                             # each concept evaluated on its own prompts; cross-talk is measured between them
                             **{k: v for k, v in eval_prompts(s, 2 if quick else demo.EVAL_PROMPTS).items() if k != "eval_other_prompts"})
                        for s in subjs]
    data["output_dir"] = str(out / "together_lora")
    # Each subject gets the steps it would get alone: n subjects share one LoRA, so n times the demo's steps
    # (three subjects in 1500 steps: 0.875 / 0.500 / 0.562; in 3000 all three pass 0.8; README). As kohya's
    # epochs over all images do, and unlike a fixed max_train_steps. An explicit max_steps= wins.
    data["max_steps"] = cfg.max_steps * len(subjs)
    for text in demo.training_overrides(overrides):  # the user's overrides win, as in the demo
        key, value = parse_override(text)
        data[key] = value
    cfg = config_from_dict(data)
    say(f"[1/3] class images and one LoRA for {', '.join(s.name for s in subjs)}: {cfg.max_steps} steps "
        f"({cfg.max_steps // len(subjs)} per subject) "
        f"(t={time.perf_counter() - t_start:.0f}s)")
    ensure_class_images(cfg, pipeline=base.pipeline("txt2img"))
    del base
    t = time.perf_counter()
    judge = Judge.load()
    result = dreambooth.train(cfg, scorers=[JudgeScorer(judge)] if cfg.eval_every else ())
    train_s = time.perf_counter() - t
    curves = concept_curves(result.evaluation.get("history", []), [s.folder.name for s in subjs])

    say(f"[2/3] drawing each subject's prompts with the one LoRA (t={time.perf_counter() - t_start:.0f}s)")
    engine = Engine.load(models.base, lora=demo.kept_weights(Path(cfg.output_dir)))
    names = [s.name for s in subjs]
    rows, cells = {}, []
    for s in subjs:
        subject_prompts = [demo.subject_prompt(s, sc) for sc in demo.new_contexts(s, prompts)]
        class_prompts = demo.class_prompts(s, prompts)
        draw = lambda ps, seed0: [r.image for r in engine.generate_many(  # noqa: E731
            "txt2img", [dict(prompt=p, seed=seed0 + i) for i, p in enumerate(ps)], steps=plan.sample_steps,
            guidance=plan.subject_guidance, batch_size=plan.batch_size)]
        imgs, cls = draw(subject_prompts, 100), draw(class_prompts, 500)
        preds = judge.predict(imgs)
        own = s.name if s.name in SUBJECTS else None
        rows[s.name] = {
            "identifier": s.identifier,
            "subject_fidelity": ev.subject_fidelity(imgs, judge, s.class_noun, subject=own),
            "cross_talk": sum(p["subject"] in names and p["subject"] != s.name for p in preds) / len(preds),
            "judged_as": {n: sum(p["subject"] == n for p in preds) / len(preds) for n in [*names, None]},
            "prompt_fidelity": ev.prompt_fidelity(imgs, subject_prompts, judge, s.identifier),
            "subject_in_context": ev.subject_in_context(imgs, subject_prompts, judge, s.class_noun, own, s.identifier),
            "prior_preservation": ev.prior_preservation(cls, s.class_noun, judge),
        }
        cells += [(im, short(p)) for im, p in zip(imgs, subject_prompts)]
        say("      " + s.name + ": " + ", ".join(f"{k} {rows[s.name][k]:.3f}"
                                                 for k in ("subject_fidelity", "cross_talk", "prompt_fidelity",
                                                           "subject_in_context", "prior_preservation")))
    del engine

    say(f"[3/3] report (t={time.perf_counter() - t_start:.0f}s)")
    save_image_atomic(make_grid(cells, 8), out / "grids" / "together.png")
    summary = dict(models=models.kind, subjects=rows, steps=result.global_step, train_s=round(train_s, 1),
                   kept_step=result.evaluation.get("kept_step", result.global_step), curves=curves,
                   verdict=result.evaluation.get("verdict"),
                   guidance=plan.subject_guidance,
                   prompts_per_subject=prompts, quick=quick, total_s=round(time.perf_counter() - t_start, 1))
    write_text_atomic(out / "together.json", json.dumps(summary, indent=2) + "\n")
    lines = ["# sdtune: several subjects in one LoRA", "",
             f"One LoRA, {result.global_step} steps, {len(subjs)} concepts (each with its identifier and class images); "
             f"{prompts} prompts per subject in new contexts, guidance {plan.subject_guidance}.", "",
             "| subject | identifier | subject fidelity | cross-talk (judged another subject) | prompt fidelity | "
             "subject in context | prior preservation |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r['identifier']} | {r['subject_fidelity']:.3f} | {r['cross_talk']:.3f} | "
              f"{r['prompt_fidelity']:.3f} | {r['subject_in_context']:.3f} | {r['prior_preservation']:.3f} |"
              for n, r in rows.items()]
    if curves:
        lines += ["", f"Per-concept evaluation during training ({summary['verdict']}): the judge's subject share, "
                      "and cross-talk (subject images nearer another subject's photos than their own), per step:", "",
                  "| step | " + " | ".join(f"{n} likeness | {n} cross-talk" for n in curves) + " |",
                  "|---|" + "---|---|" * len(curves)]
        steps = sorted({r["step"] for c in curves.values() for r in c})
        for step in steps:
            cells_ = []
            for c in curves.values():
                r = next((r for r in c if r["step"] == step), {})
                cells_ += [_fmt(r.get("likeness")), _fmt(r.get("crosstalk"))]
            lines.append(f"| {step} | " + " | ".join(cells_) + " |")
    lines += ["", "![together](grids/together.png)", ""]
    write_text_atomic(out / "together.md", "\n".join(lines))
    say(f"done in {summary['total_s']:.0f}s: {out / 'together.md'}")
    return summary
