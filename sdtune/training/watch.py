"""The run that knows when its subject is learned: evaluations during training, the best step kept, the early stop,
the settings recommended for the kept weights.

``Watch`` is what the recipe's loop calls: ``start`` before the first step (the base model's images; the step-0
evaluation of a fresh run), ``due``/``evaluate`` after a step (True: stop now), ``finish`` after the last weights
are saved (the last evaluation, the kept weights back in the model, the settings sweep). What an evaluation
measures is ``sdtune.training.evaluation``; the rule that picks the best and stops is ``sdtune.training.selection``;
the sweep is ``sdtune.training.settings_sweep``. Everything here runs on the main process; the others wait, and
learn whether to stop from it.

Scorers: the DINO and CLIP models the config names (``eval_dino``, ``eval_clip``), plus any the caller passes to
``dreambooth.train(cfg, scorers=...)`` - an object with ``name`` and ``image_embeds(images)`` (unit vectors)
and/or ``metrics(concept_images)`` (the world's judge is one: ``sdtune.world.judge_scorer``).
"""
from __future__ import annotations

import logging
import math
import time

import torch

from sdtune.errors import SdtuneError
from sdtune.imageio import write_text_atomic
from sdtune.training import adapters
from sdtune.training import evaluation as ev
from sdtune.training.config import concepts_of
from sdtune.training.selection import Selection, combine, headline, plot_svg

log = logging.getLogger("sdtune.train")


def config_scorers(cfg) -> list:
    """The DINO / CLIP scorers the config names."""
    from sdtune.models.image_features import ClipScorer, DinoScorer

    out = []
    if cfg.eval_dino:
        out.append(DinoScorer(cfg.eval_dino))
    if cfg.eval_clip:
        out.append(ClipScorer(cfg.eval_clip))
    return out


