"""The demo's generation groups: each kind of image it draws (``Group``: images, prompts, the inputs its grid
shows), drawn in batches through one ``Engine`` - the family before training (``family_groups``), the subject in
all four modes and its class prompts (``subject_groups``, ``class_group``) - and saved as whole folders.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sdtune.world import scenes
from sdtune.world.demo_plan import Plan
from sdtune.world.demo_prompts import (
    base_prompts,
    box_mask,
    changed_scene,
    class_prompts,
    new_contexts,
    other_kind,
    subject_prompt,
    world_inpaint_checks,
)
from sdtune.world.report import mask_overlay, short
from sdtune.world.subjects import Subject

@dataclass
class Group:
    """One kind of generation: its images, prompts and the extra cells (inputs) its grid shows."""

    name: str
    title: str
    results: list = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    inputs: list[list[tuple[Image.Image, str]]] = field(default_factory=list)  # per example, shown before it
    truth: list[dict] = field(default_factory=list)  # per example, what the judge should find (world checks)
    extra: dict = field(default_factory=dict)



def save_group(results, folder: Path) -> list[Path]:
    """Save results (PNG + JSON each) as a whole folder: built aside, then swapped in for the old one."""
    from sdtune.generation.metadata import save_results

    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", suffix=".partial", dir=folder.parent))
    try:
        names = [p.name for p in save_results(results, scratch)]
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}-old-{os.getpid()}"
            os.replace(folder, old)
        os.replace(scratch, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [folder / n for n in names]



def draw(engine, grp: Group, mode: str, requests: list[dict], plan: Plan, bar, **kw) -> None:
    """Draw ``requests`` into ``grp`` in batches of ``plan.batch_size``, ticking the progress bar per batch."""
    kw.setdefault("guidance", plan.guidance)
    for i in range(0, len(requests), plan.batch_size):
        chunk = requests[i:i + plan.batch_size]
        grp.results += engine.generate_many(mode, chunk, steps=plan.sample_steps, batch_size=plan.batch_size, **kw)
        bar.update(len(chunk))


def family_groups(engine, plan: Plan, size: int, say) -> list[Group]:
    """The family before any training: world prompts (two guidance scales) and the inpaint/depth2img checks."""
    from tqdm.auto import tqdm

    prompts = base_prompts(plan.base_prompts)
    hi = Group("base_guidance_7.5", f"Base model, guidance {plan.guidance} (before training)", prompts=prompts)
    lo = Group("base_guidance_1.0", "Base model, guidance 1.0 (before training)", prompts=prompts)
    # The same prompts at the LoRA's guidance too: where this family follows best (reported beside the targets,
    # which are stated at 7.5), and the gain guidance gives it there over 1.0.
    at_lora = (Group("base_subject_guidance", f"Base model, guidance {plan.subject_guidance} (the LoRA's "
                                              "subject_guidance; before training)", prompts=prompts)
               if plan.subject_guidance not in (plan.guidance, 1.0) else None)
    interval = plan.guidance_interval
    limited = (Group("base_guidance_interval", f"Base model, guidance {plan.guidance} in noise levels "
                                               f"[{interval[0]}, {interval[1]}) (before training)", prompts=prompts)
               if interval and plan.guidance > 1 else None)
    groups = [hi, lo] + ([at_lora] if at_lora else []) + ([limited] if limited else [])
    modes = [m for m in ("inpaint", "depth2img") if m in engine.modes()]
    total = (len(groups) * len(prompts) + plan.world_checks * len(modes)
             + (plan.world_checks if limited and "inpaint" in modes else 0))
    with tqdm(total=total, desc="base images", unit="img") as bar:
        requests = [dict(prompt=p, seed=i) for i, p in enumerate(prompts)]
        draw(engine, hi, "txt2img", requests, plan, bar)
        draw(engine, lo, "txt2img", requests, plan, bar, guidance=1.0)
        if at_lora:
            draw(engine, at_lora, "txt2img", requests, plan, bar, guidance=plan.subject_guidance)
        if limited:
            draw(engine, limited, "txt2img", requests, plan, bar, guidance_interval=interval)
        rng = np.random.default_rng(4321)
        checks = [scenes.sample_scene(rng) for _ in range(plan.world_checks)]
        if "inpaint" in modes:
            grp = Group("world_inpaint", "The inpainting model: a scene's object replaced by the prompted one inside "
                                         "the mask (red)")
            requests, grp.truth = world_inpaint_checks(checks, rng, size)
            grp.prompts = [r["prompt"] for r in requests]
            grp.inputs = [[(mask_overlay(r["image"], r["mask"]), "input: " + short(scenes.caption(scene)))]
                          for r, scene in zip(requests, checks)]
            draw(engine, grp, "inpaint", requests, plan, bar)
            grp.extra["inits"] = [r["image"] for r in requests]
            grp.extra["masks"] = [r["mask"] for r in requests]
            groups.append(grp)
            if limited:  # the same check, guided in the interval
                again = Group("world_inpaint_interval", grp.title + f", guidance in noise levels [{interval[0]}, "
                                                                    f"{interval[1]})", prompts=grp.prompts,
                              inputs=grp.inputs, truth=grp.truth, extra=grp.extra)
                draw(engine, again, "inpaint", requests, plan, bar, guidance_interval=interval)
                groups.append(again)
        else:
            say("      inpaint: skipped - no inpainting model")
        if "depth2img" in modes:
            grp = Group("world_depth2img", "The depth model: a scene redrawn from its estimated depth at strength 1.0 "
                                           "(new colour and background, the layout kept)")
            requests = []
            for i, scene in enumerate(checks):
                new = changed_scene(scene, rng, keep=("kind", "size", "position"))
                init = scenes.render(scene, size=size).image
                grp.prompts.append(scenes.caption(new))
                grp.truth.append({"position": scene.position})
                grp.inputs.append([(init, "input: " + short(scenes.caption(scene)))])
                requests.append(dict(prompt=grp.prompts[-1], seed=700 + i, image=init))
            draw(engine, grp, "depth2img", requests, plan, bar, strength=1.0)
            groups.append(grp)
        else:
            say("      depth2img: skipped - no depth model")
    return groups



def subject_groups(engine, subj: Subject, plan: Plan, size: int, say) -> list[Group]:
    from tqdm.auto import tqdm

    modes = [m for m in ("img2img", "inpaint", "depth2img") if m in engine.modes()]
    for m in ("img2img", "inpaint", "depth2img"):
        if m not in modes:
            say(f"      {m}: skipped - no model for it was given")
    total = plan.subject_prompts + len(modes) * plan.per_mode + plan.class_prompts
    groups = []
    with tqdm(total=total, desc="images", unit="img") as bar:
        txt = Group("txt2img", "txt2img: the subject in new contexts")
        txt.prompts = [subject_prompt(subj, s) for s in new_contexts(subj, plan.subject_prompts)]
        txt.inputs = [[] for _ in txt.prompts]
        draw(engine, txt, "txt2img", [dict(prompt=p, seed=100 + i) for i, p in enumerate(txt.prompts)], plan, bar,
                  guidance=plan.subject_guidance)
        groups.append(txt)

        # Image modes start from world renders of another kind of object, where the subject must appear.
        contexts = new_contexts(subj, plan.per_mode, seed=11)
        starts = [scenes.Scene(**{**sc.attrs(), "kind": other_kind(subj.class_noun)}, seed=sc.seed) for sc in contexts]
        prompts = [subject_prompt(subj, sc) for sc in contexts]
        if "img2img" in modes:
            grp = Group("img2img", "img2img: a world render of another object, repainted as the subject (strength 0.75)",
                        prompts=prompts)
            inits = [scenes.render(sc, size=size).image for sc in starts]
            grp.inputs = [[(im, "input: " + short(scenes.caption(sc)))] for im, sc in zip(inits, starts)]
            draw(engine, grp, "img2img", [dict(prompt=p, seed=200 + i, image=im)
                                               for i, (p, im) in enumerate(zip(prompts, inits))], plan, bar,
                      strength=0.75, guidance=plan.subject_guidance)
            groups.append(grp)
        if "inpaint" in modes:
            grp = Group("inpaint", "inpaint: a world scene's object replaced by the subject inside the mask (red)",
                        prompts=prompts)
            inits = [scenes.render(sc, size=size).image for sc in starts]
            masks = [box_mask(sc.position, size) for sc in starts]
            grp.inputs = [[(mask_overlay(im, m), "input + mask: " + short(scenes.caption(sc)))]
                          for im, m, sc in zip(inits, masks, starts)]
            draw(engine, grp, "inpaint", [dict(prompt=p, seed=300 + i, image=im, mask=m)
                                               for i, (p, im, m) in enumerate(zip(prompts, inits, masks))], plan, bar,
                      paste_back=True, guidance=plan.subject_guidance)
            groups.append(grp)
        if "depth2img" in modes:
            grp = Group("depth2img", "depth2img: a world render's structure (depth from the model's estimator), the "
                                     "subject's looks (strength 0.9)", prompts=prompts)
            renders = [scenes.render(sc, size=size) for sc in contexts]
            for r in renders:
                d = r.disparity
                d = (d - d.min()) / max(float(np.ptp(d)), 1e-6)
                grp.inputs.append([(r.image, "input: " + short(r.caption)),
                                   (Image.fromarray((d * 255).astype(np.uint8), "L"), "true depth (white = near)")])
            draw(engine, grp, "depth2img", [dict(prompt=p, seed=400 + i, image=r.image)
                                                 for i, (p, r) in enumerate(zip(prompts, renders))], plan, bar,
                      strength=0.9, guidance=plan.subject_guidance)
            groups.append(grp)

        groups.append(class_group(engine, subj, plan, "class_prompts", "Class prompts after training (prior "
                                   "preservation: the class, not the subject)", bar))
    return groups


def class_group(engine, subj: Subject, plan: Plan, name: str, title: str, bar=None) -> Group:
    """The subject's class prompts (``class_prompts``) at the LoRA's guidance, seeds 500 + i: drawn by the base
    before training and by the LoRA after, so the two are the same draws but for the weights."""
    from tqdm.auto import tqdm

    cls = Group(name, title)
    cls.prompts = class_prompts(subj, plan.class_prompts)
    cls.inputs = [[] for _ in cls.prompts]
    requests = [dict(prompt=p, seed=500 + i) for i, p in enumerate(cls.prompts)]
    if bar is None:
        with tqdm(total=len(requests), desc="base class images", unit="img") as own:
            draw(engine, cls, "txt2img", requests, plan, own, guidance=plan.subject_guidance)
    else:
        draw(engine, cls, "txt2img", requests, plan, bar, guidance=plan.subject_guidance)
    return cls

