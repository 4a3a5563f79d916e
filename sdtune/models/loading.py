"""Loading Stable Diffusion models from a hub id, a local diffusers folder or a single file.

What is loaded is always a stock diffusers pipeline; sdtune never re-implements the models.
Three kinds of source are accepted:

* a local diffusers folder (``model_index.json`` inside) - the common case, fully offline;
* a single checkpoint file (``.safetensors``; pickle ``.ckpt``/``.bin`` only with
  ``allow_pickle=True``) - its architecture comes from a *local* diffusers config folder
  (``config=``), so nothing is fetched behind the user's back;
* a hub id such as ``stabilityai/stable-diffusion-2-1-base`` - when online or already cached.

The pipeline class follows the UNet: 9 input channels -> inpainting, 5 -> depth2img, else txt2img.
SD 1.x vs 2.x and epsilon vs v-prediction are read from the model's own config (``describe``).

SDXL is recognised from the model's own config, never from its name: ``model_index.json``'s
``_class_name`` (``StableDiffusionXL...``) or a ``text_encoder_2`` entry, or the UNet's
``addition_embed_type == "text_time"``; it loads as ``StableDiffusionXLPipeline`` (or the SDXL
inpainting pipeline for a 9-channel UNet). A single SDXL file loads through
``StableDiffusionXLPipeline.from_single_file(file, config=LOCAL_FOLDER)``. Refiner-only models (no
first text encoder, aesthetic-score conditioning) are refused: they only refine a base model's latents.

SD 3 / 3.5 (family "sd3") is recognised the same way, from ``model_index.json`` or the transformer's config
(``sdtune.models.sd3``), and loads as ``StableDiffusion3Pipeline``; ``drop_t5`` leaves its T5 encoder out.

``load_controlnet`` and ``load_depth_estimator`` load the depth ControlNet (folder, single file with a
config folder, or hub id) and a transformers depth estimator (DPT) for ControlNet depth2img.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtune.errors import SdtuneError
from sdtune.models import sd3

PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth"}
SINGLE_FILE_SUFFIXES = {".safetensors"} | PICKLE_SUFFIXES


@dataclass(frozen=True)
class ModelInfo:
    """What kind of Stable Diffusion model a pipeline is, read from its own config."""

    family: str  # "sd1" | "sd2" | "sdxl" | "sd3" | "unknown"
    prediction_type: str  # "epsilon" | "v_prediction" | "sample" | "flow_matching" (sd3)
    unet_in_channels: int  # 4 txt2img, 9 inpaint, 5 depth
    text_dim: int
    vae_scale_factor: int
    scaling_factor: float

    @property
    def mode(self) -> str:
        return {9: "inpaint", 5: "depth2img"}.get(self.unet_in_channels, "txt2img")


def describe(pipe) -> ModelInfo:
    """Read the family, prediction type and UNet kind of a loaded pipeline."""
    if sd3.is_sd3_pipeline(pipe):  # SD 3.x: an MMDiT transformer trained with flow matching
        t = pipe.transformer.config
        return ModelInfo(family="sd3", prediction_type="flow_matching", unet_in_channels=int(t.in_channels),
                         text_dim=int(t.joint_attention_dim),
                         vae_scale_factor=2 ** (len(pipe.vae.config.block_out_channels) - 1),
                         scaling_factor=float(pipe.vae.config.scaling_factor))
    text_dim = int(pipe.text_encoder.config.hidden_size)
    cross = pipe.unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if getattr(pipe, "text_encoder_2", None) is not None:
        family = "sdxl"
    elif int(cross) == 768:
        family = "sd1"
    elif int(cross) == 1024:
        family = "sd2"
    else:  # tiny and home-made models: use the attention layout SD 2 introduced as the tell
        family = "sd2" if pipe.unet.config.use_linear_projection else "sd1"
    return ModelInfo(
        family=family,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        unet_in_channels=int(pipe.unet.config.in_channels),
        text_dim=text_dim,
        vae_scale_factor=2 ** (len(pipe.vae.config.block_out_channels) - 1),
        scaling_factor=float(pipe.vae.config.scaling_factor),
    )


def _pipeline_class(unet_in_channels: int, sdxl: bool = False):
    from diffusers import (
        StableDiffusionDepth2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    if sdxl:
        if unet_in_channels == 5:
            raise SdtuneError("an SDXL model with a 5-channel (depth) UNet is not supported; SDXL depth2img runs "
                              "through a depth ControlNet (--controlnet)")
        return StableDiffusionXLInpaintPipeline if unet_in_channels == 9 else StableDiffusionXLPipeline
    return {9: StableDiffusionInpaintPipeline, 5: StableDiffusionDepth2ImgPipeline}.get(
        unet_in_channels, StableDiffusionPipeline)


def _null_entry(entry) -> bool:
    return entry is None or (isinstance(entry, (list, tuple)) and all(e is None for e in entry))


def is_sdxl_config(index: dict, unet_config: dict) -> bool:
    """SDXL from the model's own config: the pipeline class, a second text encoder or SDXL's added conditioning."""
    return ("StableDiffusionXL" in str(index.get("_class_name", ""))
            or not _null_entry(index.get("text_encoder_2"))
            or unet_config.get("addition_embed_type") == "text_time")


def check_not_refiner(index: dict, unet_config: dict, where) -> None:
    """Refuse an SDXL refiner: it has only the second text encoder and is conditioned on an aesthetic score."""
    refiner = (index.get("requires_aesthetics_score") is True
               or (not _null_entry(index.get("text_encoder_2")) and _null_entry(index.get("text_encoder"))))
    if refiner:
        raise SdtuneError(f"{where} is an SDXL refiner (no first text encoder, aesthetic-score conditioning), which "
                          "only refines a base model's latents; pass an SDXL base or inpainting model")


def _folder_configs(folder: Path) -> tuple[dict, dict]:
    cfg = folder / "unet" / "config.json"
    if not cfg.is_file():
        raise SdtuneError(f"{folder} has no unet/config.json; is it a Stable Diffusion diffusers folder?")
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    return index, json.loads(cfg.read_text())


def _folder_class(folder: Path):
    """The pipeline class a diffusers folder calls for (SD or SDXL, by UNet channels; SD3); refiners refused."""
    if sd3.is_sd3_folder(folder):
        return sd3.pipeline_class(sd3.transformer_config(folder).get("in_channels", 16))
    index, unet_config = _folder_configs(folder)
    sdxl = is_sdxl_config(index, unet_config)
    if sdxl:
        check_not_refiner(index, unet_config, folder)
    return _pipeline_class(int(unet_config.get("in_channels", 4)), sdxl)


def _folder_unet_channels(folder: Path) -> int:
    return int(_folder_configs(folder)[1].get("in_channels", 4))


def _pickle_only_components(folder: Path) -> list[str]:
    """Component subfolders (unet, vae, ...) whose weights exist only as pickle files.

    Judged per component: transformers always saves .safetensors, so older folders often mix a
    safetensors text encoder with a .bin UNet/VAE.
    """
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        suffixes = {p.suffix for p in sub.rglob("*") if p.is_file()}
        if suffixes & PICKLE_SUFFIXES and ".safetensors" not in suffixes:
            found.append(sub.name)
    return found


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def resolve_source(source: str | os.PathLike) -> tuple[str, Path | str]:
    """Classify ``source`` as ("folder", path) | ("file", path) | ("hub", id); raise if it is neither."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SdtuneError(f"{path} is a folder but has no model_index.json; pass a diffusers pipeline folder")
        return "folder", path
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise SdtuneError(f"{path} is not a model: expected a diffusers folder or a .safetensors checkpoint")
        return "file", path
    looks_like_path = text.startswith((".", "/", "~")) or path.suffix in SINGLE_FILE_SUFFIXES or text.count("/") != 1
    if looks_like_path:
        raise SdtuneError(f"model not found: {text}; pass an existing diffusers folder, a .safetensors file or a hub id")
    return "hub", text


