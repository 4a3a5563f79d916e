"""Where training images and their captions come from: one layer on ``datasets`` for every source.

A *concept* (a subject, or the one subject of a plain run) reads its instance images from one source:

* a folder of images, each optionally with a same-name ``.txt`` caption beside it (kohya's convention);
  a caption of several lines holds variants of it, one drawn per step;
* an image folder with ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` plus a caption column: the
  ``datasets`` imagefolder convention);
* a saved dataset (``dataset: path/saved`` from ``Dataset.save_to_disk``) or a hub dataset id
  (``dataset: user/name``, ``split``, read from the local cache when offline), with ``image_column`` and
  ``caption_column``.

Every source becomes a ``datasets.Dataset`` of (image, caption) rows and then a list of ``Example``s: the
encoded image bytes, their SHA-256 (the key of the latent cache), the size, and the caption - the row's own,
else the concept's ``instance_prompt``. Class images (prior preservation) come through the same layer.

A folder's image may have a mask for ``masked_loss``: ``masks/<stem>.png`` beside it (white = the subject), else
its own alpha channel (any source).

Checked here, one line each naming the file (and the line): a missing folder, column or file; a metadata.jsonl line
that is not one JSON object, a metadata.csv row of the wrong width or without a file_name column, a row without
``file_name`` or whose file is missing, a column of two types, no rows, both metadata files (``check_metadata``); a
caption file that is not UTF-8 or holds NUL bytes; an empty caption; an unreadable or damaged saved dataset; an image
too small for the resolution; a mask of another size than its image. Warned: duplicate images, non-image files,
images a metadata file leaves out, captions without the concept's identifier (``caption_prefix`` adds it instead).
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sdtune.console import SdtuneWarning
from sdtune.errors import SdtuneError
from sdtune.imageio import has_alpha, image_and_alpha_of_bytes, open_image_bytes
from sdtune.training.data import METADATA_FILES, folder_images, list_image_files

CAPTION_COLUMNS = ("text", "caption")  # tried in this order when caption_column is not set


@dataclass(frozen=True)
class Source:
    """One concept's instance (or class) images: a folder or a dataset, and how to read its captions."""

    instance_dir: str | None = None
    dataset: str | None = None
    split: str = "train"
    image_column: str = "image"
    caption_column: str | None = None

    @property
    def name(self) -> str:
        return self.instance_dir or f"dataset {self.dataset} ({self.split})"


@dataclass
class Example:
    kind: str  # "instance" | "class"
    concept: int
    name: str  # the file, or "<dataset> row i", for messages
    data: bytes = field(repr=False)
    caption: str
    size: tuple[int, int]  # width, height after EXIF rotation
    key: str = ""  # SHA-256 of the encoded bytes
    mask_data: bytes | None = field(default=None, repr=False)  # masks/<stem>.png beside a folder's image
    has_alpha: bool = False  # the image's own alpha channel, the mask when there is no mask file

    @property
    def has_mask(self) -> bool:
        return self.mask_data is not None or self.has_alpha

    def image(self) -> Image.Image:
        return open_image_bytes(self.data, self.name, "RGB", what=f"{self.kind} image")

    def image_and_mask(self) -> tuple[Image.Image, Image.Image | None]:
        """(RGB, its L mask or None) for ``masked_loss``: the mask file if there is one (the image as ``image``
        gives it), else the image's alpha channel (kohya's alpha mask) under the file's own, unflattened RGB."""
        if self.mask_data is not None:
            return self.image(), open_image_bytes(self.mask_data, f"mask of {self.name}", "L", what="mask")
        return image_and_alpha_of_bytes(self.data, self.name, what=f"{self.kind} image")


# ----------------------------------------------------------------------------------------------- rows


