"""One benchmark command: every sdtune-vs-stock comparison in one run, a table of ratios, bench/results.json.

    python bench/run.py --quick      # tiny random models, few steps: a smoke pass (< 3 min on 2 shared cores)
    python bench/run.py              # longer runs of the same comparisons
    python bench/run.py --model M --inpaint-model I --depth-model D

Sections (each: sdtune and the stock path on the same model, data, settings and seed):

* training: DreamBooth LoRA (and full, without --quick) with prior preservation, sdtune's recipe vs
  diffusers' example-script loop (bench/stock_dreambooth.py: VAE + text encoder every step), plus
  sdtune with caching off (bench/bench_training.py, one child process per run: peak RSS is its own);
* inference: per mode with a LoRA applied, sdtune's engine (LoRA fused) vs each mode's stock pipeline with
  ``load_lora_weights`` (bench/bench_inference.py), plus the largest pixel difference between the two;
* cold start: ``sdtune infer txt2img`` as a subprocess vs a ``python -c`` diffusers script, wall seconds
  for import + load + one 2-step image;
* class images: images/s, sdtune's batched generation (a list of per-image generators) vs one pipeline
  call per image;
* buckets: training steps/s with 100 images in 5 aspect-ratio buckets vs the same images in one square
  bucket (bench/bench_buckets.py): data must never bound a step;
* time to subject: training time until the subject is learned (subject fidelity >= 0.9 with prior
  preservation >= 0.9, judged every 100 steps), sdtune's recipe vs the example loop with the example's
  defaults (bench/time_to_subject.py); needs the embedded family (the judge reads only its world);
* ui: one txt2img image through the web UI's Generate handler (sandbox checks, held engine, PNG + JSON written,
  gallery returned) vs ``Engine.generate`` directly (bench/bench_ui.py; target: within 10 %);
* with --compile, training and inference once more with torch.compile (sdtune's ``compile: true`` and
  ``Engine.compile_unets``), each starting from an empty inductor cache so the one-off compilation it
  reports is what a first run pays.

``--only training,inference`` runs a subset (sections: training, inference, cold_start, class_images,
vae_tiling, buckets, time_to_subject, ui, gpu).

On a CPU, per-image and class-image times are process CPU seconds (steadier than wall time on a shared
machine); cold start is wall time by nature. With CUDA present the inference, cold-start and
class-image sections run again on cuda, and GPU training runs SD 1.5's architecture at 512 px (LoRA and full)
and SDXL base 1.0's at 1024 px (LoRA, fp16, gradient checkpointing, 8-bit Adam, cached text embeddings; vs
bench/stock_dreambooth_sdxl.py, diffusers' SDXL DreamBooth LoRA loop; targets <= 10 GB peak VRAM, >= 1.3x
steps/s); otherwise the GPU section records "skipped: no CUDA".
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from bench_inference import max_pixel_difference  # noqa: E402 (bench/ is on the path only from here)

PROMPT = "a photo of a red fox in the snow"
CLASS_PROMPT = "a photo of a box"


SECTIONS = ("training", "inference", "cold_start", "class_images", "vae_tiling", "buckets", "time_to_subject", "ui",
            "gpu")


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {','.join(SECTIONS)}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models, 2 steps, 1 repeat, LoRA training only")
    p.add_argument("--model", help="base diffusers model (default: tiny random fixtures)")
    p.add_argument("--inpaint-model", help="with --model: the inpainting model for the inference section")
    p.add_argument("--depth-model", help="with --model: the depth model for the inference section")
    p.add_argument("--threads", type=int, default=2, help="torch threads in this process and the cold-start children")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd training and inference (adds minutes of compiling)")
    p.add_argument("--only", type=_sections, default=SECTIONS, metavar="A,B",
                   help=f"run only these sections ({','.join(SECTIONS)})")
    p.add_argument("--judge-every", type=int, default=100, metavar="N",
                   help="time to subject: judge both recipes every N steps (each judgement samples 32 images)")
    p.add_argument("--out", default=str(BENCH / "results.json"))
    return p.parse_args(argv)


# ---------------------------------------------------------------- helpers

def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _measure(device):
    """Timer for ``device``: process CPU seconds on a CPU, wall seconds (synchronised) on a GPU."""
    import torch

    def run(fn):
        if device.type == "cpu":
            start = time.process_time()
            fn()
            return time.process_time() - start
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    return run


def make_lora(base: str, out_dir: Path) -> Path:
    """A random rank-4 LoRA (UNet + text encoder) for ``base``, saved in diffusers format as training does.

    lora_B starts at zero after init (a no-op LoRA); it is filled with small noise so the LoRA changes
    the pictures and a side that forgot to apply it would show up in the pixel difference.
    """
    import torch

    from sdtune.models.loading import load_pipeline
    from sdtune.training import adapters

    pipe = load_pipeline(base)
    adapters.add_unet_lora(pipe.unet, rank=4, alpha=4.0)
    adapters.add_text_encoder_lora(pipe.text_encoder, rank=4, alpha=4.0)
    torch.manual_seed(1)
    for model in (pipe.unet, pipe.text_encoder):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    return adapters.save_diffusers_lora(out_dir, pipe.unet, pipe.text_encoder).parent


# ---------------------------------------------------------------- sections

def _native_size(model: str) -> int:
    """A diffusers folder's own image size: UNet sample_size x the VAE's downsampling."""
    unet = json.loads((Path(model) / "unet" / "config.json").read_text())
    vae = json.loads((Path(model) / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def section_training(args, models) -> dict:
    import bench_training

    targs = bench_training.parse_args(["--compile"] if args.compile else [])
    if args.model:
        targs.model = args.model
        targs.resolution = _native_size(args.model)
    if args.quick:
        targs.steps, targs.warmup = 4, 4
        targs.resolution = targs.resolution if args.model else 64
    methods = ("lora",) if args.quick else ("lora", "full")
    rows = bench_training.measure(targs, methods=methods, echo=False)
    out = dict(model=args.model or "random SD-1.5-shaped, quarter width", resolution=targs.resolution,
               timed_steps=targs.steps, warmup_steps=targs.warmup, threads=targs.threads,
               stock="diffusers' example-script loop (bench/stock_dreambooth.py)", runs=rows)
    for method in methods:
        on, off, stock = (next(r for r in rows if r["method"] == method and r["cache"] == c)
                          for c in ("on", "off", "stock"))
        out[method] = dict(steps_per_s=dict(sdtune=on["steps_per_s"], stock=stock["steps_per_s"]),
                           cpu_ms_per_step=dict(sdtune=on["cpu_ms_per_step"], stock=stock["cpu_ms_per_step"],
                                                sdtune_without_cache=off["cpu_ms_per_step"]),
                           peak_rss_mb=dict(sdtune=on["peak_rss_mb"], stock=stock["peak_rss_mb"]))
        comp = next((r for r in rows if r["method"] == method and r["cache"] == "compile"), None)
        if comp is not None:
            out[method]["compiled"] = dict(
                steps_per_s=comp["steps_per_s"], cpu_ms_per_step=comp["cpu_ms_per_step"],
                peak_rss_mb=comp["peak_rss_mb"],
                compile_s=comp["first_step_s"] - on["first_step_s"])
    return out


def section_gpu_training(args) -> dict:
    """SD 1.5's full-size architecture (random weights) at 512 px, batch 1, fp16 mixed precision, gradient
    checkpointing and 8-bit Adam on both sides: steps/s and peak VRAM, LoRA and full fine-tuning."""
    import bench_training

    targs = bench_training.parse_args(["--sd15-full-size", "--resolution", "512", "--batch", "1",
                                       "--mixed-precision", "fp16", "--gradient-checkpointing",
                                       "--optimizer", "adamw8bit", "--steps", "6" if args.quick else "30",
                                       "--warmup", "4"])
    rows = bench_training.measure(targs, methods=("lora", "full"), echo=False)
    out = dict(model="random, SD 1.5 architecture (UNet 860M)", resolution=512, batch=1,
               settings="fp16 mixed precision, gradient checkpointing, 8-bit AdamW (both sides)",
               timed_steps=targs.steps, runs=rows)
    for method in ("lora", "full"):
        on, stock = (next(r for r in rows if r["method"] == method and r["cache"] == c) for c in ("on", "stock"))
        out[method] = dict(steps_per_s=dict(sdtune=on["steps_per_s"], stock=stock["steps_per_s"]),
                           peak_vram_mb=dict(sdtune=on["peak_vram_mb"], stock=stock["peak_vram_mb"]))
    return out


def section_gpu_sdxl_training(args) -> dict:
    """SDXL base 1.0's architecture (random weights) at 1024 px, LoRA, batch 1, fp16 mixed precision, gradient
    checkpointing, 8-bit Adam and cached text embeddings on both sides (the SDXL example script pre-computes
    them for frozen encoders; sdtune caches latents too): steps/s and peak VRAM. Targets: peak <= 10 GB and
    >= 1.3x the example loop's steps/s."""
    import bench_training

    targs = bench_training.parse_args(["--sdxl", "full", "--resolution", "1024", "--batch", "1",
                                       "--mixed-precision", "fp16", "--gradient-checkpointing",
                                       "--optimizer", "adamw8bit", "--steps", "6" if args.quick else "30",
                                       "--warmup", "4"])
    rows = bench_training.measure(targs, methods=("lora",), echo=False)
    on, stock = (next(r for r in rows if r["cache"] == c) for c in ("on", "stock"))
    return dict(model="random, SDXL base 1.0 architecture (UNet 2.6B)", resolution=1024, batch=1,
                settings="LoRA, fp16 mixed precision, gradient checkpointing, 8-bit AdamW, cached text embeddings",
                timed_steps=targs.steps, runs=rows,
                lora=dict(steps_per_s=dict(sdtune=on["steps_per_s"], stock=stock["steps_per_s"]),
                          peak_vram_mb=dict(sdtune=on["peak_vram_mb"], stock=stock["peak_vram_mb"])),
                targets=dict(peak_vram_mb_at_most=10 * 1024, steps_per_s_ratio_at_least=1.3))