def load_pipeline(source, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  config: str | os.PathLike | None = None, allow_pickle: bool = False,
                  local_files_only: bool | None = None, drop_t5: bool = False):
    """Load a Stable Diffusion pipeline of the class its UNet calls for, on ``device`` in ``dtype``.

    ``config`` is a local diffusers folder that gives the architecture of a single-file checkpoint.
    Pickle weights (which can run code when loaded) are refused unless ``allow_pickle`` is set.
    ``drop_t5``: an SD3 model is loaded without its T5 encoder (ignored for the other families).
    """
    kind, where = resolve_source(source)
    if local_files_only is None:
        local_files_only = _is_offline() or kind != "hub"
    try:
        if kind == "folder":
            use_safetensors = True
            pickled = _pickle_only_components(where)
            if pickled:
                if not allow_pickle:
                    raise SdtuneError(f"{where} holds only pickle weights (.bin/.ckpt) for {', '.join(pickled)}, "
                                      "which can run code when loaded; convert them to .safetensors or pass "
                                      "--allow-pickle if you trust them")
                use_safetensors = None
            cls = _folder_class(where)
            pipe = cls.from_pretrained(where, dtype=dtype, use_safetensors=use_safetensors,
                                       local_files_only=True, **_no_safety_checker(cls), **_t5(cls, drop_t5))
        elif kind == "file":
            pipe = _load_single_file(where, dtype=dtype, config=config, allow_pickle=allow_pickle, drop_t5=drop_t5)
        else:
            pipe = _load_hub(where, dtype=dtype, local_files_only=local_files_only, allow_pickle=allow_pickle,
                             drop_t5=drop_t5)
    except SdtuneError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:  # diffusers reports missing/broken files this way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdtuneError(f"could not load model {source}: {first}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _no_safety_checker(cls) -> dict:
    # The NSFW checker is a separate 1.2 GB CLIP model; sdtune neither loads nor requires it.
    from diffusers import StableDiffusionDepth2ImgPipeline

    if cls is StableDiffusionDepth2ImgPipeline or "XL" in cls.__name__ or _is_sd3_class(cls):  # SDXL, SD3: none
        return {}
    return {"safety_checker": None, "requires_safety_checker": False}


