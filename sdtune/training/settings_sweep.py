"""The settings to use the kept weights with: a small sweep over guidance scale and LoRA scale (and, when asked, a
guidance interval) on the evaluation prompts, after training.

Each setting draws the subject and class prompts with the kept weights; the base model draws the class prompts at
the same guidance (drift is measured against the base at the setting's own guidance). The recommendation is the
setting with the highest likeness among those that keep the selection bounds (drift, bleed, prompt following); when
none keeps them, the one with the least drift. It goes to the model card and to the LoRA files' metadata
(``sdtune_recommended``), which ``sdtune infer`` and the web UI read when the user gives no guidance or LoRA scale.
"""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

from sdtune.models.lora import RECOMMENDED_KEY as METADATA_KEY  # noqa: F401 - one name for writer and readers
from sdtune.training import evaluation as ev
from sdtune.training.selection import combine, eligible, headline

log = logging.getLogger("sdtune.train")


SWEEP_PROMPTS = 8  # per set and concept: a setting is compared on the first 8 subject and class prompts


def _first(ci, n: int):
    """A concept's plan cut to its first ``n`` subject and class prompts (and their base images), no other classes."""
    from dataclasses import replace

    prompts = ev.EvalPrompts(subject=ci.prompts.subject[:n], klass=ci.prompts.klass[:n], other=())
    return replace(ci, prompts=prompts, base={k: v[:n] for k, v in ci.base.items() if k in ("subject", "klass")})


def sweep(watch, lora: bool) -> dict:
    """Try every setting; return {"guidance", "lora_scale", "guidance_interval", "likeness", ..., "table"}."""
    cfg = watch.cfg
    full_plan, watch.plan = watch.plan, [_first(ci, SWEEP_PROMPTS) for ci in watch.plan]
    try:
        return _sweep(watch, cfg, lora)
    finally:
        watch.plan = full_plan


def _sweep(watch, cfg, lora: bool) -> dict:
    names = [s.name for s in watch.scorers]
    scales = cfg.sweep_lora_scale if lora and cfg.adapter != "oft" else [1.0]  # an OFT rotation has no scale
    intervals = [None] + ([cfg.sweep_guidance_interval] if cfg.sweep_guidance_interval else [])
    table = []
    for guidance in cfg.sweep_guidance:
        for interval in intervals:
            if guidance == cfg.eval_guidance and interval is None and all(ci.base for ci in watch.plan):
                base = [SimpleNamespace(**ci.base) for ci in watch.plan]  # the evaluations' own base images
            else:
                base = watch._draw(guidance=guidance, interval=interval, sets=("subject", "klass"), base=True)
            for scale in scales:
                drawn = watch._draw(guidance=guidance, lora_scale=scale, interval=interval, sets=("subject", "klass"))
                heads = []
                for ci, b, d in zip(watch.plan, base, drawn):
                    d.base = {"subject": b.subject, "klass": b.klass}
                    d.other = []
                    heads.append(headline(ev.concept_metrics(watch.scorers, d), names))
                row = {"guidance": guidance, "lora_scale": scale, "guidance_interval": interval,
                       **{k: round(v, 4) for k, v in combine(heads).items()}}
                row["eligible"] = eligible(row, cfg)
                table.append(row)
                log.info("settings sweep: guidance %s, LoRA scale %s%s: %s", guidance, scale,
                         f", interval {interval}" if interval else "",
                         ", ".join(f"{k} {row[k]:.3f}" for k in ("likeness", "drift", "bleed", "prompt_following")
                                   if k in row))
    ok = [r for r in table if r["eligible"] and "likeness" in r]
    # The highest likeness within the bounds; ties: the lower guidance and LoRA scale (gentler on the base).
    chosen = (max(ok, key=lambda r: (r["likeness"], -r["guidance"], -r["lora_scale"])) if ok
              else min(table, key=lambda r: (r.get("drift", 0.0), -r.get("likeness", 0.0))))
    return {**{k: v for k, v in chosen.items() if k != "eligible"}, "within_bounds": bool(ok), "table": table}


def metadata_value(settings: dict) -> str:
    """What the LoRA files carry under ``sdtune_recommended``: JSON of guidance, LoRA scale and interval."""
    return json.dumps({"guidance": settings["guidance"], "lora_scale": settings["lora_scale"],
                       "guidance_interval": settings.get("guidance_interval")}, sort_keys=True)
