"""``sdtune lora``: describe, merge, resize, extract and fuse LoRA files (see sdtune/training/lora_tools.py)."""
from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
inputs: sdtune's files (pytorch_lora_weights.safetensors, lora_kohya.safetensors, or the run folder holding
them), diffusers / peft files (unet...lora_A.weight), kohya / A1111 files (lora_unet_*), LyCORIS LoHa / LoKr
(hada_w1_a, lokr_w1). Outputs are sdtune's diffusers-layout .safetensors, which sdtune infer --lora, stock
diffusers (pipe.load_lora_weights) and ComfyUI load. Merging or resizing LoHa / LoKr gives a plain LoRA.

examples:
  sdtune lora info runs/dog
  sdtune lora info some_lora.safetensors --json
  sdtune lora merge dog.safetensors style.safetensors --weights 0.7,0.5 --out dog_style.safetensors
  sdtune lora merge a.safetensors b.safetensors --weights 1,1 --rank 16 --out ab_r16.safetensors
  sdtune lora resize runs/dog --rank 8 --out dog_r8.safetensors
  sdtune lora resize runs/dog --rank 8 --out dog_r8_kohya.safetensors --format kohya
  sdtune lora extract --base BASE --tuned runs/full_finetune --rank 32 --out extracted.safetensors
  sdtune lora fuse runs/dog --model BASE --out dog_model/
  sdtune lora fuse runs/dog --model BASE --out dog_model.safetensors --scale 0.8
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "lora", help="LoRA tools: info, merge, resize, extract, fuse",
        description="Describe, merge, resize, extract and fuse LoRA files (sdtune, diffusers, kohya, LyCORIS).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="tool", required=True)

    i = sub.add_parser("info", help="format, adapter type, ranks, targets, base model, training metadata")
    i.add_argument("lora", help="a LoRA file or a run folder holding one")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    _read_args(i)

    m = sub.add_parser("merge", help="the weighted sum of several LoRAs, exact or SVD to --rank")
    m.add_argument("loras", nargs="+", help="two or more LoRA files (or run folders)")
    m.add_argument("--weights", help="comma-separated weights, one per file (default: 1 each)")
    m.add_argument("--rank", type=int, help="SVD the summed change to this rank (default: exact, the ranks added)")
    m.add_argument("--out", required=True, help="the .safetensors file to write")
    m.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers",
                   help="diffusers: sdtune's pytorch_lora_weights layout (default); kohya: lora_unet_* keys")
    _read_args(m)

    r = sub.add_parser("resize", help="SVD every layer to a new rank, reporting the energy kept")
    r.add_argument("lora", help="a LoRA file or a run folder holding one")
    r.add_argument("--rank", type=int, required=True, help="the new rank")
    r.add_argument("--out", required=True, help="the .safetensors file to write")
    r.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers",
                   help="diffusers: sdtune's pytorch_lora_weights layout (default); kohya: lora_unet_* keys")
    _read_args(r)

    e = sub.add_parser("extract", help="a LoRA from a full fine-tune: SVD of tuned - base per layer")
    e.add_argument("--base", required=True, help="the model fine-tuned from (diffusers folder, UNet folder, "
                                                 ".safetensors with --config, or a UNet's .safetensors)")
    e.add_argument("--tuned", required=True, help="the fine-tuned model, of the same kind")
    e.add_argument("--rank", type=int, required=True, help="rank of every extracted layer")
    e.add_argument("--out", required=True, help="the .safetensors file to write")
    e.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers",
                   help="diffusers: sdtune's pytorch_lora_weights layout (default); kohya: lora_unet_* keys")
    e.add_argument("--config", help="local diffusers folder giving the architecture of single-file models")
    e.add_argument("--allow-pickle", action="store_true", help="allow loading pickle weights you trust")
    e.add_argument("--device", choices=("cuda", "cpu"), help="where the SVDs run (default: cuda when a GPU is "
                                                             "visible, else cpu; a full SD model takes minutes on a CPU)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")

    f = sub.add_parser("fuse", help="a full model with the LoRA baked in (diffusers folder or one .safetensors)")
    f.add_argument("lora", help="a LoRA file or a run folder holding one")
    f.add_argument("--model", required=True, help="the base model (diffusers folder, .safetensors with --config, "
                                                  "hub id)")
    f.add_argument("--out", required=True, help="a folder (diffusers layout) or a name ending in .safetensors "
                                                "(one original-layout file)")
    f.add_argument("--scale", type=float, default=1.0, help="LoRA strength baked in (default 1.0)")
    f.add_argument("--config", help="local diffusers folder giving the architecture of a single-file --model")
    f.add_argument("--allow-pickle", action="store_true", help="allow loading pickle weights you trust")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _read_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="the base model's diffusers folder: maps kohya SDXL block names "
                                   "(input_blocks_*) to diffusers' UNet")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading pickle (.pt/.bin/.ckpt) files you trust")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    return {"info": _info, "merge": _merge, "resize": _resize, "extract": _extract, "fuse": _fuse}[args.tool](args)


