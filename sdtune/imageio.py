"""Reading user images robustly and writing outputs atomically.

Reading: EXIF orientation is honoured; RGBA/LA/P are flattened on white, CMYK and 16-bit
greyscale converted, so every caller gets plain 8-bit RGB (or L for masks) - except
``image_and_alpha_of_bytes``, which keeps the file's own RGB and hands back its alpha (a training
mask). A missing or corrupt file is one clear ``SdtuneError`` naming it.

Writing: outputs go to a temporary name in the same folder and are renamed when complete, so an
interrupted run never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sdtune.errors import SdtuneError, disk_reason

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer/float greyscale -> 8-bit L, scaled by the mode's range."""
    if img.mode in {"I;16", "I;16B", "I;16L", "I;16N"}:
        arr = np.asarray(img, dtype=np.float32) / 65535.0
    elif img.mode in {"I", "F"}:
        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = arr / hi
    else:
        return img
    return Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), "L")


def open_image(path: str | os.PathLike, mode: str = "RGB", what: str = "image") -> Image.Image:
    """Open ``path`` as an 8-bit image in ``mode`` ("RGB" or "L"), EXIF rotation applied."""
    p = Path(path)
    if not p.exists():
        raise SdtuneError(f"{what} not found: {p}")
    if not p.is_file():
        raise SdtuneError(f"{what} is not a file: {p}")
    return _decode(p, str(p), mode, what)


def open_image_bytes(data: bytes, name: str, mode: str = "RGB", what: str = "image") -> Image.Image:
    """``open_image`` for an encoded image held in memory (a dataset row); ``name`` says where it came from."""
    return _decode(io.BytesIO(data), name, mode, what)


def has_alpha(img: Image.Image) -> bool:
    """Whether an image (opened, or only its header read) carries an alpha channel."""
    return img.mode in {"RGBA", "LA", "PA"} or (img.mode == "P" and "transparency" in img.info)


def image_and_alpha_of_bytes(data: bytes, name: str, what: str = "image") -> tuple[Image.Image, Image.Image | None]:
    """(RGB, alpha as L or None) of an encoded image, EXIF rotation applied. The RGB is the file's own
    colour under every pixel, NOT flattened on white: a masked loss needs the real pixels where the mask is
    transparent too (a render or photo with a painted mask keeps its background there)."""
    img = _decode(io.BytesIO(data), name, None, what)
    if not has_alpha(img):
        return img.convert("RGB"), None
    img = img.convert("RGBA")
    return img.convert("RGB"), img.getchannel("A")


def _decode(source, name: str, mode: str | None, what: str) -> Image.Image:
    try:
        with Image.open(source) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        raise SdtuneError(f"{what} {name} says it is {_stated_pixels(exc)} pixels, far more than any image sdtune "
                          "works with (a corrupt file or a decompression bomb); pass a real image") from None
    except Exception as exc:  # a corrupt file reaches many decoder errors (OSError, SyntaxError, struct.error, ...)
        raise SdtuneError(f"{what} {name} could not be read as an image ({type(exc).__name__}); "
                          "is it corrupt?") from None
    img = _to_8bit(img)
    if mode is None:  # the caller takes the decoded image as it is
        return img
    if img.mode in {"RGBA", "LA", "P", "PA"}:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert(mode)


def _stated_pixels(exc: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(found.group(1)):,}" if found else "billions of"


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary path beside ``final``; rename it to ``final`` only if the block succeeds.

    A full or read-only disk is the user's to fix: one ``SdtuneError`` line, and ``final`` (if it existed) kept.
    """
    final = Path(final)
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        yield Path(tmp)
        os.replace(tmp, final)
    except SdtuneError:
        raise
    except Exception as exc:  # not only OSError: safetensors and torch.save raise their own types for a full disk
        reason = disk_reason(exc, final.parent)
        if reason is None:
            raise
        raise SdtuneError(f"{reason} while writing {final}; free some space (or choose another folder) and "
                          "run again") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_image_atomic(img: Image.Image, final: str | os.PathLike, **save_kwargs) -> Path:
    with atomic_path(final) as tmp:
        img.save(tmp, format=save_kwargs.pop("format", "PNG"), **save_kwargs)
    return Path(final)


def write_text_atomic(final: str | os.PathLike, text: str) -> Path:
    with atomic_path(final) as tmp:
        Path(tmp).write_text(text)
    return Path(final)
