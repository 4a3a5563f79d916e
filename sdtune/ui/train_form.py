"""The Train tab's key fields, made from the config's own key declarations (no gradio).

A kohya_ss user expects the common keys as fields, not as ``key=value`` lines: steps, learning rate, rank and
alpha, resolution, batch size, prior preservation with its class images, caption dropout. Each ``Field`` here is one
``TrainConfig`` key (``sdtune.training.config``): its type, range or choices and help come from the key's
declaration, so the field checks what the CLI checks and its tooltip is the help ``sdtune train --help-keys`` prints.
Its default is the recipe's (``configs/dreambooth_lora.yaml``: prior preservation on), so a run started with the
form untouched is the recipe's run. Every other key stays under "advanced" as ``key=value``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from sdtune import CONFIGS_DIR

BASE_CONFIG = CONFIGS_DIR / "dreambooth_lora.yaml"
# (key, label): the label a kohya_ss user knows the key by; the order is the form's.
KEYS = (("method", "method"), ("max_steps", "max train steps"), ("learning_rate", "learning rate"),
        ("train_batch_size", "train batch size"), ("lora_rank", "network rank (dimension)"),
        ("lora_alpha", "network alpha (0 = the rank)"), ("resolution", "resolution (0 = the model's)"),
        ("caption_dropout", "caption dropout rate"),
        ("with_prior_preservation", "prior preservation (class images keep the class)"),
        ("num_class_images", "class images"))
# What a nullable key's null means, written as 0 in the form (a number box holds no null).
ZERO_MEANS = {"resolution": "the model's own size", "lora_alpha": "the rank (scale 1)"}


@lru_cache(maxsize=1)
def recipe() -> dict:
    """The recipe's config as written (read once: the shipped file does not change while the page runs)."""
    from sdtune.yamlfile import read_yaml

    return read_yaml(BASE_CONFIG) or {}


@dataclass(frozen=True)
class Field:
    key: str
    label: str

    @property
    def declaration(self):
        from sdtune.training.config import FIELDS as DECLARED

        return DECLARED[self.key]

    @property
    def kind(self) -> str:
        """"bool", "choice", "int" or "float": which widget shows the key."""
        from sdtune.training.config import type_name

        meta = self.declaration.metadata
        if meta["choices"]:
            return "choice"
        if isinstance(self.declaration.default, bool):
            return "bool"
        words = type_name(self.key)
        return "int" if "integer" in words else "float"

    @property
    def choices(self) -> tuple[str, ...]:
        return self.declaration.metadata["choices"] or ()

    @property
    def nullable(self) -> bool:
        """A key whose null means "the model's own" (resolution): the form writes it as 0."""
        return self.declaration.default is None

    @property
    def info(self) -> str:
        """The key's help and its range, as the field's tooltip."""
        meta = self.declaration.metadata
        limits = f" ({meta['range'].requirement()}{'; ' + meta['note'] if meta['note'] else ''})" if meta["range"] \
            else ""
        return f"{self.key}: {meta['help']}{limits}"

    @property
    def default(self):
        """The recipe's value, else the key's declared default; a null shown as 0."""
        value = recipe().get(self.key, self.declaration.default)
        return 0 if value is None and self.kind in ("int", "float") else value

    def value(self, raw):
        """The form's value as the config's (a nullable key's 0 or empty box: null); raises ValueError when it is
        not one (``problem`` words it)."""
        if self.kind == "bool":
            return bool(raw)
        if self.kind == "choice":
            if raw not in self.choices:
                raise ValueError(raw)
            return raw
        if raw is None or str(raw).strip() == "":
            if self.nullable:
                return None
            raise ValueError(raw)
        number = float(raw)
        if not math.isfinite(number):
            raise ValueError(raw)
        if self.kind == "int":
            if number != int(number):
                raise ValueError(raw)
            number = int(number)
        if self.nullable and number == 0:
            return None
        return number

    def problem(self, raw) -> str | None:
        """One line naming the field and what it takes, or None when ``raw`` is a value the key accepts."""
        meta = self.declaration.metadata
        shown = "(empty)" if raw is None or str(raw).strip() == "" else str(raw)
        if self.kind == "choice":
            wants = f"one of {', '.join(self.choices)}"
        else:
            wants = ("a whole number" if self.kind == "int" else "a number") + \
                (f", {meta['range'].requirement()}" if meta["range"] else "") + \
                (f", or 0 for {ZERO_MEANS.get(self.key, 'none')}" if self.nullable else "")
        try:
            value = self.value(raw)
        except (TypeError, ValueError):
            return f"{self.label} {shown}: {wants}"
        if value is not None and meta["range"] is not None and self.kind != "bool" and not meta["range"].ok(value):
            return f"{self.label} {shown}: {wants}"
        return None


FIELDS = tuple(Field(key, label) for key, label in KEYS)
BY_KEY = {f.key: f for f in FIELDS}
