"""Benchmark: sdtune's engine against stock diffusers pipelines loaded separately per mode.

Same models, settings and seeds on both sides, in one run. Reports:

* load: the engine (all four modes, shared VAE/text encoder/tokenizer) vs four stock
  ``from_pretrained`` calls (one pipeline per mode);
* seconds per image per mode (median of --repeats; process CPU seconds on a CPU, which other
  users of a shared machine do not inflate) and the largest pixel difference between the two;
* switching modes: time to make the next mode ready. The engine wraps weights it already holds
  (no reload); stock diffusers, holding one pipeline at a time, loads the next from disk;
* memory: parameter bytes held for all four modes (engine) vs four stock pipelines;
* with --compile, the engine again after ``Engine.compile_unets()``: each mode's first image (wall
  seconds, compilation included; inductor's on-disk cache starts empty) and then seconds per image,
  against the same stock figures.

    python bench/bench_inference.py --quick                # tiny random models (or the embedded family)
    python bench/bench_inference.py --model M --inpaint-model I --depth-model D --size 512 --steps 30
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("txt2img", "img2img", "inpaint", "depth2img")
# "Same pictures": fusing a LoRA (or compiling) reorders float sums, which may move a pixel by a level or two.
PIXEL_TOLERANCE = 2
PROMPT = "a photo of a red fox in the snow"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="base model (default: embedded family if built, else tiny random models)")
    p.add_argument("--inpaint-model")
    p.add_argument("--depth-model")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's native)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"))
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    p.add_argument("--quick", action="store_true", help="2 steps, 1 repeat: a smoke run")
    p.add_argument("--compile", action="store_true", help="also time the engine with its UNets torch.compiled")
    p.add_argument("--lora", help="LoRA applied on both sides: fused by the engine, load_lora_weights on stock")
    return p.parse_args(argv)


def resolve_models(args, scratch: Path) -> dict:
    from sdtune.models.embedded import embedded_model, has_embedded
    from sdtune.models.fixtures import tiny_family

    if args.model:
        if not (args.inpaint_model and args.depth_model):
            sys.exit("bench: with --model also pass --inpaint-model and --depth-model (all four modes are timed)")
        return dict(model=args.model, inpaint=args.inpaint_model, depth=args.depth_model, label="given models")
    if all(has_embedded(k) for k in ("base", "inpaint", "depth")):
        return dict(model=str(embedded_model("base")), inpaint=str(embedded_model("inpaint")),
                    depth=str(embedded_model("depth")), label="embedded family")
    fam = tiny_family(scratch / "tiny")
    return dict(model=str(fam["sd1"]), inpaint=str(fam["inpaint"]), depth=str(fam["depth"]),
                label="tiny random fixtures")


def make_inputs(size: int, scratch: Path) -> dict:
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    img = Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    paths = dict(image=scratch / "image.png", mask=scratch / "mask.png")
    img.save(paths["image"])
    mask.save(paths["mask"])
    return {k: str(v) for k, v in paths.items()}


def stock_load(mode: str, models: dict, device, dtype, lora=None):
    """What a diffusers user does per mode: from_pretrained of that mode's pipeline class (+ load_lora_weights)."""
    from diffusers import (
        StableDiffusionDepth2ImgPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

    no_checker = dict(safety_checker=None, requires_safety_checker=False)
    if mode == "depth2img":
        pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(models["depth"], dtype=dtype)
    else:
        cls, src = {"txt2img": (StableDiffusionPipeline, models["model"]),
                    "img2img": (StableDiffusionImg2ImgPipeline, models["model"]),
                    "inpaint": (StableDiffusionInpaintPipeline, models["inpaint"])}[mode]
        pipe = cls.from_pretrained(src, dtype=dtype, **no_checker)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def stock_generate(pipe, mode: str, inputs: dict, steps: int, size: int, seed: int):
    import torch
    from PIL import Image

    kw = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=7.5,
              generator=torch.Generator("cpu").manual_seed(seed))
    if mode == "txt2img":
        kw.update(width=size, height=size)
    else:
        kw.update(image=Image.open(inputs["image"]).convert("RGB"), strength=0.8 if mode != "inpaint" else 1.0)
    if mode == "inpaint":
        kw.update(mask_image=Image.open(inputs["mask"]).convert("L"), width=size, height=size)
    with torch.inference_mode():
        return pipe(**kw).images[0]