# ---- helpers -------------------------------------------------------------------------------------------------------

def _unet_config(model):
    """The UNet config of a local diffusers folder (None without one)."""
    from pathlib import Path

    from sdtune.errors import SdtuneError

    if model is None:
        return None
    folder = Path(model).expanduser()
    for candidate in (folder / "unet" / "config.json", folder / "config.json"):
        if candidate.is_file():  # diffusers reads it by attribute, sdtune's converter by key: FrozenDict does both
            from diffusers.configuration_utils import FrozenDict

            return FrozenDict(json.loads(candidate.read_text()))
    raise SdtuneError(f"--model {model} is not a local diffusers folder (no unet/config.json)")


def _recorded_unet_config(lora):
    """The UNet config of the base an sdtune LoRA records, when that is a local folder (else None)."""
    from sdtune.errors import SdtuneError

    try:
        return _unet_config(lora.metadata.get("sdtune_base_model"))
    except (SdtuneError, OSError, ValueError):
        return None


def _read(path, args, need_names: bool = True):
    from sdtune.errors import SdtuneError
    from sdtune.models.lora_formats import read_lora_set

    lora = read_lora_set(path, allow_pickle=args.allow_pickle, unet_config=_unet_config(getattr(args, "model", None)))
    if need_names and lora.sgm_names:
        raise SdtuneError(f"{lora.path} names SDXL UNet blocks as kohya does (input_blocks_*); pass --model with the "
                          "SDXL base's diffusers folder to map them")
    return lora


def _say(*lines) -> None:
    for line in lines:
        if line:
            print(line)


def _check_out(out: str, args) -> None:
    from pathlib import Path

    from sdtune.errors import SdtuneError

    if not out.endswith(".safetensors"):
        raise SdtuneError(f"--out {out} must end in .safetensors")
    from sdtune.models.lora_formats import find_lora_file

    inputs = [getattr(args, "lora", None), *(getattr(args, "loras", None) or [])]
    for given in inputs:
        if given and find_lora_file(given, args.allow_pickle).resolve() == Path(out).expanduser().resolve():
            raise SdtuneError(f"--out {out} is an input; write to another file")


# ---- the tools -----------------------------------------------------------------------------------------------------

def _info(args) -> int:
    from sdtune.models.lora_formats import describe

    lora = _read(args.lora, args, need_names=False)
    data = describe(lora)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
        return 0
    print(f"file:      {data['file']}")
    print(f"format:    {data['format_name']}")
    print(f"adapter:   {', '.join(data['adapters'])}")
    print(f"layers:    {data['modules']} ({data['parameters']:,} parameters)")
    print(f"ranks:     {data['ranks']}")
    alphas = ", ".join(f"{a} on {n}" for a, n in data["alphas"].items())
    print(f"alpha:     {alphas}  (none = the rank: scale 1)")
    print("targets:   " + "; ".join(f"{g}: {n}" for g, n in data["targets"].items()))
    print(f"family:    {data['family']}")
    if data["sgm_names_unmapped"]:
        print("note:      kohya SDXL block names (input_blocks_*); pass --model to name the layers as diffusers does")
    print(f"base:      {data['base_model'] or 'not recorded'}")
    if data["steps"]:
        print(f"steps:     {data['steps']}")
    if data["recommended"]:
        print(f"recommended settings: {json.dumps(data['recommended'])}")
    config = data["training_config"]
    if isinstance(config, dict):
        keys = ("method", "adapter", "lora_rank", "lora_alpha", "lora_targets", "train_text_encoder", "learning_rate",
                "max_steps", "resolution", "instance_prompt", "seed")
        shown = {k: config[k] for k in keys if k in config}
        print(f"training (sdtune_config): {json.dumps(shown)}  ({len(config)} keys; --json shows all)")
    if data["kohya_metadata"]:
        shown = {k: v for k, v in data["kohya_metadata"].items() if len(str(v)) <= 80}
        print(f"kohya metadata (ss_*): {json.dumps(shown, sort_keys=True)}")
    if "DoRA" in data["adapters"]:
        print("note:      DoRA layers depend on the base weights: merge, resize and fuse refuse them")
    return 0


def _weights(args, count: int) -> list[float]:
    from sdtune.errors import SdtuneError

    if args.weights is None:
        return [1.0] * count
    try:
        weights = [float(w) for w in args.weights.split(",") if w.strip()]
    except ValueError:
        raise SdtuneError(f"--weights {args.weights!r} must be numbers separated by commas, e.g. 0.7,0.5") from None
    if len(weights) != count:
        raise SdtuneError(f"--weights gives {len(weights)} weight(s) for {count} LoRA files; give one per file")
    return weights


