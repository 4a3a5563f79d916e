"""The page's form checks, field by field (no gradio): each bad value gets one line naming the field and what it
takes, so the page can show it on the field itself and nothing runs on a silently corrected value.

``generate_problems`` checks the Generate form (the CLI's own limits from ``sdtune.generation.requests``, worded for
the page's boxes); ``train_problems`` checks the Train form's fields against the ranges and choices their config
keys declare (``sdtune.training.config``). Both return ``{field: message}``, empty when all is well.
"""
from __future__ import annotations

import math

MAX_IMAGES_PER_CLICK = 8  # a batch the 2-core page still returns in seconds; more is a loop of clicks


def _number(value):
    """A form value as a finite float, or None for an empty box / text / NaN."""
    if value is None or isinstance(value, bool) or str(value).strip() == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _whole(value):
    number = _number(value)
    return int(number) if number is not None and number == int(number) else None


def generate_problems(mode: str, *, prompt, steps, guidance, seed, width, height, num_images, strength, lora,
                      lora_scale, guidance_interval) -> dict[str, str]:
    """The Generate form's bad values, by field name (the ``generate_handler``'s argument names)."""
    from sdtune.generation.requests import MAX_SEED, MAX_SIDE, MAX_STEPS

    problems: dict[str, str] = {}
    if not str(prompt or "").strip():
        problems["prompt"] = ("prompt is empty: describe the image (an empty prompt makes an unconditional image, "
                              "not yours)")
    n = _whole(steps)
    if n is None or not 1 <= n <= MAX_STEPS:
        problems["steps"] = f"steps {_shown(steps)}: a whole number from 1 to {MAX_STEPS} (20-30 is usual)"
    g = _number(guidance)
    if g is None or g < 0:
        problems["guidance"] = f"guidance {_shown(guidance)}: a number >= 0 (1 = no guidance, 7.5 is usual)"
    s = _whole(seed)
    if s is None or not -1 <= s <= MAX_SEED - MAX_IMAGES_PER_CLICK:
        problems["seed"] = f"seed {_shown(seed)}: a whole number from 0 to {MAX_SEED - MAX_IMAGES_PER_CLICK}, or -1 " \
                           "for a random one"
    for name, value in (("width", width), ("height", height)):
        v = _whole(value)
        if v is None or (v != 0 and (v < 8 or v % 8 or v > MAX_SIDE)):
            near = f"; try {max(8, round(v / 8) * 8)}" if v is not None and v > 0 and v % 8 else ""
            problems[name] = (f"{name} {_shown(value)}: 0 (the model's size) or a multiple of 8 up to {MAX_SIDE} "
                              f"(the VAE works on 8-pixel blocks){near}")
    k = _whole(num_images)
    if k is None or not 1 <= k <= MAX_IMAGES_PER_CLICK:
        problems["num_images"] = f"images {_shown(num_images)}: a whole number from 1 to {MAX_IMAGES_PER_CLICK}"
    if mode != "txt2img":
        st = _number(strength)
        if st is None or not 0 < st <= 1:
            problems["strength"] = (f"strength {_shown(strength)}: a number in (0, 1] (0.3 keeps most of the image, "
                                    "1 repaints it fully)")
        elif n is not None and 1 <= n and int(n * st) < 1:
            problems["strength"] = f"strength {st:g} x {n} steps leaves no denoising step; raise one of them"
    if str(lora or "").strip() and _number(lora_scale) is None:
        problems["lora_scale"] = f"LoRA scale {_shown(lora_scale)}: a number (1 = as trained, 0 = off)"
    text = str(guidance_interval or "").strip()
    if text:
        from sdtune.errors import ParameterError
        from sdtune.guidance_interval import parse_interval

        try:
            parse_interval(text)
        except ParameterError:
            problems["guidance_interval"] = (f"guidance interval {text!r}: two noise levels LO,HI with "
                                             "0 <= LO < HI <= 1 (0 = clean, 1 = pure noise), e.g. 0.3,1; or empty")
    return problems


def train_problems(values: dict) -> dict[str, str]:
    """The Train form's key fields (``train_form.FIELDS``), each checked as its config key declares: its type,
    range (``Range``) or choices. ``values`` maps config keys to the form's values."""
    from sdtune.ui.train_form import FIELDS

    problems = {}
    for spec in FIELDS:
        if spec.key not in values:
            continue
        message = spec.problem(values[spec.key])
        if message:
            problems[spec.key] = message
    return problems


def _shown(value) -> str:
    return "(empty)" if value is None or str(value).strip() == "" else f"{value:g}" if isinstance(value, float) \
        else str(value)
