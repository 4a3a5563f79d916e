"""How the page words what it shows (no gradio): gallery captions, the parameters table, the status lines.

A person coming from AUTOMATIC1111 reads a result by its caption (mode, seed, LoRA and scale), its parameters as a
table (the JSON one click away), and a status line that says what just finished and when - so a new image is
visibly new even when it looks like the last one.
"""
from __future__ import annotations

import time
from pathlib import Path

# The parameters a person reads first, in this order; the rest follow alphabetically, nulls left out.
FIRST = ("mode", "prompt", "negative_prompt", "seed", "steps", "guidance", "guidance_interval", "scheduler", "width",
         "height", "strength", "lora", "lora_scale", "model", "inpaint_model", "depth_model")


def caption(params: dict) -> str:
    """Short enough not to be cut off under a thumbnail: mode, seed, LoRA and scale (the prompt is in the table)."""
    lora = f" · LoRA {Path(str(params['lora'])).name} ×{params.get('lora_scale') or 1:g}" if params.get("lora") \
        else " · no LoRA"
    return f"{params.get('mode')} · seed {params.get('seed')}{lora}"


def _cell(value) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_cell(v) for v in value)
    else:
        text = str(value)
    if len(text) > 90:  # paths: the end names the file
        text = "…" + text[-89:]
    return text.replace("|", "\\|").replace("\n", " ")


def params_table(params: dict | None) -> str:
    """The image's parameters as a two-column Markdown table, nulls left out (the JSON below has everything)."""
    if not params:
        return "*(click an image to see its parameters)*"
    keys = [k for k in FIRST if k in params] + sorted(k for k in params if k not in FIRST)
    rows = [f"| {k.replace('_', ' ')} | {_cell(params[k])} |" for k in keys if params[k] not in (None, "", [])]
    return "\n".join(["| parameter | value |", "|---|---|", *rows])


def done_line(results: list, seconds: float, images_dir: Path, loads: int) -> str:
    """What just finished, with the clock time: "txt2img done at 00:41:03 in 2.3 s: 1 image (64x64, seed 11) ..."."""
    params = results[-1][2]
    seeds = ", ".join(str(r[2].get("seed")) for r in results)
    size = f"{params.get('width')}x{params.get('height')}" if params.get("width") else ""
    return (f"{params.get('mode')} done at {time.strftime('%H:%M:%S')} in {seconds:.1f} s: {len(results)} image(s) "
            f"({size}{', ' if size else ''}seed {seeds}) in {images_dir}; engine loads so far: {loads}")
