"""Reading a YAML config file as a mapping: every problem is one line naming the file (and the line)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError


def _unique_key_loader():
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (YAML itself keeps the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.setdefault(key, key_node.start_mark.line + 1)
                    except TypeError:  # an unhashable key: SafeLoader's own error says so
                        continue
                    if first != key_node.start_mark.line + 1:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} is given twice (first on line {first}); keep one",
                            key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config file as a mapping, with a clear error for a missing file or bad YAML."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SdtuneError(f"config file not found: {p}" if not p.exists() else f"config {p} is not a file")
    try:
        data = yaml.load(p.read_text(), Loader=_unique_key_loader())
    except OSError as exc:
        raise SdtuneError(f"config {p} cannot be read ({exc.strerror or type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SdtuneError(f"config {p} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise SdtuneError(f"config {p} is not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SdtuneError(f"config {p} must be a mapping of key: value lines, got a {type(data).__name__}")
    return data
