"""``sdtune infer``: generate images in any of the four modes, or regenerate one from its PNG."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

MODES = ("txt2img", "img2img", "inpaint", "depth2img")

EPILOG = """\
inputs:
  --image is required by img2img, inpaint and depth2img. The output size defaults to the image's
  size (rounded down to a multiple of 8); --width/--height resize the inputs to that size.
  --mask (inpaint): white = repaint, black = keep. It must have the same size as --image: a mask of
  another size is refused (not resized), so a mask is never silently misaligned.
  --depth-map (depth2img): a greyscale image, white = near, as MiDaS/DPT predict; any size.
  Without it, the depth model's own estimator computes the depth from --image.
  SDXL (recognised from the model's config) has no 5-channel depth model: its depth2img is a depth
  ControlNet, --controlnet DIR with --depth-estimator DIR (a DPT folder) or --depth-map. SD 1.x/2.x
  models take the same ControlNet path instead of --depth-model.
  --strength: 0 keeps the image, 1 repaints it fully (default 0.8; inpaint 1.0).

outputs:
  Each image is a PNG whose text chunk 'sdtune' holds every parameter (also a JSON sidecar).
  `sdtune infer --from-png OUT.png --out DIR` regenerates it (the input images must still exist).

examples:
  sdtune infer txt2img --prompt "a photo of sks dog on the beach" --out out/
  sdtune infer img2img --model MODEL --image in.png --strength 0.6 --prompt "..." --out out/
  sdtune infer inpaint --model MODEL --inpaint-model INPAINT --image in.png --mask mask.png --prompt "..." --out out/
  sdtune infer txt2img --model BASE --lora runs/dog/pytorch_lora_weights.safetensors --prompt "..." --out out/
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "infer", help="generate images: txt2img, img2img, inpaint, depth2img",
        description="Generate images with a Stable Diffusion model (plus an optional LoRA or fine-tuned weights).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=MODES, help="generation mode (omit with --from-png)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="diffusers folder, .safetensors file or hub id (default: the embedded model)")
    g.add_argument("--inpaint-model", help="a 9-channel inpainting model for inpaint mode")
    g.add_argument("--depth-model", help="a 5-channel depth model (with depth estimator) for depth2img")
    g.add_argument("--base", help="the model --model was fully fine-tuned from; carries the fine-tuning over to "
                                  "--inpaint-model/--depth-model by add difference")
    g.add_argument("--controlnet", help="a depth ControlNet (diffusers folder, .safetensors with --controlnet-config, "
                                        "or hub id) for depth2img: SDXL's way, or SD's instead of --depth-model")
    g.add_argument("--controlnet-config", help="local ControlNet folder giving the architecture of a single-file "
                                               "--controlnet")
    g.add_argument("--depth-estimator", help="a transformers depth model folder (DPT) computing the ControlNet's "
                                             "depth from --image (or pass --depth-map)")
    g.add_argument("--lora", help="LoRA weights (.safetensors file or the folder holding pytorch_lora_weights)")
    g.add_argument("--lora-scale", type=float, default=None,
                   help="LoRA strength (default: the LoRA's recommended one, else 1.0; 0 = off)")
    g.add_argument("--no-fuse-lora", action="store_true",
                   help="keep the LoRA as separate layers (fusing is on when exact enough in the dtype)")
    g.add_argument("--config", help="local diffusers folder giving the architecture of a single-file --model")
    g.add_argument("--inpaint-config", help="the same for a single-file --inpaint-model")
    g.add_argument("--depth-config", help="the same for a single-file --depth-model")
    g.add_argument("--base-config", help="the same for a single-file --base")
    g.add_argument("--no-t5", action="store_true",
                   help="SD 3.x: load without the T5 text encoder (far less memory; prompts read by CLIP only)")
    g.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.ckpt/.bin) weights you trust")
    g.add_argument("--vae-tiling", action="store_true",
                   help="VAE in overlapping tiles: far less memory for images several times the model's size")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: the first image pays tens of seconds of compiling, the rest run "
                        "faster (for many images)")
    g.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default fp16 on GPU, fp32 on CPU")
    s = p.add_argument_group("generation")
    s.add_argument("--prompt", default=None, help="what to draw (prompts over 75 tokens are chunked, not cut)")
    s.add_argument("--negative-prompt", default="", help="what to steer away from")
    s.add_argument("--truncate-long-prompts", action="store_true",
                   help="cut prompts at 75 tokens (with a warning) instead of chunking them")
    s.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the --lora's recommended one, else 7.5)")
    s.add_argument("--guidance-interval", metavar="LO,HI", default=None,
                   help="guide only at noise levels LO..HI (0 = clean, 1 = pure noise), the conditional prediction "
                        "elsewhere: keeps a high --guidance from oversaturating, e.g. 0.3,1 (default: every step)")
    s.add_argument("--seed", type=int, default=0, help="seed of image 1; image i uses seed + i - 1 (default 0)")
    s.add_argument("--width", type=int, help="multiple of 8 (default: the model's native size or the image's)")
    s.add_argument("--height", type=int, help="multiple of 8 (default: the model's native size or the image's)")
    s.add_argument("--scheduler", default=None,
                   help="ddim pndm lms euler euler_a heun dpm++2m dpm++2m_karras unipc ddpm "
                        "(default: the model's own)")
    s.add_argument("--num-images", type=int, default=1, help="how many images (default 1)")
    i = p.add_argument_group("inputs")
    i.add_argument("--image", help="input image (img2img, inpaint, depth2img)")
    i.add_argument("--mask", help="inpaint mask, same size as --image; white = repaint")
    i.add_argument("--strength", type=float, default=None, help="0..1, how much to change --image")
    i.add_argument("--depth-map", help="greyscale depth map for depth2img (white = near)")
    i.add_argument("--paste-back", action="store_true",
                   help="inpaint: keep the input's exact pixels outside the mask (as AUTOMATIC1111 does)")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, help="folder for the PNGs and JSON sidecars")
    o.add_argument("--from-png", help="regenerate the image described by this sdtune PNG")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _default_models(args) -> dict:
    """--model defaults to the embedded base; its inpaint/depth siblings join only when --model was not given."""
    from sdtune.models.embedded import embedded_model, has_embedded

    models = dict(model=args.model, inpaint_model=args.inpaint_model, depth_model=args.depth_model)
    trained_on = _lora_base(args) if args.model is None and args.lora else None
    if trained_on is not None:
        models["model"] = trained_on
        print(f"sdtune: note: --model {trained_on} (the base the LoRA was trained on; pass --model to choose another)",
              file=sys.stderr)
    elif args.model is None:
        models["model"] = str(embedded_model("base"))
        if args.inpaint_model is None and args.mode == "inpaint" and has_embedded("inpaint"):
            models["inpaint_model"] = str(embedded_model("inpaint"))
        if args.depth_model is None and args.mode == "depth2img" and has_embedded("depth"):
            models["depth_model"] = str(embedded_model("depth"))
    # Load only the dedicated model the chosen mode uses: the others would cost load time for nothing.
    if args.mode != "inpaint":
        models["inpaint_model"] = None
    if args.mode != "depth2img":
        models["depth_model"] = None
    return models