def section_inference(args, models, lora: Path, device: str) -> dict:
    import bench_inference

    if not (models["inpaint"] and models["depth"]):
        return dict(skipped="with --model also pass --inpaint-model and --depth-model (all four modes are timed)")
    argv = ["--model", models["sd1"], "--inpaint-model", models["inpaint"], "--depth-model", models["depth"],
            "--lora", str(lora), "--device", device, "--threads", str(args.threads)]
    if args.quick:
        argv.append("--quick")
    if args.compile:
        argv.append("--compile")
    out = bench_inference.measure(bench_inference.parse_args(argv))
    out["lora_effect_max_pixel_difference"] = _lora_effect(models["sd1"], lora, device)
    return out


def _lora_effect(model: str, lora: Path, device: str) -> int:
    """Stock txt2img with vs without the LoRA: a large value shows the agreement above is not vacuous."""
    import torch
    from diffusers import StableDiffusionPipeline

    def image(with_lora: bool):
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                                       dtype=torch.float32)
        if with_lora:
            pipe.load_lora_weights(str(lora))
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, height=32, width=32,
                    generator=torch.Generator("cpu").manual_seed(0)).images[0]
    return max_pixel_difference(image(False), image(True))


_STOCK_SCRIPT = """
import sys, torch
from diffusers import StableDiffusionPipeline
model, out, device = sys.argv[1], sys.argv[2], sys.argv[3]
# fp32 explicitly: transformers keeps a checkpoint's own dtype (fp16 here) unless told, and CPUs want fp32.
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                               dtype=torch.float32).to(device)
pipe.set_progress_bar_config(disable=True)
image = pipe("%s", num_inference_steps=2, guidance_scale=7.5, height=32, width=32,
             generator=torch.Generator("cpu").manual_seed(0)).images[0]
image.save(out)
""" % PROMPT


