"""DreamBooth LoRA on SD 3.x: the recipe's data, prior preservation, caption dropout, caching, checkpoints and
exact resume, with the family's own model and objective.

``sdtune.training.dreambooth.train`` hands a run whose model is SD 3.x (recognised from its config) to ``train_sd3``.
What differs from SD/SDXL:

* the model: the MMDiT ``transformer`` takes the LoRA (peft, through diffusers' ``add_adapter``) on its attention
  projections - ``to_q, to_k, to_v, to_out.0`` of the image stream (and SD 3.5 Medium's second attention);
  ``lora_targets: all`` adds the context stream's ``add_q_proj, add_k_proj, add_v_proj, to_add_out`` and both
  streams' feed-forward layers (``ff``, ``ff_context``). T5 always stays frozen;
* the objective: flow matching (``sdtune.training.flow_matching``) with diffusers' timestep densities and loss
  weightings (``weighting_scheme``, ``logit_mean``, ``logit_std``, ``mode_scale``);
* ``train_text_encoder``: a LoRA on both CLIP encoders' attention (``q_proj, k_proj, v_proj, out_proj``, as
  diffusers' SD3 script), at ``text_encoder_learning_rate``; captions then run through them every step (T5 stays
  frozen, its states cached);
* the conditioning: the stock pipeline's ``encode_prompt`` (CLIP-L + CLIP-G + T5; without T5 with ``no_t5``, or
  when the model folder has none), each distinct caption encoded once while the encoders are frozen; a dropped
  caption (caption dropout) is the encoded empty prompt, exactly what SD3's pipelines feed the unconditional branch;
* the output: ``pytorch_lora_weights.safetensors`` written by ``StableDiffusion3Pipeline.save_lora_weights`` (alpha
  folded into ``lora_B``, the run's metadata added), which stock ``StableDiffusion3Pipeline.load_lora_weights`` (and
  sdtune's engine) read.

Latents are the VAE's ``(x - shift_factor) * scaling_factor``, drawn from cached posteriors (``LatentSource``) as
for SD. Every random draw of a step comes from the step's generator (``dreambooth.step_generator``), so a resumed
run ends with the weights of an uninterrupted one. Not (yet) for SD 3.x, each refused in one line: full fine-tuning
and the other adapters, the identifier embedding, output preservation, the conditional pull, min-SNR and offset
noise (epsilon-schedule notions), EMA, the in-loop evaluation and ``compile``.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import torch

from sdtune.console import SdtuneWarning
from sdtune.errors import SdtuneError
from sdtune.training import checkpointing
from sdtune.training import flow_matching as fm
from sdtune.training import objectives as obj
from sdtune.training.config import TrainConfig, resolve_model

log = logging.getLogger("sdtune.train")

LORA_FILE = "pytorch_lora_weights.safetensors"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CONTEXT = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FEED_FORWARD = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


def lora_target_modules(lora_targets: str) -> list[str]:
    """peft target names for ``lora_targets``: attention (the image stream's projections) or all."""
    return ATTENTION + (CONTEXT + FEED_FORWARD if lora_targets == "all" else [])


def is_sd3_run(cfg: TrainConfig) -> bool:
    """Whether the run's model is SD 3.x, from its config files (a single file's keys)."""
    from sdtune.models.loading import peek_model

    if not cfg.model:
        return False
    try:
        return peek_model(resolve_model(cfg)).sd3
    except SdtuneError:
        return False  # the ordinary path says what is wrong with the source


def check_supported(cfg: TrainConfig) -> None:
    """Refuse, in one line each, what the SD 3.x recipe does not do yet."""
    unsupported = [
        (cfg.method != "lora", "method: full"),
        (cfg.adapter != "lora", f"adapter: {cfg.adapter}"),
        (cfg.train_identifier_embedding, "train_identifier_embedding"),
        (cfg.output_preservation_weight > 0, "output_preservation_weight"),
        (cfg.conditional_pull > 0, "conditional_pull"),
        (cfg.snr_gamma is not None, "snr_gamma (min-SNR is an epsilon-schedule weighting; use weighting_scheme)"),
        (cfg.noise_offset > 0, "noise_offset"),
        (cfg.ema_decay is not None, "ema_decay"),
        (bool(cfg.eval_every), "eval_every"),
        (cfg.compile, "compile"),
    ]
    for bad, what in unsupported:
        if bad:
            raise SdtuneError(f"{what} is not supported for SD 3.x models yet; SD 3.x trains a LoRA on the "
                              "transformer (see docs/sd3.md)")


class SD3Prompts:
    """captions -> (prompt_embeds [N, L, D], pooled [N, P]) by the stock pipeline's ``encode_prompt``; each distinct
    caption encoded once (the encoders are frozen). ``encoder_calls`` counts the encodings."""

    def __init__(self, pipe, device, max_sequence_length: int = 256):
        self.pipe, self.device, self.max_sequence_length = pipe, device, max_sequence_length
        self._cached: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoder_calls = 0

    @torch.no_grad()
    def _one(self, prompt: str):
        self.encoder_calls += 1
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None,
                                                       do_classifier_free_guidance=False, device=self.device,
                                                       max_sequence_length=self.max_sequence_length)
        return embeds, pooled

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for p in prompts:
            if p not in self._cached:
                self._cached[p] = self._one(p)
        embeds = torch.cat([self._cached[p][0] for p in prompts])
        pooled = torch.cat([self._cached[p][1] for p in prompts])
        return embeds, pooled


