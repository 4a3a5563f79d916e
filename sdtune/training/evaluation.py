"""Evaluation inside the training loop: the run draws its evaluation prompts from the weights it holds and measures
how far the subject is learned, and what learning it cost.

Every ``eval_every`` steps (and before the first, after the last) the run generates, on fixed seeds:

- the subject in new contexts (``EvalPrompts.subject``), with the LoRA on;
- its class in the same contexts, and other classes (``klass``, ``other``), with the LoRA on;
- once per run, all of them with the LoRA off: the base model's own images, what drift and bleed compare against.
  (A full fine-tune has no "off": its base images are drawn before its first step.)

It reloads nothing: the pipeline is built around the modules being trained. The scorers measure:

- **likeness** to the instance images: mean cosine of each subject image with each instance image in a scorer's
  feature space (DINO, CLIP-I, or any injected scorer's ``image_embeds``);
- **prompt following**: CLIP-T of the subject images with their prompts, as a share of the base model's images'
  on the same prompts (1.0: follows the prompts as well as the base model did);
- **class drift**: 1 - the mean cosine between each class image and the base model's image on the same seed;
- **bleed**: the share of images of prompts without the identifier (class and other classes) that look more like
  the subject (the instance images' mean feature) than like the base model's image on the same seed.

A scorer may add its own metrics (``metrics(images)``), and name a headline one: the world's judge says
``likeness`` is its subject share. Which metric stands for each quantity is ``sdtune.training.selection``'s rule.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdtune.training.eval_prompts import EvalPrompts, class_noun, concept_prompts  # noqa: F401 - EvalPrompts: API

log = logging.getLogger("sdtune.train")
SETS = ("subject", "klass", "other")


@dataclass
class ConceptImages:
    """One concept's evaluation images at one step, with the base model's on the same prompts and seeds."""

    name: str
    class_noun: str
    prompts: EvalPrompts
    references: list  # the instance images (PIL)
    subject: list = field(default_factory=list)
    klass: list = field(default_factory=list)
    other: list = field(default_factory=list)
    img2img: list = field(default_factory=list)  # subject prompts drawn over the base model's other-class images
    base: dict = field(default_factory=dict)  # set name -> the base model's images
    others_references: list = field(default_factory=list)  # the other concepts' instance images (cross-talk)


@contextmanager
def lora_scale(scale: float, *modules):
    """Every LoRA layer in ``modules`` scaled by ``scale`` (diffusers' ``scale_lora_layers``), then back."""
    from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

    live = [m for m in modules if m is not None]
    if scale == 1.0:
        yield
        return
    for m in live:
        scale_lora_layers(m, scale)
    try:
        yield
    finally:
        for m in live:
            unscale_lora_layers(m, scale)


class Sampler:
    """Draws prompts on fixed seeds with a stock pipeline around the modules the run trains (nothing reloaded)."""

    def __init__(self, pipe, sdxl: bool, resolution: int, steps: int, batch_size: int = 8):
        self.pipe, self.sdxl, self.resolution, self.steps, self.batch_size = pipe, sdxl, resolution, steps, batch_size

    def pipeline(self, unet, text_encoder, text_encoder_2=None):
        from sdtune.training.export import sampling_pipeline

        sampler = sampling_pipeline(self.pipe, unet, text_encoder, text_encoder_2)
        sampler.set_progress_bar_config(disable=True)
        return sampler

    @torch.no_grad()
    def __call__(self, sampler, prompts, seed0: int, guidance: float, interval=None, init_images=None,
                 strength: float | None = None) -> list:
        """txt2img, or img2img over ``init_images`` (one per prompt) at ``strength``."""
        images = []
        if init_images is not None:
            sampler = _img2img(sampler)
        with _guided_only_in(sampler.unet, interval, sampler.scheduler.config.num_train_timesteps):
            for i in range(0, len(prompts), self.batch_size):
                chunk = list(prompts[i:i + self.batch_size])
                gens = [torch.Generator("cpu").manual_seed(seed0 + i + j) for j in range(len(chunk))]
                size = {} if init_images is not None else {"height": self.resolution, "width": self.resolution}
                extra = ({"image": list(init_images[i:i + self.batch_size]), "strength": strength}
                         if init_images is not None else {})
                images += sampler(chunk, num_inference_steps=self.steps, guidance_scale=guidance, generator=gens,
                                  **size, **extra).images
        return images


def _img2img(sampler):
    """The img2img pipeline of the same components (SD or SDXL)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    cls = StableDiffusionXLImg2ImgPipeline if hasattr(sampler, "text_encoder_2") else StableDiffusionImg2ImgPipeline
    out = cls(**sampler.components)
    out.set_progress_bar_config(disable=True)
    return out


@contextmanager
def _guided_only_in(unet, interval, num_train_timesteps: int):
    from sdtune.guidance_interval import limited_guidance

    with limited_guidance(unet, tuple(interval) if interval else None, num_train_timesteps):
        yield


def init_images(folder, resolution: int) -> list:
    """The img2img probe's starting images (``eval_img2img_images``): every image of the folder, at the run's size."""
    from sdtune.errors import SdtuneError
    from sdtune.imageio import IMAGE_SUFFIXES, open_image

    path = Path(folder).expanduser()
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
    if not files:
        raise SdtuneError(f"eval_img2img_images {path} is not a folder of images; give a folder of pictures the "
                          "subject should take over, or null")
    return [open_image(f, what="eval_img2img_images image").resize((resolution, resolution)) for f in files]


def concept_references(instances: list[list]) -> list[list]:
    """Each concept's instance images (PIL), from the examples the run read."""
    from sdtune.imageio import open_image_bytes

    return [[open_image_bytes(ex.data, ex.name) for ex in examples] for examples in instances]


def plan_concepts(cfg, concepts, references) -> list[ConceptImages]:
    """An empty ``ConceptImages`` per concept: its name, class noun, prompts and references."""
    out = []
    for c, concept in enumerate(concepts):
        prompts = concept_prompts(concept, cfg.eval_other_prompts)
        name = Path(concept.instance_dir).name if concept.instance_dir else (concept.dataset or f"concept{c}")
        others = [img for k, refs in enumerate(references) if k != c for img in refs]
        out.append(ConceptImages(name=str(name), class_noun=class_noun(concept.class_prompt, concept.instance_prompt,
                                                                       concept.identifier),
                                 prompts=prompts, references=references[c], others_references=others))
    return out


def draw(sample: Sampler, sampler, plan: list[ConceptImages], seed: int, guidance: float, interval=None,
         sets=SETS, img2img_strength: float | None = None, init_images=None) -> list[ConceptImages]:
    """Every concept's ``sets`` drawn from ``sampler`` (concept c's prompt i on seed ``seed + 1000 c + i``; class
    prompt i on the same seed as subject prompt i, so each pairs with it). With ``img2img_strength`` (and the base
    model's other-class images drawn, or ``init_images`` given), also the subject prompts over those images: can the
    subject take over a picture of something else, as img2img asks of it."""
    out = []
    for c, ci in enumerate(plan):
        drawn = ConceptImages(**{**ci.__dict__, "base": ci.base})
        for name in sets:
            prompts = getattr(ci.prompts, name)
            offset = 500 if name == "other" else 0
            setattr(drawn, name, sample(sampler, prompts, seed + 1000 * c + offset, guidance, interval))
        inits = init_images or ci.base.get("other") or []
        if img2img_strength and inits:
            prompts = [ci.prompts.subject[i % len(ci.prompts.subject)] for i in range(len(inits))]
            drawn.img2img = sample(sampler, prompts, seed + 1000 * c + 700, guidance, interval, init_images=inits,
                                   strength=img2img_strength)
        out.append(drawn)
    return out


# ----------------------------------------------------------------------------- metrics


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean()) if x.numel() else float("nan")


