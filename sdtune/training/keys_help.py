"""Every training key with its type, default, range and help, as ``sdtune train --help-keys`` and the web UI's
advanced box show them; read from the declarations in ``sdtune.training.config``."""
from __future__ import annotations

import dataclasses
from typing import Any

from sdtune.training.config import FIELDS, GROUPS, type_name


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "''"
    return str(value)


def key_summary(name: str) -> str:
    """One key in a line: ``max_steps = 400  (an integer, >= 1)``, ``[concept]`` when a concept may set it."""
    f, meta = FIELDS[name], FIELDS[name].metadata
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if meta["choices"]:
        kind = f"one of {', '.join(meta['choices'])}"
    else:
        kind = type_name(name)
        if meta["range"] is not None:
            kind += f", {meta['range'].requirement()}"
    return f"{name} = {_yaml_value(default)}  ({kind}){'  [concept]' if meta['concept'] else ''}"


def format_keys_help(width: int = 100) -> str:
    """Every training key with its type, default, range or choices and help, grouped (data source, prior
    preservation, adapter, images, loss, optimisation, validation and checkpoints): ``sdtune train --help-keys``."""
    import textwrap

    lines = ["Training keys: set them in the YAML config (key: value) or on the command line (key=value, YAML "
             "syntax).", "Each line: key = default  (type, range or choices); [concept]: a concept of a several-"
             "subject run may set it too."]
    for group in GROUPS:
        lines += ["", f"{group}:"]
        for name, f in FIELDS.items():
            if f.metadata["group"] == group:
                lines.append(f"  {key_summary(name)}")
                lines += textwrap.wrap(f.metadata["help"], width, initial_indent="      ",
                                       subsequent_indent="      ")
    return "\n".join(lines)
