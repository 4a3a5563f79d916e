"""``sdtune demo``: the main job end to end, offline - DreamBooth a subject, generate it in all four modes, score it."""
from __future__ import annotations

import argparse

EPILOG = """\
What it does (progress is printed per phase):
  1. models: the embedded family (base, inpaint, depth); if it is not built yet, tiny RANDOM models
     (said loudly, recorded as "models": "tiny-random" in metrics.json: their pictures are noise)
  2. the family before training: world prompts at guidance 7.5, 1.0 and the LoRA's (demo.subject_guidance),
     optionally 7.5 guided only in some noise levels (demo.guidance_interval), inpaint and depth2img checks
  3. class images, then DreamBooth LoRA on the subject with prior preservation and caption dropout
     (configs/demo.yaml)
  4. one engine with the LoRA: txt2img in new contexts, img2img, inpaint, depth2img, class prompts
     (at configs/demo.yaml's demo.subject_guidance)
  5. the judge scores everything: OUT/metrics.json, OUT/report.md (+ OUT/grids/*.png, OUT/images/)

Any training key of configs/demo.yaml can be overridden as key=value:
  sdtune demo --out outputs/demo max_steps=800 learning_rate=2e-4
and the generation plan (the demo: section) as demo.KEY=VALUE:
  sdtune demo --out outputs/g5 demo.subject_guidance=5 demo.per_mode=16
  sdtune demo --quick --out /tmp/demo              # a short pass (few steps, few images)
  sdtune demo --subjects all --out outputs/all     # every subject in data/subjects, a row each
  sdtune demo --ablations --out outputs/demo       # the recipe's variants and the diffusers example's defaults
  sdtune demo --together --out outputs/together    # every subject in ONE LoRA: each judged, and the cross-talk
  sdtune demo seed=1 --subjects all --out outputs/s1  # overrides go before --subjects, which takes the rest
A rerun into the same --out reuses the class images and replaces the other results.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="the main job: DreamBooth on a subject, all four modes, metrics and a report",
        description="Train a DreamBooth LoRA on a subject (prior preservation and caption dropout on), "
                    "generate it in all four modes with one engine, score it with the judge, and write "
                    "metrics.json and report.md - offline, on the embedded model family.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base text-to-image model (default: the embedded base model)")
    p.add_argument("--inpaint-model", help="9-channel inpainting model (default: the embedded one with the "
                                           "embedded base)")
    p.add_argument("--depth-model", help="5-channel depth model (default: the embedded one with the embedded base)")
    s = p.add_mutually_exclusive_group()
    s.add_argument("--subject", help="subject folder: 3-5 images + subject.json (default: data/subjects/checker_box)")
    s.add_argument("--subjects", nargs="+", metavar="FOLDER",
                   help="several subject folders, or 'all' for every one in data/subjects: each is trained and "
                        "judged into OUT/<name>/, with a summary in OUT/report.md")
    p.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    p.add_argument("--quick", action="store_true", help="a much shorter pass: a few steps and images (for tests)")
    p.add_argument("--ablations", action="store_true",
                   help="instead of the demo: train and score the ablations (prior preservation off, caption "
                        "dropout off, full fine-tuning) into OUT/ablations.md; the demo's report then quotes them")
    p.add_argument("--together", action="store_true",
                   help="instead of the demo: train the --subjects (default all) as concepts of ONE LoRA and judge "
                        "each, and how often one subject's prompt draws another (OUT/together.md); max_steps is per subject "
                        "there (3 subjects: 3x the steps) unless given as max_steps=N")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config keys to override, "
                   "or demo.KEY=VALUE for the generation plan (configs/demo.yaml's demo: section)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from sdtune.world.demo import run_demo

    if args.together:
        from sdtune.world.together import run_together

        run_together(out=args.out, subjects=args.subjects or "all", model=args.model, quick=args.quick,
                     overrides=args.overrides, say=lambda text: print(text, flush=True))
        return 0
    if args.ablations:
        from sdtune.world.ablations import run_ablations

        if args.inpaint_model or args.depth_model:
            print("sdtune demo --ablations: only --model is used (the ablations draw txt2img)", flush=True)
        run_ablations(out=args.out, subjects=args.subjects or args.subject, model=args.model, quick=args.quick,
                      overrides=args.overrides, say=lambda text: print(text, flush=True))
        return 0
    run_demo(out=args.out, subjects=args.subjects or args.subject, model=args.model, inpaint_model=args.inpaint_model,
             depth_model=args.depth_model, quick=args.quick, overrides=args.overrides,
             say=lambda text: print(text, flush=True))
    return 0
