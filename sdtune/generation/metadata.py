"""Traceable outputs: every generation parameter in the PNG and in a JSON sidecar.

The PNG carries two text chunks: ``sdtune`` (the parameters as JSON, read back by
``read_params``) and ``parameters`` (a human-readable A1111-style summary many image viewers and
tools display). The sidecar ``<name>.json`` holds the same JSON for scripts. Both files are written
under a temporary name and renamed, so an interrupted run leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdtune.errors import SdtuneError
from sdtune.imageio import atomic_path, write_text_atomic

KEY = "sdtune"


def summary(params: dict) -> str:
    """A1111-style one-paragraph summary (prompt, negative, then key: value pairs)."""
    lines = [params.get("prompt", "")]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    pairs = [("Steps", "steps"), ("Sampler", "scheduler"), ("CFG scale", "guidance"), ("Seed", "seed"),
             ("Mode", "mode"), ("Strength", "strength"), ("Model", "model"), ("LoRA", "lora"),
             ("LoRA scale", "lora_scale")]
    items = [f"{label}: {params[key]}" for label, key in pairs if params.get(key) is not None]
    if params.get("width"):
        items.insert(4, f"Size: {params['width']}x{params['height']}")
    lines.append(", ".join(items))
    return "\n".join(lines)


def _stem(params: dict, index: int) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "-", params.get("prompt", "")).strip("-")[:40] or "image"
    return f"{index:04d}-{params.get('mode', 'img')}-{params.get('seed', 0)}-{words}"


def _next_index(out_dir: Path) -> int:
    used = [int(m.group(1)) for p in out_dir.glob("*.png") if (m := re.match(r"(\d{4,})-", p.name))]
    return max(used, default=-1) + 1


def save_result(image: Image.Image, params: dict, path: str | os.PathLike) -> Path:
    """Write ``image`` to ``path`` (PNG, params in text chunks) and ``path`` with .json beside it."""
    path = Path(path)
    text = json.dumps(params, indent=2, sort_keys=True, default=str)
    info = PngImagePlugin.PngInfo()
    info.add_itxt(KEY, text)
    info.add_itxt("parameters", summary(params))
    # Sidecar first: a PNG under its final name always has its JSON beside it.
    write_text_atomic(path.with_suffix(".json"), text + "\n")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def save_results(results, out_dir: str | os.PathLike) -> list[Path]:
    """Save each result (``.image``, ``.params``) as a numbered PNG + JSON in ``out_dir``; return the PNG paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SdtuneError(f"--out {out} exists and is not a folder; pass a folder for the images")
    out.mkdir(parents=True, exist_ok=True)
    start = _next_index(out)
    return [save_result(r.image, r.params, out / f"{_stem(r.params, start + i)}.png") for i, r in enumerate(results)]


def read_params(png_path: str | os.PathLike) -> dict:
    """The generation parameters stored in an sdtune PNG (or, failing that, its JSON sidecar)."""
    p = Path(png_path)
    if not p.is_file():
        raise SdtuneError(f"image not found: {p}")
    try:
        with Image.open(p) as img:
            text = getattr(img, "text", {}).get(KEY) or img.info.get(KEY)
    except OSError as exc:
        raise SdtuneError(f"{p} could not be read as an image ({type(exc).__name__})") from exc
    if text is None and p.with_suffix(".json").is_file():
        text = p.with_suffix(".json").read_text()
    if text is None:
        raise SdtuneError(f"{p} carries no sdtune parameters (not made by sdtune, or its metadata was stripped)")
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SdtuneError(f"the sdtune parameters in {p} are not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise SdtuneError(f"the sdtune parameters in {p} are not a JSON object")
    return params
