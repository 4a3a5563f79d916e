"""What an ``Engine`` is built from: ``EngineSpec`` - every load option, declared once (``Engine.load`` takes it;
regeneration rebuilds it from a PNG's metadata; the command line from its flags) - and loading the models it names:
the main model, the dedicated inpaint/depth models (carrying full fine-tuning over from ``base`` by add difference)
and a depth ControlNet, each checked to fit the main model before it is used.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtune.devices import DTYPES, pick_device, pick_dtype
from sdtune.errors import SdtuneError
from sdtune.generation.requests import ParameterError
from sdtune.generation.weights import add_difference, same_weights
from sdtune.models.loading import describe, load_controlnet, load_depth_estimator, load_pipeline, resolve_source

log = logging.getLogger("sdtune")

# The options naming a model file or folder: recorded in every image's metadata (made absolute), so that
# ``regenerate`` can load the same engine again.
SOURCES = ("model", "inpaint_model", "depth_model", "base", "config", "inpaint_config", "depth_config", "base_config",
           "lora", "controlnet", "controlnet_config", "depth_estimator")


@dataclass(frozen=True)
class EngineSpec:
    """Everything ``Engine.load`` loads, and how.

    ``model``: folder | .safetensors | hub id. ``inpaint_model``/``depth_model``: dedicated 9-/5-channel models for
    those modes; ``base``: the model ``model`` was fully fine-tuned from (carries the fine-tuning over to them).
    ``config``/``inpaint_config``/``depth_config``/``base_config``: local diffusers folders giving the architecture
    of single-file checkpoints (see ``loading.load_pipeline``). ``lora`` at ``lora_scale`` (fused when exact enough
    with ``fuse_lora="auto"``). ``controlnet``: a depth ControlNet for depth2img (SDXL's way; for SD beside
    ``depth_model``), ``controlnet_config`` its config folder when it is one file; ``depth_estimator``: a
    transformers depth model folder (DPT) that computes its depth from the input image. ``no_t5``: an SD 3.x model
    runs without its T5 encoder (less memory; its share of the prompt is zeros, as diffusers does).
    """

    model: object
    inpaint_model: object = None
    depth_model: object = None
    base: object = None
    lora: object = None
    lora_scale: float = 1.0
    device: object = None
    dtype: object = None
    config: object = None
    allow_pickle: bool = False
    fuse_lora: object = "auto"
    inpaint_config: object = None
    depth_config: object = None
    base_config: object = None
    vae_tiling: bool = False
    compile: bool = False
    controlnet: object = None
    controlnet_config: object = None
    depth_estimator: object = None
    no_t5: bool = False

    @classmethod
    def from_params(cls, params: dict, *, device=None, dtype=None, allow_pickle: bool = False) -> "EngineSpec":
        """The engine an sdtune PNG was made with (its metadata ``params``): models, base, LoRA + scale, dtype.

        ``allow_pickle`` is never taken from the file: a PNG must not be able to switch pickle loading on.
        """
        if not params.get("model"):
            raise SdtuneError("the image's metadata names no model; it cannot be regenerated")
        scale = params.get("lora_scale")
        return cls(**{k: params.get(k) for k in SOURCES}, lora_scale=1.0 if scale is None else scale, device=device,
                   dtype=dtype or params.get("dtype"), allow_pickle=allow_pickle,
                   vae_tiling=bool(params.get("vae_tiling", False)), no_t5=bool(params.get("no_t5", False)))

    def check(self) -> None:
        """Refuse, before any loading, what cannot work: a bad LoRA scale, missing sources, conflicting options."""
        if self.lora_scale is None or not math.isfinite(float(self.lora_scale)):
            raise ParameterError("{lora_scale} must be a finite number (1.0 = as trained, 0 = off)")
        for name in ("inpaint_model", "depth_model", "base"):
            if getattr(self, name) is not None:
                check_source(getattr(self, name), name)
        if self.controlnet is not None and self.depth_model is not None:
            raise ParameterError("pass either {depth_model} (a 5-channel depth model) or {controlnet} (a depth "
                                 "ControlNet) for depth2img, not both")
        if self.depth_estimator is not None and self.controlnet is None:
            raise ParameterError("{depth_estimator} is used by the ControlNet depth2img path; pass {controlnet} too")
        if self.lora is not None:  # fail on a missing LoRA before minutes of model loading
            from sdtune.models.lora import find_lora_file
            find_lora_file(self.lora, self.allow_pickle)

    def sources(self) -> dict:
        """What the engine was loaded from, as its images' metadata records it."""
        return {**{k: source_name(getattr(self, k)) for k in SOURCES},
                "lora_scale": float(self.lora_scale) if self.lora is not None else None}


