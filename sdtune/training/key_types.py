"""The value types of config keys that are not one plain type: numeric ranges as the help writes them (``Range``)
and the parsers of list- and pair-valued keys (each a ``coerce(where, value)`` of a ``TrainConfig`` field).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sdtune.errors import SdtuneError


@dataclass(frozen=True)
class Range:
    """The values a numeric key takes, written as in the help: ``>= 1``, ``> 0``, ``[0, 1)``, ``[0, 1]``; and
    optionally a multiple of ``multiple_of``."""

    text: str
    multiple_of: int | None = None

    def _bounds(self) -> tuple[float | None, bool, float | None, bool]:
        """(low, low included, high, high included)."""
        t = self.text.replace(" ", "")
        if t.startswith(">="):
            return float(t[2:]), True, None, False
        if t.startswith(">"):
            return float(t[1:]), False, None, False
        low, high = t[1:-1].split(",")
        return float(low), t[0] == "[", float(high), t[-1] == "]"

    def ok(self, value: float) -> bool:
        low, low_in, high, high_in = self._bounds()
        if low is not None and not (value >= low if low_in else value > low):
            return False
        if high is not None and not (value <= high if high_in else value < high):
            return False
        return not self.multiple_of or value % self.multiple_of == 0

    def requirement(self) -> str:
        """The range in words: ``>= 1``, ``in [0, 1)``, ``a positive multiple of 8``."""
        if self.multiple_of and self._bounds()[0] is not None and self._bounds()[0] >= 0 and self._bounds()[2] is None:
            return f"a positive multiple of {self.multiple_of}"
        words = self.text if self.text[0] in "<>" else f"in {self.text}"
        return f"{words}, a multiple of {self.multiple_of}" if self.multiple_of else words


def coerce_numbers(where: str, value: Any) -> list[float]:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
                         for v in values):
        raise SdtuneError(f"{where} must be a list of numbers >= 0, e.g. [3, 5] or [0.8, 1.0]; got {value!r}")
    return [float(v) for v in values]


def coerce_interval(where: str, value: Any) -> list[float] | None:
    if value is None:
        return None
    if (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) and
                                                                      not isinstance(v, bool) for v in value)
            and 0 <= value[0] < value[1] <= 1):
        return [float(v) for v in value]
    raise SdtuneError(f"{where} must be null or two noise levels [lo, hi] with 0 <= lo < hi <= 1 (0 = clean, "
                      f"1 = pure noise), e.g. [0.3, 1]; got {value!r}")


def coerce_buckets(where: str, value: Any) -> Any:
    if value is None or value == "auto" or isinstance(value, (list, tuple)):
        return value
    raise SdtuneError(f"{where} must be null, auto or a list of [width, height] pairs, got {value!r}")
