"""The optimizer of a run, by name: adamw, adamw8bit, prodigy, adafactor, schedulefree or lion.

``make_optimizer`` builds it over the recipe's parameter groups from the config's keys (``learning_rate``, the betas,
``adam_weight_decay``...) plus ``optimizer_args``, the extra constructor arguments a user passes through (kohya's
``optimizer_args``); ``check_optimizer_args`` checks those names against the constructor before any model is
loaded. prodigy (``prodigyopt``), schedulefree (``schedulefree``) and lion (``lion-pytorch``) come with the
``[optimizers]`` extra; adafactor is transformers' own.

Schedule-free AdamW trains on one sequence of weights (y) and is evaluated on another (x, the average); its
``eval()`` and ``train()`` move the parameters between the two. ``eval_mode`` is that switch as a context manager:
the recipe holds it around validation, the in-loop evaluation and checkpoint saves, and switches for good before
the export. A checkpoint thus holds x (and the optimizer's z); a resumed run switches back with ``train()``, the
same arithmetic the uninterrupted run did after its save, so it continues bit for bit. Other optimizers have no
modes and ``eval_mode`` does nothing.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect

import torch

from sdtune.errors import SdtuneError
from sdtune.training.config import TrainConfig

EXTRA = "pip install 'sdtune[optimizers]'"

# name -> (module, class); the module is imported only when that optimizer is used
CLASSES = {
    "adamw": ("torch.optim", "AdamW"),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit"),
    "prodigy": ("prodigyopt", "Prodigy"),
    "adafactor": ("transformers.optimization", "Adafactor"),
    "schedulefree": ("schedulefree", "AdamWScheduleFree"),
    "lion": ("lion_pytorch", "Lion"),
}
PACKAGES = {"bitsandbytes.optim": "bitsandbytes", "prodigyopt": "prodigyopt", "schedulefree": "schedulefree",
            "lion_pytorch": "lion-pytorch"}


def optimizer_class(name: str):
    """The optimizer class of ``name``; a missing optional package is one line naming the extra to install."""
    module, cls = CLASSES[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        hint = ("pip install 'sdtune[cuda]' or use optimizer: adamw" if name == "adamw8bit"
                else f"{EXTRA}, or use optimizer: adamw")
        raise SdtuneError(f"optimizer {name} needs {PACKAGES[module]}; {hint}") from None


def keyed_arguments(cfg: TrainConfig) -> dict[str, tuple[object, str]]:
    """The constructor arguments the config's own keys set: {argument: (value, the keys that set it)}."""
    adam = {"betas": ((cfg.adam_beta1, cfg.adam_beta2), "adam_beta1 and adam_beta2"),
            "eps": (cfg.adam_epsilon, "adam_epsilon")}
    decay = {"weight_decay": (cfg.adam_weight_decay, "adam_weight_decay")}
    return {
        "adamw": {**adam, **decay},
        "adamw8bit": {**adam, **decay},
        "prodigy": {**adam, **decay, "d_coef": (cfg.prodigy_d_coef, "prodigy_d_coef"),
                    "use_bias_correction": (cfg.prodigy_use_bias_correction, "prodigy_use_bias_correction"),
                    "safeguard_warmup": (cfg.prodigy_safeguard_warmup, "prodigy_safeguard_warmup")},
        "adafactor": decay,
        "schedulefree": {**adam, **decay, "warmup_steps": (cfg.schedulefree_warmup_steps, "schedulefree_warmup_steps")},
        "lion": {"betas": ((cfg.lion_beta1, cfg.lion_beta2), "lion_beta1 and lion_beta2"), **decay},
    }[cfg.optimizer]


def default_arguments(cfg: TrainConfig, device: torch.device) -> dict:
    """Arguments sdtune sets unless ``optimizer_args`` says otherwise."""
    if cfg.optimizer == "adamw" and not {"fused", "foreach"} & set(cfg.optimizer_args or {}):
        # The fused kernel updates all parameters in one pass: a LoRA has hundreds of small tensors, and
        # the per-tensor loop of the default implementation costs ~7% of a small model's CPU step.
        return {"fused": device.type in ("cpu", "cuda")}
    if cfg.optimizer == "adafactor":  # a given learning rate, as kohya's and OneTrainer's Adafactor recipes
        return {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    return {}


def accepted_arguments(cls) -> list[str]:
    """The keyword arguments ``cls``'s constructor takes, besides its parameters and learning rate."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name not in ("self", "params", "lr")
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_optimizer_args(cfg: TrainConfig) -> None:
    """Every name in ``optimizer_args`` is an argument of the chosen optimizer's constructor that no key of the
    config sets already; one line for the first that is not."""
    given = cfg.optimizer_args or {}
    if not given:
        return
    accepted = accepted_arguments(optimizer_class(cfg.optimizer))
    keyed = keyed_arguments(cfg)
    for name in given:
        if name in ("lr", "params"):
            raise SdtuneError(f"optimizer_args.{name} is set by the recipe (learning_rate and its groups); remove it")
        if name in keyed:
            raise SdtuneError(f"optimizer_args.{name} is set by {keyed[name][1]}; set that instead")
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise SdtuneError(f"optimizer_args: optimizer {cfg.optimizer} takes no argument '{name}'; {hint}it takes "
                              f"{', '.join(a for a in accepted if a not in keyed)}")


def make_optimizer(cfg: TrainConfig, param_groups: list[dict], device: torch.device):
    """The config's optimizer over ``param_groups`` (each with its own ``lr``), in training mode."""
    if cfg.optimizer == "adamw8bit" and device.type != "cuda":
        raise SdtuneError("optimizer adamw8bit (bitsandbytes) runs on CUDA GPUs only; use optimizer: adamw")
    cls = optimizer_class(cfg.optimizer)
    check_optimizer_args(cfg)
    kwargs = {**default_arguments(cfg, device), **{k: v for k, (v, _) in keyed_arguments(cfg).items()},
              **{k: tuple(v) if isinstance(v, list) else v for k, v in (cfg.optimizer_args or {}).items()}}
    lr = None if cfg.optimizer == "adafactor" and kwargs.get("relative_step") else cfg.learning_rate
    try:
        optimizer = cls(param_groups, lr=lr, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise SdtuneError(f"optimizer {cfg.optimizer} refused its arguments {kwargs}: {exc}") from None
    if schedule_free(optimizer):
        optimizer.train()  # it starts in eval mode and refuses to step in it
    return optimizer


def schedule_free(optimizer) -> bool:
    """Whether ``optimizer`` (or the optimizer accelerate wraps) has schedule-free's train and eval modes."""
    return bool(optimizer.param_groups) and "train_mode" in optimizer.param_groups[0]


@contextlib.contextmanager
def eval_mode(optimizer):
    """A schedule-free optimizer's evaluation weights in the parameters for the block, its training weights after;
    nothing for other optimizers."""
    if optimizer is None or not schedule_free(optimizer):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


def after_resume(optimizer) -> None:
    """A loaded checkpoint was saved in eval mode (``eval_mode``): back to the training weights, as the
    uninterrupted run went back after its save."""
    if schedule_free(optimizer):
        optimizer.train()
