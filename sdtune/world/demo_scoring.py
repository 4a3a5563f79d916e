"""The demo's scoring: the judge reads every image back into metrics (the family before training, the subject
after), checked against ``TARGETS``.
"""
from __future__ import annotations

import numpy as np

from sdtune.world import scenes
from sdtune.world.demo_groups import Group
from sdtune.world.subjects import Subject

MODE_GROUPS = ("txt2img", "img2img", "inpaint", "depth2img")
# Every target is "at least": the metric (a share in [0, 1], or the guidance gain) must reach it.
TARGETS = {
    "base_prompt_adherence": 0.9,
    "base_attribute_accuracy": 0.95,  # each attribute
    "guidance_gain": 0.2,
    "inpaint_in_region": 0.9,
    # The same four, the family drawn at `guidance` with guidance limited to `guidance_interval` (Plan).
    "base_prompt_adherence_interval": 0.9,
    "base_attribute_accuracy_interval": 0.95,
    "guidance_gain_interval": 0.2,
    "inpaint_in_region_interval": 0.9,
    "depth_layout_kept": 0.9,
    "subject_fidelity": 0.9,
    "subject_fidelity_by_mode": {"txt2img": 0.9, "img2img": 0.8, "inpaint": 0.8, "depth2img": 0.8},
    "prompt_fidelity": 0.8,
    "prior_preservation": 0.9,
}


def _imgs(grp: Group) -> list:
    return [r.image for r in grp.results]


def score_family(judge, groups: list[Group]) -> dict:
    """Metrics of the models before training (the same for every subject)."""
    from sdtune.world import evaluation as ev

    by = {g.name: g for g in groups}
    hi, lo = by["base_guidance_7.5"], by["base_guidance_1.0"]
    adherence_hi = ev.prompt_adherence(_imgs(hi), hi.prompts, judge)
    adherence_lo = ev.prompt_adherence(_imgs(lo), lo.prompts, judge)
    m = {
        "base_prompt_adherence": adherence_hi,
        "base_prompt_adherence_guidance_1": adherence_lo,
        "guidance_gain": adherence_hi - adherence_lo,
        "base_attribute_accuracy": ev.attribute_accuracy(_imgs(hi), hi.prompts, judge),
        "base_attribute_accuracy_guidance_1": ev.attribute_accuracy(_imgs(lo), lo.prompts, judge),
    }
    # The same prompts drawn another way: adherence, per attribute and gain over 1.0, keyed by the group's suffix.
    for name, suffix in (("base_subject_guidance", "_at_subject_guidance"), ("base_guidance_interval", "_interval")):
        if name in by:
            g = by[name]
            adherence = ev.prompt_adherence(_imgs(g), g.prompts, judge)
            m["base_prompt_adherence" + suffix] = adherence
            m["base_attribute_accuracy" + suffix] = ev.attribute_accuracy(_imgs(g), g.prompts, judge)
            m["guidance_gain" + suffix] = adherence - adherence_lo
    if "world_inpaint_interval" in by:
        m["inpaint_in_region_interval"] = _in_region(judge, by["world_inpaint_interval"])[1]
    if "world_inpaint" in by:
        g = by["world_inpaint"]
        preds, m["inpaint_in_region"] = _in_region(judge, g)
        m["inpaint_in_region_by_attribute"] = {a: float(np.mean([p[a] == t[a] for p, t in zip(preds, g.truth)]))
                                               for a in ("kind", "colour", "position")}
        m["inpaint_outside_change"] = _outside_change(g)
    if "world_depth2img" in by:
        g = by["world_depth2img"]
        preds = judge.predict(_imgs(g))
        m["depth_layout_kept"] = float(np.mean([p["position"] == t["position"] for p, t in zip(preds, g.truth)]))
    return rounded(m)


def _in_region(judge, g: Group) -> tuple[list[dict], float]:
    """The judge's reading of an inpaint check's images, and the share with the prompted object in the mask."""
    preds = judge.predict(_imgs(g))
    return preds, float(np.mean([judge.matches(p, t) for p, t in zip(preds, g.truth)]))


def _outside_change(g: Group) -> float:
    """Mean absolute change (0-255) of the pixels outside the mask, inpainted image vs its input, without
    paste-back: what the VAE round trip and the model do to the part that was to be kept."""
    diffs = []
    for r, init, mask in zip(g.results, g.extra["inits"], g.extra["masks"]):
        keep = np.asarray(mask.convert("L")) < 128
        a = np.asarray(r.image.convert("RGB"), np.float32)
        b = np.asarray(init.convert("RGB").resize(r.image.size), np.float32)
        diffs.append(np.abs(a - b)[keep].mean())
    return float(np.mean(diffs))


def score_subject(judge, subj: Subject, groups: list[Group]) -> dict:
    from sdtune.imageio import open_image
    from sdtune.world import evaluation as ev

    by = {g.name: g for g in groups}
    name = subj.name if subj.name in scenes.SUBJECTS else None

    def fidelity(images):
        return ev.subject_fidelity(images, judge, subj.class_noun, subject=name)

    txt = by["txt2img"]
    m = {
        "subject_fidelity": fidelity(_imgs(txt)),
        "prompt_fidelity": ev.prompt_fidelity(_imgs(txt), txt.prompts, judge, subj.identifier),
        "subject_in_context": ev.subject_in_context(_imgs(txt), txt.prompts, judge, subj.class_noun, name,
                                                    subj.identifier),
        "prior_preservation": ev.prior_preservation(_imgs(by["class_prompts"]), subj.class_noun, judge),
    }
    if "base_class_prompts" in by:  # the same draws before training: the prior there was to keep
        m.update(prior_before_after(judge, subj.class_noun, _imgs(by["base_class_prompts"]),
                                    _imgs(by["class_prompts"])))
    modes = [mode for mode in MODE_GROUPS if mode in by]
    m["subject_fidelity_by_mode"] = {mode: fidelity(_imgs(by[mode])) for mode in modes}
    m["prompt_fidelity_by_mode"] = {mode: ev.prompt_fidelity(_imgs(by[mode]), by[mode].prompts, judge,
                                                              subj.identifier) for mode in modes}
    # The judge's own check: the real instance images should be judged the subject.
    m["judge_on_instance_images"] = fidelity([open_image(p) for p in subj.images])
    m["modes"] = modes
    return rounded(m)


def prior_before_after(judge, class_noun: str, before: list, after: list) -> dict:
    """The class prompts' draws by the base (``before``) and the LoRA (``after``), pairwise the same prompt and seed:
    ``base_prior_preservation``, prior_preservation's share on the base's; ``prior_kept``, of the prompts the base
    drew as the class, the share the LoRA still does (None if the base drew none)."""
    def the_class(images) -> list[bool]:  # prior_preservation's test, per image
        return [p["kind"] == class_noun and p["subject"] is None for p in judge.predict(list(images))]

    was, now = the_class(before), the_class(after)
    kept = [n for n, w in zip(now, was) if w]
    return {"base_prior_preservation": float(np.mean(was)) if was else None,
            "prior_kept": float(np.mean(kept)) if kept else None}


def targets_met(m: dict) -> dict:
    """For each target, whether the metrics reach it (per attribute / per mode where the target is a dict)."""
    met = {}
    for key, target in TARGETS.items():
        value = m.get(key)
        if value is None:
            continue
        if isinstance(target, dict):
            met[key] = {k: value[k] >= t for k, t in target.items() if k in value}
        elif isinstance(value, dict):
            met[key] = {k: v >= target for k, v in value.items()}
        else:
            met[key] = value >= target
    return met


def rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value

