"""Training speed and memory: sdtune's DreamBooth recipe vs the stock loop, LoRA and full.

Three runs per method, each the same steps on the same data and model (same seed) in its own process,
so peak RSS is that run's own: ``on`` = sdtune (latents and prompt embeddings cached, fused AdamW),
``off`` = sdtune with ``cache_latents: false`` (what caching alone buys), ``stock`` = diffusers'
example-script loop (bench/stock_dreambooth.py: images decoded, VAE and text encoder run every step).
With ``--compile`` a fourth, ``compile`` = sdtune with ``compile: true``, run with an empty inductor
cache so its ``first_step_s`` holds the whole one-off compilation a first run pays.

    python bench/bench_training.py --quick          # tiny random model, 32 px (CI-sized)
    python bench/bench_training.py --model PATH --resolution 64 --steps 30
    python bench/bench_training.py --sdxl tiny --resolution 32 --steps 4     # SDXL plumbing on a CPU
    python bench/bench_training.py --sdxl full --resolution 1024 --mixed-precision fp16 \
        --gradient-checkpointing --optimizer adamw8bit                       # SDXL at full size (CUDA)

SDXL (``--sdxl``): a random model of SDXL's architecture (``full``: UNet 2.6B, both text encoders) or the tiny
test fixture (``tiny``), against ``bench/stock_dreambooth_sdxl.py`` (diffusers' SDXL DreamBooth LoRA loop,
text embeddings pre-computed as that script does for frozen encoders); LoRA only.

The data: 4 subject + 4 class images, no flips, batch 1 (+1 class example). steps/s is measured over
the steps after the first ``--warmup`` (default 4 = one epoch, during which the cached run encodes
every image once; after it, it never runs the VAE encoder again): that is the steady state of a
run of hundreds of steps. The total wall time, including warm-up, loading and saving, is printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    /proc's VmHWM where there is one: it starts afresh at exec, whereas ru_maxrss carries over the
    forking parent's size (a child started from a 1 GB benchmark process would report 1 GB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    """One configuration: train, print {"steps_per_s", "wall_s", "peak_rss_mb", ...} as JSON."""
    import numpy as np
    import torch
    from accelerate import Accelerator

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "train"))
    sys.path.insert(0, str(ROOT / "bench"))
    import dreambooth

    from sdtune.training.config import config_from_dict

    stamps = []
    original_log = Accelerator.log

    def timed_log(self, values, step=None, log_kwargs=None):  # called once per optimizer step
        stamps.append((time.perf_counter(), time.process_time()))
        return original_log(self, values, step=step, log_kwargs=log_kwargs or {})

    Accelerator.log = timed_log
    from PIL import Image

    work = Path(args.work)
    if args.cache == "compile":  # a cold compile: what a user's first run pays (later runs hit the cache)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-{args.method}")
    lr = 1e-4 if args.method == "lora" else 1e-5
    start = time.perf_counter()  # first_step_s = loading + the first step (+ compiling)
    if args.cache == "stock" and args.sdxl != "none":  # diffusers' SDXL example loop
        import stock_dreambooth_sdxl

        losses = stock_dreambooth_sdxl.train_stock_sdxl(
            args.model, work / "subject", "a photo of sks box", work / "class", "a photo of a box",
            args.resolution, args.batch, args.warmup + args.steps, lr, seed=0,
            mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
            use_8bit_adam=args.optimizer == "adamw8bit",
            on_step=lambda step, loss: stamps.append((time.perf_counter(), time.process_time())))
        latent_encodes, prompt_encodes = 2 * args.batch * (args.warmup + args.steps), 2
    elif args.cache == "stock":  # diffusers' example-script loop (bench/stock_dreambooth.py)
        import stock_dreambooth

        losses = stock_dreambooth.train_stock(
            args.model, work / "subject", "a photo of sks box", work / "class", "a photo of a box", args.method,
            args.resolution, args.batch, args.warmup + args.steps, lr, seed=0,
            mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
            use_8bit_adam=args.optimizer == "adamw8bit",
            on_step=lambda step, loss: stamps.append((time.perf_counter(), time.process_time())))
        latent_encodes = prompt_encodes = 2 * args.batch * (args.warmup + args.steps)
    else:
        cfg = config_from_dict(dict(
            model=args.model, instance_dir=str(work / "subject"), instance_prompt="a photo of sks box",
            with_prior_preservation=True, class_prompt="a photo of a box", class_dir=str(work / "class"),
            num_class_images=4, caption_dropout=0.1, method=args.method, resolution=args.resolution,
            train_batch_size=args.batch, max_steps=args.warmup + args.steps, learning_rate=lr,
            random_flip=False, cache_latents=args.cache != "off", compile=args.cache == "compile",
            output_dir=str(work / f"out-{args.method}-{args.cache}"),
            mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
            optimizer=args.optimizer, seed=0))
        result = dreambooth.train(cfg)
        losses, latent_encodes, prompt_encodes = result.losses, result.latent_encodes, result.prompt_encodes
    wall = time.perf_counter() - start
    steady = stamps[args.warmup:]
    n = len(steady) - 1
    steps_per_s = n / (steady[-1][0] - steady[0][0]) if n > 0 else float("nan")
    # CPU seconds per step of this process: on a shared machine far steadier than wall time.
    cpu_ms = 1000 * (steady[-1][1] - steady[0][1]) / n if n > 0 else float("nan")
    print(json.dumps({"method": args.method, "cache": args.cache, "steps_per_s": steps_per_s, "cpu_ms_per_step": cpu_ms,
                      "wall_s": wall, "first_step_s": stamps[0][0] - start,
                      "peak_rss_mb": peak_rss_mb(),
                      "peak_vram_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
                      "vae_encoded_images": latent_encodes, "text_encoder_calls": prompt_encodes,
                      "final_loss": float(np.mean(losses[-3:]))}))
    del Image


def save_sd_shaped(out: Path, full_size: bool = False) -> Path:
    """A random pipeline with Stable Diffusion's layout at a quarter of its width.

    The tiny test fixtures have a 2-block VAE that costs next to nothing, which would hide exactly the
    work caching removes. Here the VAE (4 blocks, downsampling 8) and the UNet (4 levels, 2 layers per
    block, cross-attention in 3) keep SD 1.5's proportions, so VAE-vs-UNet cost ratios resemble it.
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from sdtune.models.fixtures import tiny_scheduler, tiny_text_encoder, tiny_tokenizer

    torch.manual_seed(0)
    w = 4 if full_size else 1  # full size: SD 1.5's own widths (UNet 860M, VAE 84M, CLIP ViT-L/14 text 123M)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=tuple(c * w for c in (32, 64, 128, 128)), layers_per_block=2,
                        norm_num_groups=32)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=tuple(c * w for c in (80, 160, 320, 320)),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768 if full_size else 192,
        attention_head_dim=8, norm_num_groups=32 if full_size else 16)
    if full_size:
        from transformers import CLIPTextConfig, CLIPTextModel

        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                          bos_token_id=49406, eos_token_id=49407, hidden_act="quick_gelu"))
    else:
        te = tiny_text_encoder(hidden=192)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tiny_tokenizer(), unet=unet,
                                   scheduler=tiny_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def save_sdxl_shaped(out: Path, full_size: bool = True) -> Path:
    """A random pipeline with SDXL base 1.0's exact architecture (``full_size``) or the tiny SDXL test fixture.

    Full size: UNet 2.6B (320/640/1280 channels, 1/2/10 transformer layers, cross-attention 2048, text_time
    conditioning 2816), the 4-block VAE with force_upcast, CLIP ViT-L (768) and OpenCLIP bigG (1280, 32 layers,
    projection 1280) text encoders; written in fp16 (the recipe loads it in fp32 master weights).
    """
    import torch

    from sdtune.models.fixtures import tiny_sdxl_pipeline, tiny_sdxl_scheduler, tiny_sdxl_tokenizer_2, tiny_tokenizer

    if not full_size:
        tiny_sdxl_pipeline("sdxl").save_pretrained(out, safe_serialization=True)
        return out
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of 3.5B weights: on the GPU
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                            sample_size=1024, scaling_factor=0.13025, force_upcast=True)
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                           bos_token_id=49406, eos_token_id=49407, hidden_act="quick_gelu"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407, hidden_act="gelu",
            projection_dim=1280))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tiny_tokenizer(),
                                     tokenizer_2=tiny_sdxl_tokenizer_2(), unet=unet, scheduler=tiny_sdxl_scheduler(),
                                     add_watermarker=False)
    pipe.to(dtype=torch.float16).save_pretrained(out, safe_serialization=True)
    return out


