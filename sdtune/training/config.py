"""The DreamBooth training configuration: one YAML file plus ``key=value`` overrides, validated up front.

Every key is a field of ``TrainConfig``. ``load_config`` reads the YAML (``yaml.safe_load``), applies the
overrides (each value is parsed as YAML too, so ``max_steps=10``, ``validation_prompts=[a, b]`` and
``resume=latest`` mean what they look like), checks every key, type, choice and range, and only then
returns - so a typo costs a second, not an hour of class-image generation.

Relative paths (``instance_dir``, ``class_dir``, ``output_dir``, ``model``, ``resume``) are relative to the
current working directory, as in diffusers' and kohya's scripts - not to the config file's folder.
``model: null`` means the embedded base model shipped with sdtune (see ``resolve_model``).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sdtune.errors import SdtuneError

METHODS = ("lora", "full")
OPTIMIZERS = ("adamw", "adamw8bit")
LORA_TARGETS = ("attention", "all")
CAPTION_DROPOUT_ON = ("all", "class")
MASKED_LOSS_MEANS = ("weights", "pixels")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
# The schedule names diffusers.optimization.get_scheduler accepts (piecewise_constant needs extra rules).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class TrainConfig:
    """All settings of a DreamBooth run. Field names are the YAML keys."""

    # --- what to learn from (one subject here, or several under `concepts`) ---
    model: str | None = None  # diffusers folder, .safetensors file or hub id; None -> embedded base model
    instance_dir: str = ""  # 3-5 photos of the subject, optionally with <name>.txt captions or metadata.jsonl
    dataset: str | None = None  # instead of instance_dir: a saved dataset folder or a hub dataset id
    split: str = "train"
    image_column: str = "image"
    caption_column: str | None = None  # None: "text" or "caption" when the source has one
    instance_prompt: str = ""  # with the rare identifier, e.g. "a photo of sks dog"; per-image captions replace it
    identifier: str | None = None  # the rare token ("sks"): captions without it are flagged
    caption_prefix: str | None = None  # ...or get this prefix ("a photo of sks dog,") added
    use_captions: bool = True  # false: ignore .txt captions / caption columns; every image trains on its prompt
    concepts: list | None = None  # several subjects in one run: a list of mappings (see CONCEPT_KEYS)
    # --- prior preservation ---
    with_prior_preservation: bool = False
    class_prompt: str | None = None  # e.g. "a photo of a dog"
    # Varied class prompts ("a photo of a dog on a beach", ...): class image i is drawn from class_prompts[i % n]
    # and keeps its prompt as its caption (class_i.txt), so the prior also holds the context words the captions use.
    class_prompts: list[str] | None = None
    class_dir: str | None = None  # generated into when it holds fewer than num_class_images
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    # differential output preservation (ai-toolkit's name): on each instance image, the class prompt (the caption
    # with the identifier taken out) must predict what the base model predicts, LoRA off, on the same noisy latent.
    # It teaches the class word's meaning on the subject's own images; 0 = off. LoRA only; costs one more UNet pass.
    output_preservation_weight: float = 0.0
    # fine-tune with the base's own objective when it was trained with one (the embedded family's guidance stage):
    # + conditional_pull x the distance between each prediction and the model's own unconditional prediction on the
    # same noisy latent (not differentiated), so the prompt's effect stays 1 / (1 + p) of the data's, as in the base,
    # and the guidance the base is sampled at still suits the fine-tune. 0 = off (SD's plain objective); one more
    # UNet pass without gradients.
    conditional_pull: float = 0.0
    class_generation_steps: int = 50
    class_generation_guidance: float = 7.5
    class_generation_batch_size: int = 4
    # --- unconditional-caption dropout (keeps classifier-free guidance working) ---
    caption_dropout: float = 0.1
    # which examples may train on "": all (kohya's caption_dropout_rate), or only the class images, so the empty
    # prompt learns the class prior and never the subject (measured: the two-tone ball's class drifted more; README)
    caption_dropout_on: str = "all"
    # --- what to train ---
    method: str = "lora"  # lora | full
    lora_rank: int = 4
    lora_alpha: float | None = None  # None -> lora_rank (scale 1)
    # attention: q/k/v/out projections (diffusers' scripts); all: also feed-forward and the
    # ResNet convolutions (kohya's LoCon), which reach textures the attention layers cannot
    lora_targets: str = "attention"
    train_text_encoder: bool = False
    # also train the identifier's own token embedding (pivotal tuning; LoRA, SD 1.x/2.x); without
    # train_text_encoder it is the text encoder's only trained part, so no other word's meaning moves
    train_identifier_embedding: bool = False
    # --- data ---
    resolution: int = 512
    center_crop: bool = True  # False -> random crop
    buckets: Any = None  # null: square crops at resolution; auto, or [[w, h], ...]: aspect-ratio buckets
    bucket_step: int | None = None  # bucket sides move in this many pixels (default resolution / 8)
    max_aspect: float = 2.0  # the widest bucket of `auto` (2 = 2:1 and 1:2)
    random_flip: bool = False
    # each instance image's mask weighs its loss (kohya's masked loss): masks/NAME.png in its folder, else its
    # alpha channel; the subject counts fully, the rest masked_loss_floor; images without a mask count everywhere
    masked_loss: bool = False
    masked_loss_floor: float = 0.1
    # the masked loss divided by the mask's weights (each example keeps its scale) or by the pixel count (kohya's)
    masked_loss_mean: str = "weights"
    # images whose shorter side is below this share of `resolution` are refused, not upscaled into mush
    min_image_fraction: float = 0.25
    dataloader_num_workers: int = 0
    cache_latents: bool = True  # compute VAE latents / prompt embeddings once while they are frozen
    latent_cache_dir: str | None = None  # where latents persist between runs (default OUTPUT_DIR/latent_cache)
    # --- optimisation ---
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = 400
    learning_rate: float = 1e-4
    text_encoder_learning_rate: float | None = None  # None -> learning_rate
    identifier_learning_rate: float | None = None  # the identifier's embedding; None -> learning_rate
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"  # adamw | adamw8bit (CUDA + bitsandbytes)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the UNet: ~1.3x per CPU step once compiled, after minutes of compiling
    snr_gamma: float | None = None  # min-SNR weighting; 5.0 is the paper's value
    noise_offset: float = 0.0
    seed: int = 0
    # --- watching and saving ---
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 0  # steps; 0 = off
    validation_steps: int = 25  # sampler steps per validation image
    validation_guidance: float = 7.5
    checkpoint_every: int = 0  # steps; 0 = off
    checkpoints_keep: int = 2
    resume: str | None = None  # a checkpoint folder or "latest"
    output_dir: str = "outputs/dreambooth"


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
_TYPES = typing.get_type_hints(TrainConfig)
# The keys a concept (one subject of a several-subject run) may set; the rest are the run's.
CONCEPT_KEYS = ("instance_dir", "dataset", "split", "image_column", "caption_column", "instance_prompt", "identifier",
                "caption_prefix", "class_prompt", "class_prompts", "class_dir", "num_class_images", "repeats")
_SPECIAL = {"buckets", "concepts"}  # validated by their own rules below, not by type alone


@dataclass(frozen=True)
class Concept:
    """One subject of a run: where its images come from, its prompts and its class images."""

    instance_dir: str | None
    dataset: str | None
    split: str
    image_column: str
    caption_column: str | None
    instance_prompt: str
    identifier: str | None
    caption_prefix: str | None
    class_prompt: str | None
    class_dir: str | None
    num_class_images: int
    repeats: int = 1
    class_prompts: tuple[str, ...] | None = None

    @property
    def source(self):
        from sdtune.training.sources import Source

        return Source(instance_dir=self.instance_dir, dataset=self.dataset, split=self.split,
                      image_column=self.image_column, caption_column=self.caption_column)


def concepts_of(cfg: "TrainConfig") -> list[Concept]:
    """The run's subjects: ``cfg.concepts``, or the one the top-level keys describe."""
    if not cfg.concepts:
        return [Concept(cfg.instance_dir or None, cfg.dataset, cfg.split, cfg.image_column, cfg.caption_column,
                        cfg.instance_prompt, cfg.identifier, cfg.caption_prefix, cfg.class_prompt, cfg.class_dir,
                        cfg.num_class_images, class_prompts=_tuple_or_none(cfg.class_prompts))]
    out = []
    for c in cfg.concepts:
        out.append(Concept(c.get("instance_dir") or None, c.get("dataset"), c.get("split", "train"),
                           c.get("image_column", "image"), c.get("caption_column"), c.get("instance_prompt", ""),
                           c.get("identifier"), c.get("caption_prefix"), c.get("class_prompt"), c.get("class_dir"),
                           c.get("num_class_images", cfg.num_class_images), c.get("repeats", 1),
                           _tuple_or_none(c.get("class_prompts"))))
    return out