def source_name(source) -> str | None:
    """A local path made absolute (so --from-png works from anywhere); a hub id as given."""
    if source is None:
        return None
    p = Path(str(source)).expanduser()
    return str(p.resolve()) if p.exists() else str(source)


def device_and_dtype(spec: EngineSpec):
    """The torch device and dtype ``spec`` asks for (the best available where it names none)."""
    device = spec.device if isinstance(spec.device, torch.device) else pick_device(spec.device)
    dtype = spec.dtype
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise SdtuneError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
    else:
        dtype = pick_dtype(device, dtype)
    return device, dtype


def load_components(spec: EngineSpec, device, dtype) -> dict:
    """Load what ``spec`` names; return the keyword arguments of ``Engine(...)`` (without ``sources``)."""
    main = load_pipeline(spec.model, device=device, dtype=dtype, config=spec.config, allow_pickle=spec.allow_pickle)
    main_info = describe(main)
    sdxl = main_info.family == "sdxl"
    if sdxl and spec.depth_model is not None:
        raise ParameterError("SDXL has no 5-channel depth model: SDXL depth2img runs through a depth ControlNet; "
                             "pass {controlnet} (and {depth_estimator} or {depth_map}) instead of {depth_model}")
    kind = {9: "inpaint", 5: "depth"}.get(main_info.unet_in_channels, "base")
    parts = dict(unets={kind: main.unet}, schedulers={kind: main.scheduler},
                 text_encoders={k: main.text_encoder for k in ("base", "inpaint", "depth")},
                 depth_estimator=getattr(main, "depth_estimator", None),
                 feature_extractor=getattr(main, "feature_extractor", None) if kind == "depth" else None)
    _load_dedicated_models(spec, main, main_info.family, parts, device, dtype)

    net = None
    if spec.controlnet is not None:
        if "base" not in parts["unets"]:
            raise ParameterError("{controlnet} drives the ordinary 4-channel UNet; {model} is a dedicated model")
        net = load_controlnet(spec.controlnet, device=device, dtype=dtype, config=spec.controlnet_config)
        check_controlnet(net, parts["unets"]["base"], spec.controlnet)
        parts.update(depth_estimator=None, feature_extractor=None)
        if spec.depth_estimator is not None:
            estimator, extractor = load_depth_estimator(spec.depth_estimator, device=device, dtype=dtype)
            parts.update(depth_estimator=estimator, feature_extractor=extractor)
    return dict(parts, vae=main.vae, text_encoder=main.text_encoder, tokenizer=main.tokenizer, device=device,
                dtype=dtype, text_encoder_2=getattr(main, "text_encoder_2", None) if sdxl else None,
                tokenizer_2=getattr(main, "tokenizer_2", None) if sdxl else None, controlnet=net,
                force_zeros_for_empty_prompt=bool(main.config.get("force_zeros_for_empty_prompt", True)))


def _load_dedicated_models(spec: EngineSpec, main, family: str, parts: dict, device, dtype) -> None:
    """Load the dedicated inpaint/depth models into ``parts`` (UNets, schedulers, the depth model's estimator), with
    ``spec.base``'s difference to the main model added to them (its text encoder too, for SD, where it has its own)."""
    sdxl = family == "sdxl"
    unets, kind = parts["unets"], next(iter(parts["unets"]))
    inpaint_model, depth_model, base = spec.inpaint_model, spec.depth_model, spec.base
    base_pipe = None
    if base is not None and not (kind == "base" and (inpaint_model or depth_model)):
        log.info("--base is only used to carry full fine-tuning over to --inpaint-model/--depth-model; ignored")
    if base is not None and kind == "base" and (inpaint_model or depth_model):
        # Same dtype as the fine-tuned model, so weights it left unchanged subtract to exactly zero;
        # kept on the CPU: it is only read once per dedicated model.
        base_pipe = load_pipeline(base, device="cpu", dtype=dtype, config=spec.base_config,
                                  allow_pickle=spec.allow_pickle)
    for dkind, src, dconfig in (("inpaint", inpaint_model, spec.inpaint_config),
                                ("depth", depth_model, spec.depth_config)):
        if src is None:
            continue
        dedicated = load_dedicated(dkind, src, dconfig, sdxl=sdxl, text_encoder=main.text_encoder,
                                   text_encoder_2=getattr(main, "text_encoder_2", None), device=device,
                                   dtype=dtype, allow_pickle=spec.allow_pickle)
        if base_pipe is not None and "base" in unets:
            if describe(base_pipe).family != family:
                raise ParameterError("{base} {src} is not of {model}'s family ({family}); pass the model {model} was "
                                     "fine-tuned from", src=base, family=family)
            add_difference(dedicated.unet, unets["base"], base_pipe.unet)
            if sdxl and not (same_weights(dedicated.text_encoder, base_pipe.text_encoder)
                             and same_weights(dedicated.text_encoder_2, base_pipe.text_encoder_2)):
                raise ParameterError("{src} has text encoders of its own (not {base}'s); SDXL's modes share one "
                                     "pair, so carry the fine-tuning over only to a dedicated model that kept the "
                                     "base's (as the public SDXL inpainting model did)", src=src)
            if not sdxl and not same_weights(dedicated.text_encoder, base_pipe.text_encoder):
                # Its text encoder was trained too: it needs its own (dedicated + fine-tuned - base).
                add_difference(dedicated.text_encoder, main.text_encoder, base_pipe.text_encoder, "text encoder")
                parts["text_encoders"][dkind] = dedicated.text_encoder
                log.warning("%s has its own text encoder; the %s mode uses it (plus the fine-tuning "
                            "difference) instead of the shared one", src, dkind)
        elif "base" in unets and not same_weights(dedicated.text_encoder, main.text_encoder):
            log.info("%s runs with the main model's text encoder (pass --base to carry fine-tuning over)", src)
        unets[dkind], parts["schedulers"][dkind] = dedicated.unet, dedicated.scheduler
        if dkind == "depth":
            parts.update(depth_estimator=dedicated.depth_estimator, feature_extractor=dedicated.feature_extractor)
        del dedicated
    del base_pipe