def read_rows(source: Source, what: str):
    """The source as a ``datasets.Dataset`` with an undecoded ``image`` column and a ``caption`` column."""
    import datasets

    if source.dataset:
        ds = _load_dataset(source, what)
        image_col, caption_col = source.image_column, source.caption_column
    else:
        folder = Path(source.instance_dir).expanduser()
        if not folder.exists():
            raise SdtuneError(f"{what} not found: {folder}; create it and put the images there")
        if not folder.is_dir():
            raise SdtuneError(f"{what} {folder} is not a folder; point it at a folder of images")
        if any((folder / m).is_file() for m in METADATA_FILES):
            check_metadata(folder, what)  # one line naming the file and line, not pyarrow's traceback
            try:
                ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
            except Exception as exc:  # noqa: BLE001 - what check_metadata cannot foresee, still in one line
                reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                raise SdtuneError(f"{what} {folder}: its metadata could not be read as an image folder's "
                                  f"({reason})") from None
            image_col, caption_col = "image", source.caption_column
        else:
            ds = _folder_rows(folder, what)
            image_col, caption_col = "image", "caption"
    columns = list(ds.column_names)
    if image_col not in columns:
        raise SdtuneError(f"{what} {source.name} has no column {image_col!r} (its columns: {', '.join(columns)}); "
                          "set image_column")
    if caption_col is not None and caption_col not in columns:
        raise SdtuneError(f"{what} {source.name} has no column {caption_col!r} (its columns: {', '.join(columns)}); "
                          "set caption_column, or leave it unset to use instance_prompt")
    if caption_col is None:
        caption_col = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if isinstance(ds.features.get(image_col), datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    keep = [image_col] + ([caption_col] if caption_col else [])
    ds = ds.select_columns(keep).rename_columns({image_col: "image", **({caption_col: "caption"} if caption_col else {})})
    if "caption" not in ds.column_names:
        ds = ds.add_column("caption", [None] * len(ds))
    return ds


METADATA_EXAMPLE = '{"file_name": "a.png", "text": "a photo of sks dog"}'
_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "true or false", list: "a list",
               dict: "an object"}


def check_metadata(folder: Path, what: str = "instance_dir") -> list[dict]:
    """The rows of ``folder``'s metadata.jsonl or metadata.csv (the imagefolder convention), each proven sound before
    ``datasets`` reads it: one ``SdtuneError`` line naming the file and the line for a file that is not UTF-8, a line
    that is not one JSON object, a CSV row of the wrong width, a row without ``file_name`` or whose file is missing, a
    column of two types (pyarrow's traceback otherwise), or no rows. Images the file leaves out are warned about:
    they are not trained on."""
    found = [folder / m for m in METADATA_FILES if (folder / m).is_file()]
    if len(found) > 1:
        raise SdtuneError(f"{what} {folder} has both {found[0].name} and {found[1].name}; keep one")
    path = found[0]
    text = read_text(path, str(path))
    rows = _jsonl_rows(path, text) if path.suffix == ".jsonl" else _csv_rows(path, text)
    if not rows:
        raise SdtuneError(f"{path} holds no rows; write one per image, e.g. "
                          + (METADATA_EXAMPLE if path.suffix == ".jsonl" else "file_name,text then a.png,a photo of sks dog"))
    types: dict[str, tuple[str, int]] = {}
    listed = set()
    for line, row in rows:
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise SdtuneError(f"{path} line {line} has no file_name (the image's file, relative to the folder), "
                              f"e.g. {METADATA_EXAMPLE}")
        image = folder / name
        if not image.is_file():
            raise SdtuneError(f"{path} line {line}: file_name {name!r} not found in {folder}")
        listed.add(image.resolve())
        for key, value in row.items():
            if value is None:
                continue
            kind = _JSON_TYPES.get(type(value), type(value).__name__)
            first = types.setdefault(key, (kind, line))
            if first[0] != kind:
                raise SdtuneError(f"{path} line {line}: {key} is {kind}, but {first[0]} on line {first[1]}; a column "
                                  "holds one type (quote numbers meant as text)")
    missing = [p.name for p in list_image_files(folder)[0] if p.resolve() not in listed]
    if missing:
        names = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        warnings.warn(f"{what} {folder}: {len(missing)} image(s) not in {path.name}, not trained on: {names}",
                      SdtuneWarning, stacklevel=3)
    return [row for _, row in rows]


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    import json

    rows = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as exc:
            reason = f"{exc.msg.removesuffix(' at')} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) \
                else str(exc).splitlines()[0]
            raise SdtuneError(f"{path} line {line} is not valid JSON ({reason}); each line must be one JSON object "
                              f"such as {METADATA_EXAMPLE}") from None
        if not isinstance(row, dict):
            raise SdtuneError(f"{path} line {line} is {_JSON_TYPES.get(type(row), 'null')}, not a JSON object; each "
                              f"line must be one object such as {METADATA_EXAMPLE}")
        rows.append((line, row))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    import csv
    import io

    try:
        lines = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise SdtuneError(f"{path} is not valid CSV ({exc})") from None
    numbered = [(i, cells) for i, cells in enumerate(lines, 1) if any(c.strip() for c in cells)]
    if not numbered:
        raise SdtuneError(f"{path} is empty; its first line names the columns, e.g. file_name,text")
    (head_line, header), body = numbered[0], numbered[1:]
    if "file_name" not in header:
        raise SdtuneError(f"{path} line {head_line} names no file_name column (it names {', '.join(header)}); the "
                          "first line names the columns, e.g. file_name,text")
    if len(set(header)) != len(header):
        raise SdtuneError(f"{path} line {head_line} names a column twice ({', '.join(header)})")
    rows = []
    for line, cells in body:
        if len(cells) != len(header):
            raise SdtuneError(f"{path} line {line} has {len(cells)} field(s) but the header names {len(header)} "
                              f"({', '.join(header)}); quote a caption that holds a comma")
        rows.append((line, dict(zip(header, cells))))
    return rows