def _lora_base(args) -> str | None:
    """The base model an sdtune LoRA records (``sdtune_base_model``), when it is not the embedded one and can be
    loaded here: a folder or file that exists, or a hub id."""
    from safetensors import safe_open

    from sdtune.errors import SdtuneError
    from sdtune.models.embedded import embedded_model
    from sdtune.models.lora import find_lora_file
    from sdtune.models.loading import resolve_source

    try:
        path = find_lora_file(args.lora, allow_pickle=False)
        with safe_open(str(path), framework="pt") as f:
            base = (f.metadata() or {}).get("sdtune_base_model")
        if not base or Path(base).resolve() == embedded_model("base").resolve():
            return None
        resolve_source(base)  # an existing folder or file, or a hub id
    except (SdtuneError, OSError, ValueError, RuntimeError):
        return None  # not an sdtune LoRA, or its base is not here: the engine's own checks speak
    return base


def _settings_defaults(args) -> None:
    """Guidance, LoRA scale and guidance interval the user left out: the LoRA's recommended ones (its run's settings
    sweep), said in one line; else 7.5, 1.0 and every step."""
    from sdtune.models.lora import recommended_settings

    given = {"guidance": args.guidance, "lora_scale": args.lora_scale, "guidance_interval": args.guidance_interval}
    rec = recommended_settings(args.lora) if args.lora and not getattr(args, "from_png", None) else None
    used = []
    if rec:
        for key, flag in (("guidance", "--guidance"), ("lora_scale", "--lora-scale"),
                          ("guidance_interval", "--guidance-interval")):
            if given[key] is None and rec.get(key) is not None:
                value = rec[key]
                setattr(args, key, ",".join(f"{x:g}" for x in value) if key == "guidance_interval" else value)
                used.append(f"{flag} {getattr(args, key) if key == 'guidance_interval' else f'{value:g}'}")
    if used:
        print(f"sdtune: note: using the LoRA's recommended settings: {', '.join(used)} (give the flags to override)",
              file=sys.stderr)
    args.guidance = 7.5 if args.guidance is None else args.guidance
    args.lora_scale = 1.0 if args.lora_scale is None else args.lora_scale


