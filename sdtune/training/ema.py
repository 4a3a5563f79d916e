"""An exponential moving average of the trained weights (``ema_decay``): what validation, the in-loop evaluation
and the export use, while the optimizer keeps training the raw weights.

The average starts as the weights after step ``ema_update_after_step`` (0: the weights before the first step) and,
after each later step k, becomes ``d * average + (1 - d) * weights`` with ``d = ema_decay``, or with ``ema_warmup``
``min(ema_decay, (1 + t) / (10 + t))``, t = k - ema_update_after_step (diffusers' ``EMAModel``'s warm-up form), so a
run of a few hundred steps is not held at its first weights. It covers every parameter the optimizer trains (a
LoRA's, the identifier's embedding rows, or the whole UNet and text encoder) and lives beside them, on their device.

``swapped_in`` puts the average into the parameters for a block and the raw weights back after it, exactly (they
are copied, not recomputed). The average and its step go into every checkpoint (accelerate's
``register_for_checkpointing``: ``custom_checkpoint_0.pkl``), so a resumed run continues it bit for bit.

Written here rather than taken from diffusers' ``EMAModel``: that one's decay is always capped by
``(1 + t) / (10 + t)``, so an ``ema_decay`` of 0.999 would never be reached in a DreamBooth run's few hundred steps.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from sdtune.errors import SdtuneError

CHECKPOINT_FILE = "custom_checkpoint_0.pkl"  # accelerate's name for the first object registered for checkpointing


class EMA:
    """The moving average of ``params`` (updated by ``update(step)`` after each optimizer step)."""

    def __init__(self, params, decay: float, warmup: bool = True, update_after_step: int = 0):
        self.params = list(params)
        self.decay, self.warmup, self.update_after_step = decay, warmup, update_after_step
        self.shadow = [p.detach().clone() for p in self.params]
        self.step = 0

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (0: the average becomes the weights)."""
        if step <= self.update_after_step:
            return 0.0
        if not self.warmup:
            return self.decay
        t = step - self.update_after_step
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = self.decay_at(step)
        if decay == 0.0:
            torch._foreach_copy_(self.shadow, [p.detach() for p in self.params])
        else:
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)
        self.step = step

    @contextlib.contextmanager
    def swapped_in(self):
        """The average in the parameters for the block; the raw weights back, exactly, after it."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, raw)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """The average into the parameters for good (the export, after the last step)."""
        torch._foreach_copy_(self.params, self.shadow)

    # accelerate's register_for_checkpointing reads and writes these
    def state_dict(self) -> dict:
        return {"step": self.step, "decay": self.decay, "shadow": [s.detach().cpu() for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise SdtuneError("the checkpoint's EMA weights do not fit this run's trainable weights; resume with "
                              "the run's own config or use a new output_dir")
        for s, saved in zip(self.shadow, shadow):
            s.copy_(saved)
        self.step = int(state["step"])


def make_ema(cfg, accelerator, params) -> EMA | None:
    """The run's EMA over ``params`` (the optimizer's), registered for checkpointing; None without ``ema_decay``."""
    from accelerate.utils import DistributedType

    if cfg.ema_decay is None:
        return None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise SdtuneError("ema_decay averages whole weights, and FSDP/DeepSpeed shard them; set ema_decay: null, or "
                          "launch with configs/accelerate/multi_gpu.yaml")
    ema = EMA(params, cfg.ema_decay, cfg.ema_warmup, cfg.ema_update_after_step)
    accelerator.register_for_checkpointing(ema)
    return ema


def check_resume(path: Path, ema: EMA | None) -> None:
    """A run with EMA resumes only from a checkpoint holding its average (one line otherwise)."""
    if ema is not None and not (Path(path) / CHECKPOINT_FILE).is_file():
        raise SdtuneError(f"checkpoint {path} was written by a run without ema_decay, so it holds no average to "
                          "continue; resume with ema_decay: null, or start a new output_dir")


@contextlib.contextmanager
def swapped_in(ema: EMA | None):
    """``ema.swapped_in()``, or nothing without EMA."""
    if ema is None:
        yield
    else:
        with ema.swapped_in():
            yield
