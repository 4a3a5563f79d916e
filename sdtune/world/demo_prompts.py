"""The demo's prompts and inputs: world prompts, the subject in contexts its images never show, class prompts,
the scenes and masks the image modes start from (``world_inpaint_checks``, ``box_mask``).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from sdtune.world import scenes
from sdtune.world.subjects import Subject, instance_caption

def base_prompts(n: int, seed: int = 1234) -> list[str]:
    """World prompts stating every attribute, e.g. "a photo of a large red ball on the left, on grass"."""
    rng = np.random.default_rng(seed)
    return [scenes.caption(scenes.sample_scene(rng)) for _ in range(n)]


def new_contexts(subject: Subject, n: int, seed: int = 7) -> list[scenes.Scene]:
    """Scenes of the subject's class in (position, background) pairs its instance images never show."""
    pairs = [(p, b) for b in scenes.BACKGROUNDS for p in scenes.POSITIONS if (p, b) not in subject.contexts]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    return [scenes.Scene(kind=subject.class_noun, colour=scenes.COLOURS[i % len(scenes.COLOURS)], size="large",
                        position=pairs[order[i % len(pairs)]][0], background=pairs[order[i % len(pairs)]][1],
                        seed=seed * 1000 + i) for i in range(n)]


EVAL_CONTEXT_SEED = 23  # the in-loop evaluation's contexts (the demo's judged image modes draw theirs with seed 11)


def eval_img2img_inputs(subject: Subject, n: int = 8) -> list[Image.Image]:
    """What the in-loop img2img probe starts from: world renders of other kinds in new contexts, as the demo's
    img2img inputs are, on seeds of their own."""
    others = [k for k in scenes.KINDS if k != subject.class_noun]
    contexts = new_contexts(subject, n, seed=EVAL_CONTEXT_SEED)
    return [scenes.render(scenes.Scene(**{**sc.attrs(), "kind": others[i % len(others)]}, seed=sc.seed + 50_000)
                          ).image for i, sc in enumerate(contexts)]


def eval_prompts(subject: Subject, n: int = 8, seed: int = EVAL_CONTEXT_SEED) -> dict[str, list[str]]:
    """The training run's own evaluation prompts (``eval_prompts``, ``eval_class_prompts``, ``eval_other_prompts``):
    new contexts as the judged ones, but worded with the size ("a photo of a large sks box on the left, on snow"),
    so no string is one the demo judges with (its seeds differ too: ``eval_seed``)."""
    stated = {"size", "kind", "position", "background"}
    scenes_ = new_contexts(subject, n, seed=seed)
    others = [k for k in scenes.KINDS if k != subject.class_noun]
    return {"eval_prompts": [scenes.caption(s, identifier=subject.identifier, stated=stated) for s in scenes_],
            "eval_class_prompts": [scenes.caption(s, stated=stated) for s in scenes_],
            "eval_other_prompts": [scenes.caption(scenes.Scene(kind=others[i % len(others)], colour=s.colour,
                                                               size="large", position=s.position,
                                                               background=s.background, seed=s.seed), stated=stated)
                                   for i, s in enumerate(scenes_[: max(1, n // 2)])]}


def subject_prompt(subject: Subject, scene: scenes.Scene) -> str:
    """"a photo of sks box on the left, on snow": the identifier, the class noun and a context (the words the
    shipped instance captions use)."""
    return instance_caption(scene, subject.identifier)


def captioned(subject: Subject) -> int:
    """How many of the subject's images have their own caption (``NN.txt`` beside them)."""
    return sum(p.with_suffix(".txt").is_file() for p in subject.images)


def has_captions(subject: Subject) -> bool:
    return captioned(subject) > 0


def subject_class_prompts(subject: Subject, use_captions) -> list[str] | None:
    """What a subject's class images are drawn from: for a subject whose captions are read, the class noun in
    every context (``prior_prompts``), since captions that name each image's context need class images drawn and
    captioned in those contexts (else the contexts come to name the class images, and the identifier is never
    needed: measured, 0 of 16); else None, the class prompt alone, which goes with the instance prompt alone."""
    return prior_prompts(subject) if use_captions is not False and has_captions(subject) else None


def prior_prompts(subject: Subject) -> list[str]:
    """The class-image prompts (``class_prompts``) for a captioned subject: the class noun in each of the world's
    position x background contexts ("a photo of a box on the left, at night"). The instance captions name those
    context words, so the prior must hold them too: with the class prompt alone, training moves their meaning."""
    return [scenes.caption(scenes.Scene(kind=subject.class_noun, position=p, background=b),
                           stated={"kind", "position", "background"})
            for b in scenes.BACKGROUNDS for p in scenes.POSITIONS]


def class_prompts(subject: Subject, n: int) -> list[str]:
    """The class prompt itself, then the class noun in world contexts ("a photo of a box on snow")."""
    rng = np.random.default_rng(99)
    prompts = [subject.class_prompt]
    while len(prompts) < n:
        scene = scenes.Scene(kind=subject.class_noun, position=scenes.POSITIONS[int(rng.integers(5))],
                            background=scenes.BACKGROUNDS[int(rng.integers(4))])
        prompts.append(scenes.caption(scene, stated={"kind", "position", "background"}))
    return prompts[:n]


def other_kind(noun: str) -> str:
    """A world kind that is not ``noun``: the object the image modes start from, so the subject must replace it."""
    return next(k for k in ("ball", "cone", "star") if k != noun)


def box_mask(position: str, size: int, half: float = 15.0) -> Image.Image:
    """White square (repaint) around a position's anchor, black elsewhere; ``half`` in 64-unit canvas units."""
    cx, cy = scenes.ANCHORS[position]
    s = size / scenes.CANVAS
    a = np.zeros((size, size), np.uint8)
    x0, x1 = int(max(0, (cx - half) * s)), int(min(size, np.ceil((cx + half) * s)))
    y0, y1 = int(max(0, (cy - half) * s)), int(min(size, np.ceil((cy + half) * s)))
    a[y0:y1, x0:x1] = 255
    return Image.fromarray(a, "L")



def world_inpaint_checks(checks: list[scenes.Scene], rng, size: int,
                         seed0: int = 600) -> tuple[list[dict], list[dict]]:
    """The world inpaint check: each scene's object masked, to be replaced by another kind and colour (its size,
    position and background kept). Returns the inpaint requests and, per request, what the judge should find."""
    requests, truth = [], []
    for i, scene in enumerate(checks):
        new = changed_scene(scene, rng, keep=("size", "position", "background"))
        requests.append(dict(prompt=scenes.caption(new), seed=seed0 + i, image=scenes.render(scene, size=size).image,
                             mask=box_mask(scene.position, size)))
        truth.append({a: getattr(new, a) for a in ("kind", "colour", "position")})
    return requests, truth


def changed_scene(scene: scenes.Scene, rng, keep: tuple[str, ...]) -> scenes.Scene:
    """``scene`` with every attribute not in ``keep`` changed to another value (and a new seed)."""
    values = {}
    for name in scenes.ATTRIBUTES:
        old = getattr(scene, name)
        if name in keep:
            values[name] = old
        else:
            others = [v for v in scenes.CHOICES[name] if v != old]
            values[name] = others[int(rng.integers(len(others)))]
    return scenes.Scene(**values, seed=int(rng.integers(2**31 - 1)))