class TrainedSD3Prompts:
    """captions -> (prompt_embeds, pooled) through the *training* CLIP encoders (``train_text_encoder``: with
    gradients, every step, through the modules accelerate prepared) and T5, frozen and cached per caption: what
    the stock ``encode_prompt`` computes (CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's
    width, then T5's states; both projections as the pooled embedding)."""

    def __init__(self, pipe, text_encoders: list, device, max_sequence_length: int = 256):
        self.pipe, self.text_encoders, self.device = pipe, text_encoders, device
        self.max_sequence_length = max_sequence_length
        self._t5: dict[str, torch.Tensor] = {}
        self.encoder_calls = 0

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pipe = self.pipe
        self.encoder_calls += 1
        hidden, pooled = [], []
        for tokenizer, te in zip((pipe.tokenizer, pipe.tokenizer_2), self.text_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = te(ids.to(self.device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        with torch.no_grad():
            for p in prompts:
                if p not in self._t5:
                    self._t5[p] = pipe._get_t5_prompt_embeds(p, device=self.device,
                                                             max_sequence_length=self.max_sequence_length)
        t5 = torch.cat([self._t5[p] for p in prompts])
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)


def train_sd3(cfg: TrainConfig, scorers=()):
    """The DreamBooth recipe on an SD 3.x model (``dreambooth.train`` calls it inside its output lock)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    from sdtune.models.loading import describe, load_pipeline
    from sdtune.training.caching import LatentSource
    from sdtune.training.class_images import ensure_concept_class_images
    from sdtune.training.data import check_output_dir
    from sdtune.training.dreambooth import TrainResult
    from sdtune.training.optimizers import make_optimizer
    from sdtune.training.run_data import read_data, read_instances
    from sdtune.training.runtime import check_launch, check_resume_matches, register_trainable_only_checkpoints

    check_supported(cfg)
    if scorers:
        raise SdtuneError("likeness scorers (the in-loop evaluation) are not supported for SD 3.x models yet")
    output_dir = check_output_dir(cfg.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision,
                              project_config=ProjectConfiguration(project_dir=str(output_dir)))
    check_launch(accelerator)
    if accelerator.is_main_process:
        checkpointing.remove_partials(output_dir)
    instances = read_instances(cfg)
    if cfg.masked_loss and not any(ex.has_mask for exs in instances for ex in exs) and accelerator.is_main_process:
        warnings.warn("masked_loss is on but no instance image has a mask: every pixel counts, as without it",
                      SdtuneWarning, stacklevel=2)
    resume_from = checkpointing.resolve_resume(cfg.resume, output_dir)
    set_seed(cfg.seed)

    # --- the model: frozen in the run's precision, a LoRA on the transformer in fp32 -------------------------
    model_source = resolve_model(cfg)
    pipe = load_pipeline(model_source, device=accelerator.device, dtype=torch.float32, drop_t5=cfg.no_t5)
    if describe(pipe).family != "sd3":
        raise SdtuneError(f"{model_source} is not an SD 3.x model")
    check_sizes(cfg, pipe)
    pipe.set_progress_bar_config(disable=True)
    class_images = ensure_concept_class_images(cfg, accelerator, pipeline=pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SdtuneWarning)
        data = read_data(cfg, instances, class_images)
    transformer = pipe.transformer
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, transformer):
        if module is not None:
            module.requires_grad_(False)
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, transformer):
        if module is not None:
            module.to(dtype=weight_dtype)
    vae_dtype = torch.float32 if pipe.vae.config.get("force_upcast", True) else weight_dtype
    pipe.vae.to(dtype=vae_dtype)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    add_lora(transformer, cfg)
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if cfg.train_text_encoder else []
    for te in encoders:
        add_clip_lora(te, cfg)

    groups = [{"params": [p for p in transformer.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
    if encoders:
        groups.append({"params": [p for te in encoders for p in te.parameters() if p.requires_grad],
                       "lr": cfg.text_encoder_learning_rate or cfg.learning_rate})
    params = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(cfg, groups, accelerator.device)
    world = accelerator.num_processes
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=cfg.max_steps * world)
    model, *trained_encoders, optimizer, lr_scheduler = accelerator.prepare(transformer, *encoders, optimizer,
                                                                            lr_scheduler)
    register_trainable_only_checkpoints(accelerator, [model, *trained_encoders])

    global_step = 0
    if resume_from is not None:
        check_resume_matches(resume_from, [model, *trained_encoders])
        accelerator.load_state(str(resume_from), strict=False)
        global_step = checkpointing.checkpoint_step(resume_from)
        accelerator.print(f"resumed from {resume_from} at step {global_step}")

    cache_dir = cfg.latent_cache_dir or (output_dir / "latent_cache")
    latents_of = LatentSource(pipe.vae, accelerator.device, vae_dtype, enabled=cfg.cache_latents and cfg.center_crop,
                              cache_dir=cache_dir if cfg.cache_latents else None)
    prompts_of = (TrainedSD3Prompts(pipe, trained_encoders, accelerator.device) if trained_encoders
                  else SD3Prompts(pipe, accelerator.device))
    scheduler = fm.training_scheduler(pipe.scheduler.config)

    result = TrainResult(output_dir=output_dir, global_step=global_step)
    start = time.perf_counter()
    result.global_step = _loop(cfg, accelerator, [model, *trained_encoders], optimizer, lr_scheduler, params, data,
                               latents_of, prompts_of, scheduler, weight_dtype, global_step, result.losses)
    result.loop_s = time.perf_counter() - start

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    te_final = [accelerator.unwrap_model(te) for te in trained_encoders]
    if accelerator.is_main_process:
        save_lora(output_dir, unwrapped, cfg, result.global_step, model_source, *te_final)
        if cfg.validation_prompts:
            final_samples(pipe, cfg, output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result.unet = unwrapped  # the SD3 transformer, with its LoRA
    if te_final:
        result.text_encoder, result.text_encoder_2 = te_final
    result.latent_encodes, result.prompt_encodes = latents_of.encoded_images, prompts_of.encoder_calls
    return result


def check_sizes(cfg: TrainConfig, pipe) -> None:
    """The training sizes (resolution, every bucket's sides) must be multiples of the VAE's factor x the transformer's
    patch size (16 for SD 3.5): the MMDiT cuts latents into patches."""
    from sdtune.training.buckets import parse_buckets

    m = 2 ** (len(pipe.vae.config.block_out_channels) - 1) * int(pipe.transformer.config.patch_size)
    sides = [cfg.resolution] + [v for wh in (parse_buckets(cfg.buckets, cfg.resolution, cfg.bucket_step,
                                                           cfg.max_aspect) or []) for v in wh]
    bad = sorted({s for s in sides if s % m})
    if bad:
        raise SdtuneError(f"SD 3.x trains at sizes that are multiples of {m} (the VAE's factor x the patch size); "
                          f"resolution/buckets give {bad[0]}: change resolution, bucket_step or buckets")


CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # diffusers' SD3 script's text-encoder LoRA


def add_clip_lora(text_encoder, cfg: TrainConfig) -> None:
    """A peft LoRA on a CLIP encoder's attention (``train_text_encoder``), injected in place (transformers' own
    ``add_adapter`` wants peft >= 0.22), trained in fp32."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                       lora_dropout=cfg.lora_dropout, init_lora_weights="gaussian",
                                       target_modules=CLIP_TARGETS), text_encoder)
    for p in text_encoder.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def add_lora(transformer, cfg: TrainConfig) -> None:
    """A peft LoRA on the transformer (diffusers' ``add_adapter``, as its SD3 script), trained in fp32."""
    from peft import LoraConfig

    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, lora_dropout=cfg.lora_dropout,
                        init_lora_weights="gaussian", target_modules=lora_target_modules(cfg.lora_targets))
    transformer.add_adapter(config)
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def _loop(cfg, accelerator, trained, optimizer, lr_scheduler, params, data, latents_of, prompts_of, scheduler,
          weight_dtype, global_step: int, losses: list[float]) -> int:
    from tqdm.auto import tqdm

    from sdtune.training.data import collate
    from sdtune.training.dreambooth import micro_step, step_generator

    rank, world, accum = accelerator.process_index, accelerator.num_processes, cfg.gradient_accumulation_steps
    progress = tqdm(total=cfg.max_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    while global_step < cfg.max_steps:
        total = torch.zeros((), device=accelerator.device)
        for micro in range(accum):
            with accelerator.accumulate(*trained):
                g = micro_step(global_step, micro, rank, world, accum)
                passes = collate(data.micro_batch("instance", g, cfg.train_batch_size),
                                 data.micro_batch("class", g, cfg.train_batch_size) if data.with_prior else ())
                loss = micro_batch_loss(cfg, trained[0], passes, latents_of, prompts_of, scheduler, weight_dtype,
                                        step_generator(cfg.seed, global_step, micro, rank))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        global_step += 1
        mean = float(accelerator.reduce(total, reduction="mean")) / accum
        losses.append(mean)
        progress.update(1)
        progress.set_postfix(loss=f"{mean:.4f}")
        if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and global_step < cfg.max_steps:
            checkpointing.save_checkpoint(accelerator, accelerator.project_dir, global_step, cfg.checkpoints_keep)
    progress.close()
    return global_step


def micro_batch_loss(cfg, model, passes, latents_of, prompts_of, scheduler, weight_dtype,
                     gen: torch.Generator) -> torch.Tensor:
    """The DreamBooth loss of one micro-batch with the flow-matching objective: instance + prior_loss_weight x
    class, each example's MSE to the velocity weighted by ``weighting_scheme`` (and its mask with masked_loss)."""
    from sdtune.training.data import drop_captions

    per_example, is_class = [], []
    for batch in passes:
        x0 = latents_of(batch["pixels"], batch["keys"], gen).float()
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device)
        timesteps, sigmas = fm.sample_sigmas(scheduler, x0.shape[0], cfg, gen)
        prompts = drop_captions(batch["prompts"], batch["is_class"], cfg.caption_dropout, cfg.caption_dropout_on, gen)
        embeds, pooled = prompts_of(prompts)
        noisy = fm.noisy_latents(x0, noise, sigmas)
        pred = model(hidden_states=noisy.to(weight_dtype), timestep=timesteps.to(x0.device),
                     encoder_hidden_states=embeds.to(weight_dtype), pooled_projections=pooled.to(weight_dtype),
                     return_dict=False)[0]
        weight = (obj.mask_weights(batch["masks"], x0.shape[-2:], cfg.masked_loss_floor)
                  if batch["masks"] is not None else None)
        loss = obj.per_example_mse(pred, fm.velocity_target(x0, noise), weight, cfg.masked_loss_mean)
        per_example.append(loss * fm.loss_weights(cfg, sigmas).to(loss.device))
        is_class.append(batch["is_class"])
    total, _, _ = obj.dreambooth_loss(torch.cat(per_example), torch.cat(is_class), cfg.prior_loss_weight)
    return total


