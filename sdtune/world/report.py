"""Reports of the main job and its ablations: labelled image grids and Markdown tables.

Shared by ``demo`` and ``ablations`` (which both write reports) so neither imports the other for them.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdtune.errors import SdtuneError


def short(prompt: str) -> str:
    """A prompt without the grammar's "a photo of ", for grid labels."""
    return prompt.replace("a photo of ", "")


def make_grid(cells: list[tuple[Image.Image, str]], cols: int, cell: int = 128) -> Image.Image:
    """Images scaled to ``cell`` px (nearest: pixels stay visible) with a wrapped label under each."""
    font_h, lines = 11, 3
    label_h = font_h * lines + 6
    rows = max(1, -(-len(cells) // cols))
    grid = Image.new("RGB", (cols * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, label) in enumerate(cells):
        x, y = (i % cols) * cell, (i // cols) * (cell + label_h)
        grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        wrapped = textwrap.wrap(label, width=max(8, cell // 6))[:lines]
        for j, line in enumerate(wrapped):
            draw.text((x + 2, y + cell + 2 + j * font_h), line, fill="black")
    return grid


def mask_overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image with the repaint region tinted red, for the report."""
    a = np.asarray(image.convert("RGB"), np.float32)
    m = (np.asarray(mask.convert("L")) > 127)[..., None]
    tinted = np.where(m, a * 0.5 + np.array([255, 0, 0]) * 0.5, a)
    return Image.fromarray(tinted.round().astype(np.uint8), "RGB")


def ablation_table(result: dict) -> str:
    """The Markdown tables of an ablations.json, one per subject (also quoted by the demo's report)."""
    subjects = result.get("subjects") or {}
    if not any(subjects.values()):
        raise SdtuneError("ablations.json holds no variants; rerun sdtune demo --ablations")
    steps = next(iter(next(iter(subjects.values())).values()))["steps"]
    lines = [f"Same subject, seed, class images and {steps} steps; only the named settings differ. "
             f"{result['subject_prompts']} subject prompts in new contexts, {result['class_prompts']} class prompts, "
             f"{result['sample_steps']} sampling steps, guidance {result.get('guidance', 7.5)}; gains are that "
             "guidance minus 1.0 on the subject prompts."]
    for subject, variants in subjects.items():
        lines += ["", f"**{subject}**", "",
                  "| variant | subject fidelity | prompt fidelity | prior preservation | guidance gain (prompt / "
                  "subject fidelity) | train s |", "|---|---|---|---|---|---|"]
        for name, r in variants.items():
            lines.append(f"| {name}: {r['what']} | {r['subject_fidelity']:.3f} | {r['prompt_fidelity']:.3f} | "
                         f"{r['prior_preservation']:.3f} | {r['guidance_gain_after']:+.3f} / "
                         f"{r.get('subject_gain_after', 0.0):+.3f} | {r['train_s']} |")
    return "\n".join(lines)


def load_table(out: Path) -> str | None:
    """The ablation table of OUT/ablations.json, or None when no ablations were run into OUT."""
    path = Path(out) / "ablations.json"
    if not path.is_file():
        return None
    return ablation_table(json.loads(path.read_text()))