def _is_sd3_class(cls) -> bool:
    return cls.__name__.startswith("StableDiffusion3")


def _t5(cls, drop_t5: bool) -> dict:
    return sd3.no_t5_kwargs(drop_t5) if _is_sd3_class(cls) else {}


def _load_hub(repo_id: str, *, dtype, local_files_only: bool, allow_pickle: bool, drop_t5: bool = False):
    from diffusers import DiffusionPipeline
    from huggingface_hub import hf_hub_download

    try:
        index = json.loads(Path(hf_hub_download(repo_id, "model_index.json",
                                                local_files_only=local_files_only)).read_text())
    except Exception as exc:  # offline and not cached, unknown repo, no network
        how = "it is not in the local cache and HF_HUB_OFFLINE is set" if local_files_only else str(exc).splitlines()[0]
        raise SdtuneError(f"could not get model {repo_id} from the hub: {how}; pass a local folder instead") from exc
    if sd3.is_sd3_index(index):  # SD 3.x: recognised from its model_index.json
        cls = sd3.pipeline_class(_hub_config(repo_id, "transformer/config.json").get("in_channels", 16))
        return cls.from_pretrained(repo_id, dtype=dtype, local_files_only=local_files_only,
                                   use_safetensors=None if allow_pickle else True, **sd3.no_t5_kwargs(drop_t5))
    unet_config = {}
    try:
        unet_cfg = hf_hub_download(repo_id, "unet/config.json", local_files_only=local_files_only)
        unet_config = json.loads(Path(unet_cfg).read_text())
    except Exception:
        pass
    sdxl = is_sdxl_config(index, unet_config)
    if sdxl:
        check_not_refiner(index, unet_config, repo_id)
    in_channels = int(unet_config.get("in_channels", 4))
    cls = (_pipeline_class(in_channels, sdxl) if "StableDiffusion" in index.get("_class_name", "")
           else DiffusionPipeline)
    return cls.from_pretrained(repo_id, dtype=dtype, local_files_only=local_files_only,
                               use_safetensors=None if allow_pickle else True, **_no_safety_checker(cls))


def _load_single_file(path: Path, *, dtype, config, allow_pickle: bool, drop_t5: bool = False):
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise SdtuneError(f"{path} is a pickle checkpoint, which can run code when loaded; convert it to "
                          ".safetensors or pass --allow-pickle if you trust it")
    if config is None:
        raise SdtuneError(f"{path} is a single-file checkpoint; pass --config with a local diffusers folder of "
                          "the same architecture (e.g. the base model's folder) so nothing is downloaded")
    config = Path(config)
    if not (config / "model_index.json").is_file():
        raise SdtuneError(f"--config {config} is not a diffusers folder (no model_index.json)")
    cls = _folder_class(config)
    _check_single_file_family(path, "sd3" if _is_sd3_class(cls) else "sdxl" if "XL" in cls.__name__ else "sd", config)
    if _is_sd3_class(cls):
        return sd3.load_single_file(path, config, dtype=dtype, drop_t5=drop_t5)
    if not hasattr(cls, "from_single_file"):
        return _load_single_file_depth(path, cls, config, dtype)
    return cls.from_single_file(str(path), config=str(config), dtype=dtype, local_files_only=True,
                                **_no_safety_checker(cls), **_t5(cls, drop_t5))