def section_cold_start(args, models, device: str, scratch: Path) -> dict:
    """Wall seconds of a fresh process: import + load + one 2-step 32 px image, median of repeats."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    sdtune_bin = Path(sys.executable).parent / "sdtune"
    ours_cmd = [str(sdtune_bin) if sdtune_bin.exists() else "sdtune", "infer", "txt2img", "--model", models["sd1"],
                "--prompt", PROMPT, "--steps", "2", "--width", "32", "--height", "32", "--seed", "0",
                "--device", device, "--quiet"]
    stock_cmd = [sys.executable, "-c", _STOCK_SCRIPT, models["sd1"], "", device]
    repeats = 1 if args.quick else 3
    times = {"sdtune": [], "stock": []}
    for r in range(repeats):  # interleaved so background load hits both sides alike
        for side, cmd in (("sdtune", ours_cmd), ("stock", stock_cmd)):
            out = scratch / f"cold-{side}-{r}"
            full = cmd + ["--out", str(out)] if side == "sdtune" else cmd[:-2] + [str(out) + ".png", device]
            start = time.perf_counter()
            proc = subprocess.run(full, capture_output=True, text=True, env=env)
            took = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"cold start ({side}) failed: {proc.stderr.strip()[-2000:]}")
            times[side].append(took)
    return dict(model=models["sd1"], steps=2, size=32, repeats=repeats, time_unit="wall_s",
                stock="python -c: StableDiffusionPipeline.from_pretrained + one image",
                wall_s={k: statistics.median(v) for k, v in times.items()}, all_wall_s=times)


def section_class_images(args, models, device: str, scratch: Path) -> dict:
    """Images/s: sdtune.training.class_images (batch of B, one generator per image) vs one pipeline call per image."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sdtune.training.class_images import generate_class_images

    dev = torch.device(device)
    n, batch, steps = (8, 8, 2) if args.quick else (16, 8, 10)
    pipe = StableDiffusionPipeline.from_pretrained(models["sd1"], safety_checker=None, dtype=torch.float32,
                                                   requires_safety_checker=False).to(dev)
    pipe.set_progress_bar_config(disable=True)
    measure = _measure(dev)

    def one_at_a_time(folder: Path):  # what a plain loop over the stock pipeline does
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            with torch.no_grad():
                img = pipe(prompt=CLASS_PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=32, width=32,
                           generator=torch.Generator("cpu").manual_seed(i)).images[0]
            img.save(folder / f"class_{i:05d}.png")

    def batched(folder: Path):
        generate_class_images(pipe, CLASS_PROMPT, list(range(n)), folder, seed=0, resolution=32, steps=steps,
                              guidance=7.5, batch_size=batch)

    # Warm-up (first-call allocations) on both sides, then timed runs into fresh folders.
    one_at_a_time(scratch / "cls-warm-1")
    batched(scratch / "cls-warm-b")
    t_single = measure(lambda: one_at_a_time(scratch / "cls-1"))
    t_batched = measure(lambda: batched(scratch / "cls-b"))
    from PIL import Image

    diff = max(max_pixel_difference(Image.open(scratch / "cls-1" / f"class_{i:05d}.png"),
                                     Image.open(scratch / "cls-b" / f"class_{i:05d}.png")) for i in range(n))
    return dict(model=models["sd1"], images=n, batch_size=batch, steps=steps, size=32,
                time_unit="cpu_s" if dev.type == "cpu" else "wall_s",
                images_per_s=dict(sdtune=n / t_batched, stock=n / t_single),
                max_pixel_difference=diff)


