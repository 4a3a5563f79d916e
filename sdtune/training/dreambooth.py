"""DreamBooth for Stable Diffusion: learn one subject from 3-5 images, as LoRA or full weights.

    accelerate launch -m sdtune.training.dreambooth CONFIG [key=value ...]   # or train/dreambooth.py in a checkout
    sdtune train CONFIG [key=value ...]                                     # the same, one process

Read top to bottom: config -> data -> model -> adapters/optimizer -> (resume) -> loop -> save.
Each step: a batch of instance examples (+ as many class examples with prior preservation); caption
dropout swaps some prompts for the empty one (so classifier-free guidance keeps working); latents
are noised at random timesteps and the UNet learns the target of the model's own prediction type;
loss = instance loss + prior_loss_weight x class loss. With ``output_preservation_weight`` each instance example is
also run on its class caption (``a photo of a box``), to predict what the base model (adapters off) predicts on the
same noisy latent: + output_preservation_weight x that loss. With ``conditional_pull`` (a base trained with it, as the
embedded family's guidance stage is) each prediction is also pulled toward the model's own unconditional one.

Reproducibility: the data order and every random draw of a step (flips, VAE sample, noise,
timesteps, caption dropout) are functions of (seed, step, micro-step, process), not of a running RNG,
so a run resumed from ``checkpoint-N`` ends with the weights of an uninterrupted run.

SDXL (recognised from the model's config) runs the same loop; its own pieces are in
``sdtune.training.sdxl``: captions through both text encoders (LoRA or training on both when
``train_text_encoder``), the pooled embedding and the six size/crop time ids per example as the UNet's
added conditioning, zeros as the caption-dropout embedding when the model's ``force_zeros_for_empty_prompt``
is set (as SDXL's pipelines use for the unconditional branch), SDXL pipelines for validation and the
full-weights folder, and SDXL's LoRA layouts (diffusers and kohya ``lora_te1_``/``lora_te2_``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdtune.console import SdtuneWarning
from sdtune.errors import LaunchError, SdtuneError
from sdtune.imageio import save_image_atomic
from sdtune.models.loading import describe, load_pipeline
from sdtune.training import adapters, checkpointing, identifier
from sdtune.training import sdxl as sdxl_parts
from sdtune.training import objectives as obj
from sdtune.training.buckets import parse_buckets
from sdtune.training.caching import LatentSource, PromptEncoder
from sdtune.training.class_images import ensure_concept_class_images
from sdtune.training.config import TrainConfig, concepts_of, config_to_dict, min_image_side, resolve_model
from sdtune.training.data import TrainingData, check_output_dir, class_caption, collate, drop_captions
from sdtune.training.model_card import write_model_card
from sdtune.training.sources import Source, read_examples

log = logging.getLogger("sdtune.train")


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step run here
    unet: torch.nn.Module | None = None  # unwrapped, final weights
    text_encoder: torch.nn.Module | None = None
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second text encoder
    loop_s: float = 0.0  # wall seconds in the training loop of this run (no loading, caching or saving)
    latent_encodes: int = 0  # images run through the VAE encoder
    prompt_encodes: int = 0  # text-encoder calls


# ----------------------------------------------------------------------------- randomness and data order

def _seed_of(*parts) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The one CPU generator all random draws of a micro-step come from."""
    return torch.Generator().manual_seed(_seed_of("step", seed, step, micro, rank))


def micro_step(step: int, micro: int, rank: int, world: int, accum: int) -> int:
    """The global index of one process's micro-step: what TrainingData draws the examples of."""
    return (step * accum + micro) * world + rank


def read_instances(cfg: TrainConfig) -> list[list]:
    """Every concept's instance examples, checked (captions, sizes, masks): one list per concept."""
    side = min_image_side(cfg)
    out = []
    for c, concept in enumerate(concepts_of(cfg)):
        what = f"concepts[{c}]" if cfg.concepts else ("instance_dir" if concept.instance_dir else "dataset")
        out.append(read_examples(concept.source, kind="instance", concept=c, default_caption=concept.instance_prompt,
                                 identifier=concept.identifier, caption_prefix=concept.caption_prefix, min_side=side,
                                 what=what, use_captions=cfg.use_captions))
    return out


