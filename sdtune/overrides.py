"""``key=value`` overrides: one parser for every command (``sdtune train``, ``sdtune demo``, the web UI's advanced box,
the family recipe's ``--set``).

The value is parsed as YAML, so ``max_steps=10``, ``validation_prompts=[a, b]``, ``resume=`` (null) and
``train.base.steps=7`` mean what they look like. A key listed in ``text_keys`` (a prompt, a path) keeps the text as
written even when it happens to look like YAML (``instance_prompt=photo: sks dog`` is not a mapping, ``model=1.5`` not a
number); only an empty value means null there. A key not in ``keys`` is refused in one line naming the closest one.
Dotted keys (``train.base.steps``) address nested mappings: ``dotted_keys`` lists a nested config's keys and
``set_dotted`` sets one.

Shared: imported by every layer (see tests/test_layout.py); it imports nothing of sdtune but its errors.
"""
from __future__ import annotations

import difflib
from typing import Any, Collection, Mapping

from sdtune.errors import SdtuneError


def unknown_key_error(key: str, keys: Collection[str], what: str = "key") -> SdtuneError:
    """``unknown key 'lora_rnk'; did you mean 'lora_rank'? valid keys: ...`` (for a dotted key, its section's keys)."""
    keys = list(keys)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    section = key.rpartition(".")[0]
    while section and not any(k.rpartition(".")[0] == section for k in keys):
        section = section.rpartition(".")[0]  # the nearest section that exists
    listed = [k for k in keys if k.rpartition(".")[0] == section] or keys
    return SdtuneError(f"unknown {what} '{key}'; {hint}valid {what}s: {', '.join(listed)}")


def parse_override(text: str, keys: Collection[str] | None = None, *, text_keys: Collection[str] = (),
                   example: str = "max_steps=200", what: str = "key") -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``, the value parsed as YAML (see the module docstring); one-line
    ``SdtuneError`` when it is not ``key=value``, the key is not in ``keys`` (``None``: any key), or the value of a
    key outside ``text_keys`` is not YAML. ``example`` is shown in the message of a malformed override."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SdtuneError(f"override '{text}' is not key=value (e.g. {example})")
    if keys is not None and key not in keys:
        raise unknown_key_error(key, keys, what)
    if not raw.strip():
        return key, None
    if key in text_keys:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        return key, None if value is None else raw.strip()
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SdtuneError(f"override '{text}': {raw.strip()!r} is not a YAML value ({problem}); quote text with "
                          f"spaces or brackets (e.g. {example})") from None


def dotted_keys(mapping: Mapping, prefix: str = "") -> list[str]:
    """Every key of a nested mapping as a dotted path, sections included: ``["train", "train.base", ...]``."""
    out = []
    for k, v in mapping.items():
        out.append(f"{prefix}{k}")
        if isinstance(v, Mapping):
            out += dotted_keys(v, f"{prefix}{k}.")
    return out


def set_dotted(mapping: dict, key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping in place (every section on the way exists: see ``dotted_keys``)."""
    *sections, last = key.split(".")
    node = mapping
    for part in sections:
        node = node[part]
    node[last] = value
