"""Which config a run takes: a YAML file, a shipped config by name, or - with no file - the family's defaults.

``load_run_config`` serves ``sdtune train`` and ``accelerate launch -m sdtune.training.dreambooth`` alike.

Training without a YAML file:

``sdtune train model=HUB_ID_OR_PATH instance_dir=photos/ instance_prompt="a photo of sks dog"
class_prompt="a photo of a dog"`` names no config. The model's own config files (no weights) say its family, and
the family's shipped config gives every default: ``sd3_lora`` for SD 3.x, ``sdxl_lora`` for SDXL, ``sd15_lora`` for
SD 1.x/2.x, and
``dreambooth_lora`` for the embedded model (no ``model``). The resolution is the model's native size. The keys that
describe one subject and one run (its photos, prompts and folders) are not taken from the shipped file: the user
gives the subject, and the folders are named after it.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

from sdtune import CONFIGS_DIR, DATA_DIR
from sdtune.errors import SdtuneError
from sdtune.training.config import TrainConfig, config_from_dict, config_to_dict, parse_override
from sdtune.yamlfile import read_yaml

log = logging.getLogger("sdtune.train")
# The shipped config each family starts from (configs/NAME.yaml).
FAMILY_PRESETS = {"embedded": "dreambooth_lora", "sd": "sd15_lora", "sdxl": "sdxl_lora", "sd3": "sd3_lora"}
# A shipped config's keys that describe its own example subject and run, not a default for another one.
SUBJECT_KEYS = ("instance_dir", "instance_prompt", "class_prompt", "class_prompts", "class_dir", "output_dir",
                "validation_prompts", "identifier", "dataset", "concepts")


def load_run_config(config: str | None, overrides: Sequence[str]) -> TrainConfig:
    """``config`` (a YAML path, a shipped config's name, or None) + ``key=value`` overrides, validated."""
    if config is None:
        return default_config(overrides)
    data = read_yaml(config_path(config))
    data.update(parse_override(text) for text in overrides)
    return config_from_dict(with_shipped_data(data))


def shipped_configs() -> list[Path]:
    """The shipped YAML configs (``sdtune config list``), by name."""
    return sorted(CONFIGS_DIR.glob("*.yaml"))


def config_path(name: str) -> Path:
    """A config file's path: an existing file as given, else a shipped config by name (``sd15_lora``)."""
    path = Path(name).expanduser()
    if path.is_file() or path.suffix in (".yaml", ".yml") and path.parent != Path("."):
        return path  # a missing path with folders is a missing file, said by read_yaml
    shipped = CONFIGS_DIR / f"{path.stem if path.suffix in ('.yaml', '.yml') else name}.yaml"
    if shipped.is_file():
        return shipped
    if path.exists():
        return path
    names = ", ".join(p.stem for p in shipped_configs())
    raise SdtuneError(f"config {name} not found: it is neither a file nor a shipped config ({names}); "
                      "see sdtune config list")


def with_shipped_data(data: dict[str, Any]) -> dict[str, Any]:
    """Relative ``data/...`` folders that are not in the current folder mean the shipped data (the shipped configs
    train on data/subjects/...), so a shipped config, or a copy of one, runs from any folder."""
    def shipped(value):
        path = Path(str(value))
        if path.is_absolute() or path.exists() or not path.parts or path.parts[0] != "data":
            return value
        inside = DATA_DIR.joinpath(*path.parts[1:])
        return str(inside) if inside.exists() else value

    out = dict(data)
    for key in ("instance_dir", "dataset"):
        if out.get(key):
            out[key] = shipped(out[key])
    if isinstance(out.get("concepts"), list):
        out["concepts"] = [{**c, **{k: shipped(c[k]) for k in ("instance_dir", "dataset") if c.get(k)}}
                           if isinstance(c, dict) else c for c in out["concepts"]]
    return out


def default_config(overrides: Sequence[str]) -> TrainConfig:
    """The config of ``sdtune train key=value ...`` with no file: the family's defaults under the user's keys."""
    given = dict(parse_override(text) for text in overrides)
    if not any(given.get(k) for k in ("instance_dir", "dataset", "concepts")):
        raise SdtuneError("no config file and no subject: give instance_dir=FOLDER_OF_PHOTOS and "
                          "instance_prompt=\"a photo of sks dog\" (and class_prompt=\"a photo of a dog\"), "
                          "or name a config (sdtune config list)")
    family, native = _family_of(given.get("model"))
    data = {k: v for k, v in read_yaml(CONFIGS_DIR / f"{FAMILY_PRESETS[family]}.yaml").items()
            if k not in SUBJECT_KEYS}
    if native is not None:
        data["resolution"] = native
    data.update(_for_this_machine(data, given))
    data.update(given)
    return config_from_dict(with_shipped_data({**_run_keys(data, family), **data}))


def _for_this_machine(data: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The presets are GPU settings (8-bit AdamW, fp16); without CUDA (or bitsandbytes) take what runs here."""
    import importlib.util

    import torch

    changes = {}
    cuda = torch.cuda.is_available()
    if "optimizer" not in given and data.get("optimizer") == "adamw8bit" and not (
            cuda and importlib.util.find_spec("bitsandbytes")):
        changes["optimizer"] = "adamw"
    if "mixed_precision" not in given and data.get("mixed_precision") not in (None, "no") and not cuda:
        changes["mixed_precision"] = "no"
    if changes:
        log.info("%s instead of the preset's GPU settings (%s)", ", ".join(f"{k} {v}" for k, v in changes.items()),
                 "no CUDA GPU" if not cuda else "bitsandbytes is not installed")
    return changes


def _family_of(model: str | None) -> tuple[str, int | None]:
    if not model:
        return "embedded", None
    from sdtune.models.loading import peek_model

    peek = peek_model(model)
    return ("sd3" if peek.sd3 else "sdxl" if peek.sdxl else "sd"), peek.native_resolution


def _run_keys(data: dict[str, Any], family: str) -> dict[str, Any]:
    """Folders named after the subject, and validation prompts built on its instance prompt."""
    keys: dict[str, Any] = {}
    subject = Path(str(data.get("instance_dir") or data.get("dataset") or "subject")).expanduser()
    name = _slug(subject.name or "subject")
    keys["output_dir"] = str(Path("outputs") / f"{name}-{data.get('method', 'lora')}")
    if data.get("class_prompt"):
        # per family: class images drawn by one model are the prior of that model only
        keys["class_dir"] = str(Path("outputs") / "class_images" / f"{_slug(data['class_prompt'])}-{family}")
    prompt = data.get("instance_prompt")
    if prompt and family != "embedded":
        keys["validation_prompts"] = [f"{prompt} on the beach", f"{prompt}, an oil painting"]
    elif prompt:  # the embedded world has a small vocabulary: the prompt itself
        keys["validation_prompts"] = [prompt]
    return keys


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_") or "subject"


# The size to train at when neither the config nor the model's config says one (a single-file checkpoint).
FALLBACK_RESOLUTION = {"sd": 512, "sdxl": 1024, "sd3": 1024}


def with_native_resolution(cfg: TrainConfig) -> TrainConfig:
    """``resolution: null`` means the model's native size, read from its config files (no weights loaded)."""
    if cfg.resolution is not None:
        return cfg
    from sdtune.models.embedded import embedded_model
    from sdtune.models.loading import peek_model

    peek = peek_model(cfg.model or embedded_model("base"))
    size = peek.native_resolution or FALLBACK_RESOLUTION["sd3" if peek.sd3 else "sdxl" if peek.sdxl else "sd"]
    log.info("resolution %d (the model's native size)", size)
    return config_from_dict({**config_to_dict(cfg), "resolution": size})
