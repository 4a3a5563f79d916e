"""DreamBooth for Stable Diffusion: learn one subject from 3-5 images, as LoRA or full weights.

    accelerate launch -m sdtune.training.dreambooth CONFIG [key=value ...]   # or train/dreambooth.py in a checkout
    sdtune train CONFIG [key=value ...]                                     # the same, one process

Read top to bottom: config -> data -> model -> adapters/optimizer -> (resume) -> loop -> save. With ``eval_every``
the loop also evaluates the weights it holds and may stop once the subject is learned, and the save keeps the best
step and recommends the settings to use it with (``sdtune.training.watch``). The step itself is
``sdtune.training.step`` (named parts: noise, prediction and target, losses); what trains is set up in
``trainables``, the run around the loop in ``runtime``, the outputs in ``export``.
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

import contextlib
import hashlib
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdtune.console import SdtuneWarning
from sdtune.errors import SdtuneError
from sdtune.models.loading import describe, load_pipeline
from sdtune.training import best, checkpointing, ema, identifier, optimizers
from sdtune.training import sdxl as sdxl_parts
from sdtune.training.caching import LatentSource
from sdtune.training.class_images import ensure_concept_class_images
from sdtune.training.conditioning import make_conditioner
from sdtune.training.config import TrainConfig, concepts_of, config_to_dict, resolve_model
from sdtune.training.data import check_output_dir, collate
from sdtune.training.dry_run import dry_run, format_dry_run  # noqa: F401 - the recipe's API
from sdtune.training.export import export_weights, final_modules, run_metadata, run_validation
from sdtune.training.model_card import write_model_card
from sdtune.training.optimizers import make_optimizer
from sdtune.training.presets import with_native_resolution
from sdtune.training.run_data import read_data, read_instances
from sdtune.training.runtime import (StopRequest, check_launch, check_resume_matches,
                                     register_trainable_only_checkpoints, tracker_config)
from sdtune.training.step import StepModels, micro_batch_losses
from sdtune.training.trainables import param_groups, prepare_models, text_encoder_trains, weight_dtype_of
from sdtune.training.watch import Watch, check_scorers, config_scorers

log = logging.getLogger("sdtune.train")


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step run here
    unet: torch.nn.Module | None = None  # unwrapped; the kept step's weights (keep_best), else the last
    text_encoder: torch.nn.Module | None = None
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second text encoder
    loop_s: float = 0.0  # wall seconds in the training loop of this run (no loading, caching or saving)
    eval_s: float = 0.0  # of which in evaluations (eval_every) and, after the loop, the settings sweep
    evaluation: dict = field(default_factory=dict)  # the kept step, its verdict and the recommended settings
    stopped_early: bool = False  # stop_when_learned ended the run before max_steps
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


# ----------------------------------------------------------------------------- the recipe

def train(cfg: TrainConfig, scorers=()) -> TrainResult:
    """Train as ``cfg`` says; one run per output folder (a second one is refused), a full disk is one line.

    ``scorers``: likeness scorers for the in-loop evaluation besides the config's (``sdtune.training.watch``)."""
    output_dir = check_output_dir(cfg.output_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0  # launchers set RANK; one process is rank 0
    try:
        with checkpointing.output_lock(output_dir, enabled=main_process):
            cfg = with_native_resolution(cfg)
            from sdtune.training.sd3 import is_sd3_run, train_sd3

            if is_sd3_run(cfg):  # SD 3.x: the same recipe with its own model and objective (sdtune.training.sd3)
                return train_sd3(cfg, scorers)
            return _train(cfg, scorers)
    except SdtuneError:
        raise
    except Exception as exc:  # not only OSError: safetensors and torch.save raise their own types for a full disk
        error = checkpointing.disk_error(exc, "the run's outputs", output_dir)
        if error is None:
            raise
        raise error from None


@dataclass
class Run:
    """One run's fixed parts, as the phases of ``_train`` set them up."""
    cfg: TrainConfig
    accelerator: object
    output_dir: Path
    pipe: object = None
    info: object = None  # sdtune.models.loading.ModelInfo of the base model
    sdxl: bool = False
    trained: list = field(default_factory=list)  # the modules accelerate prepared: UNet (+ text encoders)
    optimizer: object = None
    lr_scheduler: object = None
    ema: ema.EMA | None = None  # the moving average of the trained weights (ema_decay)
    watch: Watch | None = None  # evaluations during training (eval_every), the kept step

    def final_text_encoder(self):
        """The text encoder as it trains: the prepared one, or the pipe's own when it is frozen."""
        return self.trained[1] if len(self.trained) > 1 else self.pipe.text_encoder


def _train(cfg: TrainConfig, scorers=()) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    # --- 1. where things go, and the data: checked before any model is loaded ----------------------
    output_dir = check_output_dir(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")))
    check_launch(accelerator)
    if accelerator.is_main_process:
        checkpointing.remove_partials(output_dir)
    run = Run(cfg, accelerator, output_dir)
    instances = read_instances(cfg)  # every image checked (and read once) before any model is loaded
    if cfg.masked_loss and not any(ex.has_mask for exs in instances for ex in exs) and accelerator.is_main_process:
        warnings.warn("masked_loss is on but no instance image has a mask (an alpha channel, or masks/NAME.png in "
                      "its folder): every pixel counts, as without it", SdtuneWarning, stacklevel=2)
    scorers = [*config_scorers(cfg), *scorers] if cfg.eval_every else []
    check_scorers(cfg, scorers)
    resume_from = checkpointing.resolve_resume(cfg.resume, output_dir)
    if resume_from is None and accelerator.is_main_process:
        best.clear_previous(output_dir)
    if cfg.resume == "latest" and resume_from is None and accelerator.is_main_process:
        log.info("resume: latest found no checkpoint in %s; starting from step 0", output_dir)
    set_seed(cfg.seed)  # the initial LoRA weights; identical on every process

    # --- 2. the model, what trains in it, the optimizer; class images ------------------------------
    class_images, vae_dtype = _load_model(run)
    with warnings.catch_warnings():  # checked (and warned about) once, before the model was loaded
        warnings.simplefilter("ignore", SdtuneWarning)
        data = read_data(cfg, instances, class_images)
    step_models = _step_models(run, vae_dtype)

    # --- 3. resume ---------------------------------------------------------------------------------
    global_step = 0
    if resume_from is not None:
        check_resume_matches(resume_from, run.trained)
        ema.check_resume(resume_from, run.ema)
        accelerator.load_state(str(resume_from), strict=False)  # strict=False: checkpoints hold trainables only
        optimizers.after_resume(run.optimizer)  # saved in schedule-free's eval mode, as the run went on after it
        global_step = checkpointing.checkpoint_step(resume_from)
        accelerator.print(f"resumed from {resume_from} at step {global_step}")
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth", config=tracker_config(cfg))
    if cfg.eval_every:
        run.watch = Watch(run, instances, scorers, global_step, lambda step: best.save_best(run, step))
        run.watch.start(global_step)

    # --- 4. the loop -------------------------------------------------------------------------------
    result = TrainResult(output_dir=output_dir, global_step=global_step)
    loop_start = time.perf_counter()
    result.global_step = _loop(run, step_models, data, global_step, result.losses)
    result.loop_s = time.perf_counter() - loop_start
    result.stopped_early = result.global_step < cfg.max_steps

    # --- 5. save: LoRA files or a full pipeline, plus the model card -------------------------------
    _save(run, result)
    result.latent_encodes = step_models.latents_of.encoded_images
    result.prompt_encodes = step_models.condition.encoder_calls
    return result


def _load_model(run: Run) -> tuple[list, torch.dtype]:
    """Load the base model (fp32 master weights, half precision only for what is frozen), set up what trains,
    the optimizer and its schedule, prepared by accelerate. Returns (class images, the VAE's dtype)."""
    from diffusers.optimization import get_scheduler

    cfg, accelerator = run.cfg, run.accelerator
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
    run.pipe, run.info, run.sdxl = pipe, info, info.family == "sdxl"
    if run.sdxl:
        sdxl_parts.check_time_ids_fit(pipe.unet, pipe.text_encoder_2)
    vae_dtype = prepare_models(cfg, pipe, run.sdxl, [c.identifier for c in concepts_of(cfg)])
    if stage_on_cpu:
        pipe.to(accelerator.device)
    if cfg.compile:
        # In place, so parameter names (checkpoints, LoRA export) stay those of the plain module. The
        # first steps pay the compilation (minutes on a CPU); it pays off on long runs only.
        pipe.unet.compile()

    encoders = _text_encoders(run)
    optimizer = make_optimizer(cfg, param_groups(cfg, pipe.unet, encoders), accelerator.device)
    # accelerate steps a prepared schedule once per process per optimizer step, hence the x world.
    world = accelerator.num_processes
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=cfg.max_steps * world)
    models = [pipe.unet] + (encoders if text_encoder_trains(cfg) else [])
    *run.trained, run.optimizer, run.lr_scheduler = accelerator.prepare(*models, optimizer, lr_scheduler)
    register_trainable_only_checkpoints(accelerator, run.trained)
    run.ema = ema.make_ema(cfg, accelerator, [p for g in run.optimizer.param_groups for p in g["params"]])
    return class_images, vae_dtype


def _text_encoders(run: Run) -> list:
    return [run.pipe.text_encoder] + ([run.pipe.text_encoder_2] if run.sdxl else [])


def _step_models(run: Run, vae_dtype: torch.dtype) -> StepModels:
    """What each step reads: the prepared UNet, the conditioner, the latent cache, the noise schedule; with output
    preservation, the base model (adapters off) and a conditioner of its own, cached whatever trains."""
    from diffusers import DDPMScheduler

    cfg, accelerator, pipe = run.cfg, run.accelerator, run.pipe
    weight_dtype, te_trains = weight_dtype_of(cfg), text_encoder_trains(cfg)
    cache_dir = cfg.latent_cache_dir or (run.output_dir / "latent_cache")
    latents_of = LatentSource(pipe.vae, accelerator.device, vae_dtype, enabled=cfg.cache_latents and cfg.center_crop,
                              cache_dir=cache_dir if cfg.cache_latents else None)
    if cfg.cache_latents and not cfg.center_crop and accelerator.is_main_process:
        log.warning("random crops (center_crop: false) give new pixels every step: VAE latents are not cached")
    encoders = run.trained[1:] if te_trains else _text_encoders(run)
    condition = make_conditioner(pipe, encoders, accelerator.device, cache=cfg.cache_latents and not te_trains,
                                 weight_dtype=weight_dtype, sdxl=run.sdxl)
    parts = StepModels(cfg=cfg, unet=run.trained[0], condition=condition, latents_of=latents_of,
                       noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),  # same betas, prediction
                       weight_dtype=weight_dtype, concepts=concepts_of(cfg))
    if cfg.output_preservation_weight > 0:
        parts.base_unet = accelerator.unwrap_model(run.trained[0])
        parts.base_encoders = tuple(_text_encoders(run))
        parts.base_condition = make_conditioner(pipe, list(parts.base_encoders), accelerator.device, cache=True,
                                                weight_dtype=weight_dtype, sdxl=run.sdxl)
    return parts