_VAE_CHILD = """
import json, sys, time, numpy as np, torch
from diffusers import AutoencoderKL
sys.path.insert(0, sys.argv[6])
from bench_training import peak_rss_mb  # VmHWM: this process's own peak, not its parent's
model, size, mode, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(int(sys.argv[5]))
vae = AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=torch.float32).eval()
f = 2 ** (len(vae.config.block_out_channels) - 1)
z = torch.randn(1, vae.config.latent_channels, size // f, size // f, generator=torch.Generator().manual_seed(0))
before = peak_rss_mb()
if mode == "tiled":
    vae.enable_tiling()
start = time.perf_counter()
with torch.no_grad():
    x = vae.decode(z).sample
took = time.perf_counter() - start
np.save(out, ((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "rss_before_mb": before,
                  "seconds": took}))
"""


def section_vae_tiling(args, models, scratch: Path) -> dict:
    """Decoding one large image: whole vs diffusers' tiled VAE (sdtune infer --vae-tiling), peak RSS of a fresh
    process each (the increase over the loaded model is what the decode itself needs)."""
    size = 512 if args.quick else 1024
    runs = {}
    for mode in ("whole", "tiled"):
        out = scratch / f"vae-{mode}.npy"
        proc = subprocess.run([sys.executable, "-c", _VAE_CHILD, models["sd1"], str(size), mode, str(out),
                               str(args.threads), str(BENCH)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"vae {mode} failed: {proc.stderr.strip()[-1500:]}")
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    import numpy as np

    a, b = (np.load(scratch / f"vae-{m}.npy").astype(int) for m in ("whole", "tiled"))
    decode_mb = {m: r["peak_rss_mb"] - r["rss_before_mb"] for m, r in runs.items()}
    return dict(model=models["sd1"], size=size, runs=runs, decode_rss_mb=dict(sdtune=decode_mb["tiled"],
                stock=decode_mb["whole"]), seconds=dict(sdtune=runs["tiled"]["seconds"], stock=runs["whole"]["seconds"]),
                mean_abs_pixel_difference=float(np.abs(a - b).mean()), max_pixel_difference=int(np.abs(a - b).max()))


def section_buckets(args, models, scratch: Path) -> dict:
    import bench_buckets

    resolution = _native_size(models["sd1"])
    return bench_buckets.measure(models["sd1"], scratch / "buckets", resolution, steps=10 if args.quick else 200,
                                 n=10 if args.quick else 100)


def section_time_to_subject(args, models, scratch: Path) -> dict:
    import time_to_subject

    from sdtune.world.subjects import DEFAULT_SUBJECT

    if args.quick:  # tiny random models: the judge scores noise; this only proves the section runs
        return time_to_subject.measure(models["sd1"], DEFAULT_SUBJECT, scratch / "tts", every=2, max_steps=2,
                                       stock_factor=1, prompts=2, sample_steps=2, say=lambda s: None)
    return time_to_subject.measure(models["sd1"], DEFAULT_SUBJECT, scratch / "tts", every=args.judge_every)


def section_ui(args, models, scratch: Path) -> dict:
    import bench_ui

    return bench_ui.measure(models["sd1"], scratch / "ui", steps=2 if args.quick else 20,
                            repeats=1 if args.quick else 7)


def run_device_sections(args, models, lora, device: str, scratch: Path, results: dict, prefix: str) -> None:
    for name, fn in (("inference", lambda: section_inference(args, models, lora, device)),
                     ("cold_start", lambda: section_cold_start(args, models, device, scratch)),
                     ("class_images", lambda: section_class_images(args, models, device, scratch))):
        if name in args.only:
            results[prefix + name] = _guarded(name, fn)


def _guarded(name: str, fn) -> dict:
    """Run one section; a failure is recorded (and printed) instead of losing the other sections."""
    start = time.perf_counter()
    print(f"[{_now()}] {name} ...", file=sys.stderr, flush=True)
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - a bench must report what it could measure
        traceback.print_exc()
        out = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    out["section_wall_s"] = round(time.perf_counter() - start, 1)
    return out


# ---------------------------------------------------------------- table

def _rows(results: dict):
    """(section, metric, sdtune, stock, ratio, note): ratio > 1 means sdtune is ahead."""
    rows = []
    for prefix, label in (("", "cpu"), ("gpu_", "cuda")):
        if prefix == "gpu_" and "skipped" in results.get("gpu", {}):
            rows.append(("gpu", results["gpu"]["skipped"], None, None, None, ""))
            continue
        tr = results.get("training") if prefix == "" else results.get("gpu_training")
        if tr is not None and prefix == "gpu_":
            for m in ("lora", "full"):
                if m in tr:
                    s, v = tr[m]["steps_per_s"], tr[m]["peak_vram_mb"]
                    rows.append(("training (cuda)", f"{m} 512px steps/s", s["sdtune"], s["stock"],
                                 s["sdtune"] / s["stock"], "SD1.5 arch, fp16, grad ckpt, 8-bit Adam"))
                    rows.append(("training (cuda)", f"{m} 512px peak VRAM MB", v["sdtune"], v["stock"],
                                 v["stock"] / v["sdtune"], ""))
            if "error" in tr:
                rows.append(("training (cuda)", "error", None, None, None, tr["error"]))
            xl = results.get("gpu_sdxl_training")
            if xl is not None and "lora" in xl:
                s, v = xl["lora"]["steps_per_s"], xl["lora"]["peak_vram_mb"]
                rows.append(("training (cuda)", "SDXL lora 1024px steps/s", s["sdtune"], s["stock"],
                             s["sdtune"] / s["stock"], "target >= 1.3x; fp16, grad ckpt, 8-bit Adam"))
                rows.append(("training (cuda)", "SDXL lora 1024px peak VRAM MB", v["sdtune"], v["stock"],
                             v["stock"] / v["sdtune"], "target sdtune <= 10240 MB"))
            elif xl is not None and "error" in xl:
                rows.append(("training (cuda)", "SDXL error", None, None, None, xl["error"]))
        elif tr is not None:
            if "error" in tr:
                rows.append(("training", "error", None, None, None, tr["error"]))
            for m in ("lora", "full"):
                if m in tr:
                    s = tr[m]["steps_per_s"]
                    rows.append(("training", f"{m} steps/s", s["sdtune"], s["stock"], s["sdtune"] / s["stock"],
                                 "vs example-script loop"))
                    c = tr[m]["cpu_ms_per_step"]
                    rows.append(("training", f"{m} CPU ms/step", c["sdtune"], c["stock"], c["stock"] / c["sdtune"],
                                 f"sdtune uncached {c['sdtune_without_cache']:.0f}"))
                    r = tr[m]["peak_rss_mb"]
                    rows.append(("training", f"{m} peak RSS MB", r["sdtune"], r["stock"], r["stock"] / r["sdtune"], ""))
                    if "compiled" in tr[m]:
                        k = tr[m]["compiled"]
                        rows.append(("training", f"{m} CPU ms/step compiled", k["cpu_ms_per_step"], c["stock"],
                                     c["stock"] / k["cpu_ms_per_step"],
                                     f"compile: true; {k['compile_s']:.0f} s compiling once"))
        inf = results.get(prefix + "inference", {})
        sec = f"inference ({label})"
        if "per_image" in inf:
            unit = "CPU s" if inf["time_unit"] == "cpu_s" else "s"
            for mode, v in inf["per_image"].items():
                rows.append((sec, f"{mode} {unit}/image +LoRA", v["sdtune"], v["stock"], v["stock"] / v["sdtune"],
                             f"max px diff {inf['max_pixel_difference'][mode]}"))
            v = inf["load_s"]
            rows.append((sec, "load 4 modes s", v["sdtune"], v["stock"], v["stock"] / v["sdtune"], ""))
            k = inf.get("compiled")
            for mode in (k or {}).get("per_image", {}):
                stock_t = inf["per_image"][mode]["stock"]
                rows.append((sec, f"{mode} {unit}/image compiled", k["per_image"][mode], stock_t,
                             stock_t / k["per_image"][mode], f"max px diff {k['max_pixel_difference'][mode]}; "
                             f"first image {k['first_image_wall_s'][mode]:.0f} s (compiling)"))
        if "lora_effect_max_pixel_difference" in inf:
            rows.append((sec, "LoRA on vs off, max px diff", None, None, None,
                         f"{inf['lora_effect_max_pixel_difference']} (stock txt2img; shows the LoRA is applied)"))
        elif inf:
            rows.append((sec, "", None, None, None, inf.get("error") or inf.get("skipped")))
        cs = results.get(prefix + "cold_start", {})
        if "wall_s" in cs:
            v = cs["wall_s"]
            rows.append((f"cold start ({label})", "txt2img wall s", v["sdtune"], v["stock"], v["stock"] / v["sdtune"],
                         "import+load+1 image"))
        elif cs:
            rows.append((f"cold start ({label})", "", None, None, None, cs.get("error")))
        vt = results.get("vae_tiling") if prefix == "" else None
        if vt and "decode_rss_mb" in vt:
            m, t = vt["decode_rss_mb"], vt["seconds"]
            rows.append(("vae (cpu)", f"decode {vt['size']}px, RSS MB tiled/whole", m["sdtune"], m["stock"],
                         m["stock"] / m["sdtune"] if min(m.values()) >= 1 else None,  # < 1 MB: below RSS's grain
                         f"mean px diff {vt['mean_abs_pixel_difference']:.2f} (random latent)"))
            rows.append(("vae (cpu)", f"decode {vt['size']}px, s tiled/whole", t["sdtune"], t["stock"],
                         t["stock"] / t["sdtune"], ""))
        elif vt:
            rows.append(("vae (cpu)", "", None, None, None, vt.get("error")))
        ci = results.get(prefix + "class_images", {})
        if "images_per_s" in ci:
            v = ci["images_per_s"]
            rows.append((f"class images ({label})", f"images/s batch {ci['batch_size']} vs 1", v["sdtune"], v["stock"],
                         v["sdtune"] / v["stock"], f"max px diff {ci['max_pixel_difference']}"))
        elif ci:
            rows.append((f"class images ({label})", "", None, None, None, ci.get("error")))
        bk = results.get("buckets") if prefix == "" else None
        if bk and "ratio" in bk:
            runs = bk["runs"]
            one, many = runs["one square bucket"], runs[next(k for k in runs if k != "one square bucket")]
            rows.append(("data (cpu)", f"steps/s, {bk['images']} images in {len(bk['buckets'])} buckets vs 1",
                         many["steps_per_s"], one["steps_per_s"], bk["ratio"], "target: within 5 %"))
        elif bk:
            rows.append(("data (cpu)", "", None, None, None, bk.get("error")))
        ui = results.get("ui") if prefix == "" else None
        if ui and "per_image" in ui:
            v = ui["per_image"]
            rows.append(("web ui (cpu)", f"txt2img CPU s/image UI/engine", v["ui"], v["engine"], v["engine"] / v["ui"],
                         f"overhead {ui['overhead'] * 100:+.1f} % (target within 10 %), max px diff "
                         f"{ui['max_pixel_difference']}"))
            h = ui.get("http", {})
            if "per_image" in h:
                v = h["per_image"]
                rows.append(("web ui (cpu)", "txt2img wall s/image HTTP/engine", v["ui"], v["engine"],
                             v["engine"] / v["ui"], f"overhead {h['overhead'] * 100:+.1f} %; a 1-step request "
                             f"{h['one_step_request_s']:.3f} s (gradio's fixed cost)"))
        elif ui:
            rows.append(("web ui (cpu)", "", None, None, None, ui.get("error")))
        ts = results.get("time_to_subject") if prefix == "" else None
        if ts and "verdict" in ts:
            ours, stock = ts["sdtune"], ts["stock"]
            rows.append(("time to subject", "training s until learned", ours["seconds_to_subject"],
                         stock["seconds_to_subject"],
                         stock["seconds_to_subject"] / ours["seconds_to_subject"]
                         if ours["seconds_to_subject"] and stock["seconds_to_subject"] else None, ts["verdict"]))
            rows.append(("time to subject", "steps until learned", ours["steps_to_subject"], stock["steps_to_subject"],
                         None, f"judged every {ts['every']} steps, {ts['subject']}"))
        elif ts:
            rows.append(("time to subject", "", None, None, None, ts.get("error")))
    return rows


def print_table(results: dict) -> None:
    print(f"\nsdtune vs stock — {results['device']['cpu']}, torch {results['versions']['torch']}, "
          f"diffusers {results['versions']['diffusers']}, {results['date']}{' (--quick)' if results['quick'] else ''}")
    print(f"{'section':22} {'metric':30} {'sdtune':>10} {'stock':>10} {'ratio':>7}  note")
    for sec, metric, ours, stock, ratio, note in _rows(results):
        f = (lambda x: f"{x:10.3f}" if x is not None else f"{'-':>10}")
        r = f"{ratio:7.2f}" if ratio is not None else f"{'-':>7}"
        print(f"{sec:22} {metric:30} {f(ours)} {f(stock)} {r}  {note or ''}")
    print("ratio > 1: sdtune ahead (stock time / sdtune time, or sdtune rate / stock rate)")


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    import diffusers
    import peft
    import torch
    import transformers

    from sdtune.imageio import write_text_atomic
    from sdtune.models.fixtures import tiny_family

    warnings.filterwarnings("ignore", message=".*autocast.*")
    torch.set_num_threads(args.threads)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    results = dict(
        date=_now(), quick=args.quick, argv=sys.argv[1:],
        device=dict(cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(), threads=args.threads,
                    platform=platform.platform(), python=platform.python_version(),
                    cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__,
                      transformers=transformers.__version__, peft=peft.__version__))

    with tempfile.TemporaryDirectory(prefix="sdtune-bench-run-") as tmp:
        scratch = Path(tmp)
        if args.model:
            models = dict(sd1=args.model, inpaint=args.inpaint_model, depth=args.depth_model)
        else:
            models = {k: str(v) for k, v in tiny_family(scratch / "tiny").items()}
        results["models"] = models if args.model else "tiny random fixtures (sdtune.models.fixtures.tiny_family)"
        lora = make_lora(models["sd1"], scratch / "lora")

        if "training" in args.only:
            results["training"] = _guarded("training", lambda: section_training(args, models))
        run_device_sections(args, models, lora, "cpu", scratch, results, "")
        if "buckets" in args.only:
            results["buckets"] = _guarded("buckets", lambda: section_buckets(args, models, scratch))
        if "time_to_subject" in args.only:
            results["time_to_subject"] = _guarded("time to subject", lambda: section_time_to_subject(args, models, scratch))
        if "ui" in args.only:
            results["ui"] = _guarded("ui", lambda: section_ui(args, models, scratch))
        if "vae_tiling" in args.only:
            results["vae_tiling"] = _guarded("vae tiling", lambda: section_vae_tiling(args, models, scratch))
        if "gpu" in args.only and torch.cuda.is_available():
            results["gpu"] = dict(device=torch.cuda.get_device_name(0),
                                  note="training runs on the device accelerate picks (see training section)")
            run_device_sections(args, models, lora, "cuda", scratch, results, "gpu_")
            results["gpu_training"] = _guarded("gpu training", lambda: section_gpu_training(args))
            results["gpu_sdxl_training"] = _guarded("gpu SDXL training", lambda: section_gpu_sdxl_training(args))
        elif "gpu" in args.only:
            results["gpu"] = dict(skipped="skipped: no CUDA")
    results["total_wall_s"] = round(time.perf_counter() - started, 1)

    print_table(results)
    write_text_atomic(args.out, json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out} ({results['total_wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