def _tuple_or_none(prompts) -> tuple[str, ...] | None:
    return tuple(prompts) if prompts else None


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return f"{_type_name(inner)} or null"
    if typing.get_origin(tp) is list:
        return "a list of strings"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[tp]


def _coerce(key: str, value: Any, tp) -> Any:
    """Return ``value`` as type ``tp`` or raise a one-line error; accepts what YAML users naturally write."""
    if key == "buckets":
        if value is None or value == "auto" or isinstance(value, (list, tuple)):
            return value
        raise SdtuneError(f"buckets must be null, auto or a list of [width, height] pairs, got {value!r}")
    if key == "concepts":
        return _coerce_concepts(value)
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        tp = [a for a in args if a is not type(None)][0]
    bad = SdtuneError(f"{key} must be {_type_name(_TYPES[key])}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):  # YAML reads 1e3 as a string
            try:
                number = float(value)
            except ValueError:
                raise bad from None
            if number.is_integer():
                return int(number)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string, not a float
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if key == "mixed_precision" and value is False:  # YAML 1.1 reads a bare `no` as false
            return "no"
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key in {"model", "resume"}:
            return str(value)
        raise bad
    if typing.get_origin(tp) is list:
        if isinstance(value, str):  # a single prompt
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise bad
    raise TypeError(f"unhandled config type {tp!r}")  # a programming error, not a user one


_CONCEPT_TYPES = {"instance_dir": str, "dataset": str, "split": str, "image_column": str, "caption_column": str,
                  "instance_prompt": str, "identifier": str, "caption_prefix": str, "class_prompt": str,
                  "class_prompts": list, "class_dir": str, "num_class_images": int, "repeats": int}


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
        for k, v in item.items():
            if k not in CONCEPT_KEYS:
                close = difflib.get_close_matches(str(k), CONCEPT_KEYS, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise SdtuneError(f"{where}: unknown key '{k}'; {hint}a concept takes {', '.join(CONCEPT_KEYS)}")
            want = _CONCEPT_TYPES[k]
            if v is None and k not in ("instance_prompt", "num_class_images", "repeats"):
                continue
            if want is int and (isinstance(v, bool) or not isinstance(v, int)):
                raise SdtuneError(f"{where}.{k} must be an integer, got {v!r}")
            if want is str and not isinstance(v, str):
                raise SdtuneError(f"{where}.{k} must be a string, got {v!r}")
            if want is list:
                if isinstance(v, str):
                    item = {**item, k: [v]}
                elif not (isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)):
                    raise SdtuneError(f"{where}.{k} must be a list of strings, got {v!r}")
        if bool(item.get("instance_dir")) == bool(item.get("dataset")):
            raise SdtuneError(f"{where} needs exactly one of instance_dir or dataset")
        if not str(item.get("instance_prompt") or "").strip():
            raise SdtuneError(f"{where}.instance_prompt is empty; give each subject its own prompt with its own "
                              "identifier, e.g. 'a photo of sks dog'")
        if item.get("repeats", 1) < 1 or item.get("num_class_images", 1) < 1:
            raise SdtuneError(f"{where}: repeats and num_class_images must be >= 1")
        out.append(dict(item))
    return out


def unknown_key_error(key: str) -> SdtuneError:
    close = difflib.get_close_matches(key, FIELD_NAMES, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return SdtuneError(f"unknown key '{key}'; {hint}valid keys: {', '.join(FIELD_NAMES)}")


def _choice(cfg: TrainConfig, key: str, choices: Sequence[str]) -> None:
    value = getattr(cfg, key)
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SdtuneError(f"{key} must be one of {', '.join(choices)}; got '{value}'{hint}")


def _range(ok: bool, key: str, requirement: str, value: Any) -> None:
    if not ok:
        raise SdtuneError(f"{key} must be {requirement}; got {value!r}")


CLASS_PROMPT_HINT = ", e.g. 'a photo of a dog' (the instance prompt without the identifier)"


def _every_concept_has(cfg: TrainConfig, key: str, option: str, hint: str) -> None:
    """One line naming the first concept whose ``key`` is empty, when ``option`` needs it of every concept."""
    for i, c in enumerate(concepts_of(cfg)):
        if not (getattr(c, key) or "").strip():
            where = f"concepts[{i}]." if cfg.concepts else ""
            raise SdtuneError(f"{option} needs {where}{key}{hint}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check choices, ranges and combinations; raise one ``SdtuneError`` line for the first problem."""
    for key in FIELD_NAMES:  # types too, for configs built in code
        setattr(cfg, key, _coerce(key, getattr(cfg, key), _TYPES[key]))

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
    if cfg.buckets is not None:
        from sdtune.training.buckets import parse_buckets

        parse_buckets(cfg.buckets, cfg.resolution, cfg.bucket_step, cfg.max_aspect)  # one clear line if malformed
    if cfg.bucket_step is not None:
        _range(cfg.bucket_step >= 8 and cfg.bucket_step % 8 == 0 and cfg.resolution % cfg.bucket_step == 0,
               "bucket_step", "a multiple of 8 that divides resolution", cfg.bucket_step)
    _range(cfg.max_aspect >= 1, "max_aspect", ">= 1 (2 allows 2:1 and 1:2)", cfg.max_aspect)
    _choice(cfg, "method", METHODS)
    _choice(cfg, "optimizer", OPTIMIZERS)
    _choice(cfg, "lora_targets", LORA_TARGETS)
    _choice(cfg, "caption_dropout_on", CAPTION_DROPOUT_ON)
    _choice(cfg, "masked_loss_mean", MASKED_LOSS_MEANS)
    _choice(cfg, "mixed_precision", MIXED_PRECISIONS)
    _choice(cfg, "lr_scheduler", LR_SCHEDULERS)

    _range(0.0 <= cfg.caption_dropout < 1.0, "caption_dropout", "in [0, 1) (0.1 is typical)", cfg.caption_dropout)
    _range(cfg.resolution > 0 and cfg.resolution % 8 == 0, "resolution", "a positive multiple of 8 (e.g. 512)",
           cfg.resolution)
    _range(0 <= cfg.min_image_fraction <= 1, "min_image_fraction", "in [0, 1] (0 accepts any size)",
           cfg.min_image_fraction)
    _range(cfg.learning_rate > 0, "learning_rate", "> 0", cfg.learning_rate)
    if cfg.identifier_learning_rate is not None:
        _range(cfg.identifier_learning_rate > 0, "identifier_learning_rate", "> 0 (or null)",
               cfg.identifier_learning_rate)
    if cfg.train_identifier_embedding:
        if cfg.method != "lora":
            raise SdtuneError("train_identifier_embedding trains beside a LoRA: set method: lora (a full fine-tune "
                              "with train_text_encoder trains every embedding already)")
        _every_concept_has(cfg, "identifier", "train_identifier_embedding",
                           ", the subject's rare word in its prompt (e.g. identifier: sks)")
    if cfg.text_encoder_learning_rate is not None:
        _range(cfg.text_encoder_learning_rate > 0, "text_encoder_learning_rate", "> 0 (or null)",
               cfg.text_encoder_learning_rate)
    _range(cfg.max_steps >= 1, "max_steps", ">= 1", cfg.max_steps)
    _range(cfg.train_batch_size >= 1, "train_batch_size", ">= 1", cfg.train_batch_size)
    _range(cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", ">= 1",
           cfg.gradient_accumulation_steps)
    _range(cfg.lr_warmup_steps >= 0, "lr_warmup_steps", ">= 0", cfg.lr_warmup_steps)
    _range(cfg.lora_rank >= 1, "lora_rank", ">= 1", cfg.lora_rank)
    if cfg.lora_alpha is not None:
        _range(cfg.lora_alpha > 0, "lora_alpha", "> 0 (or null for lora_rank)", cfg.lora_alpha)
    _range(cfg.prior_loss_weight >= 0, "prior_loss_weight", ">= 0", cfg.prior_loss_weight)
    _range(cfg.output_preservation_weight >= 0, "output_preservation_weight", ">= 0 (0 = off, 1 is usual)",
           cfg.output_preservation_weight)
    _range(cfg.conditional_pull >= 0, "conditional_pull", ">= 0 (0 = off)", cfg.conditional_pull)
    _range(cfg.num_class_images >= 1, "num_class_images", ">= 1", cfg.num_class_images)
    _range(cfg.class_generation_steps >= 1, "class_generation_steps", ">= 1", cfg.class_generation_steps)
    _range(cfg.class_generation_guidance >= 0, "class_generation_guidance", ">= 0", cfg.class_generation_guidance)
    _range(cfg.class_generation_batch_size >= 1, "class_generation_batch_size", ">= 1",
           cfg.class_generation_batch_size)
    _range(cfg.dataloader_num_workers >= 0, "dataloader_num_workers", ">= 0", cfg.dataloader_num_workers)
    _range(0 <= cfg.adam_beta1 < 1, "adam_beta1", "in [0, 1)", cfg.adam_beta1)
    _range(0 <= cfg.adam_beta2 < 1, "adam_beta2", "in [0, 1)", cfg.adam_beta2)
    _range(cfg.adam_weight_decay >= 0, "adam_weight_decay", ">= 0", cfg.adam_weight_decay)
    _range(cfg.adam_epsilon > 0, "adam_epsilon", "> 0", cfg.adam_epsilon)
    _range(cfg.max_grad_norm > 0, "max_grad_norm", "> 0", cfg.max_grad_norm)
    if cfg.snr_gamma is not None:
        _range(cfg.snr_gamma > 0, "snr_gamma", "> 0 (5.0 is usual) or null for off", cfg.snr_gamma)
    _range(cfg.noise_offset >= 0, "noise_offset", ">= 0 (0.05 is usual)", cfg.noise_offset)
    _range(0 <= cfg.masked_loss_floor <= 1, "masked_loss_floor", "in [0, 1] (0: the background is not learned at all)",
           cfg.masked_loss_floor)
    _range(cfg.seed >= 0, "seed", ">= 0", cfg.seed)
    _range(cfg.validation_every >= 0, "validation_every", ">= 0 (0 = off)", cfg.validation_every)
    _range(cfg.validation_steps >= 1, "validation_steps", ">= 1", cfg.validation_steps)
    _range(cfg.validation_guidance >= 0, "validation_guidance", ">= 0", cfg.validation_guidance)
    _range(cfg.checkpoint_every >= 0, "checkpoint_every", ">= 0 (0 = off)", cfg.checkpoint_every)
    _range(cfg.checkpoints_keep >= 1, "checkpoints_keep", ">= 1", cfg.checkpoints_keep)
    if not cfg.output_dir.strip():
        raise SdtuneError("output_dir is empty; set it to the folder the results go to")

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
    if cfg.optimizer == "adamw8bit":
        import torch

        if not torch.cuda.is_available():
            raise SdtuneError("optimizer adamw8bit (bitsandbytes) needs a CUDA GPU and none is visible; "
                              "use optimizer: adamw")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise SdtuneError("optimizer adamw8bit needs bitsandbytes; pip install 'sdtune[cuda]' "
                              "or use optimizer: adamw")
    return cfg


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build and validate a config from a mapping of YAML keys."""
    for key in data:
        if key not in FIELD_NAMES:
            raise unknown_key_error(str(key))
    values = {k: _coerce(k, v, _TYPES[k]) for k, v in data.items()}
    return validate(TrainConfig(**values))


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, value parsed as YAML and converted to the key's type)."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SdtuneError(f"override '{text}' is not key=value (e.g. max_steps=200)")
    if key not in FIELD_NAMES:
        raise unknown_key_error(key)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML at all: take the text as written
    # A prompt or path is text even when it happens to look like YAML ("photo: sks dog" is a mapping,
    # "1.5" a number): for string keys keep the raw text unless it means null or the YAML `no`.
    if _TYPES[key] in (str, str | None) and not isinstance(value, str) and value is not None \
            and not (key == "mixed_precision" and value is False):
        value = raw.strip()
    if value is None and _TYPES[key] is str:  # `instance_prompt=` means an empty string, caught by validate
        value = ""
    return key, _coerce(key, value, _TYPES[key])


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config file as a mapping, with a clear error for a missing file or bad YAML."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SdtuneError(f"config file not found: {p}" if not p.exists() else f"config {p} is not a file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SdtuneError(f"config {p} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise SdtuneError(f"config {p} is not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SdtuneError(f"config {p} must be a mapping of key: value lines, got a {type(data).__name__}")
    return data


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
    """The smallest shorter side (pixels) a training image may have: ``min_image_fraction`` x ``resolution``."""
    import math

    return math.ceil(cfg.min_image_fraction * cfg.resolution)


def resolve_model(cfg: TrainConfig) -> str:
    """The model source to load: ``cfg.model``, or the embedded base model when it is null."""
    if cfg.model:
        return cfg.model
    from sdtune.models.embedded import embedded_model

    return str(embedded_model("base"))
