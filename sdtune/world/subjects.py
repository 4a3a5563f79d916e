"""The world's subjects as DreamBooth sees them: a folder of 3-5 renders plus ``subject.json``.

``data/subjects/<name>/`` is written by ``write_subject`` (``python train/make_subjects.py``) from
``scenes.SUBJECTS``: four renders in chosen contexts, each with its mask (``masks/NN.png``), and a
``subject.json`` with the class noun, the identifier, the instance and class prompts and what each render shows.
With captions (the subject's ``"captions"`` in ``scenes.SUBJECTS``, or ``captions=True/False``;
``make_subjects.py --captions / --no-captions``) each render also gets a caption (``NN.txt``, kohya's convention) of
two lines, of which each training step draws one: the identifier and class noun with the render's position and
background ("a photo of sks box on the left, on sand"), so the context words explain the context and "sks box" is
left to mean the subject; and the instance prompt alone, so the identifier also keeps the whole subject (kohya's tag
dropout, of the context, half the time). The README measures both on every subject: captions win the stated
context for each, and the two-tone ball, whose captions explain everything but its colours, is learned with them
only beside output preservation; so all three ship with captions.
A subject.json may also carry ``"training"``: training keys the folder recommends (the two-tone ball's
``output_preservation_weight``), which the demo applies over ``configs/demo.yaml`` and under the command line.
``load_subject`` reads and checks such a folder before any model is loaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sdtune import DATA_DIR
from sdtune.errors import SdtuneError
from sdtune.imageio import save_image_atomic, write_text_atomic
from sdtune.training.sources import MASK_FOLDER
from sdtune.world import scenes

SUBJECTS_DIR = DATA_DIR / "subjects"
DEFAULT_SUBJECT = SUBJECTS_DIR / "checker_box"
# The instance images: (size, position, background, seed) - varied, and leaving most contexts unseen.
RENDERS = {
    "checker_box": [("large", "center", "grass", 101), ("large", "left", "sand", 102), ("small", "right", "snow", 103),
                    ("large", "bottom", "night", 104)],
    "crescent": [("large", "center", "sand", 201), ("large", "right", "grass", 202), ("small", "left", "night", 203),
                 ("large", "top", "snow", 204)],
    "twotone_ball": [("large", "center", "snow", 301), ("large", "top", "grass", 302), ("small", "bottom", "sand", 303),
                     ("large", "left", "night", 304)],
}


@dataclass
class Subject:
    folder: Path
    name: str
    class_noun: str
    identifier: str
    instance_prompt: str
    class_prompt: str
    images: list[Path]
    contexts: set = field(default_factory=set)  # (position, background) pairs the instance images show
    training: dict = field(default_factory=dict)  # training keys the folder recommends (subject.json "training")


def load_subject(folder: str | os.PathLike) -> Subject:
    """Read and check a subject folder (3-5 images + subject.json) before any model is loaded."""
    from sdtune.training.data import find_images

    p = Path(folder).expanduser()
    if not p.is_dir():
        raise SdtuneError(f"--subject {p} is not a folder; pass a subject folder with images and subject.json "
                          f"(e.g. {DEFAULT_SUBJECT})")
    meta_path = p / "subject.json"
    if not meta_path.is_file():
        raise SdtuneError(f"--subject {p} has no subject.json (class_noun, identifier, prompts); "
                          f"see {DEFAULT_SUBJECT}/subject.json")
    meta = read_subject_json(meta_path)
    noun = meta.get("class_noun")
    if noun not in scenes.KINDS:
        raise SdtuneError(f"{meta_path}: class_noun must be one of the world's classes the judge knows "
                          f"({', '.join(scenes.KINDS)}), got {noun!r}; use `sdtune train` for other subjects")
    identifier = str(meta.get("identifier") or scenes.IDENTIFIER)
    images = find_images(p, what="--subject")  # subject.json, captions and masks/ are not stray files
    contexts = {(r.get("position"), r.get("background")) for r in meta.get("renders") or []}
    training = meta.get("training") or {}
    return Subject(folder=p, name=str(meta.get("name") or p.name), class_noun=noun, identifier=identifier,
                   instance_prompt=str(meta.get("instance_prompt") or f"a photo of {identifier} {noun}"),
                   class_prompt=str(meta.get("class_prompt") or f"a photo of a {noun}"), images=images,
                   contexts=contexts, training=dict(training))


SUBJECT_TEXT_KEYS = ("name", "identifier", "instance_prompt", "class_prompt", "description")


def read_subject_json(meta_path: Path) -> dict:
    """A subject.json as a mapping, every problem one line naming the file (and the line of bad JSON): not UTF-8,
    not JSON, not an object, a text key that is not a string, ``renders`` not a list of objects, ``training`` not an
    object of training keys."""
    from sdtune.training.config import FIELD_NAMES
    from sdtune.overrides import unknown_key_error

    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise SdtuneError(f"{meta_path} is not UTF-8 text; save it as UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise SdtuneError(f"{meta_path} line {exc.lineno} is not valid JSON ({exc.msg.removesuffix(' at')} at column "
                          f"{exc.colno}); it holds one object such as "
                          '{"class_noun": "box", "identifier": "sks"}') from None
    except OSError as exc:
        raise SdtuneError(f"{meta_path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise SdtuneError(f"{meta_path} must hold a JSON object such as {{\"class_noun\": \"box\"}}, "
                          f"got a {type(meta).__name__}")
    for key in SUBJECT_TEXT_KEYS:
        value = meta.get(key)
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise SdtuneError(f"{meta_path}: \"{key}\" must be a non-empty string, got {value!r}")
    identifier = meta.get("identifier")
    if identifier is not None and len(identifier.split()) != 1:
        raise SdtuneError(f"{meta_path}: \"identifier\" must be one rare word such as sks, got {identifier!r}")
    renders = meta.get("renders")
    if renders is not None and not (isinstance(renders, list) and all(
            isinstance(r, dict) and all(isinstance(r.get(k), (str, type(None))) for k in ("position", "background"))
            for r in renders)):
        raise SdtuneError(f"{meta_path}: \"renders\" must be a list of objects (file, position, background: "
                          f"strings), got {renders!r}"[:300])
    training = meta.get("training") or {}
    if not isinstance(training, dict) or not all(isinstance(k, str) for k in training):
        raise SdtuneError(f"{meta_path}: \"training\" must be an object of training keys, "
                          f"e.g. {{\"output_preservation_weight\": 1.0}}, got {training!r}")
    for key in training:
        if key not in FIELD_NAMES:
            raise SdtuneError(f"{meta_path}: \"training\": {unknown_key_error(key, FIELD_NAMES)}")
    return meta


def instance_caption(scene: scenes.Scene, identifier: str) -> str:
    """"a photo of sks box on the left, on sand": what a render of the subject shows besides the subject,
    in the words the subject prompts use (position and background; the size is the subject's own)."""
    return scenes.caption(scene, identifier=identifier, stated={"kind", "position", "background"})


def dreambooth_prompt(spec: dict) -> str:
    """The subject's instance prompt, DreamBooth's form: "a photo of sks box"."""
    return f"a photo of {spec['identifier']} {spec['class_noun']}"


def subject_folders() -> list[Path]:
    """Every shipped subject folder (``data/subjects/*`` with a subject.json), default subject first."""
    found = sorted(p.parent for p in SUBJECTS_DIR.glob("*/subject.json"))
    return sorted(found, key=lambda p: p != DEFAULT_SUBJECT)


def write_subject(name: str, folder: str | os.PathLike, size: int = 64, captions: bool | None = None) -> Path:
    """Render subject ``name`` of ``scenes.SUBJECTS`` into ``folder``: 4 PNGs, their masks under masks/,
    subject.json and, with captions (``None``: as the subject ships), a caption per render (module docstring)."""
    if name not in scenes.SUBJECTS or name not in RENDERS:
        raise SdtuneError(f"unknown subject {name!r}; choose one of {', '.join(scenes.SUBJECTS)}")
    spec, folder = scenes.SUBJECTS[name], Path(folder)
    if captions is None:
        captions = bool(spec.get("captions", False))
    noun, ident = spec["class_noun"], spec["identifier"]
    renders = []
    for i, (sz, pos, bg, seed) in enumerate(RENDERS[name]):
        scene = scenes.Scene(kind=noun, colour="red", size=sz, position=pos, background=bg, seed=seed)
        render = scenes.render(scene, size=size, subject=name)
        save_image_atomic(render.image, folder / f"{i:02d}.png")
        # The subject's own pixels, for masked_loss (white = the subject); the renderer knows them exactly.
        save_image_atomic(Image.fromarray(render.mask.astype(np.uint8) * 255, "L"),
                          folder / MASK_FOLDER / f"{i:02d}.png")
        caption = folder / f"{i:02d}.txt"
        if captions:
            write_text_atomic(caption, f"{instance_caption(scene, ident)}\n{dreambooth_prompt(spec)}\n")
        else:  # rewriting a captioned folder without captions: none may stay behind
            caption.unlink(missing_ok=True)
        renders.append({"file": f"{i:02d}.png", "size": sz, "position": pos, "background": bg, "seed": seed})
    meta = {"name": name, "class_noun": noun, "identifier": ident, "instance_prompt": dreambooth_prompt(spec),
            "class_prompt": f"a photo of a {noun}", "description": spec["stresses"], "renders": renders}
    if spec.get("training"):
        meta["training"] = dict(spec["training"])
    write_text_atomic(folder / "subject.json", json.dumps(meta, indent=2) + "\n")
    return folder
