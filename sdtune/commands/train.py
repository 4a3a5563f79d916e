"""``sdtune train CONFIG [key=value ...]``: the DreamBooth recipe (train/dreambooth.py), in this process."""
from __future__ import annotations

import argparse

EPILOG = """\
One process (one GPU, or the CPU). For several GPUs run the very same recipe under accelerate:
  accelerate launch --num_processes 4 train/dreambooth.py CONFIG [key=value ...]
  torchrun --nproc_per_node 4 train/dreambooth.py CONFIG [key=value ...]
DeepSpeed / FSDP full fine-tuning: accelerate launch --config_file configs/accelerate/<file>.yaml ...

Every config key can be overridden as key=value (YAML syntax):
  sdtune train configs/dreambooth_lora.yaml max_steps=200 learning_rate=5e-5 resume=latest
Outputs in output_dir: pytorch_lora_weights.safetensors + lora_kohya.safetensors (LoRA) or a diffusers
pipeline folder (full), README.md model card, samples/, logs/ (tensorboard --logdir OUTPUT_DIR/logs),
checkpoint-N/ folders (resume=latest continues from the newest).
"""

def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="DreamBooth fine-tuning (LoRA or full) from a YAML config",
        description="Fine-tune Stable Diffusion on a subject with DreamBooth, as configured in CONFIG. "
                    "Runs in this one process; use `accelerate launch train/dreambooth.py` for many.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config keys to override")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and show what would be trained (images, sizes, buckets, captions, class "
                        "images to generate, steps, trainable parameters), then stop")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from sdtune.training.config import load_config
    from sdtune.training import dreambooth

    cfg = load_config(args.config, args.overrides)  # validated before anything heavy is loaded
    if args.dry_run:
        recipe = dreambooth
        print(recipe.format_dry_run(recipe.dry_run(cfg)))
        return 0
    result = dreambooth.train(cfg)
    print(f"done: {result.global_step} steps, outputs in {result.output_dir}")
    return 0
