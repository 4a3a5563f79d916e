"""Ablations of the main job: what prior preservation, caption dropout and LoRA-vs-full each change.

``run_ablations`` trains the demo's DreamBooth run once per variant on the same subject, class images,
seed and steps (only the ablated setting differs), then draws the same subject prompts (the subject in
new contexts) and class prompts with each result and scores them with the judge:

* ``subject_fidelity`` / ``prompt_fidelity`` / ``prior_preservation`` - as in the demo's metrics;
* ``guidance_gain_after`` - on the subject prompts, prompt fidelity at guidance 7.5 minus at 1.0 (caption
  dropout keeps the unconditional prediction trained, so guidance keeps working).

``sdtune demo --ablations --out OUT`` writes OUT/ablations.json and OUT/ablations.md (a table and image
grids); ``sdtune demo`` into the same OUT then quotes the table in its report.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from typing import Callable

from sdtune.imageio import save_image_atomic, write_text_atomic
from sdtune.world.report import ablation_table, make_grid, short


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    overrides: tuple[str, ...] = ()


VARIANTS = (
    Variant("main", "LoRA, prior preservation on, caption dropout 0.1 (the demo)"),
    Variant("no_prior", "prior preservation off", ("with_prior_preservation=false",)),
    Variant("no_caption_dropout", "caption dropout off", ("caption_dropout=0.0",)),
    # Full fine-tuning moves every UNet weight: a smaller learning rate, as in the DreamBooth paper.
    Variant("full", "full fine-tuning of the UNet instead of a LoRA", ("method=full", "learning_rate=1e-4")),
)


def run_ablations(out, subject=None, model=None, variants=VARIANTS, subject_prompts: int = 16,
                  class_prompts: int = 16, sample_steps: int = 25, quick: bool = False, overrides=(),
                  say: Callable[[str], None] = print) -> dict:
    """Train and score each variant into OUT/ablations/<name>; write OUT/ablations.json and .md."""
    from sdtune.generation.engine import Engine
    from sdtune.training.class_images import ensure_class_images
    from sdtune.training.data import check_output_dir
    from sdtune.training.recipe import load_recipe
    from sdtune.world import demo
    from sdtune.world import evaluation as ev
    from sdtune.world.judge import Judge

    t_start = time.perf_counter()
    subj = demo.load_subject(subject or demo.DEFAULT_SUBJECT)
    out = check_output_dir(out, what="--out")
    models = demo.resolve_models(model, None, None, out, say)
    base = Engine.load(models.base)
    resolution = base.native_size[0]
    judge = Judge.load()
    if quick:
        subject_prompts, class_prompts, sample_steps = 2, 2, 3
    contexts = demo.new_contexts(subj, subject_prompts)
    prompts = [demo.subject_prompt(subj, s) for s in contexts]
    cls_prompts = demo.class_prompts(subj, class_prompts)

    rows, grids = {}, {}
    for v in variants:
        say(f"[{v.name}] {v.what}  (t={time.perf_counter() - t_start:.0f}s)")
        cfg = demo.demo_config(subj, models.base, out, resolution, quick, (*overrides, *v.overrides))
        cfg.output_dir = str(out / "ablations" / v.name)
        if cfg.with_prior_preservation:  # the same class images for every variant
            ensure_class_images(cfg, pipeline=base.pipeline("txt2img"))
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*non-image file")
            result = load_recipe().train(cfg)
        train_s = time.perf_counter() - t
        if cfg.method == "lora":
            engine = Engine.load(models.base, lora=cfg.output_dir)
        else:
            engine = Engine.load(cfg.output_dir)

        def draw(ps, guidance, seed0):
            return [engine.generate("txt2img", prompt=p, steps=sample_steps, guidance=guidance, seed=seed0 + i)[0].image
                    for i, p in enumerate(ps)]
        subj_hi, subj_lo = draw(prompts, 7.5, 100), draw(prompts, 1.0, 100)
        cls = draw(cls_prompts, 7.5, 500)
        del engine
        hi = ev.prompt_fidelity(subj_hi, prompts, judge, subj.identifier)
        rows[v.name] = dict(
            what=v.what, overrides=list(v.overrides), steps=result.global_step, train_s=round(train_s, 1),
            subject_fidelity=ev.subject_fidelity(subj_hi, judge, subj.class_noun),
            prompt_fidelity=hi,
            prior_preservation=ev.prior_preservation(cls, subj.class_noun, judge),
            guidance_gain_after=hi - ev.prompt_fidelity(subj_lo, prompts, judge, subj.identifier),
            subject_fidelity_guidance_1=ev.subject_fidelity(subj_lo, judge, subj.class_noun),
            last_loss=round(float(result.losses[-1]), 4))
        rel = f"grids/ablation-{v.name}.png"
        cells = [(img, short(p)) for img, p in zip(subj_hi, prompts)] + \
                [(img, short(p)) for img, p in zip(cls, cls_prompts)]
        save_image_atomic(make_grid(cells, 8), out / rel)
        grids[v.name] = rel
        say("      " + ", ".join(f"{k} {rows[v.name][k]:.3f}" for k in
                                  ("subject_fidelity", "prompt_fidelity", "prior_preservation", "guidance_gain_after")))

    result = dict(models=models.kind, model=models.base, subject=subj.name, quick=quick,
                  subject_prompts=len(prompts), class_prompts=len(cls_prompts), sample_steps=sample_steps,
                  variants=rows, total_s=round(time.perf_counter() - t_start, 1))
    write_text_atomic(out / "ablations.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out / "ablations.md", "# sdtune ablations\n\n" + ablation_table(result) + "\n\n" + "\n".join(
        f"### {name}: {rows[name]['what']}\n\nSubject prompts, then class prompts:\n\n![{name}]({rel})\n"
        for name, rel in grids.items()))
    say(f"done in {result['total_s']:.0f}s: {out / 'ablations.md'}")
    return result
