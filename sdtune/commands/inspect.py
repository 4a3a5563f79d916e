"""``sdtune inspect``: the course's teaching tools, one subcommand each (see sdtune/generation/teaching.py)."""
from __future__ import annotations

import argparse

EPILOG = """\
examples:
  sdtune inspect tokens "A painting of a flooble"
  sdtune inspect vae --image photo.jpg --size 512 --out out/vae
  sdtune inspect schedule --scheduler lms --out out/schedule.png
  sdtune inspect unet
  sdtune inspect guidance --prompt "A collie with a pink hat" --scales 1.1,8,12 --seed 42 --out out/cfg.png
  sdtune inspect schedulers --prompt "Palette knife painting of a winter cityscape" \\
      --names pndm,lms,euler,dpm++2m --out out/schedulers.png

--model defaults to the embedded base model.
"""


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="diffusers folder, .safetensors file or hub id (default: the embedded model)")
    g.add_argument("--config", help="local diffusers folder giving the architecture of a single-file --model")
    g.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.ckpt/.bin) weights you trust")
    g.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default fp16 on GPU, fp32 on CPU")


def _generation_args(p: argparse.ArgumentParser, steps: int = 35) -> None:
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", default="", help="what to steer away from")
    p.add_argument("--seed", type=int, default=42, help="the one seed every image uses (default 42)")
    p.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
    p.add_argument("--width", type=int, help="multiple of 8 (default: the model's native size)")
    p.add_argument("--height", type=int, help="multiple of 8 (default: the model's native size)")
    p.add_argument("--out", required=True, help="the grid PNG to write")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect", help="the course's teaching tools: tokens, VAE, schedule, UNet, guidance/scheduler grids",
        description="Look inside a Stable Diffusion model the way the course does.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="tool", required=True)

    t = sub.add_parser("tokens", help="a prompt's token ids and its text-embedding shape")
    t.add_argument("text", help="the prompt to tokenize")
    _model_args(t)

    v = sub.add_parser("vae", help="VAE round trip: latent shape, reconstruction error, decoded image")
    v.add_argument("--image", help="image to encode (default: a built-in test pattern)")
    v.add_argument("--size", type=int, help="square size the image is cropped/resized to (default: the VAE's)")
    v.add_argument("--out", required=True, help="folder for input.png, decoded.png and side_by_side.png")
    _model_args(v)

    s = sub.add_parser("schedule", help="plot the noise schedule (alphas_cumprod) and print the scheduler")
    s.add_argument("--scheduler", help="show this scheduler built from the model's config (default: its own)")
    s.add_argument("--out", required=True, help="the PNG to write")
    _model_args(s)

    u = sub.add_parser("unet", help="the course's dummy UNet call: input and output shapes")
    u.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    u.add_argument("--steps", type=int, default=50, help="timesteps set on the scheduler; the first is used")
    _model_args(u)

    g = sub.add_parser("guidance", help="same seed, one image per guidance scale, labelled grid")
    g.add_argument("--scales", default="1.1,8,12", help="comma-separated guidance scales (default 1.1,8,12)")
    _generation_args(g)
    _model_args(g)

    c = sub.add_parser("schedulers", help="same seed, one image per scheduler, labelled grid")
    c.add_argument("--names", default="pndm,lms,euler,dpm++2m",
                   help="comma-separated scheduler names (default pndm,lms,euler,dpm++2m)")
    c.add_argument("--guidance", type=float, default=8.0, help="guidance scale (default 8)")
    _generation_args(c)
    _model_args(c)

    p.set_defaults(func=run)
    return p


def _load(args):
    from sdtune.devices import pick_device, pick_dtype
    from sdtune.models.embedded import embedded_model
    from sdtune.models.loading import load_pipeline

    source = args.model or embedded_model("base")
    device = pick_device(args.device)
    pipe = load_pipeline(source, device=device, dtype=pick_dtype(device, args.dtype), config=args.config,
                         allow_pickle=args.allow_pickle)
    if getattr(pipe, "transformer", None) is not None:  # SD 3.x: an MMDiT, not the UNet these tools read
        from sdtune.errors import SdtuneError

        raise SdtuneError(f"sdtune inspect's tools read a UNet and one text encoder; {source} is an SD 3.x model (an "
                          "MMDiT transformer), which they do not support yet")
    return pipe


def _parse_list(text: str, what: str, convert=str) -> list:
    from sdtune.errors import SdtuneError

    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise SdtuneError(f"--{what} is empty; give a comma-separated list")
    try:
        return [convert(x) for x in items]
    except ValueError as exc:
        raise SdtuneError(f"--{what} {text!r} is not a comma-separated list of numbers") from exc


def run(args) -> int:
    from pathlib import Path

    from sdtune.errors import SdtuneError
    from sdtune.generation import teaching
    from sdtune.imageio import open_image, save_image_atomic
    from sdtune.models.schedulers import make_scheduler

    tool = args.tool
    # Check what can be checked before the (slow) model load.
    if tool == "vae" and args.image:
        image = open_image(args.image)
    if tool == "guidance":
        scales = _parse_list(args.scales, "scales", float)
    if tool == "schedulers":
        from sdtune.models.schedulers import SCHEDULERS
        names = _parse_list(args.names, "names")
        unknown = [n for n in names if n.lower() not in SCHEDULERS]
        if unknown:
            raise SdtuneError(f"unknown scheduler {unknown[0]!r}; choose from: {', '.join(SCHEDULERS)}")
    if tool == "unet" and args.steps < 1:
        raise SdtuneError(f"--steps must be at least 1; got {args.steps}")
    if tool in {"guidance", "schedulers"}:
        teaching._check_generation(args.steps, args.width, args.height)

    pipe = _load(args)
    if tool == "tokens":
        print(teaching.format_tokens(teaching.inspect_tokens(pipe, args.text)))
    elif tool == "vae":
        report = teaching.vae_roundtrip(pipe, image if args.image else None, args.size)
        print(teaching.format_vae(report))
        out = Path(args.out)
        save_image_atomic(report.input_image, out / "input.png")
        save_image_atomic(report.decoded_image, out / "decoded.png")
        pair = teaching.labelled_grid([report.input_image, report.decoded_image],
                                      ["input", f"decoded (PSNR {report.psnr:.1f} dB)"])
        save_image_atomic(pair, out / "side_by_side.png")
        print(f"wrote {out / 'side_by_side.png'}")
    elif tool == "schedule":
        scheduler = make_scheduler(args.scheduler, pipe.scheduler.config) if args.scheduler else pipe.scheduler
        print(teaching.format_scheduler(scheduler))
        print(f"wrote {teaching.plot_schedule(scheduler, args.out)}")
    elif tool == "unet":
        print(teaching.format_unet(teaching.unet_dummy_call(pipe, args.seed, args.steps)))
    elif tool == "guidance":
        grid, _ = teaching.guidance_grid(pipe, args.prompt, scales, seed=args.seed, steps=args.steps,
                                         width=args.width, height=args.height,
                                         negative_prompt=args.negative_prompt)
        print(f"wrote {save_image_atomic(grid, args.out)}")
    elif tool == "schedulers":
        grid, _ = teaching.scheduler_grid(pipe, args.prompt, names, seed=args.seed, steps=args.steps,
                                          guidance=args.guidance, width=args.width, height=args.height,
                                          negative_prompt=args.negative_prompt)
        print(f"wrote {save_image_atomic(grid, args.out)}")
    return 0