def _controlnet_args(args) -> dict:
    """The depth ControlNet and its estimator, loaded only for depth2img (the other modes do not use them)."""
    if args.mode != "depth2img":
        return {}
    return dict(controlnet=args.controlnet, controlnet_config=args.controlnet_config,
                depth_estimator=args.depth_estimator)


class _Progress:
    """One tqdm bar over every step of every image; the per-image step count comes from the pipeline."""

    def __init__(self, images: int, quiet: bool):
        from tqdm.auto import tqdm

        self.images = images
        self.bar = tqdm(total=None, unit="step", desc="sampling", disable=quiet, file=sys.stderr, leave=False)

    def step(self, per_image: int) -> None:
        if self.bar.total != per_image * self.images:
            self.bar.total = per_image * self.images
            self.bar.refresh()
        self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def run(args) -> int:
    """``sdtune infer``; the library's errors name its parameters (``lora_scale``), worded here as flags."""
    from sdtune.errors import SdtuneError
    from sdtune.generation.requests import ParameterError, cli_flag

    try:
        return _run(args)
    except ParameterError as exc:
        raise SdtuneError(exc.worded(cli_flag)) from None


def engine_spec(args):
    """The ``EngineSpec`` the flags ask for."""
    from sdtune.generation.components import EngineSpec

    return EngineSpec(**_default_models(args), base=args.base, lora=args.lora, lora_scale=args.lora_scale,
                      device=args.device, dtype=args.dtype, config=args.config, inpaint_config=args.inpaint_config,
                      depth_config=args.depth_config, base_config=args.base_config, allow_pickle=args.allow_pickle,
                      fuse_lora=False if args.no_fuse_lora else "auto", vae_tiling=args.vae_tiling,
                      compile=args.compile, no_t5=args.no_t5, **_controlnet_args(args))


def _run(args) -> int:
    from sdtune.errors import SdtuneError
    from sdtune.generation.engine import Engine
    from sdtune.generation.metadata import read_params, save_results
    from sdtune.generation.regenerate import check_params, engine_for_params, regenerate
    from sdtune.generation.requests import check_request

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SdtuneError(f"--out {out} exists and is not a folder; pass a folder for the images")
    if args.lora is None and args.lora_scale is not None:
        raise SdtuneError("--lora-scale was given without --lora; pass the LoRA file too")
    _settings_defaults(args)
    if args.from_png:
        if args.mode:
            raise SdtuneError("--from-png takes the mode and every setting from the PNG; do not pass a mode")
        params = read_params(args.from_png)
        check_params(params)
        engine = engine_for_params(params, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
        with _Progress(1, args.quiet) as bar:
            results = regenerate(params, engine=engine, on_step=bar.step)
    else:
        if args.mode is None:
            raise SdtuneError("choose a mode: txt2img, img2img, inpaint or depth2img (or pass --from-png IMG)")
        if args.prompt is None:
            raise SdtuneError("--prompt is required (use --prompt '' for an unconditional image)")
        gen = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                   guidance=args.guidance, seed=args.seed, width=args.width, height=args.height,
                   scheduler=args.scheduler, image=args.image, mask=args.mask, strength=args.strength,
                   depth_map=args.depth_map, num_images=args.num_images, guidance_interval=args.guidance_interval,
                   long_prompt="truncate" if args.truncate_long_prompts else "chunk")
        # Every input checked (images opened, mask size compared) before minutes of model loading.
        check_request(args.mode, **{k: v for k, v in gen.items() if k not in ("prompt", "negative_prompt")})
        if args.paste_back and args.mode != "inpaint":
            raise SdtuneError("--paste-back is only used by inpaint")
        gen["paste_back"] = args.paste_back
        engine = Engine.load(engine_spec(args))
        with _Progress(args.num_images, args.quiet) as bar:
            results = engine.generate(args.mode, on_step=bar.step, **gen)
    for path in save_results(results, args.out):
        print(path)
    return 0