SDXL_FILE_KEY = "conditioner.embedders.1.model.positional_embedding"  # SDXL base/inpaint: OpenCLIP second
REFINER_FILE_KEY = "conditioner.embedders.0.model.text_projection"  # SDXL refiner: OpenCLIP as the only encoder


def _check_single_file_family(path: Path, config_family: str, config: Path) -> None:
    """The file's own keys say SD3, SDXL, refiner or SD; refuse a refiner and a config folder of another family."""
    if path.suffix != ".safetensors":
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception as exc:
        raise SdtuneError(f"{path} is not a readable .safetensors file ({type(exc).__name__})") from exc
    if REFINER_FILE_KEY in keys:
        raise SdtuneError(f"{path} is an SDXL refiner checkpoint, which only refines a base model's latents; "
                          "pass an SDXL base or inpainting checkpoint")
    file_is_sdxl = SDXL_FILE_KEY in keys or any(k.startswith("conditioner.embedders.") for k in keys)
    file_family = "sd3" if sd3.file_is_sd3(keys) else "sdxl" if file_is_sdxl else "sd"
    if "sd3" in (file_family, config_family) and file_family != config_family:
        names = {"sd3": "an SD 3.x", "sdxl": "an SDXL", "sd": "an SD 1.x/2.x"}
        raise SdtuneError(f"{path} is {names[file_family]} checkpoint but --config {config} is "
                          f"{names[config_family]} folder; pass a config folder of the same family")
    config_is_sdxl = config_family == "sdxl"
    if file_is_sdxl != config_is_sdxl:
        what = ("an SDXL", "an SD 1.x/2.x") if file_is_sdxl else ("an SD 1.x/2.x", "an SDXL")
        raise SdtuneError(f"{path} is {what[0]} checkpoint but --config {config} is {what[1]} folder; "
                          "pass a config folder of the same family")


def load_controlnet(source, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    config: str | os.PathLike | None = None, local_files_only: bool | None = None):
    """A ControlNet from a diffusers folder (config.json + weights), one .safetensors (with ``config``, a local
    ControlNet folder of the same architecture) or a hub id. An SD3 ControlNet (``SD3ControlNetModel`` in its
    config) loads as that class."""
    from diffusers import ControlNetModel, SD3ControlNetModel

    def cls_of(cfg: dict):
        return SD3ControlNetModel if cfg.get("_class_name") == "SD3ControlNetModel" else ControlNetModel

    text = str(source)
    path = Path(text).expanduser()
    try:
        if path.is_dir():
            cfg = path / "config.json"
            if not cfg.is_file() or "ControlNet" not in json.loads(cfg.read_text()).get("_class_name", ""):
                raise SdtuneError(f"--controlnet {path} is not a diffusers ControlNet folder (no config.json naming "
                                  "ControlNetModel)")
            net = cls_of(json.loads(cfg.read_text())).from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                                      local_files_only=True)
        elif path.is_file():
            if path.suffix != ".safetensors":
                raise SdtuneError(f"--controlnet {path} must be a .safetensors file or a diffusers folder")
            if config is None or not (Path(config) / "config.json").is_file():
                raise SdtuneError(f"--controlnet {path} is a single file; pass --controlnet-config with a local "
                                  "ControlNet folder of the same architecture so nothing is downloaded")
            cls = cls_of(json.loads((Path(config) / "config.json").read_text()))
            net = cls.from_single_file(str(path), config=str(config), dtype=dtype, local_files_only=True)
        elif text.count("/") == 1 and not text.startswith((".", "/", "~")):
            offline = _is_offline() if local_files_only is None else local_files_only
            try:
                cls = cls_of(_hub_config(text, "config.json"))
                net = cls.from_pretrained(text, dtype=dtype, local_files_only=offline)
            except Exception as exc:
                how = "it is not in the local cache and HF_HUB_OFFLINE is set" if offline else _first_line(exc)
                raise SdtuneError(f"could not get ControlNet {text} from the hub: {how}; pass a local folder") from exc
        else:
            raise SdtuneError(f"ControlNet not found: {text}; pass a diffusers ControlNet folder, a .safetensors "
                              "file or a hub id")
    except SdtuneError:
        raise
    except (OSError, ValueError) as exc:
        raise SdtuneError(f"could not load ControlNet {source}: {_first_line(exc)}") from exc
    return net.to(device).eval()


