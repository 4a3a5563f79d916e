"""The command line of the DreamBooth recipe, declared once for ``sdtune train`` and ``accelerate launch``.

``sdtune train ARGS`` and ``accelerate launch -m sdtune.training.dreambooth ARGS`` (or ``train/dreambooth.py``)
take the same arguments from ``add_arguments`` and run ``run``. Light on purpose: nothing heavy is imported until
``run``, so ``sdtune --help`` stays instant.
"""
from __future__ import annotations

import argparse
import os
import sys

EPILOG = """\
Your own subject, no YAML needed (the model's family picks the recommended defaults):
  sdtune train model=stable-diffusion-v1-5/stable-diffusion-v1-5 instance_dir=photos/my_dog \\
               instance_prompt="a photo of sks dog" class_prompt="a photo of a dog"
From a config (a file, or a shipped one by name; `sdtune config list`, `sdtune config show NAME > my.yaml`):
  sdtune train my.yaml max_steps=200 learning_rate=5e-5 resume=latest
Every key, with its type, default, range and help: sdtune train --help-keys

One process (one GPU, or the CPU). For several GPUs run the very same recipe under accelerate:
  accelerate launch --num_processes 4 -m sdtune.training.dreambooth CONFIG [key=value ...]
DeepSpeed / FSDP full fine-tuning: accelerate launch --config_file ACCELERATE.yaml -m sdtune.training.dreambooth ...
(shipped accelerate configs: configs/accelerate/ in the repository).

Outputs in output_dir: the LoRA files (or a diffusers pipeline folder with method=full), README.md model card,
samples/, logs/ (tensorboard --logdir OUTPUT_DIR/logs), checkpoint-N/ folders (resume=latest continues).
"""



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Fine-tune Stable Diffusion on a subject with DreamBooth. `sdtune train` runs in this one "
                     "process; `accelerate launch -m sdtune.training.dreambooth` runs the same in many.")
    p.epilog, p.formatter_class = EPILOG, argparse.RawDescriptionHelpFormatter
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config file or a shipped config's name (sdtune config list); omit it to take the "
                        "defaults recommended for the model's family")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config keys to set (YAML syntax)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and show what would be trained (images, sizes, buckets, captions, class "
                        "images to generate, steps, trainable parameters), then stop")
    p.add_argument("--help-keys", action="store_true", help="list every config key with its type, default and help")


def run(args, scorer_factory=None) -> int:
    """Check the config, then train (or show the dry run). ``scorer_factory(cfg)``: extra likeness scorers for the
    in-loop evaluation (the commands layer passes the world's judge for the embedded family)."""
    if args.help_keys:
        from sdtune.training.keys_help import format_keys_help

        print(format_keys_help())
        return 0
    from sdtune.training import dreambooth
    from sdtune.training.presets import load_run_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # `sdtune train model=... instance_dir=...`: no config named
        config, overrides = None, [config, *overrides]
    cfg = load_run_config(config, overrides)  # validated before anything heavy is loaded
    if args.dry_run:
        print(dreambooth.format_dry_run(dreambooth.dry_run(cfg)))
        return 0
    result = dreambooth.train(cfg, scorers=scorer_factory(cfg) if scorer_factory else ())
    if os.environ.get("RANK", "0") in ("", "0"):  # one line for the run, not one per process
        print(f"done: {result.global_step} steps, outputs in {result.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sdtune.training.dreambooth`` (what ``accelerate launch -m`` runs in every process)."""
    from sdtune import console
    from sdtune.errors import LaunchError, SdtuneError

    parser = argparse.ArgumentParser(prog="sdtune.training.dreambooth")
    add_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="also show the libraries' own notices")
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra and all("=" in e and not e.startswith("-") for e in extra):  # key=value after a flag
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console.setup(verbose=args.verbose)
    try:
        return run(args)
    except SdtuneError as exc:
        # a launch error is every process's; rank 0 says it once
        if not (isinstance(exc, LaunchError) and os.environ.get("RANK", "0") not in ("", "0")):
            sys.stderr.write(f"sdtune: error: {exc}\n")  # one write: a line another process cannot split
            sys.stderr.flush()
        return exc.exit_code