def _load_dataset(source: Source, what: str):
    import datasets

    path = Path(source.dataset).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - a damaged saved dataset: its JSON or arrow files
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise SdtuneError(f"{what} {path} is a saved dataset that cannot be read ({reason}); save it again "
                              "with Dataset.save_to_disk") from None
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise SdtuneError(f"{what} {path} has no split {source.split!r} (it has {', '.join(loaded)}); set split")
            loaded = loaded[source.split]
        return loaded
    try:
        return datasets.load_dataset(source.dataset, split=source.split)
    except Exception as exc:  # noqa: BLE001 - the hub client raises many kinds; all mean "not available"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise SdtuneError(f"{what} {source.dataset!r} is neither a saved dataset folder nor a dataset that could be "
                          f"loaded{' from the local cache (offline)' if offline else ''}: {reason}") from None


def _folder_rows(folder: Path, what: str):
    """A plain folder: its images, each with the text of ``<stem>.txt`` beside it as caption (if any)."""
    import datasets

    images = folder_images(folder, what, stacklevel=3)
    captions = [_caption_file(p.with_suffix(".txt")) for p in images]
    return datasets.Dataset.from_dict({"image": [str(p) for p in images], "caption": captions})


def read_text(path: Path, label: str) -> str:
    """A UTF-8 text file (a BOM allowed); one line naming ``label`` and the line for bytes that are not UTF-8 text
    (NUL bytes included: a binary file), or for a file that cannot be read."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise SdtuneError(f"{label} is not UTF-8 text (line {line}); save it as UTF-8") from None
    except OSError as exc:
        raise SdtuneError(f"{label} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise SdtuneError(f"{label} holds NUL bytes (line {line}), so it is not text; save it as plain UTF-8 text")
    return text


def _caption_file(path: Path) -> str | None:
    return read_text(path, f"caption file {path}").strip() if path.is_file() else None


# ----------------------------------------------------------------------------------------------- examples


def read_examples(source: Source, *, kind: str = "instance", concept: int = 0, default_caption: str | None = None,
                  identifier: str | None = None, caption_prefix: str | None = None, min_side: int = 0,
                  what: str = "instance_dir", use_captions: bool = True) -> list[Example]:
    """Every image of ``source`` as an ``Example``, checked (see the module docstring).

    ``use_captions=False`` ignores the source's captions: every image trains on ``default_caption``.
    """
    ds = read_rows(source, what)
    if len(ds) == 0:
        raise SdtuneError(f"{what} {source.name} holds no images")
    examples, lacking = [], []
    for i, row in enumerate(ds):
        data, name = _bytes_of(row["image"], source, i, what)
        img = open_image_bytes(data, name, "RGB", what=f"{what} image")
        w, h = img.size
        if min(w, h) < min_side:
            raise SdtuneError(f"{what} image {name} is {w}x{h} pixels, too small to train at this resolution "
                              f"(the shorter side must be at least {min_side} px, min_image_fraction of resolution); "
                              "use a larger photo, remove it, or lower min_image_fraction")
        caption = row["caption"] if use_captions else None
        if caption is not None:
            # Several non-empty lines are variants of one caption: each step draws one (see TrainingData.example).
            lines = [ln.strip() for ln in str(caption).splitlines() if ln.strip()]
            if not lines:
                raise SdtuneError(f"{what}: the caption of {name} is empty; write one, or remove it so the image "
                                  "trains on instance_prompt")
            if identifier and not all(_has_word(ln, identifier) for ln in lines):
                if caption_prefix:
                    lines = [ln if _has_word(ln, identifier) else f"{caption_prefix.rstrip()} {ln}" for ln in lines]
                else:
                    lacking.append(name)
            caption = "\n".join(lines)
        else:
            if not default_caption:
                raise SdtuneError(f"{what}: {name} has no caption and no instance_prompt is set; give one of them")
            caption = default_caption
        mask_data, has_alpha = _mask_of(source, name, (w, h), data, what)
        examples.append(Example(kind, concept, name, data, caption, (w, h), hashlib.sha256(data).hexdigest(),
                                mask_data, has_alpha))
    if lacking:
        warnings.warn(f"{what} {source.name}: {len(lacking)} caption(s) lack the identifier {identifier!r} "
                      f"(e.g. {Path(lacking[0]).name}); the subject is then not tied to it - add it, or set "
                      "caption_prefix", SdtuneWarning, stacklevel=2)
    seen: dict[str, str] = {}
    for ex in examples:
        if ex.key in seen:
            warnings.warn(f"{what} {source.name}: {Path(ex.name).name} is the same image as {Path(seen[ex.key]).name}; "
                          "it counts twice", SdtuneWarning, stacklevel=2)
        seen.setdefault(ex.key, ex.name)
    return examples


MASK_FOLDER = "masks"  # <instance_dir>/masks/<image stem>.png: white = the subject (for masked_loss)


def _mask_of(source: Source, name: str, size: tuple[int, int], data: bytes, what: str) -> tuple[bytes | None, bool]:
    """(the bytes of the image's mask file, or None; whether the image has an alpha channel)."""
    mask_data = None
    if source.instance_dir and not source.dataset:
        path = Path(source.instance_dir).expanduser() / MASK_FOLDER / f"{Path(name).stem}.png"
        if path.is_file():
            mask_data = _read(path, f"{what}: mask")
            got = open_image_bytes(mask_data, str(path), "L", what="mask").size
            if got != size:
                raise SdtuneError(f"{what}: mask {path} is {got[0]}x{got[1]} but its image {Path(name).name} is "
                                  f"{size[0]}x{size[1]}; make the mask the image's size")
    return mask_data, mask_data is None and _has_alpha(data)


def _has_alpha(data: bytes) -> bool:
    """Whether an encoded image has an alpha channel - from its header, without decoding the pixels again."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as img:
            return has_alpha(img)
    except Exception:  # noqa: BLE001 - it decoded once already; an odd header just means no alpha
        return False


def _bytes_of(image, source: Source, i: int, what: str) -> tuple[bytes, str]:
    """(encoded bytes, a name for messages) of one row's undecoded image (a dict, a path, or a PIL image)."""
    label = f"{source.dataset} row {i}" if source.dataset else None
    if isinstance(image, dict):
        if image.get("bytes"):
            return image["bytes"], image.get("path") or label or f"row {i}"
        image = image.get("path")
    if isinstance(image, str):
        path = Path(image)
        if not path.is_file() and not path.is_absolute() and source.instance_dir:  # relative to the folder
            path = Path(source.instance_dir).expanduser() / path
        if not path.is_file():
            raise SdtuneError(f"{what}: image file {path} (row {i}) not found")
        return _read(path, f"{what}: image file"), str(path)
    if isinstance(image, Image.Image):  # a decoded column: encode once, losslessly
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), label or f"row {i}"
    raise SdtuneError(f"{what} {source.name}: row {i} holds no image ({type(image).__name__}); check image_column")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SdtuneError(f"{what} {path} cannot be read ({exc.strerror or type(exc).__name__})") from None


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None
