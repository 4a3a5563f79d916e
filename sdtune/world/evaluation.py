"""Scoring generations: the judge's world metrics and the DreamBooth paper's CLIP/DINO metrics.

Judge metrics (shares in [0, 1]) read each image back into world attributes:

- ``prompt_adherence``: every attribute the prompt states is found.
- ``subject_fidelity``: the image shows the subject.
- ``prompt_fidelity``: a subject prompt's context (size, position, background) is honoured.
- ``prior_preservation``: a class-prompt image shows the class and NOT the subject.
- ``subject_in_context``: a subject prompt's image is the subject and honours the stated context, both at once.

Paper metrics (cosines in [-1, 1]) need CLIP / DINO models: local folders, or hub ids already in the cache:
CLIP-T (image vs its prompt), CLIP-I (generated vs real subject images, CLIP image space),
DINO (the same in a self-supervised ViT's CLS space), with ``sdtune.models.image_features``' scorers (which the
training run's in-loop evaluation uses too).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.models.image_features import ClipScorer, DinoScorer, as_scorer as _as_scorer  # noqa: F401 - API
from sdtune.world import scenes

CONTEXT = ("size", "position", "background")  # what a "new context" changes around a subject


def _attrs(items, identifier: str | None = None) -> list[dict]:
    """Prompts (strings) or already-parsed attribute dicts -> attribute dicts."""
    return [scenes.parse(a, identifier) if isinstance(a, str) else dict(a) for a in items]


def _judge(judge):
    if judge is None:
        from sdtune.world.judge import Judge

        judge = Judge.load()
    return judge


def _share(hits: list[bool]) -> float:
    if not hits:
        raise SdtuneError("no images to score; pass at least one image (with a prompt that uses the world's words)")
    return float(np.mean(hits))


def _check_lengths(images, other, what: str) -> None:
    if len(images) != len(other):
        raise SdtuneError(f"{len(images)} images but {len(other)} {what}; pass one per image")


def prompt_adherence(images: Sequence[Image.Image], prompts_attrs, judge=None, identifier: str | None = None) -> float:
    """Share of images in which the judge finds every attribute their prompt states."""
    _check_lengths(images, prompts_attrs, "prompts")
    judge = _judge(judge)
    preds = judge.predict(list(images))
    return _share([judge.matches(p, a) for p, a in zip(preds, _attrs(prompts_attrs, identifier))])


def attribute_accuracy(images: Sequence[Image.Image], prompts_attrs, judge=None,
                       identifier: str | None = None) -> dict[str, float]:
    """Per attribute (kind, colour, size, position, background): the share of images, among those whose
    prompt states it, in which the judge finds it. Says which attribute a low adherence comes from."""
    _check_lengths(images, prompts_attrs, "prompts")
    judge = _judge(judge)
    preds = judge.predict(list(images))
    attrs = _attrs(prompts_attrs, identifier)
    return {a: _share([judge.matches(p, {a: want[a]}) for p, want in zip(preds, attrs) if a in want])
            for a in scenes.ATTRIBUTES if any(a in want for want in attrs)}


def subject_fidelity(images: Sequence[Image.Image], judge=None, class_noun: str | None = None,
                     subject: str | None = None) -> float:
    """Share of images judged to be a subject - ``subject`` itself when named - (and, given ``class_noun``,
    of its class)."""
    preds = _judge(judge).predict(list(images))
    return _share([_is_subject(p, class_noun, subject) for p in preds])


def _is_subject(prediction: dict, class_noun: str | None, subject: str | None) -> bool:
    """The judge saw a subject (``subject`` itself when named) of the class ``class_noun`` (when given)."""
    return (prediction["subject"] is not None and (subject is None or prediction["subject"] == subject)
            and (class_noun is None or prediction["kind"] == class_noun))


def prior_preservation(images: Sequence[Image.Image], class_noun: str, judge=None) -> float:
    """Share of class-prompt images that show the class and NOT the subject (no language drift)."""
    preds = _judge(judge).predict(list(images))
    return _share([p["kind"] == class_noun and p["subject"] is None for p in preds])


def prompt_fidelity(images: Sequence[Image.Image], prompts_attrs, judge=None, identifier: str | None = None) -> float:
    """Share of images whose stated context (size, position, background) is honoured.

    Images whose prompt states no context are left out of the share.
    """
    _check_lengths(images, prompts_attrs, "prompts")
    judge = _judge(judge)
    pairs = [(img, {k: v for k, v in a.items() if k in CONTEXT}) for img, a in zip(images, _attrs(prompts_attrs, identifier))]
    pairs = [(img, c) for img, c in pairs if c]
    preds = judge.predict([img for img, _ in pairs])
    return _share([judge.matches(p, c) for p, (_, c) in zip(preds, pairs)])


def subject_in_context(images: Sequence[Image.Image], prompts_attrs, judge=None, class_noun: str | None = None,
                       subject: str | None = None, identifier: str | None = None) -> float:
    """Share of subject-prompt images that are the subject AND honour the prompt's stated context: DreamBooth's
    own aim (the subject recontextualised). A LoRA that redraws its instance images scores high subject fidelity
    and low prompt fidelity, one that ignores the identifier the reverse; only this counts both in one image."""
    _check_lengths(images, prompts_attrs, "prompts")
    judge = _judge(judge)
    preds = judge.predict(list(images))
    contexts = [{k: v for k, v in a.items() if k in CONTEXT} for a in _attrs(prompts_attrs, identifier)]
    return _share([_is_subject(p, class_noun, subject) and judge.matches(p, c) for p, c in zip(preds, contexts)])


# ----------------------------------------------------------------------------------------------
# CLIP and DINO (the scorers are sdtune.models.image_features')


def _mean_pairwise(a, b) -> float:
    return float((a @ b.T).mean().clamp(-1, 1))


def clip_t(images: Sequence[Image.Image], prompts: Sequence[str], clip) -> float:
    """CLIP-T: mean cosine between each image and its own prompt (``clip``: folder or ``ClipScorer``)."""
    _check_lengths(images, prompts, "prompts")
    if not images:
        raise SdtuneError("no images to score for CLIP-T")
    scorer = _as_scorer(clip, ClipScorer)
    sims = (scorer.image_embeds(images) * scorer.text_embeds(prompts)).sum(-1)
    return float(sims.mean().clamp(-1, 1))


def clip_i(images: Sequence[Image.Image], references: Sequence[Image.Image], clip) -> float:
    """CLIP-I: mean cosine over all (generated, real subject image) pairs in CLIP image space."""
    if not images or not references:
        raise SdtuneError("CLIP-I needs generated images and real subject images")
    scorer = _as_scorer(clip, ClipScorer)
    return _mean_pairwise(scorer.image_embeds(images), scorer.image_embeds(references))


def dino(images: Sequence[Image.Image], references: Sequence[Image.Image], model) -> float:
    """DINO: mean cosine over all (generated, real subject image) pairs of ViT CLS embeddings."""
    if not images or not references:
        raise SdtuneError("DINO needs generated images and real subject images")
    scorer = _as_scorer(model, DinoScorer)
    return _mean_pairwise(scorer.image_embeds(images), scorer.image_embeds(references))


# ----------------------------------------------------------------------------------------------
# subjects and folders of generations


def load_subject(folder) -> dict:
    """A subject folder: ``subject.json`` + its images -> dict with ``images`` (PIL) added."""
    from sdtune.imageio import IMAGE_SUFFIXES, open_image

    folder = Path(folder)
    meta_path = folder / "subject.json"
    if not meta_path.is_file():
        raise SdtuneError(f"{folder} has no subject.json; a subject folder holds 3-5 images and subject.json")
    meta = json.loads(meta_path.read_text())
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SdtuneError(f"subject folder {folder} has no images")
    meta["images"] = [open_image(p, what="subject image") for p in paths]
    return meta


def read_prompt(png: Path) -> str | None:
    """The prompt an sdtune PNG carries (``sdtune`` text chunk, or its JSON sidecar); None if absent."""
    try:
        from sdtune.generation.metadata import read_params
    except ImportError:  # metadata module not there: read the chunk ourselves
        read_params = None
    if read_params is not None:
        try:
            return read_params(png).get("prompt")
        except SdtuneError:
            return None
    try:
        with Image.open(png) as img:
            text = getattr(img, "text", {}).get("sdtune") or img.info.get("sdtune")
        if text:
            return json.loads(text).get("prompt")
    except (OSError, ValueError):
        pass
    side = png.with_suffix(".json")
    if side.is_file():
        try:
            return json.loads(side.read_text()).get("prompt")
        except ValueError:
            return None
    return None


def evaluate_folder(
    images_dir,
    subject_dir=None,
    judge=None,
    clip=None,
    dino_model=None,
    identifier: str | None = None,
    class_noun: str | None = None,
    use_judge: bool = True,
) -> dict:
    """All metrics for a folder of generated PNGs whose prompts are in their metadata."""
    from sdtune.imageio import IMAGE_SUFFIXES, open_image

    folder = Path(images_dir)
    if not folder.is_dir():
        raise SdtuneError(f"--images {folder} is not a folder of images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SdtuneError(f"no images in {folder}")
    subject = load_subject(subject_dir) if subject_dir else None
    identifier = identifier or (subject or {}).get("identifier")  # None: any world subject's identifier
    class_noun = class_noun or (subject or {}).get("class_noun")

    images = [open_image(p) for p in paths]
    prompts = [read_prompt(p) for p in paths]
    with_prompt = [(img, pr, scenes.parse(pr, identifier)) for img, pr in zip(images, prompts) if pr]
    metrics: dict = {"images": len(images), "images_with_prompt": len(with_prompt)}

    subj = [(i, p, a) for i, p, a in with_prompt if a.get("subject")]
    plain = [(i, p, a) for i, p, a in with_prompt if not a.get("subject") and a]
    if use_judge and with_prompt:
        judge = _judge(judge)
        if plain:
            metrics["prompt_adherence"] = prompt_adherence([i for i, _, _ in plain], [a for _, _, a in plain], judge)
            metrics["prompt_adherence_n"] = len(plain)
        if subj:
            name = (subject or {}).get("name")
            metrics["subject_fidelity"] = subject_fidelity([i for i, _, _ in subj], judge, class_noun,
                                                           name if name in scenes.SUBJECTS else None)
            metrics["subject_fidelity_n"] = len(subj)
            ctx = [(i, a) for i, _, a in subj if any(k in a for k in CONTEXT)]
            if ctx:
                metrics["prompt_fidelity"] = prompt_fidelity([i for i, _ in ctx], [a for _, a in ctx], judge)
                metrics["prompt_fidelity_n"] = len(ctx)
        if class_noun:
            cls = [i for i, _, a in plain if a.get("kind") == class_noun]
            if cls:
                metrics["prior_preservation"] = prior_preservation(cls, class_noun, judge)
                metrics["prior_preservation_n"] = len(cls)
    if clip is not None:
        scorer = _as_scorer(clip, ClipScorer)
        if with_prompt:
            metrics["clip_t"] = clip_t([i for i, _, _ in with_prompt], [p for _, p, _ in with_prompt], scorer)
        if subject:
            gen = [i for i, _, _ in subj] or images
            metrics["clip_i"] = clip_i(gen, subject["images"], scorer)
    if dino_model is not None and subject:
        gen = [i for i, _, _ in subj] or images
        metrics["dino"] = dino(gen, subject["images"], dino_model)
    return metrics
