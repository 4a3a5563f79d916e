"""Regeneration from an sdtune PNG's metadata: the engine it was made with (``engine_for_params``), its stored
parameters checked before any model load (``check_params``) and the image drawn again (``regenerate``).
"""
from __future__ import annotations

from sdtune.errors import SdtuneError
from sdtune.generation.components import EngineSpec
from sdtune.generation.requests import check_request
from sdtune.models.prompts import CHUNK


def engine_for_params(params: dict, *, device=None, dtype=None, allow_pickle: bool = False):
    """Load the engine an sdtune PNG was made with (model, dedicated models, base, LoRA + scale, dtype).

    ``allow_pickle`` is never taken from the file: a PNG must not be able to switch pickle loading on.
    """
    from sdtune.generation.engine import Engine

    return Engine.load(EngineSpec.from_params(params, device=device, dtype=dtype, allow_pickle=allow_pickle))


def regenerate(params: dict, *, device=None, dtype=None, allow_pickle: bool = False, engine=None, on_step=None) -> list:
    """Re-run the generation described by an sdtune PNG's params (one image, its own seed); a list of ``Result``."""
    request = check_params(params)
    engine = engine or engine_for_params(params, device=device, dtype=dtype, allow_pickle=allow_pickle)
    return engine.generate(params["mode"], prompt=params.get("prompt") or "",
                           negative_prompt=params.get("negative_prompt") or "", on_step=on_step,
                           paste_back=bool(params.get("paste_back")), **request)


def check_params(params: dict) -> dict:
    """Validate stored params (before any model load); return the request to pass to ``generate``."""
    missing = [k for k in ("mode", "model", "seed", "steps", "guidance") if params.get(k) is None]
    if missing:
        raise SdtuneError(f"the image's metadata lacks {', '.join(missing)}; it cannot be regenerated")
    for key in ("prompt", "negative_prompt"):
        if params.get(key) is not None and not isinstance(params[key], str):
            raise SdtuneError(f"the image's metadata has a {key} that is not text ({params[key]!r}); "
                              "it cannot be regenerated")
    for key in ("image", "mask", "depth_map"):
        if params.get(key) == "<in-memory>":
            raise SdtuneError(f"the image was made from an in-memory {key} (API call), which was not saved; "
                              "it cannot be regenerated from the PNG alone")
    request = request_from_params(params)
    check_request(params["mode"], **request)
    return request


def request_from_params(params: dict) -> dict:
    """The ``generate`` keyword arguments an image's stored params describe (one image)."""
    return dict(steps=params["steps"], guidance=params["guidance"], seed=params["seed"], width=params.get("width"),
                height=params.get("height"), scheduler=params.get("scheduler"), image=params.get("image"),
                mask=params.get("mask"), strength=params.get("strength"), depth_map=params.get("depth_map"),
                num_images=1, long_prompt=params.get("long_prompt") or CHUNK,
                guidance_interval=params.get("guidance_interval"))
