"""Schedulers by name, all built from the model's own scheduler config.

The course swaps PNDM (the default) for LMS with ``LMSDiscreteScheduler.from_config(...)``;
this table does the same for every common sampler, keeping the model's noise schedule and
prediction type (epsilon or v) and changing only the solver. Names follow A1111/kohya usage.
"""
from __future__ import annotations

from sdtune.errors import SdtuneError

# name -> (diffusers class name, extra config overrides)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler",
                       {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def make_scheduler(name: str, base_config):
    """A new scheduler ``name`` configured from ``base_config`` (a scheduler's ``.config``)."""
    import diffusers

    key = name.lower()
    if key not in SCHEDULERS:
        raise SdtuneError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    cls_name, overrides = SCHEDULERS[key]
    cls = getattr(diffusers, cls_name)
    return cls.from_config(base_config, **overrides)