def save_lora(output_dir: Path, transformer, cfg: TrainConfig, step: int, base, text_encoder=None,
              text_encoder_2=None) -> Path:
    """The LoRA as diffusers writes SD3 LoRAs (``transformer.`` keys; ``text_encoder.``/``text_encoder_2.`` with
    ``train_text_encoder``), read by stock ``StableDiffusion3Pipeline.load_lora_weights``."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    # The file has no alpha (stock loaders then take alpha = rank): lora_alpha / lora_rank goes into lora_B, so
    # every reader applies the delta the run trained.
    scale = float(cfg.lora_alpha or cfg.lora_rank) / cfg.lora_rank

    def layers(module):
        if module is None:
            return None
        return {k: (v.detach().to("cpu", torch.float32) * (scale if ".lora_B." in k else 1.0)).contiguous()
                for k, v in get_peft_model_state_dict(module).items()}

    StableDiffusion3Pipeline.save_lora_weights(output_dir, transformer_lora_layers=layers(transformer),
                                               text_encoder_lora_layers=layers(text_encoder),
                                               text_encoder_2_lora_layers=layers(text_encoder_2),
                                               safe_serialization=True)
    _add_run_metadata(Path(output_dir) / LORA_FILE, cfg, step)
    (Path(output_dir) / "sdtune_sd3_run.txt").write_text(
        f"sdtune DreamBooth LoRA on SD 3.x\nbase: {base}\nsteps: {step}\nlora_rank: {cfg.lora_rank}\n"
        f"lora_targets: {cfg.lora_targets}\nweighting_scheme: {cfg.weighting_scheme}\nno_t5: {str(cfg.no_t5).lower()}"
        f"{' (use the LoRA with --no-t5)' if cfg.no_t5 else ''}\n")
    return Path(output_dir) / LORA_FILE


def _add_run_metadata(path: Path, cfg: TrainConfig, step: int) -> None:
    """The run's config, base model and step in the file's metadata, as every sdtune weights file carries them
    (``sdtune infer --lora FILE`` then finds the base model by itself); written whole or not at all."""
    import os

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sdtune.training.export import run_metadata

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    metadata.update(run_metadata(cfg, step))
    tmp = path.with_name(path.name + ".partial")
    save_file(load_file(str(path)), str(tmp), metadata=metadata)
    os.replace(tmp, path)


@torch.no_grad()
def final_samples(pipe, cfg: TrainConfig, output_dir: Path) -> list[Path]:
    """``samples/final-i.png``: each validation prompt with the trained LoRA, seeded ``seed``, through the stock
    SD3 pipeline (in-loop validation, ``validation_every``, is not run for SD 3.x yet)."""
    folder = Path(output_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, prompt in enumerate(cfg.validation_prompts):
        image = pipe(prompt, num_inference_steps=cfg.validation_steps, guidance_scale=cfg.validation_guidance,
                     height=cfg.resolution, width=cfg.resolution,
                     generator=torch.Generator("cpu").manual_seed(cfg.seed)).images[0]
        written.append(folder / f"final-{i}.png")
        image.save(written[-1])
    return written