def _loop(run: Run, m: StepModels, data, global_step: int, losses: list[float]) -> int:
    """Train from ``global_step`` to ``max_steps``; each step's mean loss goes to ``losses``. Returns the last step."""
    from tqdm.auto import tqdm

    cfg, accelerator, optimizer, lr_scheduler = run.cfg, run.accelerator, run.optimizer, run.lr_scheduler
    rank, world, accum = accelerator.process_index, accelerator.num_processes, cfg.gradient_accumulation_steps
    params = [p for g in optimizer.param_groups for p in g["params"]]
    unet, text_encoder = run.trained[0], run.final_text_encoder()
    progress = tqdm(total=cfg.max_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    with StopRequest(enabled=world == 1) as stop:  # the handlers go back however the loop ends
        while global_step < cfg.max_steps:
            sums = torch.zeros(4, device=accelerator.device)  # loss, instance, prior, output preservation
            for micro in range(accum):
                with accelerator.accumulate(*run.trained):
                    g = micro_step(global_step, micro, rank, world, accum)
                    passes = collate(data.micro_batch("instance", g, cfg.train_batch_size),
                                     data.micro_batch("class", g, cfg.train_batch_size) if data.with_prior else ())
                    step_losses = micro_batch_losses(m, passes, step_generator(cfg.seed, global_step, micro, rank))
                    accelerator.backward(step_losses.loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                sums += torch.stack([(t.detach() if t is not None else torch.zeros((), device=sums.device)) for t in
                                     (step_losses.loss, step_losses.instance, step_losses.prior,
                                      step_losses.preservation)])
            global_step += 1
            if run.ema is not None:
                run.ema.update(global_step)

            # watch: every process's mean, logged once
            means = (accelerator.reduce(sums, reduction="mean") / accum).tolist()
            losses.append(means[0])
            logs = {"loss": means[0], "instance_loss": means[1], "lr": lr_scheduler.get_last_lr()[0]}
            if data.with_prior:
                logs["prior_loss"] = means[2]
            if m.base_condition is not None:
                logs["output_preservation_loss"] = means[3]
            accelerator.log(logs, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{means[0]:.4f}")

            if cfg.validation_prompts and cfg.validation_every and global_step % cfg.validation_every == 0:
                with _inference_weights(run):
                    run_validation(cfg, run.pipe, unet, text_encoder, accelerator, global_step, run.output_dir)
            if (cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and global_step < cfg.max_steps
                    or stop.signum is not None):
                with optimizers.eval_mode(optimizer):  # the EMA is saved beside the raw weights, not in them
                    checkpointing.save_checkpoint(accelerator, run.output_dir, global_step, cfg.checkpoints_keep)
            if stop.signum is not None:
                progress.close()
                print(f"sdtune: note: stopped at step {global_step}; saved checkpoint-{global_step} in "
                      f"{run.output_dir} (resume=latest continues from it)", file=sys.stderr, flush=True)
                raise KeyboardInterrupt
            if run.watch is not None and run.watch.due(global_step) and _evaluate(run, global_step):
                accelerator.print(f"sdtune: the subject is learned (stop_when_learned): stopping at step "
                                  f"{global_step} of {cfg.max_steps}")
                break
    progress.close()
    return global_step


def _inference_weights(run: Run) -> contextlib.ExitStack:
    """For a block, the weights validation, evaluation and export use: the EMA's (ema_decay), schedule-free's
    evaluation weights (optimizer: schedulefree), else the trained ones as they are; the trained ones after it."""
    stack = contextlib.ExitStack()
    stack.enter_context(optimizers.eval_mode(run.optimizer))
    stack.enter_context(ema.swapped_in(run.ema))
    return stack


def _evaluate(run: Run, step: int) -> bool:
    """The in-loop evaluation (``Watch.evaluate``) of the inference weights; True: stop now."""
    with _inference_weights(run):
        return run.watch.evaluate(step)


def _use_inference_weights(run: Run) -> None:
    """After the last step, for good: the EMA's weights, or schedule-free's evaluation weights, in the modules; the
    final validation, the export, the last evaluation and the settings sweep use them. With ``ema_export: both`` the
    raw weights are written to OUTPUT_DIR/raw first."""
    cfg, accelerator = run.cfg, run.accelerator
    if run.ema is not None and cfg.ema_export == "both" and accelerator.is_main_process:
        unet, te = accelerator.unwrap_model(run.trained[0]), accelerator.unwrap_model(run.final_text_encoder())
        rows = identifier.current_rows(te) if cfg.train_identifier_embedding else {}
        raw = run.output_dir / "raw"
        raw.mkdir(exist_ok=True)
        export_weights(raw, cfg, run.pipe, run.sdxl, unet, te, rows, {**run_metadata(cfg, run.ema.step),
                                                                        "sdtune_weights": "raw (not the EMA)"})
    if run.ema is not None:
        run.ema.copy_to_params()
    if optimizers.schedule_free(run.optimizer):
        run.optimizer.eval()


def _save(run: Run, result: TrainResult) -> None:
    """The last weights (LoRA files and the identifier's embedding, or a full pipeline): the EMA's with ema_decay,
    schedule-free's evaluation weights with that optimizer; with evaluation, the last one, the kept step's weights
    back in the model and the recommended settings; the model card. Every process waits."""
    cfg, accelerator, pipe, output_dir = run.cfg, run.accelerator, run.pipe, run.output_dir
    unet, text_encoder = run.trained[0], run.final_text_encoder()
    accelerator.wait_for_everyone()
    _use_inference_weights(run)
    unet_final, te_final = final_modules(accelerator, unet, text_encoder, cfg)
    identifier_rows = identifier.detach(te_final) if cfg.train_identifier_embedding else {}  # back into the table
    samples, files = [], []
    if cfg.validation_prompts and accelerator.is_main_process:
        samples = run_validation(cfg, pipe, unet, text_encoder, accelerator, result.global_step, output_dir,
                                 final=True)
    if accelerator.is_main_process:
        files = export_weights(output_dir, cfg, pipe, run.sdxl, unet_final, te_final, identifier_rows,
                               run_metadata(cfg, result.global_step))
    if run.watch is not None:
        result.evaluation = run.watch.finish(result.global_step, lambda step: best.load_best(run, step))
        result.eval_s = run.watch.seconds
        if accelerator.is_main_process:
            best.record_settings(run, result.evaluation)
            for line in best.summary_lines(result.evaluation, output_dir):
                accelerator.print(f"sdtune: {line}")
    if accelerator.is_main_process:
        write_model_card(output_dir, config=config_to_dict(cfg), base_model=str(resolve_model(cfg)),
                         method=cfg.method, steps=result.global_step, family=run.info.family,
                         prediction_type=run.info.prediction_type, files=files, samples=samples,
                         evaluation=result.evaluation)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result.unet, result.text_encoder = unet_final, te_final
    result.text_encoder_2 = pipe.text_encoder_2 if run.sdxl else None


if __name__ == "__main__":  # accelerate launch -m sdtune.training.dreambooth CONFIG [key=value ...]
    from sdtune.training.launch import main

    sys.exit(main())
