"""The embedded model family's architectures, built from one config (``configs/family.yaml``).

Three stock diffusers pipelines share one VAE and one CLIP text encoder (and the real CLIP
tokenizer): a text-to-image UNet (4 input channels), an inpainting UNet (9: latents, mask,
masked-image latents) and a depth UNet (5: latents, depth) with a small DPT depth estimator.
This module only *builds and saves* them; ``train/build_family.py`` trains them.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from sdtune import CONFIGS_DIR, DATA_DIR
from sdtune.errors import SdtuneError
from sdtune.overrides import dotted_keys, parse_override, set_dotted

CONFIG_PATH = CONFIGS_DIR / "family.yaml"
PIPELINES = ("base", "inpaint", "depth")
EXTRA_CHANNELS = {"base": 0, "inpaint": 5, "depth": 1}  # UNet inputs beyond the 4 latent channels


# ----------------------------------------------------------------------------------------------
# config


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> dict:
    """The family config from YAML, with ``dotted.key=value`` overrides (values parsed as YAML)."""
    path = Path(path) if path else CONFIG_PATH
    if not path.is_file():
        raise SdtuneError(f"family config {path} not found; pass --config with a YAML file like configs/family.yaml")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SdtuneError(f"family config {path} is not valid YAML{where}: "
                          f"{getattr(exc, 'problem', None) or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise SdtuneError(f"family config {path} is not a text file") from None
    if not isinstance(cfg, dict):
        raise SdtuneError(f"family config {path} must be a mapping of key: value lines, got {type(cfg).__name__}")
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def apply_override(cfg: dict, item: str) -> None:
    """Set ``a.b.c=value`` in ``cfg`` in place; the key must already exist (typos fail loudly)."""
    key, value = parse_override(item, dotted_keys(cfg), example="train.base.steps=200")
    set_dotted(cfg, key, value)


# ----------------------------------------------------------------------------------------------
# components


def latent_size(cfg: dict) -> int:
    return cfg["image_size"] // 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)


def build_vae(cfg: dict):
    from diffusers import AutoencoderKL

    v = cfg["vae"]
    n = len(v["block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=v["latent_channels"],
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(v["block_out_channels"]), layers_per_block=v["layers_per_block"],
        norm_num_groups=v["norm_num_groups"], sample_size=cfg["image_size"],
        mid_block_add_attention=v.get("mid_block_add_attention", True),
    )


def build_text_encoder(cfg: dict):
    from transformers import CLIPTextConfig, CLIPTextModel

    t = cfg["text_encoder"]
    # Full vocabulary and 77 positions, so the real CLIP tokenizer (and SD's ids) work unchanged.
    config = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"], hidden_act="quick_gelu", projection_dim=t["hidden_size"],
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_tokenizer():
    from sdtune.models.fixtures import tiny_tokenizer

    return tiny_tokenizer()  # the real CLIP BPE files of data/clip_tokenizer


def build_unet(cfg: dict, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    u = cfg["unet"]
    return UNet2DConditionModel(
        sample_size=latent_size(cfg), in_channels=in_channels, out_channels=cfg["vae"]["latent_channels"],
        block_out_channels=tuple(u["block_out_channels"]), down_block_types=tuple(u["down_block_types"]),
        up_block_types=tuple(u["up_block_types"]), layers_per_block=u["layers_per_block"],
        attention_head_dim=u["attention_head_dim"], norm_num_groups=u["norm_num_groups"],
        cross_attention_dim=cfg["text_encoder"]["hidden_size"],
    )


def widen_unet(base_unet, in_channels: int):
    """A copy of ``base_unet`` taking ``in_channels`` inputs; the new conv_in channels start at zero.

    This is how SD-inpainting and SD-2-depth were made from a text-to-image UNet: at step 0 the
    wider model computes exactly what the base model does, and learns to use the extra inputs.
    """
    from diffusers import UNet2DConditionModel

    old = base_unet.config.in_channels
    if in_channels < old:
        raise SdtuneError(f"cannot narrow a UNet from {old} to {in_channels} input channels")
    unet = UNet2DConditionModel.from_config({**base_unet.config, "in_channels": in_channels})
    state = {k: v.clone() for k, v in base_unet.state_dict().items()}
    w = state["conv_in.weight"]
    extra = torch.zeros(w.shape[0], in_channels - old, *w.shape[2:], dtype=w.dtype)
    state["conv_in.weight"] = torch.cat([w, extra], dim=1)
    unet.load_state_dict(state)
    return unet


def build_depth_estimator(cfg: dict):
    """A small ``DPTForDepthEstimation`` and the ``DPTImageProcessor`` that feeds it (pixels -> [-1, 1])."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    d = cfg["depth_estimator"]
    size, layers = cfg["image_size"], d["num_hidden_layers"]
    config = DPTConfig(
        image_size=size, patch_size=d["patch_size"], num_channels=3, hidden_size=d["hidden_size"],
        num_hidden_layers=layers, num_attention_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"], backbone_out_indices=[round(i * (layers - 1) / 3) for i in range(4)],  # 4 taps spread over the layers
        neck_hidden_sizes=list(d["neck_hidden_sizes"]), fusion_hidden_size=d["fusion_hidden_size"],
        reassemble_factors=[4, 2, 1, 0.5], head_in_index=-1,
    )
    processor = DPTImageProcessor(size={"height": size, "width": size}, keep_aspect_ratio=False, do_resize=True,
                                  do_rescale=True, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return DPTForDepthEstimation(config), processor


def build_scheduler(cfg: dict | None = None):
    """SD's training schedule (scaled_linear betas 0.00085..0.012, 1000 steps) with PNDM sampling, the course's
    default, and the family's prediction type (``prediction_type``: v_prediction, as SD 2.x at 768 px)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True,
                         prediction_type=(cfg or {}).get("prediction_type", "epsilon"))


def param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# pipelines


def assemble(kind: str, vae, text_encoder, unet, depth_estimator=None, feature_extractor=None, cfg: dict | None = None):
    """A stock diffusers pipeline of ``kind`` (base / inpaint / depth) from the components."""
    from diffusers import (
        StableDiffusionDepth2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

    if kind not in PIPELINES:
        raise SdtuneError(f"unknown family pipeline {kind!r}; choose one of {', '.join(PIPELINES)}")
    want = 4 + EXTRA_CHANNELS[kind]
    if unet.config.in_channels != want:
        raise SdtuneError(f"the {kind} pipeline needs a {want}-channel UNet, got {unet.config.in_channels}")
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(), unet=unet,
                  scheduler=build_scheduler(cfg))
    if kind == "depth":
        if depth_estimator is None or feature_extractor is None:
            raise SdtuneError("the depth pipeline needs a depth estimator and its feature extractor")
        return StableDiffusionDepth2ImgPipeline(depth_estimator=depth_estimator, feature_extractor=feature_extractor,
                                                **common)
    cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline
    return cls(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **common)


SHARED = ("vae", "text_encoder", "tokenizer")  # what the three pipelines have in common, byte for byte


def save_pipeline(pipe, folder: str | os.PathLike, dtype: torch.dtype = torch.float16,
                  share_with: str | os.PathLike | None = None) -> Path:
    """Write ``pipe`` as a diffusers folder of ``dtype`` safetensors; built aside, then swapped in whole.

    With ``share_with`` (the base pipeline's folder beside it), a component whose files equal the base's
    byte for byte (the VAE, text encoder and tokenizer of the inpaint and depth models) becomes a relative
    symlink to the base's: stock diffusers reads it the same, and the family ships each only once.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        copy.deepcopy(pipe).to(dtype=dtype).save_pretrained(tmp, safe_serialization=True)
        _slim_tokenizer(tmp / "tokenizer")
        if share_with is not None:
            base = Path(share_with)
            for name in SHARED:
                if (tmp / name).is_dir() and _same_files(tmp / name, base / name):
                    shutil.rmtree(tmp / name)
                    os.symlink(Path("..") / base.name / name, tmp / name, target_is_directory=True)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _same_files(a: Path, b: Path) -> bool:
    """True when folders ``a`` and ``b`` hold the same file names with the same bytes."""
    if not b.is_dir():
        return False
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def _slim_tokenizer(folder: Path) -> None:
    """Keep the tokenizer as CLIP's own vocab.json + merges.txt (1.5 MB) instead of tokenizer.json (3.6 MB).

    CLIPTokenizer loads either form with identical ids; the BPE pair is what SD checkpoints ship.
    """
    if not folder.is_dir():
        return
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(DATA_DIR / "clip_tokenizer" / name, folder / name)
    (folder / "tokenizer.json").unlink(missing_ok=True)


def folder_size(path: str | os.PathLike) -> int:
    """Bytes of all files under ``path``, a symlinked folder counted where it points (once, by its owner)."""
    root = Path(path)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not _under_symlink(p, root))


def _under_symlink(p: Path, root: Path) -> bool:
    return any(parent.is_symlink() for parent in [p, *p.parents] if parent != root and root in parent.parents)


def sizes(cfg: dict) -> dict:
    """Parameter counts of the family's components under ``cfg`` (no training)."""
    torch.manual_seed(0)
    est, _ = build_depth_estimator(cfg)
    return {"vae": param_count(build_vae(cfg)), "text_encoder": param_count(build_text_encoder(cfg)),
            "unet": param_count(build_unet(cfg)), "unet_inpaint": param_count(build_unet(cfg, 9)),
            "unet_depth": param_count(build_unet(cfg, 5)), "depth_estimator": param_count(est)}
