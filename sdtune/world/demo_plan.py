"""The demo's plan and configuration: how much it generates (``Plan``, ``FULL``, ``QUICK``), which models it runs
(``resolve_models``: given ones, the embedded family, or tiny random ones) and the training config each subject
trains with (``demo_config``: configs/demo.yaml + the subject folder's keys + --quick + key=value overrides).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sdtune import CONFIGS_DIR
from sdtune.errors import SdtuneError
from sdtune.world.demo_prompts import eval_img2img_inputs, eval_prompts, subject_class_prompts
from sdtune.world.subjects import Subject

DEMO_CONFIG = CONFIGS_DIR / "demo.yaml"
TINY_NOTICE = ("embedded models not built yet: running on tiny RANDOM models; pictures will be noise; "
               "see README")


@dataclass(frozen=True)
class Plan:
    """How much the demo generates (per guidance scale, per subject, per mode)."""

    base_prompts: int = 48  # world prompts stating all 5 attributes, each at guidance 7.5, 1.0 and subject_guidance
    world_checks: int = 16  # inpaint (object replaced in a mask) and depth2img (layout kept) on world scenes
    subject_prompts: int = 32  # txt2img of the subject in new contexts
    per_mode: int = 16  # img2img / inpaint / depth2img examples each
    class_prompts: int = 32  # class-prompt images, before and after training (prior preservation)
    sample_steps: int = 25
    guidance: float = 7.5  # the family before training (the targets are stated at 7.5, SD's default)
    # Every image drawn with the LoRA (the subject in all modes, class prompts). The trained LoRA oversaturates
    # at 7.5 on this family; the value is chosen on held-out seeds and contexts (README, "Guidance after training").
    subject_guidance: float = 3.0
    # The family's prompts and inpaint check are drawn a second time at `guidance`, guided only at noise levels in
    # [lo, hi) (sdtune.guidance_interval), for a model that oversaturates where guidance acts on the first and
    # last steps (family v2 at 7.5). None skips these draws: configs/demo.yaml sets None for family v2.1, which
    # meets the targets guided everywhere; --quick keeps this default so the path stays exercised.
    guidance_interval: tuple[float, float] | None = (0.3, 0.8)
    batch_size: int = 16  # images per pipeline call


FULL = Plan()
QUICK = Plan(base_prompts=2, world_checks=1, subject_prompts=2, per_mode=1, class_prompts=2, sample_steps=3,
             batch_size=2)
# Training settings of --quick, applied before the user's key=value overrides.
# The in-loop evaluation's subject and class prompts (and img2img probes) per evaluation, with half as many other-kind
# prompts: 8 every 300 steps cost 17 % of the training, the sweep included (16 every 150: 43 %; docs/embedded-world.md).
EVAL_PROMPTS = 8
QUICK_TRAINING = {"max_steps": 3, "num_class_images": 2, "class_generation_steps": 3, "train_batch_size": 1,
                  "eval_every": 2, "eval_steps": 2, "sweep_guidance": [3.0], "sweep_lora_scale": [1.0]}


# ----------------------------------------------------------------------------- models

@dataclass
class Models:
    base: str
    inpaint: str | None
    depth: str | None
    kind: str  # "embedded" | "tiny-random" | "custom"


def resolve_models(model, inpaint_model, depth_model, out: Path, say: Callable[[str], None]) -> Models:
    """The base/inpaint/depth models to use: given ones, else the embedded family, else tiny random ones."""
    from sdtune.models import embedded

    if model is not None:  # the user's own base; dedicated models only when given (another family may not fit)
        own = embedded.has_embedded("base") and Path(str(model)).resolve() == embedded.embedded_model("base").resolve()
        return Models(str(model), _opt(inpaint_model), _opt(depth_model), "embedded" if own else "custom")
    if embedded.has_embedded("base"):
        def pick(given, kind):
            if given is not None:
                return str(given)
            return str(embedded.embedded_model(kind)) if embedded.has_embedded(kind) else None

        return Models(str(embedded.embedded_model("base")), pick(inpaint_model, "inpaint"),
                      pick(depth_model, "depth"), "embedded")
    say(f"WARNING: {TINY_NOTICE}")
    tiny = tiny_models(out / "_tiny_models")
    return Models(str(tiny["sd1"]), _opt(inpaint_model) or str(tiny["inpaint"]),
                  _opt(depth_model) or str(tiny["depth"]), "tiny-random")


def _opt(value) -> str | None:
    return None if value is None else str(value)


def tiny_models(folder: Path) -> dict[str, Path]:
    """Tiny random base/inpaint/depth models in ``folder``: built aside and renamed in, reused by a rerun."""
    from sdtune.models.fixtures import save_tiny_pipeline

    names = ("sd1", "inpaint", "depth")  # one seed: the three share VAE and text-encoder weights, as a family does
    if not all((folder / n / "model_index.json").is_file() for n in names):
        scratch = Path(tempfile.mkdtemp(prefix=".tiny_models-", suffix=".partial", dir=folder.parent))
        try:
            for name in names:
                save_tiny_pipeline(scratch / name, name, seed=0)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(scratch, folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return {n: folder / n for n in names}


# ----------------------------------------------------------------------------- configuration

def demo_yaml() -> dict:
    """configs/demo.yaml's training keys (its ``demo:`` generation plan left out)."""
    from sdtune.yamlfile import read_yaml

    if not DEMO_CONFIG.is_file():
        raise SdtuneError(f"the demo config {DEMO_CONFIG} is missing; run sdtune from a source checkout")
    data = read_yaml(DEMO_CONFIG)
    data.pop("demo", None)  # the generation plan (see demo_plan), not a training key
    return data


