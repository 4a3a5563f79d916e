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


# the schedulers whose clip_sample defaults to True in diffusers
CLIPPING = ("DDIMScheduler", "DDPMScheduler")


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
    if cls_name in CLIPPING and base_config.get("clip_sample") is None:
        # DDIM and DDPM clip the predicted x0 to [-1, 1] unless told otherwise: right for pixels, wrong for SD's
        # latents, which range wider. SD's own configs say clip_sample: false; a config without the key (a PNDM
        # config saved without it, as the embedded family's) would otherwise give DDIM noise (adherence 0.00).
        overrides = {**overrides, "clip_sample": False}
    return cls.from_config(base_config, **overrides)
