"""Which evaluated step is best, and when the subject is learned: the rule, the run's evaluation history
(``eval.jsonl``), the early stop and what the model card and summary line say about them.

The rule (every bound a key of ``TrainConfig``):

1. An evaluation is **eligible** when its class drift is at most ``max_drift``, its bleed at most ``max_bleed`` and
   its prompt following at least ``min_prompt_following`` (a quantity no scorer measured does not bound).
2. The **best** is the eligible evaluation with the highest likeness; a tie goes to the later step (within the
   bounds, more training holds the subject more firmly: a share such as the judge's saturates before every mode
   is learned).
3. The subject is **learned** once a best exists whose likeness is at least ``learned_likeness`` (any, when null);
   ``stop_when_learned`` ends the run when, after that, ``stop_patience`` evaluations in a row have not raised the
   highest likeness (a tie is no rise).

With ``eval_img2img_strength`` the likeness is the lower of the txt2img and the img2img probe's. Which metric stands
for each quantity: the one a scorer names as its headline (the world's judge: ``likeness`` is
its subject share, ``bleed`` its share of images without the identifier that show the subject), else DINO's,
else CLIP's, else the first feature scorer's. With several concepts the run is as good as its worst concept:
the lowest likeness and prompt following, the highest drift and bleed (cross-talk counts as bleed).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.imageio import write_text_atomic

EVAL_FILE = "eval.jsonl"
QUANTITIES = ("likeness", "prompt_following", "drift", "bleed")
FEATURE_ORDER = ("dino", "clip")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def headline(metrics: dict[str, float], scorer_names: list[str]) -> dict[str, float]:
    """One concept's likeness, prompt following, drift and bleed, as the rule reads them (missing ones left out)."""
    order = [n for n in FEATURE_ORDER if n in scorer_names] + [n for n in scorer_names if n not in FEATURE_ORDER]
    out = {}
    for q in QUANTITIES:
        if _finite(metrics.get(q)):  # a scorer's own headline
            out[q] = metrics[q]
            continue
        for name in order:
            value = metrics.get(f"{q}_{name}")
            if _finite(value):
                out[q] = value
                break
    # With the img2img probe the subject is learned as far as its weaker mode: the lower likeness of the two.
    img2img = metrics.get("likeness_img2img")
    if not _finite(img2img):
        img2img = next((metrics[f"likeness_img2img_{n}"] for n in order
                        if _finite(metrics.get(f"likeness_img2img_{n}"))), None)
    if _finite(img2img) and "likeness" in out:
        out["likeness"] = min(out["likeness"], img2img)
    crosstalk = [metrics.get(f"crosstalk_{n}") for n in order if _finite(metrics.get(f"crosstalk_{n}"))]
    if crosstalk:
        out["bleed"] = max(out.get("bleed", 0.0), crosstalk[0])
    return out


def combine(per_concept: list[dict[str, float]]) -> dict[str, float]:
    """Several concepts' headlines -> the run's: the worst of each."""
    out = {}
    for q, worst in (("likeness", min), ("prompt_following", min), ("drift", max), ("bleed", max)):
        values = [h[q] for h in per_concept if q in h]
        if values:
            out[q] = worst(values)
    return out


def eligible(record: dict, cfg) -> bool:
    """Rule 1: drift, bleed and prompt following within their bounds."""
    return (record.get("drift", 0.0) <= cfg.max_drift and record.get("bleed", 0.0) <= cfg.max_bleed
            and record.get("prompt_following", math.inf) >= cfg.min_prompt_following)


def why_not(record: dict, cfg) -> str:
    """The first bound an evaluation breaks, in words (empty when eligible)."""
    if record.get("drift", 0.0) > cfg.max_drift:
        return f"drift {record['drift']:.3f} > max_drift {cfg.max_drift}"
    if record.get("bleed", 0.0) > cfg.max_bleed:
        return f"bleed {record['bleed']:.3f} > max_bleed {cfg.max_bleed}"
    if record.get("prompt_following", math.inf) < cfg.min_prompt_following:
        return f"prompt following {record['prompt_following']:.3f} < min_prompt_following {cfg.min_prompt_following}"
    return ""