def _merge(args) -> int:
    from sdtune.errors import SdtuneError
    from sdtune.training import lora_tools

    if len(args.loras) < 2:
        raise SdtuneError("merge takes two or more LoRA files")
    weights = _weights(args, len(args.loras))
    lora_tools.check_rank(args.rank)
    _check_out(args.out, args)
    sets = [_read(p, args) for p in args.loras]
    outcome = lora_tools.merge(sets, weights, args.rank, quiet=args.quiet)
    meta = {**lora_tools.carried_metadata(sets),
            **lora_tools.tool_metadata("merge", inputs=[str(s.path) for s in sets], weights=weights, rank=args.rank)}
    recorded = next((c for c in map(_recorded_unet_config, sets) if c is not None), None)
    path = lora_tools.write(outcome.modules, args.out, meta, fmt=args.format, sdxl=any(s.sdxl for s in sets),
                            unet_config=_unet_config(args.model) or recorded)
    how = f"SVD to rank {args.rank}" if args.rank else "exact (ranks stacked)"
    _say(f"merged {len(sets)} LoRAs ({how}): {len(outcome.modules)} layers -> {path}", outcome.energy_line(),
         *outcome.notes)
    return 0


def _resize(args) -> int:
    from sdtune.training import lora_tools
    from sdtune.models.lora_formats import rank_summary

    lora_tools.check_rank(args.rank)
    _check_out(args.out, args)
    lora = _read(args.lora, args)
    outcome = lora_tools.resize(lora, args.rank, quiet=args.quiet)
    meta = {**{k: v for k, v in lora.metadata.items() if k.startswith(("sdtune_", "ss_"))
               and k not in ("ss_network_dim", "ss_network_alpha")},
            **lora_tools.tool_metadata("resize", input=str(lora.path), rank=args.rank)}
    path = lora_tools.write(outcome.modules, args.out, meta, fmt=args.format, sdxl=lora.sdxl,
                            unet_config=_unet_config(args.model) or _recorded_unet_config(lora))
    _say(f"resized {lora.path} ({rank_summary(lora.modules.values())}) to "
         f"{rank_summary(outcome.modules.values())} -> {path}", outcome.energy_line(), *outcome.notes)
    return 0


def _extract(args) -> int:
    from sdtune.training import lora_tools

    lora_tools.check_rank(args.rank)
    _check_out(args.out, args)
    base, unet_config = lora_tools.load_parts(args.base, args.config, args.allow_pickle)
    tuned, _ = lora_tools.load_parts(args.tuned, args.config, args.allow_pickle)
    outcome = lora_tools.extract(base, tuned, args.rank, quiet=args.quiet, device=_svd_device(args.device))
    meta = {"sdtune_base_model": str(args.base),
            **lora_tools.tool_metadata("extract", base=str(args.base), tuned=str(args.tuned), rank=args.rank)}
    path = lora_tools.write(outcome.modules, args.out, meta, fmt=args.format, sdxl="text_encoder_2" in base,
                            unet_config=unet_config)
    _say(f"extracted rank {args.rank} from {args.tuned} - {args.base}: {len(outcome.modules)} layers -> {path}",
         outcome.energy_line(), *outcome.notes)
    return 0


def _svd_device(requested):
    """cuda when asked for or visible (float64 SVDs; Apple MPS has none), else the CPU."""
    import torch

    from sdtune.devices import pick_device

    if requested:
        return pick_device(requested)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _fuse(args) -> int:
    import math

    from sdtune.errors import SdtuneError
    from sdtune.training import lora_tools
    from sdtune.models.loading import load_pipeline
    from sdtune.models.lora_formats import find_lora_file, read_lora_set

    if not math.isfinite(args.scale):
        raise SdtuneError(f"--scale must be a number, got {args.scale}")
    out = str(args.out)
    if any(out.endswith(s) for s in (".ckpt", ".pt", ".bin", ".pth")):
        raise SdtuneError(f"--out {out}: fuse writes a diffusers folder or a .safetensors file, never pickle")
    find_lora_file(args.lora, allow_pickle=args.allow_pickle)  # a missing LoRA is said before the model loads
    pipe = load_pipeline(args.model, config=args.config, allow_pickle=args.allow_pickle)
    # the model's own UNet config maps kohya SDXL block names (input_blocks_*), as its loader would
    lora = read_lora_set(args.lora, allow_pickle=args.allow_pickle, unet_config=pipe.unet.config)
    changed = lora_tools.fuse_into(lora, pipe, args.scale, quiet=args.quiet)
    meta = {**lora_tools.tool_metadata("fuse", lora=str(lora.path), model=str(args.model), scale=args.scale),
            "sdtune_base_model": str(args.model)}
    path = lora_tools.save_model(pipe, args.out, meta)
    print(f"fused {lora.path} at scale {args.scale:g} into {changed} layers of {args.model} -> {path}",
          file=sys.stdout)
    return 0
