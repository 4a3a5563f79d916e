"""The world's judge as a scorer of the training run's in-loop evaluation (``sdtune.training.watch``).

It gives two things, for any subject drawn in the embedded world:

- ``image_embeds``: the judge's hidden layer (what all its heads read), unit-normalised - an image-feature space
  where likeness, drift and bleed are measured as in DINO's, for any subject, not only the three the judge names;
- ``metrics``: what the judge reads back - the share of subject images that show the subject (``likeness``, the
  headline; the subject the judge finds in the instance images, else any subject, of the class noun when it is a
  world kind), the share whose stated context (position, background) is honoured against the base model's share
  (``prompt_following``), the share of class images that show the class and not the subject (``judge_prior``), the
  share of seeds whose class image showed the class with the base model and no longer does (``drift``), and the
  share of images without the identifier that show a subject where the base model's did not (``bleed``).

Its prompts must use the world's words (``sdtune.world.scenes``); a prompt it cannot read adds no context check.
"""
from __future__ import annotations

from collections import Counter

import torch

from sdtune.world import scenes
from sdtune.world.evaluation import CONTEXT


class JudgeScorer:
    name = "judge"
    text_embeds = None  # images only

    def __init__(self, judge=None):
        from sdtune.world.judge import Judge

        self.judge = judge or Judge.load()

    def image_embeds(self, images):
        from sdtune.world.judge import to_tensor

        net = self.judge.net
        with torch.no_grad():
            hidden = net.hidden(net.features(to_tensor(list(images), self.judge.config["image_size"])))
        return torch.nn.functional.normalize(hidden, dim=-1)

    def _subject_of(self, references) -> str | None:
        """The world subject the judge sees in most instance images (None: not one it knows)."""
        names = Counter(p["subject"] for p in self.judge.predict(list(references)))
        name, count = names.most_common(1)[0]
        return name if name is not None and count * 2 > len(references) else None

    def metrics(self, ci) -> dict[str, float]:
        judge = self.judge
        name = self._subject_of(ci.references)
        kind = ci.class_noun if ci.class_noun in scenes.KINDS else None
        shows = lambda p: (p["subject"] is not None and (name is None or p["subject"] == name)  # noqa: E731
                           and (kind is None or p["kind"] == kind))
        preds = judge.predict(ci.subject)
        out = {"judge_subject": sum(map(shows, preds)) / len(preds)}
        out["likeness"] = out["judge_subject"]
        if ci.img2img:  # the img2img probe: the subject drawn over another object's image
            out["likeness_img2img"] = out["judge_subject_img2img"] = (sum(map(shows, judge.predict(ci.img2img)))
                                                                      / len(ci.img2img))
        contexts = [{k: v for k, v in scenes.parse(p).items() if k in CONTEXT} for p in ci.prompts.subject]
        if any(contexts) and ci.base.get("subject"):
            base_preds = judge.predict(ci.base["subject"])
            now = [judge.matches(p, c) for p, c in zip(preds, contexts) if c]
            before = [judge.matches(p, c) for p, c in zip(base_preds, contexts) if c]
            out["judge_context"] = sum(now) / len(now)
            out["judge_context_base"] = sum(before) / len(before)
            if out["judge_context_base"] > 0:
                out["prompt_following"] = out["judge_context"] / out["judge_context_base"]
        if ci.klass and kind is not None:
            klass = [p["kind"] == kind and p["subject"] is None for p in judge.predict(ci.klass)]
            out["judge_prior"] = sum(klass) / len(klass)
            if len(ci.base.get("klass", [])) == len(klass):  # drift: the base drew the class on a seed, now it doesn't
                base = [p["kind"] == kind and p["subject"] is None for p in judge.predict(ci.base["klass"])]
                out["drift"] = out["judge_drift"] = sum(b and not k for b, k in zip(base, klass)) / len(klass)
        no_id, no_id_base = ci.klass + ci.other, ci.base.get("klass", []) + ci.base.get("other", [])
        if no_id and len(no_id_base) == len(no_id):
            now, before = judge.predict(no_id), judge.predict(no_id_base)
            out["bleed"] = sum(a["subject"] is not None and b["subject"] is None
                               for a, b in zip(now, before)) / len(no_id)
        return out


def world_scorers(cfg) -> list:
    """The judge, when the run's base model is the embedded family's (the world it was trained to read)."""
    from pathlib import Path

    from sdtune.models.embedded import embedded_model, has_embedded
    from sdtune.training.config import resolve_model

    if not cfg.eval_every or not has_embedded("base"):
        return []
    source = Path(resolve_model(cfg))
    if not source.exists() or source.resolve() != embedded_model("base").resolve():
        return []
    return [JudgeScorer()]
