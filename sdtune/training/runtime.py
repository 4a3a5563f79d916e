"""The run around the loop: launches checked, checkpoints of trainable weights only, resumes matched to their run,
stop requests honoured at a step's end, and the config as tensorboard takes it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sdtune.errors import LaunchError, SdtuneError
from sdtune.training.config import TrainConfig, config_to_dict


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