class Watch:
    """Evaluations of one run (main process), and the decisions made from them (every process)."""

    def __init__(self, run, instances, scorers, start_step: int, export_best):
        cfg = run.cfg
        self.run, self.cfg, self.scorers, self.export_best = run, cfg, list(scorers), export_best
        self.main = run.accelerator.is_main_process
        self.plan = ev.plan_concepts(cfg, concepts_of(cfg), ev.concept_references(instances))
        self.sample = ev.Sampler(run.pipe, run.sdxl, cfg.resolution, cfg.eval_steps)
        self.init_images = (ev.init_images(cfg.eval_img2img_images, cfg.resolution)
                            if cfg.eval_img2img_images and cfg.eval_img2img_strength else None)
        self.selection = Selection.resume(cfg, run.output_dir, start_step) if start_step else Selection(cfg)
        self.seconds = 0.0
        self.last_step = None
        self.settings: dict | None = None

    # --- modules ----------------------------------------------------------------------------------------
    def _modules(self):
        """(unet, text encoder, SDXL's second text encoder), unwrapped, as they train now."""
        acc, run = self.run.accelerator, self.run
        unet = acc.unwrap_model(run.trained[0])
        te = acc.unwrap_model(run.trained[1]) if len(run.trained) > 1 else run.pipe.text_encoder
        return unet, te, getattr(run.pipe, "text_encoder_2", None)

    def _sampler(self):
        unet, te, te2 = self._modules()
        return self.sample.pipeline(unet, te, te2), (unet, te, te2)

    def _draw(self, guidance=None, lora_scale: float = 1.0, interval=None, sets=ev.SETS, base=False):
        sampler, modules = self._sampler()
        guidance = self.cfg.eval_guidance if guidance is None else guidance
        trainable = [m for m in modules if m is not None]
        was = [m.training for m in trainable]
        for m in trainable:
            m.eval()
        try:
            strength = None if base or sets != ev.SETS else self.cfg.eval_img2img_strength
            with torch.no_grad(), self.run.accelerator.autocast():
                if base:
                    with adapters.disabled(*modules):
                        return ev.draw(self.sample, sampler, self.plan, self.cfg.eval_seed, guidance, interval, sets)
                with ev.lora_scale(lora_scale, *modules):
                    return ev.draw(self.sample, sampler, self.plan, self.cfg.eval_seed, guidance, interval, sets,
                                   img2img_strength=strength, init_images=self.init_images)
        finally:
            for m, flag in zip(trainable, was):
                m.train(flag)

    # --- the loop's calls -------------------------------------------------------------------------------
    def start(self, step: int) -> None:
        """The base model's images (LoRA off; a full fine-tune's before its first step), and the step-0 record."""
        if self.main:
            t = time.perf_counter()
            if self.cfg.method == "full" and step > 0:
                log.warning("eval: a resumed full fine-tune has no base model to draw: drift and bleed are not "
                            "measured in this run")
            else:
                drawn = self._draw(base=True)
                for ci, d in zip(self.plan, drawn):
                    ci.base = d.base = {name: getattr(d, name) for name in ev.SETS}
                if step == 0 and not self.selection.history:
                    self._record(0, drawn)
            self.seconds += time.perf_counter() - t
        self.run.accelerator.wait_for_everyone()

    def due(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0 and step != self.last_step

    def evaluate(self, step: int) -> bool:
        """Evaluate at ``step``; keep it if it is the new best; True when the run should stop (every process)."""
        stop = False
        if self.main:
            t = time.perf_counter()
            new_best = self._record(step, self._draw())
            if new_best and self.cfg.keep_best:
                self.export_best(step)
            stop = self.cfg.stop_when_learned and self.selection.should_stop()
            self.seconds += time.perf_counter() - t
        self.last_step = step
        flag = torch.tensor([1.0 if stop else 0.0], device=self.run.accelerator.device)
        return bool(self.run.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _record(self, step: int, drawn: list) -> bool:
        names = [s.name for s in self.scorers]
        per_concept, record = [], {"step": step}
        for ci in drawn:
            metrics = ev.concept_metrics(self.scorers, ci)
            per_concept.append(headline(metrics, names))
            prefix = f"{ci.name}/" if len(drawn) > 1 else ""
            record.update({prefix + k: round(v, 4) for k, v in metrics.items() if math.isfinite(v)})
            if prefix:
                record.update({prefix + k: round(v, 4) for k, v in per_concept[-1].items()})
        record.update({k: round(v, 4) for k, v in combine(per_concept).items()})
        new_best = self.selection.add(record)
        self.selection.save(self.run.output_dir)
        self._log(step, record, drawn)
        return new_best

    def _log(self, step: int, record: dict, drawn: list) -> None:
        import numpy as np

        acc = self.run.accelerator
        acc.log({f"eval/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                step=step)
        tracker = acc.get_tracker("tensorboard", unwrap=True)
        if tracker is not None and hasattr(tracker, "add_images"):
            for name in ("subject", "klass"):
                images = [np.asarray(img.convert("RGB")) for img in getattr(drawn[0], name)]
                if images:
                    tracker.add_images(f"eval/{name}", np.stack(images), step, dataformats="NHWC")
        best = self.selection.best
        parts = [f"{q} {record[q]:.3f}" for q in ("likeness", "prompt_following", "drift", "bleed") if q in record]
        log.info("eval step %d: %s%s", step, ", ".join(parts) or "no metric",
                 f" (best: step {best['step']})" if best else "")

    # --- after the last step --------------------------------------------------------------------------
    def finish(self, step: int, load_best) -> dict:
        """The last evaluation, the kept weights loaded back (``load_best(step)``) and the settings sweep; returns
        what the model card says (main process; the others get {})."""
        if not self.main:
            return {}
        t = time.perf_counter()
        if self.last_step != step:
            new_best = self._record(step, self._draw())
            if new_best and self.cfg.keep_best:
                self.export_best(step)
            self.last_step = step
        best = self.selection.best
        kept = best["step"] if (best is not None and self.cfg.keep_best) else step
        if kept != step:
            load_best(kept)
        sweep_s = time.perf_counter()
        if self.cfg.recommend_settings:
            from sdtune.training.settings_sweep import sweep

            self.settings = sweep(self, lora=self.cfg.method == "lora")
        sweep_s = time.perf_counter() - sweep_s
        self.seconds += time.perf_counter() - t
        write_text_atomic(self.run.output_dir / "eval.svg",
                          plot_svg(self.selection.history, best["step"] if best else None))
        verdict = self.selection.verdict()
        if best is not None and not self.cfg.keep_best:
            verdict = verdict.replace(" kept:", " best:") + "; keep_best is off, so the last weights are the run's"
        return {"history": self.selection.history, "best": best, "kept_step": kept, "last_step": step,
                "verdict": verdict, "settings": self.settings, "eval_seconds": round(self.seconds, 1),
                "sweep_seconds": round(sweep_s, 1), "plot": "eval.svg"}


def check_scorers(cfg, scorers) -> None:
    """An evaluation needs something to measure likeness with: one line saying how to give it, before training."""
    if cfg.eval_every and not scorers:
        raise SdtuneError("eval_every needs a model to measure likeness with: set eval_dino (a DINO ViT folder or "
                          "cached hub id, e.g. facebook/dino-vits16) or eval_clip (e.g. openai/clip-vit-base-patch32)")
