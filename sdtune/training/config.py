"""The DreamBooth training configuration: one YAML file plus ``key=value`` overrides, validated up front.

Every key is declared once, as a field of ``TrainConfig``: its type and default, and in the field's metadata
(as peft's ``LoraConfig``) its help, group, range or choices (see ``_key``). ``validate`` reads those declarations
(types, finite numbers, choices, ranges); only the rules between keys are written out there. ``format_keys_help``
prints them all (``sdtune train --help-keys``). The keys marked ``concept`` make up a ``Concept``, one subject of a
several-subject run (``concepts``): a key a concept leaves out is the run's.

``load_config`` reads the YAML (a safe loader that also refuses a key written twice), applies the overrides
(``sdtune.overrides.parse_override``, the parser of every command: each value is parsed as YAML too, so
``max_steps=10``, ``validation_prompts=[a, b]`` and ``resume=latest`` mean what they look like, while prompts and
paths stay the text written), checks everything, and only then returns - so a typo costs a second, not an hour of
class-image generation. Every problem is one ``SdtuneError`` line.

Relative paths (``instance_dir``, ``class_dir``, ``output_dir``, ``model``, ``resume``) are relative to the
current working directory, as in diffusers' and kohya's scripts - not to the config file's folder.
``model: null`` means the embedded base model shipped with sdtune (see ``resolve_model``); ``resolution: null`` the
model's native size, which the recipe fills in from the model's config before training.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sdtune import overrides
from sdtune.errors import SdtuneError
from sdtune.training.key_types import Range, coerce_buckets, coerce_interval, coerce_numbers
from sdtune.yamlfile import read_yaml

METHODS = ("lora", "full")
# The adapters method: lora trains, all through peft (sdtune.training.adapter_kinds says how each is built and saved).
ADAPTERS = ("lora", "loha", "lokr", "dora", "oft")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "schedulefree", "lion")
# The optimizers of the [optimizers] extra: the module each needs (sdtune.training.optimizers builds them).
OPTIONAL_OPTIMIZERS = {"prodigy": "prodigyopt", "schedulefree": "schedulefree", "lion": "lion_pytorch"}
EMA_EXPORTS = ("ema", "both")
LORA_TARGETS = ("attention", "all")
CAPTION_DROPOUT_ON = ("all", "class")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")  # SD 3.x (diffusers' SD3 script)
MASKED_LOSS_MEANS = ("weights", "pixels")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
# The schedule names diffusers.optimization.get_scheduler accepts (piecewise_constant needs extra rules).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


# ----------------------------------------------------------------------------------------------- declaring keys

GROUPS = ("data source", "prior preservation", "adapter: what trains", "images", "loss", "optimisation",
          "validation and checkpoints", "evaluation and selection")


def _key(group: str, default: Any = dataclasses.MISSING, *, help: str, range: str | None = None,
         multiple_of: int | None = None, choices: Sequence[str] | None = None, note: str = "", concept: bool = False,
         path: bool = False, required: str | None = None, coerce=None, kind: str | None = None, factory=None):
    """A ``TrainConfig`` field with everything about its key in its metadata (as peft's ``LoraConfig``):

    ``help`` (shown by ``format_keys_help`` and the web UI), ``range`` (``Range``'s forms) or ``choices``, ``note``
    (added to the range's error: "0 = off"), ``concept`` (a concept of a several-subject run may set it too),
    ``path`` (a file or folder: a YAML number is its name), ``required`` (a blank value is refused, with this hint),
    ``coerce`` (the key's own parser, for keys that are not one plain type) and ``kind`` (its type in words then).
    """
    metadata = {"group": group, "help": help, "range": Range(range, multiple_of) if range else None,
                "choices": tuple(choices) if choices else None, "note": note, "concept": concept, "path": path,
                "required": required, "coerce": coerce, "kind": kind}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _group(title: str):
    assert title in GROUPS, title
    return lambda *args, **kw: _key(title, *args, **kw)


SOURCE, PRIOR, ADAPTER, IMAGES, LOSS, OPTIM, WATCH, EVAL = (_group(g) for g in GROUPS)


@dataclass
class TrainConfig:
    """All settings of a DreamBooth run. Field names are the YAML keys; each field's metadata says the rest
    (``format_keys_help`` prints it)."""

    # --- what to learn from (one subject here, or several under `concepts`) ---
    model: str | None = SOURCE(None, path=True, help="the base model: a diffusers folder, a .safetensors file or a "
                               "hub id; null: the embedded base model shipped with sdtune")
    instance_dir: str = SOURCE("", path=True, concept=True, help="a folder of 3-5 photos of the subject, optionally "
                               "with <name>.txt captions (several lines: variants) or metadata.jsonl/.csv")
    dataset: str | None = SOURCE(None, path=True, concept=True,
                                 help="instead of instance_dir: a saved dataset folder or a hub dataset id")
    split: str = SOURCE("train", concept=True, help="the dataset's split")
    image_column: str = SOURCE("image", concept=True, help="the dataset's image column")
    caption_column: str | None = SOURCE(None, concept=True, help="the caption column; null: text or caption when "
                                        "the source has one, else instance_prompt")
    instance_prompt: str = SOURCE("", concept=True, help="the prompt with the rare identifier, e.g. 'a photo of sks "
                                  "dog'; per-image captions replace it")
    identifier: str | None = SOURCE(None, concept=True, help="the rare token (sks): captions without it are flagged "
                                    "(pivotal tuning trains its embedding)")
    caption_prefix: str | None = SOURCE(None, concept=True, help="added to captions that lack the identifier "
                                        "('a photo of sks dog,') instead of flagging them")
    use_captions: bool = SOURCE(True, help="false: ignore .txt captions and caption columns; every image trains on "
                                "its prompt")
    concepts: list | None = SOURCE(None, coerce=lambda where, v: _coerce_concepts(v), kind="a list of mappings",
                                   help="several subjects in one run: a list of mappings of the keys marked "
                                   "[concept]; a key a concept leaves out is the run's")
    repeats: int = SOURCE(1, concept=True, range=">= 1", help="how often a concept's images count per epoch against "
                          "the other concepts' (kohya's folder repeats)")
    # --- prior preservation ---
    with_prior_preservation: bool = PRIOR(False, help="also train on class images of the class prompt, so the class "
                                          "keeps its meaning (DreamBooth's prior-preservation loss)")
    class_prompt: str | None = PRIOR(None, concept=True, help="the class images' prompt, e.g. 'a photo of a dog'")
    # Varied class prompts: class image i is drawn from class_prompts[i % n] and keeps its prompt as its caption
    # (class_i.txt), so the prior also holds the context words the captions use.
    class_prompts: list[str] | None = PRIOR(None, concept=True, help="varied class prompts ('a photo of a dog on a "
                                            "beach', ...): class image i is drawn from class_prompts[i % n] and keeps "
                                            "it as its caption")
    class_dir: str | None = PRIOR(None, path=True, concept=True, help="the class images' folder; missing ones (up to "
                                  "num_class_images) are generated into it")
    num_class_images: int = PRIOR(100, concept=True, range=">= 1", help="how many class images prior preservation "
                                  "uses")
    prior_loss_weight: float = PRIOR(1.0, range=">= 0", help="the class images' share of the loss")
    # ai-toolkit's differential output preservation; LoRA only; costs one more UNet pass.
    output_preservation_weight: float = LOSS(0.0, range=">= 0", note="0 = off, 1 is usual", help="on each instance "
                                             "image, the class prompt must predict what the base model (LoRA off) "
                                             "predicts: teaches the class word on the subject's own images; LoRA "
                                             "only, one more UNet pass")
    # The base's own objective (the embedded family's guidance stage): + p x the distance between each prediction
    # and the model's own unconditional one (not differentiated), so the guidance the base is sampled at still suits.
    conditional_pull: float = LOSS(0.0, range=">= 0", note="0 = off", help="fine-tune with the base's own guidance "
                                   "objective: + this x the distance to the model's own unconditional prediction "
                                   "(the embedded family); one more UNet pass without gradients")
    class_generation_steps: int = PRIOR(50, range=">= 1", help="sampler steps per generated class image")
    class_generation_guidance: float = PRIOR(7.5, range=">= 0", help="guidance scale of the generated class images")
    class_generation_batch_size: int = PRIOR(4, range=">= 1", help="class images generated per batch")
    # --- unconditional-caption dropout (keeps classifier-free guidance working) ---
    caption_dropout: float = LOSS(0.1, range="[0, 1)", note="0.1 is typical", help="the share of examples trained on "
                                  "the empty prompt, which keeps classifier-free guidance working")
    caption_dropout_on: str = LOSS("all", choices=CAPTION_DROPOUT_ON, help="which examples may train on '': all "
                                   "(kohya's caption_dropout_rate) or only the class images, so the empty prompt "
                                   "learns the class prior and never the subject")
    # --- what to train ---
    method: str = ADAPTER("lora", choices=METHODS, help="lora: a LoRA adapter; full: fine-tune the whole UNet")
    adapter: str = ADAPTER("lora", choices=ADAPTERS, help="with method: lora, which adapter trains (peft's): lora; "
                           "loha (LyCORIS' Hadamard product); lokr (Kronecker product); dora (LoRA with a learned "
                           "magnitude); oft (an orthogonal rotation of each weight)")
    lora_rank: int = ADAPTER(4, range=">= 1", help="the adapter's rank (lora, dora, loha, lokr; oft: see "
                             "oft_block_size)")
    lora_alpha: float | None = ADAPTER(None, range="> 0", note="or null for lora_rank",
                                       help="the adapter's alpha (lora, dora, loha, lokr); null: lora_rank (scale 1)")
    lora_dropout: float = ADAPTER(0.0, range="[0, 1)", help="dropout on the adapter's input (lora, dora)")
    rank_dropout: float = ADAPTER(0.0, range="[0, 1)", help="dropout of whole ranks while training (loha, lokr)")
    module_dropout: float = ADAPTER(0.0, range="[0, 1)", help="the chance a whole module's adapter is skipped in a "
                                    "training step (loha, lokr, oft)")
    lokr_factor: int = ADAPTER(-1, range=">= -1", note="-1: as balanced as the sizes allow",
                               help="lokr: the Kronecker factor the weight's sides are split by (LyCORIS' factor)")
    lokr_decompose_both: bool = ADAPTER(False, help="lokr: also make the small Kronecker factor low-rank")
    oft_block_size: int = ADAPTER(32, range=">= 1", help="oft: the side of each orthogonal block; it must divide "
                                  "every targeted layer's input size (smaller: fewer parameters, less change)")
    oft_coft: bool = ADAPTER(False, help="oft: constrained OFT, which keeps each rotation within oft_eps of the "
                             "identity")
    oft_eps: float = ADAPTER(6e-5, range="> 0", help="oft with oft_coft: how far a rotation may move")
    lora_targets: str = ADAPTER("attention", choices=LORA_TARGETS, help="attention: the q/k/v/out projections "
                                "(diffusers' scripts); all: also feed-forward and the ResNet convolutions (kohya's "
                                "LoCon), which reach textures attention cannot")
    train_text_encoder: bool = ADAPTER(False, help="also train the text encoder (a LoRA on it, or all of it with "
                                       "method: full)")
    train_identifier_embedding: bool = ADAPTER(False, help="also train the identifier's own token embedding (pivotal "
                                               "tuning; LoRA, SD 1.x/2.x); without train_text_encoder no other "
                                               "word's meaning moves")
    # --- data ---
    resolution: int | None = IMAGES(None, range="> 0", multiple_of=8, note="e.g. 512; null: the model's native size",
                                    help="the training size in pixels; null (the default): the model's native size "
                                    "(its UNet's sample size x the VAE's scale factor), read before training")
    center_crop: bool = IMAGES(True, help="center crops; false: random crops")
    buckets: Any = IMAGES(None, coerce=coerce_buckets, kind="null, auto or a list of [width, height]",
                          help="null: square crops at resolution; auto, or [[w, h], ...]: aspect-ratio buckets")
    bucket_step: int | None = IMAGES(None, range=">= 8", multiple_of=8, note="one that divides resolution",
                                     help="bucket sides move in this many pixels; null: resolution / 8")
    max_aspect: float = IMAGES(2.0, range=">= 1", note="2 allows 2:1 and 1:2", help="the widest bucket of auto")
    random_flip: bool = IMAGES(False, help="mirror half of the examples")
    masked_loss: bool = LOSS(False, help="weigh each instance image's loss by its mask: masks/NAME.png in its folder, "
                             "else its alpha channel (kohya's masked loss); images without one count everywhere")
    masked_loss_floor: float = LOSS(0.1, range="[0, 1]", note="0: the background is not learned at all",
                                    help="the weight of the pixels outside the mask")
    masked_loss_mean: str = LOSS("weights", choices=MASKED_LOSS_MEANS, help="the masked loss divided by the mask's "
                                 "weights (each example keeps its scale) or by the pixel count (kohya's)")
    min_image_fraction: float = IMAGES(0.25, range="[0, 1]", note="0 accepts any size", help="images whose shorter "
                                       "side is below this share of resolution are refused, not upscaled into mush")
    dataloader_num_workers: int = IMAGES(0, range=">= 0", help="processes that prepare batches (0: this one)")
    cache_latents: bool = IMAGES(True, help="compute VAE latents and prompt embeddings once while they are frozen")
    latent_cache_dir: str | None = IMAGES(None, path=True, help="where latents persist between runs; null: "
                                          "OUTPUT_DIR/latent_cache")
    # --- optimisation ---
    train_batch_size: int = OPTIM(1, range=">= 1", help="examples per micro-step (and as many class images)")
    gradient_accumulation_steps: int = OPTIM(1, range=">= 1", help="micro-steps per optimiser step")
    max_steps: int = OPTIM(400, range=">= 1", help="optimiser steps")
    learning_rate: float = OPTIM(1e-4, range="> 0", help="the UNet's (or its LoRA's) learning rate")
    text_encoder_learning_rate: float | None = OPTIM(None, range="> 0", note="or null",
                                                     help="the text encoder's; null: learning_rate")
    identifier_learning_rate: float | None = OPTIM(None, range="> 0", note="or null",
                                                   help="the identifier's embedding's; null: learning_rate")
    lr_scheduler: str = OPTIM("constant", choices=LR_SCHEDULERS, help="the learning-rate schedule (diffusers' names)")
    lr_warmup_steps: int = OPTIM(0, range=">= 0", help="steps of linear warm-up")
    optimizer: str = OPTIM("adamw", choices=OPTIMIZERS, help="adamw; adamw8bit (CUDA and bitsandbytes); prodigy "
                           "(finds its own step size: learning_rate 1); adafactor (transformers'; factored second "
                           "moments, less memory); schedulefree (AdamW without a schedule: lr_scheduler constant, its "
                           "averaged weights are validated and exported); lion (sign updates: learning_rate 3-10x "
                           "smaller than AdamW's). prodigy, schedulefree, lion: pip install 'sdtune[optimizers]'")
    optimizer_args: dict | None = OPTIM(None, coerce=lambda where, v: _coerce_optimizer_args(where, v),
                                        kind="null or a mapping of argument: value",
                                        help="more constructor arguments of the optimizer (kohya's optimizer_args), "
                                        "e.g. {d0: 1.0e-5, growth_rate: 1.02} for prodigy; names are checked against "
                                        "its constructor, values are numbers, true/false, strings or lists of "
                                        "numbers; what a key below sets (lr, betas, eps, weight_decay...) is set there")
    adam_beta1: float = OPTIM(0.9, range="[0, 1)", help="beta1 of adamw, adamw8bit, prodigy and schedulefree (its "
                              "interpolation between the average and the last iterate)")
    adam_beta2: float = OPTIM(0.999, range="[0, 1)", help="beta2 of adamw, adamw8bit, prodigy and schedulefree")
    adam_weight_decay: float = OPTIM(1e-2, range=">= 0", help="the (decoupled) weight decay of every optimizer; "
                                     "lion's is usually 3-10x AdamW's, as its learning rate is that much smaller")
    adam_epsilon: float = OPTIM(1e-8, range="> 0", help="epsilon of adamw, adamw8bit, prodigy and schedulefree")
    prodigy_d_coef: float = OPTIM(1.0, range="> 0", help="prodigy: scales the step size it finds (0.5: half); "
                                  "change this, not learning_rate, to make its steps smaller or larger")
    prodigy_use_bias_correction: bool = OPTIM(True, help="prodigy: Adam's bias correction (as diffusers' DreamBooth "
                                              "scripts set it; prodigyopt's own default is false)")
    prodigy_safeguard_warmup: bool = OPTIM(True, help="prodigy: leave the learning rate out of its step-size "
                                           "estimate, which keeps the estimate sane during lr_warmup_steps "
                                           "(diffusers' scripts set it)")
    schedulefree_warmup_steps: int = OPTIM(0, range=">= 0", help="schedulefree: steps of linear warm-up (it takes "
                                           "no lr_scheduler, so no lr_warmup_steps either); 5-10% of max_steps is "
                                           "usual")
    lion_beta1: float = OPTIM(0.9, range="[0, 1)", help="lion: the momentum the update's sign is taken of (its usual "
                              "0.9)")
    lion_beta2: float = OPTIM(0.99, range="[0, 1)", help="lion: the momentum kept between steps (its usual 0.99, "
                              "not AdamW's 0.999)")
    ema_decay: float | None = OPTIM(None, range="(0, 1)", note="0.999 is usual for long runs, 0.99 for a few hundred "
                                    "steps; or null", help="keep an exponential moving average of the trained weights "
                                    "(LoRA or full), with this decay: validation, the evaluation and the export use "
                                    "it; null: off")
    ema_warmup: bool = OPTIM(True, help="with ema_decay, the decay at the t-th averaged step is min(ema_decay, "
                             "(1 + t) / (10 + t)) (diffusers' EMAModel's), so a short run's average is not held at "
                             "its first weights; false: ema_decay from the first step")
    ema_update_after_step: int = OPTIM(0, range=">= 0", help="with ema_decay, the average copies the weights up to "
                                       "this step and averages after it")
    ema_export: str = OPTIM("ema", choices=EMA_EXPORTS, help="with ema_decay, what the run exports: ema (the "
                            "average, in the usual place) or both (the last raw weights also, in OUTPUT_DIR/raw)")
    max_grad_norm: float = OPTIM(1.0, range="> 0", help="gradients are clipped to this norm")
    mixed_precision: str = OPTIM("no", choices=MIXED_PRECISIONS, help="no, fp16 or bf16 autocast")
    gradient_checkpointing: bool = OPTIM(False, help="recompute activations in the backward pass: less memory, "
                                         "slower steps")
    compile: bool = OPTIM(False, help="torch.compile the UNet: ~1.3x per CPU step once compiled, after minutes of "
                          "compiling")
    snr_gamma: float | None = LOSS(None, range="> 0", note="5.0 is usual, or null for off",
                                   help="min-SNR loss weighting; null: off")
    noise_offset: float = LOSS(0.0, range=">= 0", note="0.05 is usual", help="offset noise, for darker darks and "
                               "brighter brights; 0: off")
    # SD 3.x only (flow matching, sdtune.training.flow_matching); defaults as diffusers' train_dreambooth_lora_sd3.py
    weighting_scheme: str = LOSS("none", choices=WEIGHTING_SCHEMES, help="SD 3.x: the timestep density and loss "
                                 "weighting (diffusers' SD3 script): none draws sigmas uniformly and weighs every one "
                                 "alike; logit_normal and mode draw them from those densities; cosmap and sigma_sqrt "
                                 "weigh the loss")
    logit_mean: float = LOSS(0.0, range="[-10, 10]", help="SD 3.x, weighting_scheme logit_normal: the normal's mean")
    logit_std: float = LOSS(1.0, range="> 0", help="SD 3.x, weighting_scheme logit_normal: the normal's std")
    mode_scale: float = LOSS(1.29, range=">= 0", help="SD 3.x, weighting_scheme mode: the mode density's scale")
    no_t5: bool = ADAPTER(False, help="SD 3.x: train without the T5 text encoder (far less memory; its share of the "
                          "prompt is zeros, as in diffusers' SD3 pipelines without it): use the LoRA with --no-t5")
    seed: int = OPTIM(0, range=">= 0", help="the seed of every random choice (a resumed run draws the same)")
    # --- watching and saving ---
    validation_prompts: list[str] = WATCH(factory=list, help="prompts sampled at each validation")
    validation_every: int = WATCH(0, range=">= 0", note="0 = off", help="validate every this many steps; 0: off")
    validation_steps: int = WATCH(25, range=">= 1", help="sampler steps per validation image")
    validation_guidance: float = WATCH(7.5, range=">= 0", help="guidance scale of the validation images")
    checkpoint_every: int = WATCH(0, range=">= 0", note="0 = off", help="save a checkpoint every this many steps; "
                                  "0: off")
    checkpoints_keep: int = WATCH(2, range=">= 1", help="the newest checkpoints kept")
    resume: str | None = WATCH(None, path=True, help="a checkpoint folder, or latest (the newest in output_dir)")
    output_dir: str = WATCH("outputs/dreambooth", path=True, required="set it to the folder the results go to",
                            help="where the LoRA or model, checkpoints, logs and samples go")
    # --- evaluation during training, the best step kept, the settings recommended (sdtune.training.watch) ---
    eval_every: int = EVAL(0, range=">= 0", note="0 = off", help="every this many steps (and before the first and "
                           "after the last) generate the evaluation prompts and measure likeness, prompt following, "
                           "class drift and bleed into eval.jsonl and TensorBoard; 0: off")
    eval_prompts: list[str] | None = EVAL(None, concept=True, help="the subject in new contexts, with its identifier "
                                          "('a photo of sks dog on the beach'); never the training captions; null: "
                                          "built from the identifier and the class noun")
    eval_class_prompts: list[str] | None = EVAL(None, concept=True, help="its class without the identifier, for class "
                                                "drift and bleed; null: eval_prompts without the identifier")
    eval_other_prompts: list[str] | None = EVAL(None, help="other classes' prompts, for bleed; null: a few common "
                                                "ones (a person, a car, a house, a cat)")
    eval_seed: int = EVAL(9000, range=">= 0", help="evaluation image i is drawn with seed eval_seed + i, at every "
                          "evaluation")
    eval_steps: int = EVAL(20, range=">= 1", help="sampler steps per evaluation image")
    eval_guidance: float = EVAL(7.5, range=">= 0", help="guidance scale of the evaluation images")
    eval_img2img_strength: float | None = EVAL(None, range="(0, 1]", note="or null", help="also draw the subject "
                                               "prompts over the base model's other-class images at this strength "
                                               "(img2img): the likeness counted is the lower of the two; null: off")
    eval_img2img_images: str | None = EVAL(None, path=True, help="the images the img2img probe starts from (a "
                                           "folder: pictures the subject should take over); null: the base model's "
                                           "images of eval_other_prompts")
    eval_dino: str | None = EVAL(None, path=True, help="a DINO ViT to measure likeness with: a local folder or a hub "
                                 "id in the cache (facebook/dino-vits16)")
    eval_clip: str | None = EVAL(None, path=True, help="a CLIP model for CLIP-I likeness and CLIP-T prompt "
                                 "following: a local folder or a cached hub id (openai/clip-vit-base-patch32)")
    keep_best: bool = EVAL(False, help="export the best evaluated step to OUTPUT_DIR/best, in every format the run "
                           "writes: the highest likeness whose drift, bleed and prompt following keep their bounds")
    stop_when_learned: bool = EVAL(False, help="end the run once the best step's likeness is at least "
                                   "learned_likeness and stop_patience evaluations have not beaten it")
    max_drift: float = EVAL(0.25, range="[0, 2]", help="selection bound: class drift, 1 - the mean cosine between "
                            "class images with the LoRA and the base model's on the same seeds")
    max_bleed: float = EVAL(0.25, range="[0, 1]", help="selection bound: the share of prompts without the identifier "
                            "(class and other classes) whose images look more like the subject than like the base "
                            "model's")
    min_prompt_following: float = EVAL(0.8, range=">= 0", help="selection floor: prompt following as a share of the "
                                       "base model's on the same prompts (CLIP-T, or a judge's context match)")
    learned_likeness: float | None = EVAL(None, range="[-1, 1]", note="or null", help="the likeness at which "
                                          "stop_when_learned may stop; null: any step that keeps the bounds")
    stop_patience: int = EVAL(2, range=">= 1", help="evaluations without a better step before stop_when_learned "
                              "ends the run")
    recommend_settings: bool = EVAL(True, help="with eval_every, after training sweep sweep_guidance x "
                                    "sweep_lora_scale on the evaluation prompts and record the best in the model card "
                                    "and the LoRA's metadata (infer and the UI use them)")
    sweep_guidance: list = EVAL(factory=lambda: [3.0, 5.0, 7.5], coerce=coerce_numbers, kind="a list of numbers",
                                help="guidance scales the settings sweep tries")
    sweep_lora_scale: list = EVAL(factory=lambda: [0.8, 1.0], coerce=coerce_numbers, kind="a list of numbers",
                                  help="LoRA scales the settings sweep tries")
    sweep_guidance_interval: list | None = EVAL(None, coerce=coerce_interval, kind="null or [lo, hi]",
                                                help="also try guiding only at these noise levels (0 clean, 1 noise)")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_NAMES = tuple(FIELDS)
_TYPES = typing.get_type_hints(TrainConfig)
# The keys a concept (one subject of a several-subject run) may set; the rest are the run's.
CONCEPT_KEYS = tuple(name for name, f in FIELDS.items() if f.metadata["concept"])
# Keys whose override value is text as written (prompts, paths, names), never YAML's numbers or mappings.
TEXT_KEYS = frozenset(name for name in FIELD_NAMES if _TYPES[name] in (str, str | None))


class _ConceptSource:
    @property
    def source(self):
        from sdtune.training.sources import Source

        return Source(instance_dir=self.instance_dir, dataset=self.dataset, split=self.split,
                      image_column=self.image_column, caption_column=self.caption_column)


# One subject of a run: the CONCEPT_KEYS, as TrainConfig declares them (class_prompts a tuple, instance_dir None
# when unset); ``concept.source`` is where its images come from.
Concept = dataclasses.make_dataclass("Concept", [(name, _TYPES[name]) for name in CONCEPT_KEYS],
                                     bases=(_ConceptSource,), frozen=True)
Concept.__module__ = __name__
Concept.__doc__ = "One subject of a run: where its images come from, its prompts and its class images."


def concepts_of(cfg: "TrainConfig") -> list[Concept]:
    """The run's subjects: ``cfg.concepts``, or the one the top-level keys describe. A concept's key that it leaves
    out (or sets to null) is the run's."""
    run = {name: getattr(cfg, name) for name in CONCEPT_KEYS}
    out = []
    for given in cfg.concepts or [{}]:
        values = {**run, **{k: v for k, v in given.items() if v is not None}}
        values["instance_dir"] = values["instance_dir"] or None
        for key in ("class_prompts", "eval_prompts", "eval_class_prompts"):
            values[key] = _tuple_or_none(values[key])
        out.append(Concept(**values))
    return out


def _tuple_or_none(prompts) -> tuple[str, ...] | None:
    return tuple(prompts) if prompts else None


# ----------------------------------------------------------------------------------------------- checking keys


def type_name(name: str) -> str:
    kind = FIELDS[name].metadata["kind"]
    if kind:
        return kind
    tp = _TYPES[name]
    args = typing.get_args(tp)
    if type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return f"{plain_type_name(inner)} or null"
    return plain_type_name(tp)


def plain_type_name(tp) -> str:
    if typing.get_origin(tp) is list:
        return "a list of strings"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[tp]


def _coerce(key: str, value: Any, where: str | None = None) -> Any:
    """``value`` as key ``key``'s declared type, or a one-line error naming ``where`` (default: the key); accepts
    what YAML users naturally write (``1e-4``, ``no``, a single prompt for a list)."""
    where = where or key
    meta = FIELDS[key].metadata
    if meta["coerce"] is not None:
        return meta["coerce"](where, value)
    tp = _TYPES[key]
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        tp = [a for a in args if a is not type(None)][0]
    bad = SdtuneError(f"{where} must be {type_name(key)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):  # YAML reads 1e3 as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string, not a float
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if not isinstance(value, (int, float)):
            raise bad
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            value = math.inf
        if not math.isfinite(value):
            raise SdtuneError(f"{where} must be a finite number, got {value!r}")
        return value
    if tp is str:
        if value is False and "no" in (meta["choices"] or ()):  # YAML 1.1 reads a bare `no` as false
            return "no"
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and meta["path"]:
            return str(value)  # a folder named 2024
        raise bad
    if typing.get_origin(tp) is list:
        if isinstance(value, str):  # a single prompt
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise bad
    raise TypeError(f"unhandled config type {tp!r}")  # a programming error, not a user one


def _check(key: str, value: Any, where: str | None = None) -> None:
    """The declared choices, range and blankness of one key's (coerced) value; one line naming ``where``."""
    where = where or key
    meta = FIELDS[key].metadata
    if value is None:
        return
    choices = meta["choices"]
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SdtuneError(f"{where} must be one of {', '.join(choices)}; got '{value}'{hint}")
    rng = meta["range"]
    if rng is not None and not rng.ok(value):
        note = f" ({meta['note']})" if meta["note"] else ""
        raise SdtuneError(f"{where} must be {rng.requirement()}{note}; got {value!r}")
    if meta["required"] and isinstance(value, str) and not value.strip():
        raise SdtuneError(f"{where} is empty; {meta['required']}")


def _coerce_concepts(value: Any) -> list | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise SdtuneError("concepts must be a list of mappings, one per subject (instance_dir, instance_prompt, ...)")
    out = []
    for i, item in enumerate(value):
        where = f"concepts[{i}]"
        if not isinstance(item, dict):
            raise SdtuneError(f"{where} must be a mapping of key: value (instance_dir, instance_prompt, ...)")
        checked = {}
        for k, v in item.items():
            if k not in CONCEPT_KEYS:
                close = difflib.get_close_matches(str(k), CONCEPT_KEYS, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise SdtuneError(f"{where}: unknown key '{k}'; {hint}a concept takes {', '.join(CONCEPT_KEYS)}")
            if v is None:  # null: the run's value
                continue
            checked[k] = _coerce(k, v, f"{where}.{k}")
            _check(k, checked[k], f"{where}.{k}")
        if bool(checked.get("instance_dir")) == bool(checked.get("dataset")):
            raise SdtuneError(f"{where} needs exactly one of instance_dir or dataset")
        if not str(checked.get("instance_prompt") or "").strip():
            raise SdtuneError(f"{where}.instance_prompt is empty; give each subject its own prompt with its own "
                              "identifier, e.g. 'a photo of sks dog'")
        out.append(checked)
    return out


def _coerce_optimizer_args(where: str, value: Any) -> dict | None:
    """A mapping of constructor argument names to numbers, true/false, strings or lists of numbers (YAML 1.1 reads
    1e-5 as a string: numbers written so are numbers). Whether the optimizer takes each name is checked later."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SdtuneError(f"{where} must be a mapping of argument: value, e.g. {{d0: 1.0e-5}}; got {value!r}")

    def number_or_text(v):
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return v
        return v

    out = {}
    for name, v in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise SdtuneError(f"{where}: {name!r} is not an argument name")
        v = number_or_text(v)
        if isinstance(v, (list, tuple)):
            v = [number_or_text(x) for x in v]
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise SdtuneError(f"{where}.{name} must be a number, true/false, a string or a list of numbers; "
                                  f"got {value[name]!r}")
        elif not isinstance(v, (bool, int, float, str)):
            raise SdtuneError(f"{where}.{name} must be a number, true/false, a string or a list of numbers; "
                              f"got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise SdtuneError(f"{where}.{name} must be finite; got {v!r}")
        out[name] = v
    return out


def _check_optimizer(cfg: TrainConfig) -> None:
    """The optimizer's package, the keys it needs and refuses, its optimizer_args; EMA's rules."""
    if cfg.optimizer == "adamw8bit":
        import torch

        if not torch.cuda.is_available():
            raise SdtuneError("optimizer adamw8bit (bitsandbytes) needs a CUDA GPU and none is visible; "
                              "use optimizer: adamw")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise SdtuneError("optimizer adamw8bit needs bitsandbytes; pip install 'sdtune[cuda]' "
                              "or use optimizer: adamw")
    module = OPTIONAL_OPTIMIZERS.get(cfg.optimizer)
    if module is not None and importlib.util.find_spec(module) is None:
        raise SdtuneError(f"optimizer {cfg.optimizer} needs {module.replace('_', '-')}; pip install "
                          "'sdtune[optimizers]', or use optimizer: adamw")
    if cfg.optimizer == "prodigy":
        if cfg.learning_rate == 1e-4:
            raise SdtuneError("optimizer prodigy finds its own step size and takes learning_rate 1 (this is AdamW's "
                              "1e-4, which would make its steps 10000x smaller): set learning_rate=1, and "
                              "prodigy_d_coef to scale its steps")
        if any(lr not in (None, cfg.learning_rate) for lr in (cfg.text_encoder_learning_rate,
                                                             cfg.identifier_learning_rate)):
            raise SdtuneError("optimizer prodigy takes one learning rate for every group; set "
                              "text_encoder_learning_rate and identifier_learning_rate to null")
    if cfg.optimizer == "schedulefree":
        if cfg.lr_scheduler != "constant" or cfg.lr_warmup_steps:
            raise SdtuneError("optimizer schedulefree replaces the learning-rate schedule: set lr_scheduler: "
                              "constant and lr_warmup_steps: 0 (schedulefree_warmup_steps warms it up)")
        if cfg.ema_decay is not None:
            raise SdtuneError("optimizer schedulefree already exports an average of its weights; set ema_decay: null "
                              "(or use another optimizer with EMA)")
    if cfg.ema_export == "both" and cfg.ema_decay is None:
        raise SdtuneError("ema_export: both writes the raw weights beside the EMA's; set ema_decay (e.g. 0.99), or "
                          "ema_export: ema")
    if cfg.optimizer_args:
        from sdtune.training.optimizers import check_optimizer_args

        check_optimizer_args(cfg)


def unknown_key_error(key: str) -> SdtuneError:
    return overrides.unknown_key_error(key, FIELD_NAMES)


CLASS_PROMPT_HINT = ", e.g. 'a photo of a dog' (the instance prompt without the identifier)"


def _every_concept_has(cfg: TrainConfig, key: str, option: str, hint: str) -> None:
    """One line naming the first concept whose ``key`` is empty, when ``option`` needs it of every concept."""
    for i, c in enumerate(concepts_of(cfg)):
        if not (getattr(c, key) or "").strip():
            where = f"concepts[{i}]." if cfg.concepts else ""
            raise SdtuneError(f"{option} needs {where}{key}{hint}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every key's declared type, choices and range, then the rules between keys; raise one
    ``SdtuneError`` line for the first problem."""
    for key in FIELD_NAMES:  # types too, for configs built in code
        value = _coerce(key, getattr(cfg, key))
        _check(key, value)
        setattr(cfg, key, value)

    # --- rules between keys ---
    if cfg.concepts:
        given = [k for k in ("instance_dir", "dataset", "instance_prompt", "class_prompt", "class_prompts", "class_dir")
                 if getattr(cfg, k)]
        if given:
            raise SdtuneError(f"with concepts, set {', '.join(given)} inside each concept, not at the top level")
    else:
        if not cfg.instance_dir.strip() and not cfg.dataset:
            raise SdtuneError("instance_dir is missing; set it to a folder with 3-5 photos of the subject "
                              "(or set dataset, or concepts for several subjects)")
        if cfg.instance_dir.strip() and cfg.dataset:
            raise SdtuneError("set either instance_dir or dataset, not both")
        if not cfg.instance_prompt.strip():
            raise SdtuneError("instance_prompt is empty; set it to a prompt with a rare identifier, "
                              "e.g. 'a photo of sks dog'")
    if cfg.bucket_step is not None and cfg.resolution is not None and cfg.resolution % cfg.bucket_step:
        raise SdtuneError(f"bucket_step must be a multiple of 8 that divides resolution ({cfg.resolution}); "
                          f"got {cfg.bucket_step!r}")
    if cfg.buckets is not None and not (cfg.buckets == "auto" and cfg.resolution is None):
        from sdtune.training.buckets import parse_buckets

        parse_buckets(cfg.buckets, cfg.resolution, cfg.bucket_step, cfg.max_aspect)  # one clear line if malformed
    if cfg.train_identifier_embedding:
        if cfg.method != "lora":
            raise SdtuneError("train_identifier_embedding trains beside a LoRA: set method: lora (a full fine-tune "
                              "with train_text_encoder trains every embedding already)")
        _every_concept_has(cfg, "identifier", "train_identifier_embedding",
                           ", the subject's rare word in its prompt (e.g. identifier: sks)")
    if cfg.method == "lora" and cfg.adapter == "oft" and cfg.lora_targets == "all":
        raise SdtuneError("adapter oft works on linear layers here: peft 0.21's OFT on a convolution ignores its "
                          "padding (it fails on small feature maps and does not merge exactly); set lora_targets: "
                          "attention")
    if cfg.caption_dropout_on == "class" and cfg.caption_dropout and not cfg.with_prior_preservation:
        raise SdtuneError("caption_dropout_on: class drops only class images' captions, and there are none without "
                          "prior preservation; set with_prior_preservation: true or caption_dropout_on: all")
    if cfg.output_preservation_weight:
        if cfg.method != "lora":
            raise SdtuneError("output_preservation_weight compares the model with its LoRA switched off, so it needs "
                              "method: lora; set output_preservation_weight: 0 for a full fine-tune")
        _every_concept_has(cfg, "class_prompt", "output_preservation_weight", CLASS_PROMPT_HINT)
    if cfg.with_prior_preservation:
        _every_concept_has(cfg, "class_prompt", "with_prior_preservation", CLASS_PROMPT_HINT)
        for i, c in enumerate(concepts_of(cfg)):
            where = f"concepts[{i}]." if cfg.concepts else ""
            if c.class_prompts is not None and not all(p.strip() for p in c.class_prompts):
                raise SdtuneError(f"{where}class_prompts holds an empty prompt; remove it (each class image is drawn "
                                  "from one of them)")
            if not (c.class_dir or "").strip():
                raise SdtuneError(f"with_prior_preservation needs {where}class_dir, a folder for the class images "
                                  "(missing ones are generated into it)")
    if cfg.resume not in (None, "latest") and not Path(cfg.resume).expanduser().is_dir():
        raise SdtuneError(f"resume checkpoint not found: {cfg.resume}; pass a checkpoint-N folder or 'latest'")
    if cfg.eval_img2img_images and not Path(cfg.eval_img2img_images).expanduser().is_dir():
        raise SdtuneError(f"eval_img2img_images {cfg.eval_img2img_images} is not a folder; give a folder of pictures "
                          "the subject should take over in img2img, or null")
    if (cfg.keep_best or cfg.stop_when_learned) and not cfg.eval_every:
        raise SdtuneError(f"{'keep_best' if cfg.keep_best else 'stop_when_learned'} chooses among evaluations; set "
                          "eval_every (e.g. eval_every=100)")
    if cfg.eval_every and any(not (p or "").strip() for p in [*(cfg.eval_prompts or []),
                                                               *(cfg.eval_class_prompts or []),
                                                               *(cfg.eval_other_prompts or [])]):
        raise SdtuneError("an evaluation prompt list holds an empty prompt; remove it")
    _check_optimizer(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build and validate a config from a mapping of YAML keys."""
    for key in data:
        if key not in FIELD_NAMES:
            raise unknown_key_error(str(key))
    values = {k: _coerce(k, v) for k, v in data.items()}
    return validate(TrainConfig(**values))


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, value converted to the key's type), by the one parser of every command
    (``sdtune.overrides.parse_override``): YAML values, text as written for prompts and paths."""
    key, value = overrides.parse_override(text, FIELD_NAMES, text_keys=TEXT_KEYS)
    if value is None and _TYPES[key] is str:  # `instance_prompt=` means an empty string, caught by validate
        value = ""
    return key, _coerce(key, value)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file (or None for defaults) + ``key=value`` overrides -> a validated ``TrainConfig``."""
    data = read_yaml(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        data[key] = value
    return config_from_dict(data)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain JSON-serialisable dict of every key, for metadata and model cards."""
    return dataclasses.asdict(cfg)


def min_image_side(cfg: TrainConfig) -> int:
    """The smallest shorter side (pixels) a training image may have: ``min_image_fraction`` x ``resolution``;
    0 (any size) while ``resolution`` is null (the model's native size, not known before the model is read)."""
    if cfg.resolution is None:
        return 0
    return math.ceil(cfg.min_image_fraction * cfg.resolution)


def resolve_model(cfg: TrainConfig) -> str:
    """The model source to load: ``cfg.model``, or the embedded base model when it is null."""
    if cfg.model:
        return cfg.model
    from sdtune.models.embedded import embedded_model

    return str(embedded_model("base"))
