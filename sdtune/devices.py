"""Choosing the device and dtype: sensible defaults, explicit overrides."""
from __future__ import annotations

import torch

from sdtune.errors import SdtuneError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` if given (validated), else CUDA, then Apple MPS, then CPU."""
    if requested:
        name = requested.split(":")[0]
        if name == "cuda" and not torch.cuda.is_available():
            raise SdtuneError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise SdtuneError("--device mps was asked for but Apple MPS is not available; use --device cpu")
        if name not in {"cuda", "mps", "cpu"}:
            raise SdtuneError(f"unknown device {requested!r}; choose cuda, mps or cpu")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """``requested`` if given, else fp16 on CUDA/MPS and fp32 on CPU.

    fp16 on the CPU is slow and poorly supported by conv kernels, so it is never the CPU default.
    """
    if requested:
        if requested not in DTYPES:
            raise SdtuneError(f"unknown dtype {requested!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[requested]
    return torch.float16 if device.type in {"cuda", "mps"} else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