def load_dedicated(dkind: str, src, config, *, sdxl: bool, text_encoder, text_encoder_2, device, dtype,
                   allow_pickle: bool):
    """Load ``src`` as the dedicated ``dkind`` ("inpaint" | "depth") model of an engine whose main model is (or is
    not) SDXL with these text encoders; refuse, in one line, a model of another family, kind or text width."""
    dedicated = load_pipeline(src, device=device, dtype=dtype, config=config, allow_pickle=allow_pickle)
    dinfo = describe(dedicated)
    got = {9: "inpaint", 5: "depth"}.get(dinfo.unet_in_channels, "base")
    if (dinfo.family == "sdxl") != sdxl:
        raise ParameterError("{%s_model} {src} is {what} model but {model} is {family}; use one family" % dkind,
                             src=src, what="an SDXL" if dinfo.family == "sdxl" else "an SD 1.x/2.x",
                             family="SDXL" if sdxl else "SD 1.x/2.x")
    if got != dkind:
        want = {"inpaint": "a 9-channel inpainting", "depth": "a 5-channel depth"}[dkind]
        raise ParameterError("{%s_model} {src} is not {want} model (its UNet has {channels} input channels)" % dkind,
                             src=src, want=want, channels=dedicated.unet.config.in_channels)
    check_text_dim(dedicated.unet, text_encoder, src, text_encoder_2)
    return dedicated


def check_source(src, name: str) -> None:
    """Refuse a source (parameter ``name``) that names no model: a missing path, a malformed hub id."""
    try:
        resolve_source(src)
    except SdtuneError as exc:
        raise ParameterError("{%s}: {why}" % name, why=str(exc)) from None


def check_text_dim(unet, text_encoder, src, text_encoder_2=None) -> None:
    cross = unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    width = int(text_encoder.config.hidden_size) + (int(text_encoder_2.config.hidden_size) if text_encoder_2 else 0)
    if int(cross) != width:
        raise SdtuneError(f"{src} expects {cross}-wide text embeddings but the main model's text encoders give "
                          f"{width} (SD 1.x vs 2.x?); use a model of the same family")


def check_controlnet(net, unet, src) -> None:
    """A ControlNet fits a UNet when it reads the same text width and, for SDXL, the same added conditioning."""
    if type(net).__name__ == "SD3ControlNetModel":  # an SD 3.x ControlNet drives an MMDiT, never a UNet
        raise ParameterError("{controlnet} {src} is an SD 3.x ControlNet, but the model is not SD 3.x; use a "
                             "ControlNet trained for this model family", src=src)
    want = (unet.config.cross_attention_dim, unet.config.addition_embed_type, unet.config.block_out_channels)
    got = (net.config.cross_attention_dim, net.config.addition_embed_type, net.config.block_out_channels)
    if tuple(map(str, want)) != tuple(map(str, got)):
        kind = "an SDXL" if net.config.addition_embed_type == "text_time" else "an SD 1.x/2.x"
        raise ParameterError("{controlnet} {src} does not fit the model's UNet ({kind} ControlNet with text width "
                             "{got} vs the UNet's {want}); use a ControlNet trained for this model family", src=src,
                             kind=kind, got=net.config.cross_attention_dim, want=unet.config.cross_attention_dim)