@dataclass
class Selection:
    """The run's evaluations so far and the best of them by the rule."""

    cfg: object
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    risen_at: int | None = None  # the step at which the highest likeness last rose (the early stop counts from it)

    def add(self, record: dict) -> bool:
        """Record one evaluation (with its ``step``); True when it is the new best."""
        record["eligible"] = eligible(record, self.cfg)
        self.history.append(record)
        if record.get("step", 0) == 0 or not record["eligible"] or not _finite(record.get("likeness")):
            return False  # step 0 is the base model itself: nothing learned to keep
        if self.best is None or record["likeness"] >= self.best["likeness"]:
            if self.best is None or record["likeness"] > self.best["likeness"]:
                self.risen_at = record["step"]
            self.best = record
            return True
        return False

    @property
    def learned(self) -> bool:
        need = self.cfg.learned_likeness
        return self.best is not None and (need is None or self.best["likeness"] >= need)

    def should_stop(self) -> bool:
        """Rule 3: learned, and the last ``stop_patience`` evaluations after the best did not beat it."""
        if not self.learned:
            return False
        after = [r for r in self.history if r["step"] > self.risen_at]
        return len(after) >= self.cfg.stop_patience

    # --- the history file ---------------------------------------------------------------------------------
    def save(self, output_dir: Path) -> None:
        write_text_atomic(output_dir / EVAL_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history))

    @classmethod
    def resume(cls, cfg, output_dir: Path, up_to_step: int) -> "Selection":
        """The history a resumed run continues: the evaluations of ``eval.jsonl`` up to its checkpoint's step (the
        later ones are evaluated again), the best among them found again by the rule."""
        selection = cls(cfg)
        path = output_dir / EVAL_FILE
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a torn last line of an interrupted write cannot be: the file is replaced whole
                if isinstance(record, dict) and record.get("step", math.inf) <= up_to_step:
                    selection.add({k: v for k, v in record.items() if k != "eligible"})
        return selection

    # --- what the run says about it -------------------------------------------------------------------
    def verdict(self) -> str:
        """Which step is kept and why, in one line."""
        cfg = self.cfg
        if self.best is None:
            last = self.history[-1] if self.history else {}
            reason = why_not(last, cfg) if last else "no evaluation"
            return f"no evaluated step kept its bounds (last: {reason}); the last weights are the run's"
        b = self.best
        parts = [f"likeness {b['likeness']:.3f}"] + [f"{q.replace('_', ' ')} {b[q]:.3f}"
                                                     for q in QUANTITIES[1:] if _finite(b.get(q))]
        bounds = (f"drift <= {cfg.max_drift}, bleed <= {cfg.max_bleed}, prompt following >= "
                  f"{cfg.min_prompt_following}")
        learned = "" if self.learned else f" (below learned_likeness {cfg.learned_likeness}: not yet learned)"
        return (f"step {b['step']} kept: {', '.join(parts)}; the highest likeness of {len(self.history)} evaluations "
                f"within {bounds}{learned}")


def plot_svg(history: list[dict], best_step: int | None) -> str:
    """The evaluation curves (likeness, prompt following, drift, bleed against step) as a small SVG."""
    width, height, pad = 560, 240, 36
    steps = [r["step"] for r in history]
    colours = {"likeness": "#1f77b4", "prompt_following": "#2ca02c", "drift": "#d62728", "bleed": "#ff7f0e"}
    values = [r[q] for r in history for q in colours if _finite(r.get(q))]
    lo, hi = min(values + [0.0]), max(values + [1.0])
    top = max(steps + [1])

    def xy(step, v):
        return (pad + (width - 2 * pad) * step / top, height - pad - (height - 2 * pad) * (v - lo) / ((hi - lo) or 1))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
           f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">step (0 - {top})</text>',
           f'<text x="4" y="{pad - 8}">{hi:.2f}</text><text x="4" y="{height - pad}">{lo:.2f}</text>']
    if best_step is not None:
        x, _ = xy(best_step, lo)
        out.append(f'<line x1="{x:.1f}" y1="{pad}" x2="{x:.1f}" y2="{height - pad}" stroke="#555" '
                   f'stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="{pad + 10}">kept: {best_step}</text>')
    for k, (q, colour) in enumerate(colours.items()):
        points = [xy(r["step"], r[q]) for r in history if _finite(r.get(q))]
        if points:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                       + " ".join(f"{x:.1f},{y:.1f}" for x, y in points) + '"/>')
            out.append(f'<text x="{pad + 10 + 120 * k}" y="{pad - 8}" fill="{colour}">{q.replace("_", " ")}</text>')
    return "\n".join(out + ["</svg>", ""])