def load_depth_estimator(source, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A transformers depth-estimation model (DPT and the like) and its image processor from a local folder."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    path = Path(str(source)).expanduser()
    if not (path / "config.json").is_file():
        raise SdtuneError(f"--depth-estimator {path} is not a transformers model folder (no config.json); pass a "
                          "folder holding a depth-estimation model such as DPT and its preprocessor_config.json")
    try:
        model = AutoModelForDepthEstimation.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                            use_safetensors=True)
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SdtuneError(f"could not load depth estimator {path}: {_first_line(exc)}") from exc
    return model.to(device).eval(), processor


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_single_file_depth(path: Path, cls, config: Path, dtype):
    """depth2img from one file: diffusers has no single-file loader for it, so the UNet, VAE and text
    encoder are read from the file by the txt2img loader (same LDM layout) and the depth estimator,
    which original checkpoints store in MiDaS form that diffusers cannot convert, comes from ``config``.
    """
    from diffusers import StableDiffusionPipeline

    parts = StableDiffusionPipeline.from_single_file(str(path), config=str(config), dtype=dtype,
                                                     local_files_only=True, safety_checker=None,
                                                     requires_safety_checker=False, feature_extractor=None)
    return cls.from_pretrained(config, unet=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder,
                               tokenizer=parts.tokenizer, scheduler=parts.scheduler, dtype=dtype,
                               local_files_only=True, use_safetensors=True)


@dataclass(frozen=True)
class ModelPeek:
    """What a model's config files say, read without loading any weights."""
    sdxl: bool
    native_resolution: int | None  # pixels: the UNet's sample size x the VAE's downsampling; None if unknown
    sd3: bool = False  # SD 3.x (an MMDiT transformer, flow matching)


def peek_model(source: str | os.PathLike) -> ModelPeek:
    """The family and native size of a diffusers folder, hub id (its config files only) or .safetensors file."""
    kind, where = resolve_source(source)
    if kind == "file":  # a checkpoint's own keys say SDXL; its size lives in a config folder it does not carry
        return ModelPeek(sdxl=_file_is_sdxl(where), native_resolution=None, sd3=_file_is_sd3(where))
    if kind == "folder" and sd3.is_sd3_folder(where):
        vae_file = where / "vae" / "config.json"
        vae_config = json.loads(vae_file.read_text()) if vae_file.is_file() else {}
        return ModelPeek(sdxl=False, native_resolution=sd3.native_resolution(sd3.transformer_config(where), vae_config),
                         sd3=True)
    if kind == "folder":
        index, unet_config = _folder_configs(where)
        vae_file = where / "vae" / "config.json"
        vae_config = json.loads(vae_file.read_text()) if vae_file.is_file() else {}
    else:
        index = _hub_config(where, "model_index.json")
        if not index:  # not on the hub (or not reachable): the other files would not be either
            how = ("it is not in the local cache and HF_HUB_OFFLINE is set" if _is_offline()
                   else "its model_index.json could not be read (no such model, or no network)")
            raise SdtuneError(f"could not read model {where} from the hub: {how}; pass a local folder instead")
        if sd3.is_sd3_index(index):
            return ModelPeek(sdxl=False, sd3=True, native_resolution=sd3.native_resolution(
                _hub_config(where, "transformer/config.json"), _hub_config(where, "vae/config.json")))
        unet_config, vae_config = _hub_config(where, "unet/config.json"), _hub_config(where, "vae/config.json")
    size = unet_config.get("sample_size")
    blocks = vae_config.get("block_out_channels")
    native = int(size) * 2 ** (len(blocks) - 1) if isinstance(size, int) and blocks else None
    return ModelPeek(sdxl=is_sdxl_config(index, unet_config), native_resolution=native)


def _hub_config(repo_id: str, filename: str) -> dict:
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(repo_id, filename, local_files_only=_is_offline())).read_text())
    except Exception:  # not cached offline, no such file, no network: the caller says what it needs
        return {}


def _file_is_sdxl(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith("conditioner.embedders.") for k in f.keys())
    except Exception as exc:
        raise SdtuneError(f"{path} is not a readable .safetensors file ({type(exc).__name__})") from exc


def _file_is_sd3(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return sd3.file_is_sd3(f.keys())
    except Exception as exc:
        raise SdtuneError(f"{path} is not a readable .safetensors file ({type(exc).__name__})") from exc