def ours_generate(engine, mode: str, inputs: dict, steps: int, size: int, seed: int):
    kw = dict(prompt=PROMPT, steps=steps, guidance=7.5, seed=seed)
    if mode == "txt2img":
        kw.update(width=size, height=size)
    else:
        kw.update(image=inputs["image"])
    if mode == "inpaint":
        kw.update(mask=inputs["mask"])
    return engine.generate(mode, **kw)[0].image


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def cpu_timed(fn):
    """Process CPU seconds: on a shared machine, far steadier than wall time (others' load is excluded)."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def image_timer(device):
    """Seconds of one call: process CPU time on a CPU, wall time elsewhere."""
    return cpu_timed if device.type == "cpu" else (lambda fn: timed(fn)[0])


def max_pixel_difference(a, b) -> int:
    import numpy as np

    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def param_bytes(*modules) -> int:
    """Bytes of distinct parameter/buffer storage across ``modules`` (shared tensors counted once)."""
    seen, total = set(), 0
    for m in modules:
        if m is None or not hasattr(m, "state_dict"):
            continue
        for t in m.state_dict().values():
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def pipe_modules(pipe):
    return [v for v in pipe.components.values() if hasattr(v, "state_dict")]


def main(argv=None) -> int:
    r = measure(parse_args(argv))
    print_table(r)
    diffs = [*r["max_pixel_difference"].values(), *r.get("compiled", {}).get("max_pixel_difference", {}).values()]
    return 0 if max(diffs) <= PIXEL_TOLERANCE else 1


def measure(args) -> dict:
    """Run every comparison; return the figures as a plain dict (printed by ``print_table``)."""
    import warnings

    import diffusers
    import torch
    import transformers

    from sdtune.devices import dtype_name, pick_device, pick_dtype
    from sdtune.generation.engine import Engine

    warnings.filterwarnings("ignore", message=".*autocast.*")  # depth2img's fp32-on-CPU autocast notice
    if args.quick:
        args.steps, args.repeats = 2, 1
    torch.set_num_threads(args.threads)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)

    with tempfile.TemporaryDirectory(prefix="sdtune-bench-") as tmp:
        scratch = Path(tmp)
        models = resolve_models(args, scratch)

        load_ours, engine = timed(lambda: Engine.load(models["model"], inpaint_model=models["inpaint"],
                                                      depth_model=models["depth"], device=device, dtype=dtype,
                                                      lora=args.lora))
        size = args.size or engine.native_size[0]
        inputs = make_inputs(size, scratch)
        print(f"models: {models['label']} ({models['model']}); device {device}, {dtype_name(dtype)}, "
              f"{torch.get_num_threads()} threads; {size}x{size}, {args.steps} steps, {args.repeats} repeat(s)")

        # Stock: load each mode's pipeline (timed), keep them all for the per-image timing.
        stock, load_stock = {}, {}
        for mode in MODES:
            load_stock[mode], stock[mode] = timed(lambda m=mode: stock_load(m, models, device, dtype, args.lora))

        # Warm-up once per mode on both sides (first-call allocations), also the pixel check.
        same = {}
        for mode in MODES:
            a = ours_generate(engine, mode, inputs, args.steps, size, seed=0)
            b = stock_generate(stock[mode], mode, inputs, args.steps, size, seed=0)
            same[mode] = max_pixel_difference(a, b)

        per_image = {}
        clock = image_timer(device)
        for mode in MODES:
            ours_t, stock_t = [], []
            for r in range(args.repeats):  # interleaved so background load hits both sides alike
                ours_t.append(clock(lambda: ours_generate(engine, mode, inputs, args.steps, size, seed=r + 1)))
                stock_t.append(clock(lambda: stock_generate(stock[mode], mode, inputs, args.steps, size,
                                                              seed=r + 1)))
            per_image[mode] = (statistics.median(ours_t), statistics.median(stock_t))

        compiled = _measure_compiled(engine, stock, inputs, args, size, device) if args.compile else None

        mem_ours = param_bytes(engine.vae, engine.text_encoder, *engine.unets.values(), engine.depth_estimator)
        mem_stock = sum(param_bytes(*pipe_modules(p)) for p in stock.values())
        del stock

        # Switching: time to make the next mode ready after a change. The engine builds (once) a pipeline
        # object around weights it already holds; stock diffusers holding one pipeline at a time (four
        # would need the memory above) loads the next one from disk.
        order = ["txt2img", "inpaint", "depth2img", "img2img", "txt2img"]
        fresh = Engine.load(models["model"], inpaint_model=models["inpaint"], depth_model=models["depth"],
                            device=device, dtype=dtype, lora=args.lora)
        fresh.pipeline(order[0])
        held = stock_load(order[0], models, device, dtype, args.lora)
        switch_ours, switch_stock = [], []
        for mode in order[1:]:
            switch_ours.append(timed(lambda: fresh.pipeline(mode))[0])
            del held
            t, held = timed(lambda: stock_load(mode, models, device, dtype, args.lora))
            switch_stock.append(t)
        # The last switched-to mode really works on both sides (same pixels as before).
        for mode in order[-1:]:
            a = ours_generate(fresh, mode, inputs, args.steps, size, seed=0)
            b = stock_generate(held, mode, inputs, args.steps, size, seed=0)
            same[mode] = max(same[mode], max_pixel_difference(a, b))

    return dict(models=models["label"], device=str(device), dtype=dtype_name(dtype), threads=torch.get_num_threads(),
                size=size, steps=args.steps, repeats=args.repeats, lora=args.lora is not None,
                time_unit="cpu_s" if device.type == "cpu" else "wall_s",
                load_s=dict(sdtune=load_ours, stock=sum(load_stock.values())),
                per_image={m: dict(sdtune=o, stock=s) for m, (o, s) in per_image.items()},
                max_pixel_difference=same,
                mode_switch_s=dict(sdtune=statistics.mean(switch_ours), stock=statistics.mean(switch_stock)),
                weights_mb=dict(sdtune=mem_ours / 2**20, stock=mem_stock / 2**20),
                **({"compiled": compiled} if compiled else {}))


def _measure_compiled(engine, stock: dict, inputs: dict, args, size: int, device) -> dict:
    """The engine with compiled UNets: first image per mode (compiling), then per image, pixels vs stock."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdtune-bench-inductor-")  # a cold compile
    engine.compile_unets()
    first, per_image, same = {}, {}, {}
    clock = image_timer(device)
    for mode in MODES:
        first[mode], a = timed(lambda: ours_generate(engine, mode, inputs, args.steps, size, seed=0))
        b = stock_generate(stock[mode], mode, inputs, args.steps, size, seed=0)
        same[mode] = max_pixel_difference(a, b)
        per_image[mode] = statistics.median(
            clock(lambda: ours_generate(engine, mode, inputs, args.steps, size, seed=r + 1))
            for r in range(args.repeats))
    return dict(first_image_wall_s=first, per_image=per_image, max_pixel_difference=same)