def read_data(cfg: TrainConfig, instances: list[list], class_images: list[list[Path]]) -> TrainingData:
    """``read_instances``' examples and every concept's class examples, bucketed."""
    side = min_image_side(cfg)
    concepts = concepts_of(cfg)
    instance, klass = [ex for examples in instances for ex in examples], []
    for c, concept in enumerate(concepts):
        if class_images[c]:
            klass += read_examples(Source(instance_dir=concept.class_dir), kind="class", concept=c,
                                   default_caption=concept.class_prompt, min_side=side, what="class_dir",
                                   use_captions=cfg.use_captions)[
                :concept.num_class_images]
    return TrainingData(instance, klass, resolution=cfg.resolution,
                        buckets=parse_buckets(cfg.buckets, cfg.resolution, cfg.bucket_step, cfg.max_aspect),
                        center_crop=cfg.center_crop, random_flip=cfg.random_flip, seed=cfg.seed,
                        repeats=[c.repeats for c in concepts], masked_loss=cfg.masked_loss)


def dry_run(cfg: TrainConfig) -> dict:
    """What ``train(cfg)`` would do, without training: the resolved config, every image found (size, bucket,
    caption), class images still to generate, steps and epochs, and the trainable parameter count."""
    from sdtune.training.class_images import missing_class_indices

    concepts = concepts_of(cfg)
    buckets = parse_buckets(cfg.buckets, cfg.resolution, cfg.bucket_step, cfg.max_aspect)
    report = {"config": config_to_dict(cfg), "model": resolve_model(cfg), "concepts": []}
    data = None
    for concept, examples in zip(concepts, read_instances(cfg)):
        data = TrainingData(examples, resolution=cfg.resolution, buckets=buckets, center_crop=cfg.center_crop)
        class_todo = (len(missing_class_indices(Path(concept.class_dir).expanduser(), concept.num_class_images))
                      if cfg.with_prior_preservation else 0)
        report["concepts"].append({
            "source": concept.source.name, "instance_prompt": concept.instance_prompt, "repeats": concept.repeats,
            "images": [{"name": e.name, "size": list(e.size), "bucket": list(data.bucket_of(e)), "caption": e.caption,
                        "mask": mask_shown(e) if cfg.masked_loss else None,
                        # what output preservation says of the plain class instead (a caption's first line)
                        "class_caption": class_caption(e.caption.splitlines()[0] if e.caption else
                                                       concept.instance_prompt, concept.instance_prompt,
                                                       concept.class_prompt, concept.identifier)
                        if cfg.output_preservation_weight else None} for e in examples],
            "class_prompt": concept.class_prompt if cfg.with_prior_preservation else None,
            "class_prompts": list(concept.class_prompts or ()) if cfg.with_prior_preservation else [],
            "class_dir": concept.class_dir if cfg.with_prior_preservation else None,
            "class_images_to_generate": class_todo})
    stream = sum(len(c["images"]) * c["repeats"] for c in report["concepts"])
    report["steps"] = {"max_steps": cfg.max_steps, "batch": cfg.train_batch_size,
                       "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                       "instance_examples_per_epoch": stream,
                       "epochs": round(cfg.max_steps * cfg.train_batch_size * cfg.gradient_accumulation_steps / stream, 1)}
    pipe = load_pipeline(report["model"], device="cpu", dtype=torch.float32)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if describe(pipe).family == "sdxl" else [])
    if cfg.method == "lora":
        for te in encoders:  # frozen as in training: only adapters (and the identifier's rows) count
            te.requires_grad_(False)
        adapters.add_unet_lora(pipe.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        if cfg.train_text_encoder:
            for te in encoders:
                adapters.add_text_encoder_lora(te, cfg.lora_rank, cfg.lora_alpha)
        if cfg.train_identifier_embedding and len(encoders) == 1:  # counted with the text encoder's parameters
            identifier.attach(pipe.text_encoder, pipe.tokenizer, [c.identifier for c in concepts])
    else:
        pipe.unet.requires_grad_(True)
        for te in encoders:
            te.requires_grad_(cfg.train_text_encoder)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    report["trainable_parameters"] = {"unet": count(pipe.unet), "text_encoder": sum(
        count(te) for te in encoders) if text_encoder_trains(cfg) else 0}
    return report


def mask_shown(example) -> str | None:
    """Where an instance image's masked_loss mask comes from, for the dry run."""
    if example.mask_data is not None:
        return f"masks/{Path(example.name).stem}.png"
    return "alpha" if example.has_alpha else None


def format_dry_run(report: dict) -> str:
    import yaml

    lines = ["resolved config:"]
    lines += ["  " + ln for ln in yaml.safe_dump(report["config"], sort_keys=True).splitlines()]
    lines.append(f"model: {report['model']}")
    for i, c in enumerate(report["concepts"]):
        lines.append(f"concept {i}: {c['source']} - {len(c['images'])} image(s) x {c['repeats']} repeat(s), "
                     f"prompt '{c['instance_prompt']}'")
        for e in c["images"]:
            mask = f"  mask: {e['mask']}" if e.get("mask") else ""
            kept = f"  output preservation on '{e['class_caption']}'" if e.get("class_caption") else ""
            lines.append(f"  {e['name']}  {e['size'][0]}x{e['size'][1]} -> bucket {e['bucket'][0]}x{e['bucket'][1]}  "
                         f"'{e['caption']}'{mask}{kept}")
        if c["class_prompt"]:
            drawn = (f"drawn from {len(c['class_prompts'])} class prompts ('{c['class_prompts'][0]}', ...)"
                     if c.get("class_prompts") else f"'{c['class_prompt']}'")
            lines.append(f"  class images: {drawn} in {c['class_dir']}, "
                         f"{c['class_images_to_generate']} still to generate")
    s = report["steps"]
    lines.append(f"steps: {s['max_steps']} x batch {s['batch']} x accumulation {s['gradient_accumulation_steps']} = "
                 f"{s['epochs']} epochs of {s['instance_examples_per_epoch']} instance examples")
    tp = report["trainable_parameters"]
    lines.append(f"trainable parameters: UNet {tp['unet']:,}, text encoder {tp['text_encoder']:,}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- building blocks

def make_optimizer(cfg: TrainConfig, param_groups: list[dict], device: torch.device):
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise SdtuneError("optimizer adamw8bit (bitsandbytes) runs on CUDA GPUs only; use optimizer: adamw")
        try:
            import bitsandbytes as bnb  # lazy: a CUDA-only dependency
        except ImportError:
            raise SdtuneError("optimizer adamw8bit needs bitsandbytes; pip install 'sdtune[cuda]' "
                              "or use optimizer: adamw") from None
        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    # The fused kernel updates all parameters in one pass: a LoRA has hundreds of small tensors, and
    # the per-tensor loop of the default implementation costs ~7% of a small model's CPU step.
    return torch.optim.AdamW(param_groups, fused=device.type in ("cpu", "cuda"), **kwargs)


def text_encoder_trains(cfg: TrainConfig) -> bool:
    """Whether the text encoder has trainable weights: its LoRA (``train_text_encoder``), or only the identifier's
    embedding rows (``train_identifier_embedding`` alone: pivotal tuning with every other word frozen)."""
    return cfg.train_text_encoder or (cfg.method == "lora" and cfg.train_identifier_embedding)


def check_launch(accelerator) -> None:
    """Refuse a launch that accelerate quietly ran as something else than asked.

    On a machine without GPUs, accelerate 1.15 turns ``accelerate launch --num_processes 2`` into two separate
    single-process runs (each would write the same output_dir), and an FSDP or DeepSpeed config into plain
    data parallelism (it sets FSDP and DeepSpeed up for GPU-like devices only). Both are said in one line.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes == 1:
        raise LaunchError(f"launched as {launched} processes, but accelerate runs each one alone (no GPU found); on "
                          "CPUs set ACCELERATE_USE_CPU=true for data parallelism on gloo, or launch one process")
    for flag, kind, name in (("ACCELERATE_USE_FSDP", "FSDP", "FSDP"),
                             ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED", "DeepSpeed")):
        asked = os.environ.get(flag, "false").lower() == "true"
        if asked and accelerator.distributed_type.name != kind:
            raise LaunchError(f"the accelerate config asks for {name}, but accelerate runs it only on GPUs (here it "
                              f"would run as {accelerator.distributed_type.name}); use "
                              "configs/accelerate/multi_gpu.yaml on CPUs, or run on GPUs")


def register_trainable_only_checkpoints(accelerator, models: list[torch.nn.Module]) -> None:
    """Checkpoints hold only trainable weights (a LoRA checkpoint is MBs, not the whole UNet).

    Plain DDP/single-device only; DeepSpeed and FSDP shard and save their own way.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return

    def save_hook(hook_models, weights, output_dir):
        for i, model in enumerate(hook_models):
            keep = {n for n, p in model.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    accelerator.register_save_state_pre_hook(save_hook)


def check_resume_matches(path: Path, trained: list[torch.nn.Module]) -> None:
    """A checkpoint holds exactly the trainable weights of the run that wrote it; refuse any other run's."""
    from safetensors import safe_open

    error = SdtuneError(f"checkpoint {path} was written by a run with other trainable weights (method, lora_rank "
                        "or train_text_encoder differ); resume with that run's config or use a new output_dir")
    if (path / f"model_{len(trained)}.safetensors").is_file():  # it trained more models than this run does
        raise error
    for i, model in enumerate(trained):
        weights = path / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not weights.is_file():
            continue  # DeepSpeed/FSDP write their own formats and check them themselves
        with safe_open(str(weights), framework="pt") as f:
            saved = set(f.keys())
        if saved != {n for n, p in model.named_parameters() if p.requires_grad}:
            raise error


def validation_images(cfg: TrainConfig, pipe, unet, text_encoder, accelerator) -> list:
    """Sample every validation prompt from the current weights with a stock pipeline, fixed seed."""
    from diffusers import StableDiffusionPipeline

    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: its second encoder is trained in place
        sampler = sdxl_parts.sdxl_pipeline(pipe, unet, text_encoder, pipe.text_encoder_2)
    else:
        sampler = StableDiffusionPipeline(vae=pipe.vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer,
                                          unet=unet, scheduler=pipe.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    sampler.set_progress_bar_config(disable=True)
    images = []
    with torch.no_grad(), accelerator.autocast():
        for k, prompt in enumerate(cfg.validation_prompts):
            generator = torch.Generator("cpu").manual_seed(cfg.seed + k)
            images += sampler(prompt, num_inference_steps=cfg.validation_steps, guidance_scale=cfg.validation_guidance,
                              height=cfg.resolution, width=cfg.resolution, generator=generator).images
    return images


def save_full_pipeline(output_dir: Path, pipe, unet, text_encoder, metadata: dict[str, str]) -> None:
    """Write a complete diffusers folder into ``output_dir``: built aside, moved in, model_index.json last."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import save_file

    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: a complete SDXL folder, both encoders
        final = sdxl_parts.sdxl_pipeline(pipe, unet, text_encoder, pipe.text_encoder_2)
    else:
        final = StableDiffusionPipeline(vae=pipe.vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                                        scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    scratch = Path(tempfile.mkdtemp(prefix=".pipeline-", suffix=".partial", dir=output_dir))
    try:
        final.save_pretrained(scratch, safe_serialization=True)
        for weights in scratch.glob("*/*.safetensors"):  # the training config rides in every weights file
            with safe_open(str(weights), framework="pt") as f:
                meta = {**(f.metadata() or {}), **metadata}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            save_file(tensors, str(weights), metadata=meta)
        entries = sorted(scratch.iterdir(), key=lambda p: p.name == "model_index.json")
        for entry in entries:
            target = output_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def final_modules(accelerator, unet, text_encoder, cfg: TrainConfig):
    """The trained modules with full weights, on every process.

    Under DDP the unwrapped module is complete. FSDP (and DeepSpeed ZeRO-3) shard parameters, so
    the full state dict is gathered (a collective: all processes call it) into fresh copies.
    (Sharded paths follow accelerate's documented API; CI runs DDP only.)
    """
    from accelerate.utils import DistributedType

    unet_m, te_m = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED) or cfg.method != "full":
        return unet_m, te_m
    unet_state = accelerator.get_state_dict(unet)
    te_state = accelerator.get_state_dict(text_encoder) if cfg.train_text_encoder else None
    if accelerator.is_main_process:
        fresh = type(unet_m).from_config(unet_m.config)
        fresh.load_state_dict(unet_state)
        unet_m = fresh
        if te_state is not None:
            te_fresh = type(te_m)(te_m.config)
            te_fresh.load_state_dict(te_state)
            te_m = te_fresh
    return unet_m, te_m


class StopRequest:
    """Stop = checkpoint, then stop: SIGINT/SIGTERM during the loop (one process, main thread only) lets the
    current step finish, saves ``checkpoint-N`` and raises KeyboardInterrupt (``resume=latest`` continues).
    A second signal interrupts at once. (``sdtune ui``'s Stop button sends SIGINT; so does Ctrl-C.)"""

    def __init__(self, enabled: bool):
        import signal
        import threading

        self.signum, self._previous = None, {}
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        import signal

        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def tracker_config(cfg: TrainConfig) -> dict:
    # TensorBoard hparams take scalars and strings only.
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in config_to_dict(cfg).items()}


# ----------------------------------------------------------------------------- the recipe

def train(cfg: TrainConfig) -> TrainResult:
    """Train as ``cfg`` says; one run per output folder (a second one is refused), a full disk is one line."""
    output_dir = check_output_dir(cfg.output_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0  # launchers set RANK; one process is rank 0
    try:
        with checkpointing.output_lock(output_dir, enabled=main_process):
            return _train(cfg)
    except SdtuneError:
        raise
    except Exception as exc:  # not only OSError: safetensors and torch.save raise their own types for a full disk
        error = checkpointing.disk_error(exc, "the run's outputs", output_dir)
        if error is None:
            raise
        raise error from None


def _train(cfg: TrainConfig) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    # --- where things go; checked before any work -------------------------------------------------
    output_dir = check_output_dir(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")))
    rank, world = accelerator.process_index, accelerator.num_processes
    check_launch(accelerator)
    if accelerator.is_main_process:
        checkpointing.remove_partials(output_dir)
    concepts = concepts_of(cfg)
    identifiers = [c.identifier for c in concepts]  # the words whose embedding rows train_identifier_embedding trains
    instances = read_instances(cfg)  # every image checked (and read once) before any model is loaded
    if cfg.masked_loss and not any(ex.has_mask for exs in instances for ex in exs) and accelerator.is_main_process:
        warnings.warn("masked_loss is on but no instance image has a mask (an alpha channel, or masks/NAME.png in "
                      "its folder): every pixel counts, as without it", SdtuneWarning, stacklevel=2)
    resume_from = checkpointing.resolve_resume(cfg.resume, output_dir)
    if cfg.resume == "latest" and resume_from is None and accelerator.is_main_process:
        log.info("resume: latest found no checkpoint in %s; starting from step 0", output_dir)
    set_seed(cfg.seed)  # the initial LoRA weights; identical on every process

    # --- the base model: fp32 master weights, half precision only for what is frozen ---------------
    model_source = resolve_model(cfg)
    # A half-precision LoRA run on a GPU stages the model on the CPU: the frozen weights are cast before they
    # reach the GPU, so its memory never holds their fp32 copy (SDXL's UNet alone is 10 GB in fp32).
    stage_on_cpu = (accelerator.device.type == "cuda" and cfg.method == "lora"
                    and cfg.mixed_precision in ("fp16", "bf16"))
    pipe = load_pipeline(model_source, device="cpu" if stage_on_cpu else accelerator.device, dtype=torch.float32)
    info = describe(pipe)
    if info.mode != "txt2img":
        raise SdtuneError(f"DreamBooth trains a text-to-image model, but {model_source} is an {info.mode} model "
                          f"({info.unet_in_channels}-channel UNet); pass its text-to-image base model")
    # Staged on the CPU: class images (if any are missing) get their own half-precision copy on the GPU.
    class_images = ensure_concept_class_images(cfg, accelerator, pipeline=None if stage_on_cpu else pipe)
    vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    sdxl = info.family == "sdxl"
    text_encoder_2 = pipe.text_encoder_2 if sdxl else None
    if sdxl:
        sdxl_parts.check_time_ids_fit(unet, text_encoder_2)
    text_encoders = [text_encoder] + ([text_encoder_2] if sdxl else [])
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # same betas and prediction_type
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    te_trains = text_encoder_trains(cfg)  # a LoRA on it, or the identifier's embedding rows alone

    half = weight_dtype != torch.float32
    # SDXL's VAE overflows in fp16 (its config says force_upcast, as the SDXL pipelines honour): keep it fp32.
    vae_dtype = torch.float32 if sdxl and vae.config.get("force_upcast", False) else weight_dtype
    vae.requires_grad_(False)
    for te in text_encoders:
        te.requires_grad_(False)
    if half:
        vae.to(dtype=vae_dtype)
        if cfg.method == "lora" or not cfg.train_text_encoder:
            for te in text_encoders:
                te.to(dtype=weight_dtype)
    if cfg.method == "lora":
        if half:
            unet.to(dtype=weight_dtype)  # frozen base in half precision; the adapters stay fp32 below
        adapters.add_unet_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        if cfg.train_text_encoder:
            for te in text_encoders:
                adapters.add_text_encoder_lora(te, cfg.lora_rank, cfg.lora_alpha)
        if cfg.train_identifier_embedding:  # the identifier's own embedding rows (pivotal tuning)
            if sdxl:
                raise SdtuneError("train_identifier_embedding works with SD 1.x/2.x models so far, not SDXL; "
                                  "set train_identifier_embedding: false")
            identifier.attach(text_encoder, tokenizer, identifiers)
        cast_training_params([unet, *text_encoders] if te_trains else [unet], dtype=torch.float32)
    else:
        unet.requires_grad_(True)
        for te in text_encoders:
            te.requires_grad_(cfg.train_text_encoder)
    if sdxl and cfg.train_text_encoder:
        sdxl_parts.freeze_unread_layers(text_encoder)  # SDXL reads its penultimate layer only
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if te_trains:
            for te in text_encoders:
                te.gradient_checkpointing_enable()
    unet.train()
    for te in text_encoders:
        te.train(te_trains)
    if stage_on_cpu:
        pipe.to(accelerator.device)
    if cfg.compile:
        # In place, so parameter names (checkpoints, LoRA export) stay those of the plain module. The
        # first steps pay the compilation (minutes on a CPU); it pays off on long runs only.
        unet.compile()

    # --- optimizer, lr schedule, processes ---------------------------------------------------------
    groups = [{"params": adapters.trainable_parameters(unet), "lr": cfg.learning_rate}]
    if te_trains:
        rows = identifier.rows_of(text_encoder)
        rows = [rows.identifier_rows] if rows is not None else []
        lora_params = [p for te in text_encoders for p in adapters.trainable_parameters(te)
                       if not any(p is r for r in rows)]
        if lora_params:
            groups.append({"params": lora_params, "lr": cfg.text_encoder_learning_rate or cfg.learning_rate})
        if rows:  # no weight decay: it would pull the identifier towards the zero vector, not towards a word
            groups.append({"params": rows, "lr": cfg.identifier_learning_rate or cfg.learning_rate,
                           "weight_decay": 0.0})
    optimizer = make_optimizer(cfg, groups, accelerator.device)
    # accelerate steps a prepared schedule once per process per optimizer step, hence the x world.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=cfg.max_steps * world)
    if te_trains and sdxl:
        unet, text_encoder, text_encoder_2, optimizer, lr_scheduler = accelerator.prepare(
            unet, text_encoder, text_encoder_2, optimizer, lr_scheduler)
        trained = [unet, text_encoder, text_encoder_2]
    elif te_trains:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
        trained = [unet, text_encoder]
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        trained = [unet]
    register_trainable_only_checkpoints(accelerator, trained)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    # --- data and the caches that skip repeated VAE / text-encoder work ----------------------------
    with warnings.catch_warnings():  # checked (and warned about) once, before the model was loaded
        warnings.simplefilter("ignore", SdtuneWarning)
        data = read_data(cfg, instances, class_images)
    cache_dir = cfg.latent_cache_dir or (output_dir / "latent_cache")
    latents_of = LatentSource(vae, accelerator.device, vae_dtype, enabled=cfg.cache_latents and cfg.center_crop,
                              cache_dir=cache_dir if cfg.cache_latents else None)
    if sdxl:  # both encoders, pooled embedding; zeros for dropped captions when the model says so
        encode = sdxl_parts.XLPromptEncoder(
            [tokenizer, pipe.tokenizer_2], [text_encoder, text_encoder_2], accelerator.device,
            cache=cfg.cache_latents and not te_trains,
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)))
    else:
        encode = PromptEncoder(tokenizer, text_encoder, accelerator.device,
                               cache=cfg.cache_latents and not te_trains)
    # Output preservation's targets: the base model (adapters off) on the class captions. Its text encodings never
    # change, so they are cached whatever trains.
    preserve = cfg.output_preservation_weight > 0
    unet_base = accelerator.unwrap_model(unet)
    encoders_base = [accelerator.unwrap_model(te) for te in text_encoders]
    if preserve and sdxl:
        encode_base = sdxl_parts.XLPromptEncoder(
            [tokenizer, pipe.tokenizer_2], encoders_base, accelerator.device, cache=True,
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)))
    elif preserve:
        encode_base = PromptEncoder(tokenizer, encoders_base[0], accelerator.device, cache=True)
    if cfg.cache_latents and not cfg.center_crop and accelerator.is_main_process:
        log.warning("random crops (center_crop: false) give new pixels every step: VAE latents are not cached")

    # --- resume ------------------------------------------------------------------------------------
    global_step = 0
    if resume_from is not None:
        check_resume_matches(resume_from, trained)
        accelerator.load_state(str(resume_from), strict=False)  # strict=False: checkpoints hold trainables only
        global_step = checkpointing.checkpoint_step(resume_from)
        accelerator.print(f"resumed from {resume_from} at step {global_step}")
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth", config=tracker_config(cfg))

    # --- the loop ----------------------------------------------------------------------------------
    result = TrainResult(output_dir=output_dir, global_step=global_step)
    progress = tqdm(total=cfg.max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    with_prior = data.with_prior
    loop_start = time.perf_counter()
    with StopRequest(enabled=world == 1) as stop:  # the handlers go back however the loop ends
        while global_step < cfg.max_steps:
            # loss, instance loss, prior loss, output-preservation loss over micro-steps
            sums = torch.zeros(4, device=accelerator.device)
            for micro in range(cfg.gradient_accumulation_steps):
                with accelerator.accumulate(*trained):
                    gen = step_generator(cfg.seed, global_step, micro, rank)
                    g = micro_step(global_step, micro, rank, world, cfg.gradient_accumulation_steps)
                    passes = collate(data.micro_batch("instance", g, cfg.train_batch_size),
                                     data.micro_batch("class", g, cfg.train_batch_size) if with_prior else ())
                    per_example, is_class, weights, preserved = [], [], [], []
                    for batch in passes:  # one pass, or two when the class examples are in another bucket
                        n = len(batch["prompts"])
                        latents = latents_of(batch["pixels"], batch["keys"], gen).float()
                        noise = obj.sample_noise(latents, gen, cfg.noise_offset)
                        timesteps = obj.sample_timesteps(n, noise_scheduler.config.num_train_timesteps, gen,
                                                         latents.device)
                        prompts = drop_captions(batch["prompts"], batch["is_class"], cfg.caption_dropout,
                                                cfg.caption_dropout_on, gen)
                        noisy = obj.add_noise(noise_scheduler, latents, noise, timesteps)
                        time_ids = batch["time_ids"]
                        # Output preservation: each instance example once more, on its class caption, in the same
                        # forward pass; its target is the base model's prediction, computed first (adapters off).
                        keep = [i for i in range(n) if preserve and not batch["is_class"][i]]
                        if keep:
                            class_captions = [class_caption(batch["prompts"][i], concepts[c].instance_prompt,
                                                            concepts[c].class_prompt, concepts[c].identifier)
                                              for i, c in ((i, batch["concepts"][i]) for i in keep)]
                            with torch.no_grad(), adapters.disabled(unet_base, *encoders_base):
                                base_extra = {}
                                if sdxl:
                                    base_embeddings, base_pooled = encode_base(class_captions)
                                    base_extra["added_cond_kwargs"] = sdxl_parts.added_cond(
                                        base_pooled, time_ids[keep], weight_dtype)
                                else:
                                    base_embeddings = encode_base(class_captions)
                                base_pred = unet_base(noisy[keep].to(weight_dtype), timesteps[keep],
                                                      base_embeddings.to(weight_dtype), return_dict=False,
                                                      **base_extra)[0]
                            prompts = prompts + class_captions
                            time_ids = torch.cat([time_ids, time_ids[keep]])
                            noisy_in, t_in = torch.cat([noisy, noisy[keep]]), torch.cat([timesteps, timesteps[keep]])
                        else:
                            noisy_in, t_in = noisy, timesteps
                        extra = {}
                        if sdxl:
                            embeddings, pooled = encode(prompts)
                            extra["added_cond_kwargs"] = sdxl_parts.added_cond(pooled, time_ids, weight_dtype)
                        else:
                            embeddings = encode(prompts)

                        pred = unet(noisy_in.to(weight_dtype), t_in, embeddings.to(weight_dtype), return_dict=False,
                                    **extra)[0]
                        if keep:
                            pred, pred_class = pred[:n], pred[n:]
                            preserved.append(obj.per_example_mse(pred_class, base_pred))
                        target = obj.training_target(noise_scheduler, latents, noise, timesteps)
                        weight = (obj.mask_weights(batch["masks"], latents.shape[-2:], cfg.masked_loss_floor)
                                  if batch["masks"] is not None else None)
                        example_loss = obj.per_example_mse(pred, target, weight, cfg.masked_loss_mean)
                        if cfg.conditional_pull:
                            # the base's own objective (conditional_pull): also toward the model's unconditional
                            # prediction on the same x_t, which is a target here, not a path for gradients
                            with torch.no_grad():
                                if sdxl:
                                    empty, empty_pooled = encode([""] * n)
                                    empty_extra = {"added_cond_kwargs": sdxl_parts.added_cond(
                                        empty_pooled, batch["time_ids"], weight_dtype)}
                                else:
                                    empty, empty_extra = encode([""] * n), {}
                                uncond = unet(noisy.to(weight_dtype), timesteps, empty.to(weight_dtype),
                                              return_dict=False, **empty_extra)[0]
                            example_loss = example_loss + cfg.conditional_pull * obj.per_example_mse(
                                pred, uncond, weight, cfg.masked_loss_mean)
                        per_example.append(example_loss)
                        is_class.append(batch["is_class"])
                        if cfg.snr_gamma:
                            weights.append(obj.min_snr_weights(obj.snr(noise_scheduler, timesteps), cfg.snr_gamma,
                                                               noise_scheduler.config.prediction_type))
                    loss, instance_loss, prior_loss = obj.dreambooth_loss(
                        torch.cat(per_example), torch.cat(is_class), cfg.prior_loss_weight,
                        torch.cat(weights) if weights else None)
                    preservation_loss = torch.cat(preserved).mean() if preserved else None
                    if preservation_loss is not None:
                        loss = loss + cfg.output_preservation_weight * preservation_loss

                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                zero = torch.zeros((), device=loss.device)
                prior = prior_loss.detach() if prior_loss is not None else zero
                kept = preservation_loss.detach() if preservation_loss is not None else zero
                sums += torch.stack([loss.detach(), instance_loss.detach(), prior, kept])
            global_step += 1

            # --- watch: every process's mean, logged once ------------------------------------------------
            means = (accelerator.reduce(sums, reduction="mean") / cfg.gradient_accumulation_steps).tolist()
            result.losses.append(means[0])
            logs = {"loss": means[0], "instance_loss": means[1], "lr": lr_scheduler.get_last_lr()[0]}
            if with_prior:
                logs["prior_loss"] = means[2]
            if preserve:
                logs["output_preservation_loss"] = means[3]
            accelerator.log(logs, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{means[0]:.4f}")

            if cfg.validation_prompts and cfg.validation_every and global_step % cfg.validation_every == 0:
                run_validation(cfg, pipe, unet, text_encoder, accelerator, global_step, output_dir)
            if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and global_step < cfg.max_steps:
                checkpointing.save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_keep)
            elif stop.signum is not None:
                checkpointing.save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_keep)
            if stop.signum is not None:
                progress.close()
                print(f"sdtune: note: stopped at step {global_step}; saved checkpoint-{global_step} in {output_dir} "
                      "(resume=latest continues from it)", file=sys.stderr, flush=True)
                raise KeyboardInterrupt
    progress.close()
    result.loop_s = time.perf_counter() - loop_start

    # --- save: LoRA files or a full pipeline, plus the model card ----------------------------------
    accelerator.wait_for_everyone()
    unet_final, te_final = final_modules(accelerator, unet, text_encoder, cfg)
    identifier_rows = identifier.detach(te_final) if cfg.train_identifier_embedding else {}  # back into the table
    samples = []
    if cfg.validation_prompts and accelerator.is_main_process:
        samples = run_validation(cfg, pipe, unet, text_encoder, accelerator, global_step, output_dir, final=True)
    if accelerator.is_main_process:
        config = config_to_dict(cfg)
        metadata = {**adapters.config_metadata(config), "sdtune_base_model": str(model_source),
                    "sdtune_steps": str(global_step)}
        te2_final = pipe.text_encoder_2 if sdxl and cfg.train_text_encoder else None  # trained in place
        if cfg.method == "lora":
            # Before the LoRA file, which the engine finds first: a LoRA file present has its embedding beside it.
            if identifier_rows:
                identifier.save(output_dir, identifier_rows, tokenizer, identifiers, metadata)
            else:  # an earlier run's embedding in this folder would be loaded with this run's LoRA
                (output_dir / identifier.IDENTIFIER_FILE).unlink(missing_ok=True)
            files = adapters.save_lora_files(output_dir, unet_final, te_final if cfg.train_text_encoder else None,
                                             te2_final, rank=cfg.lora_rank, alpha=cfg.lora_alpha or cfg.lora_rank,
                                             metadata=metadata, sdxl=sdxl)
            files += [identifier.IDENTIFIER_FILE] if identifier_rows else []
        else:
            save_full_pipeline(output_dir, pipe, unet_final, te_final, metadata)
            files = ["model_index.json", "unet/", "text_encoder/", "vae/", "tokenizer/", "scheduler/"]
            if sdxl:
                files[3:3] = ["text_encoder_2/", "tokenizer_2/"]
        write_model_card(output_dir, config=config, base_model=str(model_source), method=cfg.method,
                         steps=global_step, family=info.family, prediction_type=info.prediction_type,
                         files=files, samples=samples)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result.global_step = global_step
    result.unet, result.text_encoder = unet_final, te_final
    result.text_encoder_2 = pipe.text_encoder_2 if sdxl else None
    result.latent_encodes, result.prompt_encodes = latents_of.encoded_images, encode.encoder_calls
    return result


def run_validation(cfg, pipe, unet, text_encoder, accelerator, step, output_dir, final=False) -> list[str]:
    """Main process: sample, save to output_dir/samples, log to TensorBoard; others wait."""
    names = []
    if accelerator.is_main_process:
        import numpy as np

        unet_m, te_m = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
        was_training = unet_m.training
        unet_m.eval()
        images = validation_images(cfg, pipe, unet_m, te_m, accelerator)
        unet_m.train(was_training)
        for k, image in enumerate(images):
            name = f"samples/{'final' if final else f'step-{step:06d}'}-{k}.png"
            save_image_atomic(image, output_dir / name)
            names.append(name)
        tracker = accelerator.get_tracker("tensorboard", unwrap=True)
        if images and tracker is not None and hasattr(tracker, "add_images"):
            tracker.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
    accelerator.wait_for_everyone()
    return names


if __name__ == "__main__":  # accelerate launch -m sdtune.training.dreambooth CONFIG [key=value ...]
    from sdtune.training.launch import main

    sys.exit(main())
