"""Ablations of the main job: what each choice of the recipe changes, and the diffusers example beside it.

``run_ablations`` trains the demo's DreamBooth run once per variant and subject on the same class images,
seed and steps (only the named settings differ), then draws the same subject prompts (the subject in new
contexts, at the demo's guidance after training and at 1.0) and class prompts with each result and scores them
with the judge:

* ``subject_fidelity`` / ``prompt_fidelity`` / ``prior_preservation`` - as in the demo's metrics;
* ``guidance_gain_after`` - on the subject prompts, prompt fidelity at that guidance minus at 1.0 (caption
  dropout keeps the unconditional prediction trained, so guidance keeps working);
* ``subject_gain_after`` - the same for subject fidelity.

Variants: the demo itself; prior preservation off; caption dropout off; full fine-tuning; attention-only
LoRA targets; and ``stock`` - the defaults of diffusers' ``train_dreambooth_lora.py`` (rank 4 on the
attention projections, no text encoder, no caption dropout, learning rate 5e-4), same steps and class images.

``sdtune demo --ablations --out OUT`` writes OUT/ablations.json and OUT/ablations.md (tables and image grids);
``sdtune demo`` into the same OUT then quotes the tables in its report.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from typing import Callable

from sdtune.errors import SdtuneError
from sdtune.imageio import save_image_atomic, write_text_atomic
from sdtune.world.report import ablation_table, make_grid, short
from sdtune.world.demo_plan import FIXED_STEPS


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    overrides: tuple[str, ...] = ()


# The diffusers example's own defaults (examples/dreambooth/train_dreambooth_lora.py): --rank 4, LoRA on
# to_q/to_k/to_v/to_out.0, alpha = rank, no --train_text_encoder, no caption dropout, --learning_rate 5e-4.
# The example has no masked loss either, and one prompt for all instance images and one for all class images: no
# per-image captions, no varied class prompts, no output preservation.
STOCK = ("lora_rank=4", "lora_alpha=4", "lora_targets=attention", "train_text_encoder=false", "caption_dropout=0.0",
         "learning_rate=5e-4", "text_encoder_learning_rate=null", "masked_loss=false", "use_captions=false",
         "class_prompts=null", "output_preservation_weight=0")

VARIANTS = (
    Variant("main", "sdtune's recipe (the demo): configs/demo.yaml"),
    Variant("no_prior", "prior preservation off", ("with_prior_preservation=false",)),
    Variant("no_caption_dropout", "caption dropout off", ("caption_dropout=0.0",)),
    # Full fine-tuning moves every UNet weight: a smaller learning rate, as in the DreamBooth paper.
    Variant("full", "full fine-tuning of the UNet instead of a LoRA", ("method=full", "learning_rate=1e-4",
                                                                       "train_text_encoder=false",
                                                                       "output_preservation_weight=0")),
    Variant("attention_only", "LoRA on the attention projections only (diffusers' targets)",
            ("lora_targets=attention",)),
    Variant("stock", "diffusers' train_dreambooth_lora.py defaults: rank 4, attention only, no text encoder, "
                     "no caption dropout, lr 5e-4", STOCK),
)


def run_ablations(out, subjects=None, model=None, variants=VARIANTS, subject_prompts: int = 16,
                  class_prompts: int = 16, sample_steps: int = 25, quick: bool = False, overrides=(),
                  say: Callable[[str], None] = print, subject=None) -> dict:
    """Train and score each variant for each subject into OUT/ablations/<subject>/<variant>; write
    OUT/ablations.json and OUT/ablations.md."""
    from sdtune.generation.engine import Engine
    from sdtune.training.class_images import ensure_class_images
    from sdtune.training.data import check_output_dir
    from sdtune.training import dreambooth
    from sdtune.world import demo
    from sdtune.world import evaluation as ev
    from sdtune.world.judge import Judge
    from sdtune.world.scenes import SUBJECTS

    t_start = time.perf_counter()
    subjs = demo.resolve_subjects(subjects if subjects is not None else subject)
    out = check_output_dir(out, what="--out")
    models = demo.resolve_models(model, None, None, out, say)
    base = Engine.load(models.base)
    resolution = base.native_size[0]
    judge = Judge.load()
    plan = demo.demo_plan(quick, overrides)
    if quick:
        subject_prompts, class_prompts, sample_steps = 2, 2, 3

    def draw(engine, prompts, guidance, seed0):
        requests = [dict(prompt=p, seed=seed0 + i) for i, p in enumerate(prompts)]
        return [r.image for r in engine.generate_many("txt2img", requests, steps=sample_steps, guidance=guidance,
                                                      batch_size=plan.batch_size)]

    rows: dict[str, dict] = {}
    grids: dict[str, dict] = {}
    for subj in subjs:
        rows[subj.name], grids[subj.name] = {}, {}
        where = out if len(subjs) == 1 else out / subj.name
        contexts = demo.new_contexts(subj, subject_prompts)
        prompts = [demo.subject_prompt(subj, s) for s in contexts]
        cls_prompts = demo.class_prompts(subj, class_prompts)
        name = subj.name if subj.name in SUBJECTS else None
        for v in variants:
            say(f"[{subj.name} / {v.name}] {v.what}  (t={time.perf_counter() - t_start:.0f}s)")
            cfg = demo.demo_config(subj, models.base, where, resolution, quick,
                                   (*FIXED_STEPS, *overrides, *v.overrides))
            cfg.output_dir = str(out / "ablations" / subj.name / v.name)
            if cfg.with_prior_preservation:  # the same class images for every variant
                ensure_class_images(cfg, pipeline=base.pipeline("txt2img"))
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*non-image file")
                result = dreambooth.train(cfg)
            train_s = time.perf_counter() - t
            engine = Engine.load(models.base, lora=cfg.output_dir) if cfg.method == "lora" else Engine.load(cfg.output_dir)
            g = plan.subject_guidance
            subj_hi, subj_lo = draw(engine, prompts, g, 100), draw(engine, prompts, 1.0, 100)
            cls = draw(engine, cls_prompts, g, 500)
            del engine
            hi = ev.prompt_fidelity(subj_hi, prompts, judge, subj.identifier)
            fid_hi = ev.subject_fidelity(subj_hi, judge, subj.class_noun, subject=name)
            rows[subj.name][v.name] = dict(
                what=v.what, overrides=list(v.overrides), steps=result.global_step, train_s=round(train_s, 1),
                subject_fidelity=fid_hi, prompt_fidelity=hi,
                prior_preservation=ev.prior_preservation(cls, subj.class_noun, judge),
                guidance_gain_after=hi - ev.prompt_fidelity(subj_lo, prompts, judge, subj.identifier),
                subject_gain_after=fid_hi - ev.subject_fidelity(subj_lo, judge, subj.class_noun, subject=name),
                last_loss=round(float(result.losses[-1]), 4))
            rel = f"grids/ablation-{subj.name}-{v.name}.png"
            cells = [(img, short(p)) for img, p in zip(subj_hi, prompts)] + \
                    [(img, short(p)) for img, p in zip(cls, cls_prompts)]
            save_image_atomic(make_grid(cells, 8), out / rel)
            grids[subj.name][v.name] = rel
            r = rows[subj.name][v.name]
            say("      " + ", ".join(f"{k} {r[k]:.3f}" for k in ("subject_fidelity", "prompt_fidelity",
                                                               "prior_preservation", "guidance_gain_after")))

    result = dict(models=models.kind, model=models.base, quick=quick, subject_prompts=len(prompts),
                  class_prompts=len(cls_prompts), sample_steps=sample_steps, guidance=plan.subject_guidance,
                  subjects=rows,
                  total_s=round(time.perf_counter() - t_start, 1))
    write_text_atomic(out / "ablations.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out / "ablations.md", "# sdtune ablations\n\n" + ablation_table(result) + "\n\n" + "\n".join(
        f"### {s} / {v}: {rows[s][v]['what']}\n\nSubject prompts, then class prompts:\n\n![{s}-{v}]({rel})\n"
        for s, by in grids.items() for v, rel in by.items()))
    if not rows:
        raise SdtuneError("no ablation ran; pass at least one subject and variant")
    say(f"done in {result['total_s']:.0f}s: {out / 'ablations.md'}")
    return result