def demo_defaults() -> dict:
    """Every training key as a demo run takes it before any folder's or command line's: configs/demo.yaml, and the
    recipe's own default (``TrainConfig``'s) for a key the file leaves out."""
    from sdtune.training.config import TrainConfig

    return {**vars(TrainConfig()), **demo_yaml()}


def demo_config(subject: Subject, base_model: str, out: Path, resolution: int, quick: bool,
                overrides=(), training: dict | None = None, check_only: bool = False):
    """configs/demo.yaml + the subject folder's own training keys (subject.json "training", or ``training``) + what
    this run fixes (model, subject, folders under ``out``, resolution) + --quick + overrides. ``check_only``: the
    overrides checked before any work, nothing written (the img2img probe's inputs are written otherwise)."""
    from sdtune.training.config import config_from_dict, parse_override

    data = demo_yaml()
    data.update(subject.training if training is None else training)
    data.update(model=base_model, instance_dir=str(subject.folder), instance_prompt=subject.instance_prompt,
                identifier=subject.identifier, class_prompt=subject.class_prompt, class_dir=str(out / "class_images"),
                output_dir=str(out / "lora"), resolution=resolution)
    if quick:
        data.update(QUICK_TRAINING)
    given = {}
    for text in training_overrides(overrides):
        key, value = parse_override(text)
        given[key] = value
    data.update(given)
    in_context = subject_class_prompts(subject, data.get("use_captions", True))
    if "class_prompts" not in given and in_context:  # an explicit class_prompts wins
        data["class_prompts"] = in_context
    # the run's own evaluation, in the world's words
    for key, prompts in eval_prompts(subject, 2 if quick else EVAL_PROMPTS).items():
        if data.get(key) is None:
            data[key] = prompts
    if data.get("eval_img2img_strength") and not data.get("eval_img2img_images") and not check_only:
        data["eval_img2img_images"] = str(write_eval_inputs(subject, out / "eval_inputs", 2 if quick else 8))
    return config_from_dict(data)


# What a run at the recipe's fixed max_steps sets (the ablations and the time-to-subject bench compare recipes step for
# step): no evaluation, no kept step, no early stop.
FIXED_STEPS = ("eval_every=0", "keep_best=false", "stop_when_learned=false")

def write_eval_inputs(subject: Subject, folder: Path, n: int) -> Path:
    """The in-loop img2img probe's inputs (``eval_img2img_inputs``) as PNGs in ``folder``; kept when already there."""
    from sdtune.imageio import save_image_atomic

    for i, image in enumerate(eval_img2img_inputs(subject, n)):
        if not (folder / f"{i:02d}.png").is_file():
            save_image_atomic(image, folder / f"{i:02d}.png")
    return folder


PLAN_PREFIX = "demo."


def training_overrides(overrides) -> list[str]:
    """The key=value overrides that are training keys (``demo.KEY=VALUE`` ones set the plan instead)."""
    return [t for t in overrides if not t.strip().startswith(PLAN_PREFIX)]


def demo_plan(quick: bool, overrides=()) -> Plan:
    """The generation plan: QUICK for --quick, else FULL updated by the ``demo:`` section of configs/demo.yaml;
    then the ``demo.KEY=VALUE`` overrides (``sdtune demo demo.subject_guidance=5``), with or without --quick."""
    from dataclasses import fields, replace

    from sdtune.overrides import parse_override
    from sdtune.yamlfile import read_yaml

    names = {f.name for f in fields(Plan)}
    given = {}
    for text in overrides:
        if not text.partition("=")[0].strip().startswith(PLAN_PREFIX):
            continue  # a training key, for demo_config
        key, value = parse_override(text, [PLAN_PREFIX + n for n in sorted(names)], example="demo.subject_guidance=5",
                                    what="demo plan key")
        default = getattr(FULL, key[len(PLAN_PREFIX):])
        if isinstance(default, (int, float)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SdtuneError(f"override '{text}': {key} takes a number (e.g. {key}={default})")
        given[key[len(PLAN_PREFIX):]] = value
    if quick or not DEMO_CONFIG.is_file():
        section = {}
        base = QUICK if quick else FULL
    else:
        section = read_yaml(DEMO_CONFIG).get("demo") or {}
        base = FULL
        if not isinstance(section, dict) or set(section) - names:
            raise SdtuneError(f"{DEMO_CONFIG}: the demo section takes only {', '.join(sorted(names))}")
    section = {**section, **given}
    if not section:
        return base
    if section.get("guidance_interval") is not None:
        from sdtune.guidance_interval import parse_interval

        section = {**section, "guidance_interval": parse_interval(section["guidance_interval"])}
    return replace(base, **section)
