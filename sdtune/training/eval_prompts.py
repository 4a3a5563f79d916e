"""The prompts a run evaluates itself on: the subject in new contexts, its class in the same contexts, other classes.

The subject prompts are never the training captions: they put the subject where its photos never show it, as the
DreamBooth paper's recontextualisation prompts do. The class prompts say the same without the identifier, so each
pairs with a subject prompt, and the base model's own image of it (same seed) is what class drift is measured
against. Other classes' prompts show whether the subject bleeds into everything the model draws.
A user's own lists (``eval_prompts``, ``eval_class_prompts``, ``eval_other_prompts``) replace the defaults.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Contexts a subject's photos rarely show; each a phrase after "a photo of <subject>".
CONTEXTS = ("on the beach", "in the snow", "in a forest", "on a wooden table", "on a city street at night",
            "with a mountain in the background", "in a kitchen", "on a red carpet")
OTHER_CLASSES = ("person", "car", "house", "cat", "dog", "chair")


@dataclass(frozen=True)
class EvalPrompts:
    """One concept's evaluation prompts: ``subject[i]`` and ``klass[i]`` share seed i."""

    subject: tuple[str, ...]
    klass: tuple[str, ...]
    other: tuple[str, ...]


def class_noun(class_prompt: str | None, instance_prompt: str, identifier: str | None) -> str:
    """The class word(s) a concept names: its class prompt without "a photo of a", else its instance prompt
    without the photo phrase and the identifier ("a photo of sks dog" -> "dog")."""
    text = (class_prompt or "").strip()
    if not text:
        text = instance_prompt
        if identifier:
            text = re.sub(rf"\b{re.escape(identifier)}\b", " ", text)
    text = re.sub(r"^\s*(an?\s+)?(photo|picture|image|rendering)\s+of\s+", "", text.strip(), flags=re.I)
    text = re.sub(r"^\s*(an?|the)\s+", "", text, flags=re.I)
    return " ".join(text.split()) or "object"


def default_prompts(identifier: str | None, noun: str, count: int = 8) -> EvalPrompts:
    """``count`` contexts for ``identifier noun`` and for ``noun`` alone, and other classes than ``noun``."""
    contexts = CONTEXTS[:max(1, min(count, len(CONTEXTS)))]
    subject = f"{identifier} {noun}" if identifier else noun
    others = tuple(f"a photo of a {c}" for c in OTHER_CLASSES if c not in noun.split())[:4]
    return EvalPrompts(subject=tuple(f"a photo of {subject} {c}" for c in contexts),
                       klass=tuple(f"a photo of a {noun} {c}" for c in contexts), other=others)


def without_identifier(prompt: str, identifier: str | None) -> str:
    """The prompt with its identifier taken out ("a photo of sks dog" -> "a photo of a dog")."""
    if not identifier:
        return prompt
    text = re.sub(rf"\bof\s+{re.escape(identifier)}\s+", "of a ", prompt)
    text = re.sub(rf"\s*\b{re.escape(identifier)}\b\s*", " ", text)
    return " ".join(text.split())


def concept_prompts(concept, other_prompts) -> EvalPrompts:
    """A concept's evaluation prompts: its own lists where given, else the defaults from its class noun."""
    identifier = concept.identifier or _guess_identifier(concept.instance_prompt, concept.class_prompt)
    noun = class_noun(concept.class_prompt, concept.instance_prompt, identifier)
    defaults = default_prompts(identifier, noun)
    subject = tuple(concept.eval_prompts or defaults.subject)
    klass = tuple(concept.eval_class_prompts or (tuple(without_identifier(p, identifier) for p in subject)
                                                  if concept.eval_prompts else defaults.klass))
    return EvalPrompts(subject=subject, klass=klass, other=tuple(other_prompts or defaults.other))


def _guess_identifier(instance_prompt: str, class_prompt: str | None) -> str | None:
    """The word of the instance prompt that the class prompt lacks ("a photo of sks dog" vs "a photo of a dog")."""
    extra = [w for w in instance_prompt.split() if w not in set((class_prompt or "").split())]
    return extra[0] if len(extra) == 1 else None