def print_table(r: dict) -> None:
    print()
    print(f"{'':22}{'sdtune':>10}{'stock':>10}{'stock/sdtune':>14}")
    unit = "CPU s" if r["time_unit"] == "cpu_s" else "s"
    lo, ls = r["load_s"]["sdtune"], r["load_s"]["stock"]
    print(f"{'load, all 4 modes (s)':22}{lo:10.2f}{ls:10.2f}{ls / lo:14.2f}")
    for mode in MODES:
        o, s = r["per_image"][mode]["sdtune"], r["per_image"][mode]["stock"]
        print(f"{mode + f' {unit}/image':22}{o:10.3f}{s:10.3f}{s / o:14.2f}   max pixel difference: "
              f"{r['max_pixel_difference'][mode]}")
    so, ss = r["mode_switch_s"]["sdtune"], r["mode_switch_s"]["stock"]
    ratio = ss / so if so > 0 else float("inf")
    print(f"{'mode switch (s)':22}{so:10.4f}{ss:10.3f}{ratio:14.0f}   (mean over 4 switches)")
    mo, ms = r["weights_mb"]["sdtune"], r["weights_mb"]["stock"]
    print(f"{'weights held (MB)':22}{mo:10.1f}{ms:10.1f}{ms / max(mo, 1e-9):14.2f}")
    if "compiled" in r:
        c = r["compiled"]
        for mode in MODES:
            o, s = c["per_image"][mode], r["per_image"][mode]["stock"]
            print(f"{mode + ' compiled':22}{o:10.3f}{s:10.3f}{s / o:14.2f}   max pixel difference: "
                  f"{c['max_pixel_difference'][mode]}; first image {c['first_image_wall_s'][mode]:.1f} s (compiling)")

if __name__ == "__main__":
    sys.exit(main())