def make_data(work: Path, resolution: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for kind, n in (("subject", 4), ("class", 4)):
        (work / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = rng.integers(0, 255, (resolution + 8, resolution + 4, 3), dtype=np.uint8)
            Image.fromarray(a).save(work / kind / f"{i}.png")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 px, 8 timed steps")
    p.add_argument("--model", help="diffusers folder (default: a random SD-shaped model at quarter width)")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps; 4 = one epoch, the cache is full after it")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing shared CPUs)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"))
    p.add_argument("--sd15-full-size", action="store_true",
                   help="a random model with SD 1.5's exact architecture (860M UNet) instead of the quarter-width one")
    p.add_argument("--sdxl", default="none", choices=("none", "tiny", "full"),
                   help="SDXL: a random model of SDXL's architecture (full) or the tiny fixture; LoRA vs the SDXL "
                        "example loop")
    p.add_argument("--compile", action="store_true",
                   help="also time sdtune with compile: true (torch.compile; minutes of one-off compilation)")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "CACHE"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(args, methods=("lora", "full"), echo=True) -> list[dict]:
    """Each (method, cache on/off) run in its own process; return one dict of figures per run."""
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-") as tmp:
        work = Path(tmp)
        if args.model is None and args.sdxl != "none":
            args.model = str(save_sdxl_shaped(work / "sdxl-shaped", full_size=args.sdxl == "full"))
        elif args.model is None:
            args.model = str(save_sd_shaped(work / "sd-shaped", full_size=args.sd15_full_size))
        make_data(work, args.resolution)
        rows = []
        for method in methods:
            for cache in ("on", "off", "stock") + (("compile",) if args.compile else ()):
                cmd = [sys.executable, __file__, "--child", method, cache, "--work", str(work), "--model", args.model,
                       "--resolution", str(args.resolution), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--batch", str(args.batch), "--threads", str(args.threads),
                       "--mixed-precision", args.mixed_precision, "--optimizer", args.optimizer, "--sdxl", args.sdxl]
                cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"training child {method}/{cache} failed:\n{proc.stderr[-3000:]}")
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                if echo:
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        args.method, args.cache = args.child
        child(args)
        return 0
    if args.quick:
        args.steps, args.resolution = 8, 64

    methods = ("lora",) if args.sdxl != "none" else ("lora", "full")
    try:
        rows = measure(args, methods=methods)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1

    shaped = {"none": "random SD-1.5-shaped, quarter width", "tiny": "tiny random SDXL",
              "full": "random SDXL architecture"}[args.sdxl]
    print(f"\nmodel {args.model if not args.model.startswith(tempfile.gettempdir()) else shaped}, "
          f"{args.resolution} px, batch {args.batch} (+{args.batch} class), {args.steps} timed steps, "
          f"{args.threads} threads, on = sdtune, off = sdtune without caching, stock = example-script loop")
    print(f"{'method':6} {'cache':5} {'steps/s':>8} {'CPU ms/step':>12} {'wall s':>7} {'peak RSS MB':>12} "
          f"{'VAE imgs':>9} {'TE calls':>9}")
    for r in rows:
        print(f"{r['method']:6} {r['cache']:5} {r['steps_per_s']:8.2f} {r['cpu_ms_per_step']:12.0f} {r['wall_s']:7.1f} "
              f"{r['peak_rss_mb']:12.0f} "
              f"{r['vae_encoded_images']:9d} {r['text_encoder_calls']:9d}")
    for method in methods:
        on = next(r for r in rows if r["method"] == method and r["cache"] == "on")
        off = next(r for r in rows if r["method"] == method and r["cache"] == "off")
        stock = next(r for r in rows if r["method"] == method and r["cache"] == "stock")
        print(f"{method}: vs stock x{on['steps_per_s'] / stock['steps_per_s']:.2f} steps/s (wall), "
              f"x{stock['cpu_ms_per_step'] / on['cpu_ms_per_step']:.2f} CPU time per step, "
              f"peak RSS ratio (sdtune/stock) {on['peak_rss_mb'] / stock['peak_rss_mb']:.2f}; "
              f"caching alone x{off['cpu_ms_per_step'] / on['cpu_ms_per_step']:.2f} CPU time per step")
        comp = next((r for r in rows if r["method"] == method and r["cache"] == "compile"), None)
        if comp is not None:
            print(f"{method} compiled: vs stock x{stock['cpu_ms_per_step'] / comp['cpu_ms_per_step']:.2f} CPU time per "
                  f"step; compiling cost {comp['first_step_s'] - on['first_step_s']:.0f} s once "
                  f"(first step {comp['first_step_s']:.1f} s vs {on['first_step_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
