"""What the web UI may touch: the outputs folder, the shipped data and the folders named at launch.

Every path typed in the browser goes through ``Sandbox.resolve``: a ``..`` component, a NUL byte or a path that
resolves (symlinks followed) outside the allowed roots is refused in one line. Run names become folders directly
under the outputs folder and must be plain names. Uploads are size-limited and must decode as images.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sdtune import DATA_DIR
from sdtune.errors import SdtuneError

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"}
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass
class Sandbox:
    """``outputs``: read and write. ``read_only``: the shipped data (models, subjects). ``allowed``: read, named
    by the person who started the UI (``sdtune ui --allow DIR``)."""

    outputs: Path
    allowed: list[Path] = field(default_factory=list)
    read_only: list[Path] = field(default_factory=lambda: [DATA_DIR])

    def __post_init__(self):
        self.outputs = Path(self.outputs).expanduser().resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        roots = []
        for folder in self.allowed:
            p = Path(folder).expanduser().resolve()
            if not p.is_dir():
                raise SdtuneError(f"--allow {folder}: not a folder")
            roots.append(p)
        self.allowed = roots
        self.read_only = [Path(p).resolve() for p in self.read_only]

    @property
    def roots(self) -> list[Path]:
        return [self.outputs, *self.allowed, *self.read_only]

    def describe_roots(self) -> str:
        return ", ".join(str(r) for r in self.roots)

    def candidates(self, raw: str, write: bool = False) -> list[Path]:
        """Where a relative path is looked for, in order: the outputs folder; for ``data/...`` the shipped data
        (the README's ``data/subjects/checker_box`` works from any folder, in a checkout or a wheel); then each folder
        named with ``--allow``. A path written to is only ever inside the outputs folder."""
        p = Path(raw).expanduser()
        if p.is_absolute():
            return [p]
        found = [self.outputs / p]
        if not write:
            if p.parts and p.parts[0] == "data":
                found += [DATA_DIR.joinpath(*p.parts[1:])]
            found += [root / p for root in self.allowed]
        return found

    def resolve(self, text: str | os.PathLike, what: str, *, kind: str = "any", write: bool = False) -> Path:
        """A path typed in the browser, checked: no traversal, inside an allowed root, existing as ``kind``
        ("file", "dir" or "any"). A relative path is the first of ``candidates`` that exists (else the outputs
        folder's); the message of a missing one names every place it was looked for."""
        raw = str(text).strip()
        if not raw:
            raise SdtuneError(f"{what}: empty path")
        if "\x00" in raw:
            raise SdtuneError(f"{what}: the path contains a NUL byte")
        if ".." in Path(raw).parts or ".." in re.split(r"[\\/]", raw):
            raise SdtuneError(f"{what}: '..' is not allowed in paths (got {raw})")
        looked = [c.resolve() for c in self.candidates(raw, write)]
        p = next((c for c in looked if c.exists()), looked[0])
        roots = [self.outputs] if write else self.roots
        if not any(_inside(p, r) for r in roots):
            where = f"the outputs folder {self.outputs}" if write else self.describe_roots()
            raise SdtuneError(f"{what}: {raw} is outside the folders the UI may use ({where}); "
                              "start the UI with --allow DIR to name another folder")
        if kind in ("file", "dir") and not p.exists():
            places = " or ".join(str(c) for c in looked)
            raise SdtuneError(f"{what}: {raw} does not exist" + (f" (looked for {places})" if len(looked) > 1 or
                                                                  not Path(raw).is_absolute() else ""))
        if kind == "file" and not p.is_file():
            raise SdtuneError(f"{what}: {raw} is not a file")
        if kind == "dir" and not p.is_dir():
            raise SdtuneError(f"{what}: {raw} is not a folder")
        return p

    def run_dir(self, name: str) -> Path:
        """The folder of run ``name``, directly under the outputs folder (created by the caller)."""
        name = (name or "").strip()
        if not RUN_NAME.match(name) or name in (".", ".."):
            raise SdtuneError(f"run name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                              "or digit (it becomes a folder under the outputs folder)")
        return self.outputs / name


def check_upload(path: str | os.PathLike, what: str = "upload", max_bytes: int = MAX_UPLOAD_BYTES):
    """An uploaded file: at most ``max_bytes``, a real image (decoded, not just named .png), not a pixel bomb.
    Returns the decoded image (its own mode)."""
    from PIL import Image

    p = Path(path)
    name = p.name
    try:
        size = p.stat().st_size
    except OSError:
        raise SdtuneError(f"{what} {name}: the file could not be read") from None
    if size > max_bytes:
        raise SdtuneError(f"{what} {name} is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB")
    try:
        with Image.open(p) as img:
            fmt = img.format
            if fmt not in IMAGE_FORMATS:
                raise SdtuneError(f"{what} {name} is a {fmt or 'unknown'} file; upload a PNG, JPEG, WEBP or BMP image")
            if img.width * img.height > MAX_UPLOAD_PIXELS:
                raise SdtuneError(f"{what} {name} is {img.width}x{img.height}; the limit is {MAX_UPLOAD_PIXELS} pixels")
            img.load()
            return img.copy()
    except SdtuneError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        raise SdtuneError(f"{what} {name} is not an image (it could not be decoded)") from None
