"""``sdtune eval``: score a folder of generated images (judge metrics, CLIP-T/CLIP-I/DINO)."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="score generated images: world judge metrics and CLIP-T / CLIP-I / DINO",
        description=(
            "Score the PNGs in --images by the prompts stored in their metadata. With the built-in "
            "judge: prompt_adherence, subject_fidelity, prompt_fidelity, prior_preservation. With local "
            "model folders: CLIP-T and CLIP-I (--clip), DINO (--dino); CLIP-I and DINO compare with the "
            "real images in --subject-dir."
        ),
    )
    p.add_argument("--images", required=True, help="folder of generated PNGs (prompts in their sdtune metadata)")
    p.add_argument("--prompts-from", choices=["metadata"], default="metadata", help="where each image's prompt comes from")
    p.add_argument("--subject-dir", help="subject folder (images + subject.json) for CLIP-I, DINO and the class noun")
    p.add_argument("--judge", help="judge folder (default: the shipped data/judge)")
    p.add_argument("--no-judge", action="store_true", help="skip the world judge metrics")
    p.add_argument("--clip", help="local CLIP model folder (CLIPModel + tokenizer) for CLIP-T and CLIP-I")
    p.add_argument("--dino", help="local ViT model folder (e.g. DINO ViT-S/16) for the DINO metric")
    p.add_argument("--identifier", help="subject identifier in prompts (default: from subject.json, else sks)")
    p.add_argument("--class-noun", help="class noun for prior preservation (default: from subject.json)")
    p.add_argument("--out", default="metrics.json", help="where to write the metrics JSON")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import json

    from sdtune.imageio import write_text_atomic
    from sdtune.world.evaluation import evaluate_folder
    from sdtune.world.judge import Judge

    judge = None if args.no_judge else Judge.load(args.judge)
    metrics = evaluate_folder(
        args.images,
        subject_dir=args.subject_dir,
        judge=judge,
        clip=args.clip,
        dino_model=args.dino,
        identifier=args.identifier,
        class_noun=args.class_noun,
        use_judge=not args.no_judge,
    )
    text = json.dumps(metrics, indent=2, sort_keys=True)
    write_text_atomic(args.out, text + "\n")
    print(text)
    return 0
