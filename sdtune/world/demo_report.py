"""The demo's reports: a subject's report.md (metrics table, training, timings, image grids) and, for several
subjects, the summary (OUT/metrics.json and OUT/report.md, a row per subject).
"""
from __future__ import annotations

import json
from pathlib import Path

from sdtune.imageio import save_image_atomic, write_text_atomic
from sdtune.world.demo_groups import Group
from sdtune.world.demo_plan import TINY_NOTICE
from sdtune.world.demo_scoring import TARGETS, targets_met
from sdtune.world.report import load_table, make_grid, short
from sdtune.world.subjects import Subject

def write_grids(out: Path, groups: list[Group]) -> dict[str, str]:
    grids = {}
    for g in groups:
        cells = []
        for i, r in enumerate(g.results):
            cells += g.inputs[i] if i < len(g.inputs) else []
            cells.append((r.image, short(g.prompts[i]) if i < len(g.prompts) else ""))
        per_example = 1 + (len(g.inputs[0]) if g.inputs else 0)
        cols = per_example * max(1, 8 // per_example) if per_example > 1 else 8
        cols = min(cols, len(cells))
        rel = f"grids/{g.name}.png"
        save_image_atomic(make_grid(cells, cols), out / rel)
        grids[g.name] = rel
    return grids


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _met(ok) -> str:
    if isinstance(ok, dict):
        return "met" if all(ok.values()) else "missed: " + ", ".join(k for k, v in ok.items() if not v)
    return "met" if ok else "missed"


WHAT = {
    "base_prompt_adherence": "base model: share of world prompts (all five attributes) whose every attribute is found",
    "base_attribute_accuracy": "base model, per attribute: kind / colour / size / position / background",
    "guidance_gain": "base model: adherence at guidance 7.5 minus at 1.0 (classifier-free guidance works)",
    "inpaint_in_region": "inpainting model: the prompted object (kind, colour) drawn at the mask's position",
    "base_prompt_adherence_interval": "the same, guided only in `guidance_interval` (noise levels) at the same scale",
    "base_attribute_accuracy_interval": "the same per attribute, guided only in `guidance_interval`",
    "guidance_gain_interval": "adherence guided in `guidance_interval` minus at guidance 1.0",
    "inpaint_in_region_interval": "the inpaint check, guided only in `guidance_interval`",
    "depth_layout_kept": "depth model: the object stays where the input had it",
    "subject_fidelity": "after training, txt2img: subject prompts judged to be the subject",
    "subject_fidelity_by_mode": "after training, per mode: txt2img / img2img / inpaint / depth2img",
    "prompt_fidelity": "after training, txt2img: subject prompts whose context (position, background) is honoured",
    "prior_preservation": "after training: class-prompt images that are the class and not the subject",
}


def _value(v) -> str:
    if isinstance(v, dict):
        return " / ".join(_fmt(x) for x in v.values())
    return _fmt(v)


def _target(t) -> str:
    if isinstance(t, dict):
        return ">= " + " / ".join(_fmt(x) for x in t.values())
    return f">= {t}" + (" each" if isinstance(t, float) and t == TARGETS["base_attribute_accuracy"] else "")


def metrics_table(m: dict) -> list[str]:
    """The Markdown table of a metrics.json: value, target, met or missed, what it measures."""
    lines = ["| metric | value | target | | what it measures |", "|---|---|---|---|---|"]
    for key, desc in WHAT.items():
        if key in m:
            lines.append(f"| {key} | {_value(m[key])} | {_target(TARGETS[key])} | {_met(m['targets_met'][key])} | "
                         f"{desc} |")
    if "subject_in_context" in m:
        lines.append(f"| subject_in_context | {_fmt(m['subject_in_context'])} | (reported) | | the same txt2img images: "
                     "the subject AND its stated context in one image (DreamBooth's aim; at most the lower of the "
                     "two) |")
    if m.get("base_prior_preservation") is not None:
        lines.append(f"| base_prior_preservation | {_fmt(m['base_prior_preservation'])} | (reported) | | the same "
                     "class prompts, seeds and guidance drawn by the base before training: the prior there was, "
                     "which prior_preservation cannot exceed but by chance |")
        lines.append(f"| prior_kept | {_fmt(m['prior_kept'])} | (reported) | | of the class prompts the base drew "
                     "as the class, the share still the class (and not the subject) after training |")
    if "inpaint_outside_change" in m:
        lines.append(f"| inpaint_outside_change | {_fmt(m['inpaint_outside_change'])} | (reported) | | mean change "
                     "(0-255) of the pixels outside the mask without paste-back; with `--paste-back` it is 0 |")
    return lines


def subject_report(m: dict, grids: dict[str, str], subj: Subject) -> str:
    tiny = m["models"] == "tiny-random"
    lines = ["# sdtune demo: DreamBooth on a subject, all four modes, judged", ""]
    if tiny:
        lines += [f"> **WARNING: {TINY_NOTICE}.** The models below are tiny and untrained: every picture is "
                  "noise and every metric is meaningless (chance level). This run only proves that the pipeline "
                  "runs end to end.", ""]
    elif m["models"] == "custom":
        lines += [f"> Models: your own ({m['model']}). The judge knows only the built-in world, so its metrics "
                  "mean something only for models trained on that world.", ""]
    t = m["training"]
    lines += [
        f"- models: **{m['models']}** (base `{m['model']}`, inpaint `{m['inpaint_model']}`, depth "
        f"`{m['depth_model']}`), {m['resolution']} px",
        f"- subject: **{subj.name}** ({len(subj.images)} images, {t.get('instance_captions', 0)} with their own "
        f"caption), instance prompt `{m['instance_prompt']}`, class prompt `{m['class_prompt']}`"
        + (f" (class images drawn from {t['class_prompts']} class prompts)" if t.get("class_prompts") else ""),
        f"- training: {t.get('adapter', 'lora') if t['method'] == 'lora' else t['method']} rank {t['lora_rank']} on {t['lora_targets']} targets"
        f"{' + text encoder' if t['train_text_encoder'] else ''}, {m['steps']} steps, lr {t['learning_rate']}, batch "
        f"{t['train_batch_size']}, prior preservation {'on' if t['with_prior_preservation'] else 'off'} "
        f"({m['counts']['class_images']} class images), caption dropout {t['caption_dropout']}"
        f"{', masked loss' if t.get('masked_loss') else ''}"
        f"{', output preservation ' + str(t['output_preservation_weight']) if t.get('output_preservation_weight') else ''}"
        f"; loss "
        f"{t['first_loss']} -> {t['last_loss']}",
        *([f"- when the subject was learned: {m['eval']['verdict']}; "
           f"{'stopped early (stop_when_learned) at' if m.get('stopped_early') else 'trained to'} step {m['steps']}, "
           f"generated with step {m.get('kept_step', m['steps'])}'s weights; evaluations {m['eval']['eval_seconds']} s "
           "(curves: lora/eval.jsonl, lora/eval.svg)"] if m.get("eval") else []),
        f"- sampling: {m['sample_steps']} steps, guidance {m.get('guidance', 7.5)} before training, "
        f"{m.get('subject_guidance', 7.5)} with the LoRA"
        + (f"; the family also at {m.get('guidance')} guided only in noise levels {m['guidance_interval']}"
           if m.get("guidance_interval") else "") + (" (--quick)" if m["quick"] else ""),
        f"- time: {m['timings']['total_s']} s in all (this subject {m['timings']['subject_s']} s: train "
        f"{m['timings']['train_s']} s, class images {m['timings']['class_images_s']} s; generating "
        f"{m['timings']['generate_s']} s) on {m['torch_threads']} threads",
        "", "## Metrics (the judge)", "", *metrics_table(m), "",
        "Per mode, prompt fidelity (context honoured): " + ", ".join(
            f"{mode} {_fmt(m['prompt_fidelity_by_mode'][mode])}" for mode in m["modes"]) + ".",
        f"The judge on the real instance images: {_fmt(m['judge_on_instance_images'])} judged the subject.", ""]
    acc1 = m.get("base_attribute_accuracy_guidance_1")
    if acc1:
        lines += ["Base model at guidance 1.0, per attribute: " + ", ".join(f"{a} {_fmt(v)}" for a, v in acc1.items())
                  + ".", ""]
    acc = m.get("base_attribute_accuracy_at_subject_guidance")
    if acc:
        lines += [f"Base model at guidance {m['subject_guidance']} (the LoRA's): adherence "
                  f"{_fmt(m['base_prompt_adherence_at_subject_guidance'])}, per attribute "
                  + ", ".join(f"{a} {_fmt(v)}" for a, v in acc.items())
                  + f"; gain over guidance 1.0 {m['guidance_gain_at_subject_guidance']:+.3f} (reported; the targets "
                  "are stated at 7.5).", ""]
    if tiny:
        lines += ["(Tiny random models: these numbers are chance, not results.)", ""]
    table = load_table(m["out"]) if m.get("out") else None
    lines += ["## Ablations", ""]
    lines += [table, "", "(From `sdtune demo --ablations` into this folder: see ablations.md for its images.)", ""] \
        if table else ["Not run into this folder: `sdtune demo --ablations --out THIS_FOLDER` trains and scores "
                       "the recipe's variants and the diffusers example's defaults.", ""]
    lines += ["## Images", ""]
    titles = {"base_guidance_7.5": "Base model, guidance 7.5 (before training)",
              "base_guidance_1.0": "Base model, guidance 1.0 (before training)",
              "base_subject_guidance": f"Base model, guidance {m.get('subject_guidance')} (before training)",
              "base_guidance_interval": f"Base model, guidance {m.get('guidance')} in noise levels "
                                        f"{m.get('guidance_interval')} (before training)",
              "world_inpaint_interval": "Inpainting model before training, guided in the interval",
              "world_inpaint": "Inpainting model before training: the prompted object inside the mask",
              "world_depth2img": "Depth model before training: the layout kept",
              "txt2img": "txt2img: the subject in new contexts",
              "img2img": "img2img: a world render repainted as the subject",
              "inpaint": "inpaint: the subject painted into a world scene (red = repainted region)",
              "depth2img": "depth2img: a world render's structure, the subject's looks",
              "class_prompts": "Class prompts after training (prior preservation)"}
    for name, rel in grids.items():
        lines += [f"### {titles.get(name, name)}", "", f"![{name}]({rel})", "",
                  f"Images with their parameters (PNG + JSON): `images/{name}/`", ""]
    return "\n".join(lines)


SUMMARY_KEYS = ("subject_fidelity", "prompt_fidelity", "prior_preservation", "subject_in_context")


def write_summary(out: Path, results: dict, family: dict, models, quick: bool, total_s: float) -> dict:
    """OUT/metrics.json and OUT/report.md for several subjects: the family once, a row per subject."""
    summary = {"models": models.kind, "model": models.base, "quick": quick, "family": family,
               "subjects": {name: {k: m[k] for k in (*SUMMARY_KEYS, "subject_fidelity_by_mode", "targets_met",
                                                     "timings")}
                            for name, m in results.items()},
               "total_s": round(total_s, 1)}
    modes = next(iter(results.values()))["modes"]
    lines = ["# sdtune demo: every subject", "",
             f"Models: **{models.kind}** (`{models.base}`); {len(results)} subjects, each trained and judged on its "
             f"own (its report: `<name>/report.md`); {summary['total_s']} s in all.", "",
             "## The family before training", "",
             *[ln for ln in metrics_table({**family, "targets_met": targets_met(family)})], "",
             "## Per subject", "",
             "| subject | subject fidelity " + " / ".join(modes) + " | prompt fidelity | prior preservation | "
             "subject in context | targets |",
             "|---|---|---|---|---|---|"]
    for name, m in results.items():
        met = m["targets_met"]
        missed = [k for k in ("subject_fidelity_by_mode", *SUMMARY_KEYS) if k in met and _met(met[k]) != "met"]
        lines.append(f"| [{name}]({name}/report.md) | {_value(m['subject_fidelity_by_mode'])} | "
                     f"{_fmt(m['prompt_fidelity'])} | {_fmt(m['prior_preservation'])} | "
                     f"{_fmt(m['subject_in_context'])} | "
                     f"{'all met' if not missed else 'missed: ' + ', '.join(missed)} |")
    write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    return summary