def _fixed_embeds(scorer, images: list):
    """Embeddings of images that stay the same from one evaluation to the next (the instance images, the base
    model's images): computed once per scorer and list, not at every evaluation."""
    cache = scorer.__dict__.setdefault("_sdtune_fixed_embeds", {})
    hit = cache.get(id(images))
    if hit is None or hit[0] is not images:  # the id of a list that is gone may be reused
        hit = cache[id(images)] = (images, scorer.image_embeds(images))
    return hit[1]


def feature_metrics(scorer, ci: ConceptImages) -> dict[str, float]:
    """Likeness, drift, bleed (and CLIP-T with prompt following when the scorer reads text) in one feature space."""
    name = scorer.name
    refs = _fixed_embeds(scorer, ci.references)
    centroid = torch.nn.functional.normalize(refs.mean(0), dim=0)
    subject = scorer.image_embeds(ci.subject)
    out = {f"likeness_{name}": _mean(subject @ refs.T)}
    if ci.img2img:
        out[f"likeness_img2img_{name}"] = _mean(scorer.image_embeds(ci.img2img) @ refs.T)
    if ci.base.get("subject"):
        out[f"likeness_{name}_base"] = _mean(_fixed_embeds(scorer, ci.base["subject"]) @ refs.T)
    no_id, no_id_base = ci.klass + ci.other, ci.base.get("klass", []) + ci.base.get("other", [])
    if ci.klass and len(ci.base.get("klass", [])) == len(ci.klass):
        klass, klass_base = scorer.image_embeds(ci.klass), _fixed_embeds(scorer, ci.base["klass"])
        out[f"drift_{name}"] = 1.0 - _mean((klass * klass_base).sum(-1))
    if no_id and len(no_id_base) == len(no_id):
        now = scorer.image_embeds(no_id)
        base = torch.cat([_fixed_embeds(scorer, ci.base[k]) for k in ("klass", "other") if ci.base.get(k)])
        out[f"bleed_{name}"] = _mean(((now @ centroid) > (now * base).sum(-1)).float())
    if ci.others_references:  # cross-talk: subject images nearer another concept's instance images than their own
        others = _fixed_embeds(scorer, ci.others_references)
        nearest_other, nearest_own = (subject @ others.T).max(1).values, (subject @ refs.T).max(1).values
        out[f"crosstalk_{name}"] = _mean((nearest_other > nearest_own).float())
    if getattr(scorer, "text_embeds", None) is not None:
        texts = scorer.text_embeds(list(ci.prompts.subject))
        out[f"clip_t_{name}"] = _mean((subject * texts).sum(-1))
        if ci.base.get("subject"):
            base_t = _mean((_fixed_embeds(scorer, ci.base["subject"]) * texts).sum(-1))
            out[f"prompt_following_{name}"] = out[f"clip_t_{name}"] / base_t if base_t > 0 else float("nan")
    return out


def concept_metrics(scorers, ci: ConceptImages) -> dict[str, float]:
    """Every scorer's metrics of one concept: feature metrics from ``image_embeds``, a scorer's own from
    ``metrics``."""
    out: dict[str, float] = {}
    for scorer in scorers:
        if getattr(scorer, "image_embeds", None) is not None:
            out.update(feature_metrics(scorer, ci))
        if getattr(scorer, "metrics", None) is not None:
            out.update(scorer.metrics(ci))
    return out
