"""Applying a LoRA file at inference: read, check it fits, load with a scale, fuse when exact enough.

Reading and key conversion (diffusers/peft format, kohya ``lora_unet_*``/``lora_te_*`` format) and
injecting the adapter layers into the UNet are diffusers' own (``lora_state_dict``,
``load_lora_adapter``); the text encoder gets the same steps with peft directly (see
``_load_into_text_encoder``). sdtune adds what they leave out:

* a fit check before loading: every LoRA key must name a layer of the model with matching
  in/out sizes; otherwise one clear ``SdtuneError`` (diffusers would only log unexpected keys);
* one scale for UNet and text encoder alike;
* fusing: W + scale * B @ A * alpha/r is written into the base weights and the adapter layers are
  removed, so sampling costs the same as without a LoRA. In fp32 that is exact to rounding. In
  fp16/bf16 a small delta added to a large weight can round away, so fusing is "auto": done only if
  every layer keeps its delta within ``FUSE_TOLERANCE`` (relative); otherwise the adapter stays
  unfused (still correct, a little slower);
* the identifier's trained embedding (``identifier_embedding.safetensors`` beside a LoRA trained with
  ``train_identifier_embedding``): its rows go into the text encoder's token table, scaled like the LoRA
  (``load_identifier_embedding``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdtune.errors import SdtuneError

log = logging.getLogger("sdtune")

ADAPTER = "sdtune"
FUSE_TOLERANCE = 0.02  # max relative error of a fused layer's delta, || fused - (W + dW) || / || dW ||
# A run's files, in the order a folder is searched: LoRA and DoRA (diffusers' layout), LoHa / LoKr / OFT (peft's).
DEFAULT_NAMES = ("pytorch_lora_weights.safetensors", "lora.safetensors", "adapter_model.safetensors")
ADAPTER_METADATA_KEY = "sdtune_adapter"  # {component: peft config} in sdtune's adapter_model.safetensors
IDENTIFIER_FILE = "identifier_embedding.safetensors"  # the identifier's own embedding rows, beside the LoRA


@dataclass
class LoraFile:
    path: Path
    state_dict: dict  # prefixed "unet." / "text_encoder." / "text_encoder_2." keys, as diffusers' loaders expect
    network_alphas: dict | None
    metadata: dict | None
    unet_keys: int = 0
    text_encoder_keys: int = 0
    text_encoder_2_keys: int = 0  # SDXL's second text encoder (kohya: lora_te2_)
    notes: list[str] = field(default_factory=list)
    # lora and dora go through diffusers' readers; loha / lokr / oft through peft (``sdtune.models.lycoris``):
    # state_dict then holds the file's own keys, and peft_configs the configs sdtune wrote (None: a LyCORIS file,
    # whose configs are read off its tensors once the model is known).
    kind: str = "lora"
    peft_configs: dict | None = None


def find_lora_file(path: str | os.PathLike, allow_pickle: bool = False) -> Path:
    """A LoRA weights file: ``path`` itself, or the known file name inside a folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in DEFAULT_NAMES:
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise SdtuneError(f"LoRA folder {p} has no pytorch_lora_weights.safetensors; pass the .safetensors file")
    if not p.is_file():
        raise SdtuneError(f"LoRA not found: {p}")
    if p.suffix != ".safetensors" and not allow_pickle:
        raise SdtuneError(f"LoRA {p} is a pickle file, which can run code when loaded; convert it to "
                          ".safetensors or pass --allow-pickle if you trust it")
    return p


def read_lora(path: str | os.PathLike, allow_pickle: bool = False, unet_config=None) -> LoraFile:
    """Read a LoRA file into diffusers' prefixed state dict (kohya keys converted by diffusers).

    ``unet_config``: the UNet it is for; kohya's SDXL files name UNet blocks in the original layout
    (``input_blocks_4_1_...``), which diffusers maps to its own blocks with the UNet's config, as
    ``StableDiffusionXLPipeline.load_lora_weights`` does."""
    from diffusers import StableDiffusionPipeline

    file = find_lora_file(path, allow_pickle)
    other = _read_peft_or_lycoris(file)
    if other is not None:
        return other
    try:
        sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(
            str(file.parent), weight_name=file.name, local_files_only=True,
            use_safetensors=file.suffix == ".safetensors", return_lora_metadata=True, unet_config=unet_config)
    except SdtuneError:
        raise
    except Exception as exc:  # corrupt file, not a state dict, unknown layout
        raise SdtuneError(f"LoRA {file} could not be read ({type(exc).__name__}: {_first_line(exc)})") from exc
    if not sd or not all("lora" in k for k in sd):
        raise SdtuneError(f"{file} is not a LoRA file (its keys do not name LoRA layers)")
    lora = LoraFile(file, sd, alphas, meta)
    lora.unet_keys = sum(k.startswith("unet.") for k in sd)
    lora.text_encoder_keys = sum(k.startswith("text_encoder.") for k in sd)
    lora.text_encoder_2_keys = sum(k.startswith("text_encoder_2.") for k in sd)
    if lora.unet_keys + lora.text_encoder_keys + lora.text_encoder_2_keys == 0:
        raise SdtuneError(f"LoRA {file} has no UNet or text-encoder layers for a Stable Diffusion model "
                          "(a LoRA for another model family?)")
    return lora


def _read_peft_or_lycoris(file: Path) -> LoraFile | None:
    """A LoHa / LoKr / OFT file (sdtune's peft-keyed one, or a LyCORIS one) as a LoraFile; None for the others."""
    import json

    from safetensors import safe_open

    from sdtune.models.lycoris import KOHYA_PREFIXES, kind_of_keys

    if file.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            keys, meta = list(f.keys()), dict(f.metadata() or {})
            kind = kind_of_keys(keys)
            if kind is None and any(k.endswith(".dora_scale") for k in keys):
                kind = "kohya_dora"  # diffusers drops dora_scale (with a warning): read here, through peft
            if kind is None:
                return None
            sd = {k: f.get_tensor(k) for k in keys}
    except Exception as exc:  # safetensors raises its own types for a damaged file
        raise SdtuneError(f"LoRA {file} could not be read ({type(exc).__name__}: {_first_line(exc)})") from exc
    configs = None
    if ADAPTER_METADATA_KEY in meta:
        try:
            configs = json.loads(meta[ADAPTER_METADATA_KEY])
        except ValueError:
            raise SdtuneError(f"{file}: its {ADAPTER_METADATA_KEY} metadata is not JSON (a damaged file?)") from None
        prefixes = {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}
    else:  # LyCORIS: kohya's module names
        if not all(k.startswith(KOHYA_PREFIXES) for k in keys):
            raise SdtuneError(f"{file} holds {kind} tensors under names sdtune does not know (neither sdtune's "
                              "adapter file nor LyCORIS' lora_unet_/lora_te_ names)")
        prefixes = {"unet": "lora_unet_", "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": "lora_te2_"}
    lora = LoraFile(file, sd, None, meta, kind=kind, peft_configs=configs)
    lora.unet_keys = sum(k.startswith(prefixes["unet"]) for k in sd)
    lora.text_encoder_keys = sum(k.startswith(prefixes["text_encoder"]) for k in sd)
    lora.text_encoder_2_keys = sum(k.startswith(prefixes["text_encoder_2"]) for k in sd)
    if lora.unet_keys + lora.text_encoder_keys + lora.text_encoder_2_keys == 0:
        raise SdtuneError(f"LoRA {file} has no UNet or text-encoder layers for a Stable Diffusion model "
                          "(an adapter for another model family?)")
    return lora


def _peft_component(lora: LoraFile, component: str, model, sdxl: bool = False):
    """(peft config, peft keys) of one component (unet / text_encoder / text_encoder_2) of a LoHa/LoKr/OFT file,
    for ``model``; a LyCORIS file's kohya names are matched to ``model``'s modules and its scale folded in."""
    from peft import LoHaConfig, LoKrConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from sdtune.models import lycoris

    if lora.peft_configs is not None:
        data = dict(lora.peft_configs.get(component) or {})
        if not data:
            return None, {}
        config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[str(data["peft_type"]).upper()]
        known = set(config_cls.__dataclass_fields__)
        config = config_cls(**{k: v for k, v in data.items() if k in known and k != "peft_type"})
        sd = {k.removeprefix(f"{component}."): v for k, v in lora.state_dict.items() if k.startswith(f"{component}.")}
        return config, sd
    prefixes = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
    part = {k: v for k, v in lora.state_dict.items() if k.startswith(prefixes[component])}
    if not part:
        return None, {}
    names = {}
    for prefix in prefixes[component]:
        names.update(lycoris.kohya_names(model, prefix, root="" if component == "unet" else "text_model.",
                                         sgm_config=model.config if sdxl and component == "unet" else None))
        if component != "unet":  # a text encoder named without CLIP's text_model. root
            names.update(lycoris.kohya_names(model, prefix))

    def module_of(name):
        if name not in names:
            raise SdtuneError(f"LoRA {lora.path} does not fit the {component.replace('_', ' ')}: it has no layer "
                              f"{name} (an adapter for another model family?)")
        return names[name]

    if lora.kind == "kohya_dora":
        return _kohya_dora_component(lora, part, module_of, model)
    sd, scales, ranks = lycoris.from_lycoris(part, lora.kind, module_of)
    for key in list(sd):  # the reader's scale into the first factor: the config then scales by 1
        module, suffix = lycoris.split_key(key, lora.kind)
        if suffix in lycoris.FOLD_INTO[lora.kind]:
            sd[key] = sd[key] * scales[module]
    targets = sorted(ranks)
    if lora.kind == "loha":
        return LoHaConfig(r=max(ranks.values()), alpha=max(ranks.values()), target_modules=targets,
                          rank_pattern=dict(ranks), alpha_pattern=dict(ranks)), sd
    # LoKr: a module with a full second factor gets a rank beyond its sizes (peft then keeps it full)
    full = {m: 1 << 20 for m in ranks if f"{m}.lokr_w2" in sd}
    pattern = {**ranks, **full}
    return LoKrConfig(r=max(pattern.values()), alpha=max(pattern.values()), target_modules=targets,
                      rank_pattern=pattern, alpha_pattern=dict(pattern),
                      decompose_both=any(k.endswith(".lokr_w1_a") for k in sd)), sd


def _kohya_dora_component(lora: LoraFile, part: dict, module_of, model):
    """A kohya/LyCORIS DoRA (``lora_down``, ``lora_up``, ``alpha``, ``dora_scale``) as peft's DoRA: the scale folded
    into ``lora_B``, ``dora_scale`` (out, 1) as the magnitude. LyCORIS' other decomposition axis, (1, in), has no
    peft form: one line."""
    from peft import LoraConfig

    sd, ranks = {}, {}
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in part}
    for name in sorted(names):
        module = module_of(name)
        down, up = part.get(f"{name}.lora_down.weight"), part.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            raise SdtuneError(f"LoRA {lora.path}: {name} lacks lora_down or lora_up (a damaged file?)")
        rank = down.shape[0]
        alpha = float(part[f"{name}.alpha"]) if f"{name}.alpha" in part else float(rank)
        sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"] = down, up * (alpha / rank)
        ranks[module] = rank
        scale = part.get(f"{name}.dora_scale")
        if scale is not None:
            weight = model.get_submodule(module).weight
            out = weight.shape[0]
            if scale.shape[0] != out:
                raise SdtuneError(f"LoRA {lora.path}: its DoRA magnitudes are on the input axis (dora_scale "
                                  f"{tuple(scale.shape)}), which peft's DoRA cannot represent; retrain with LyCORIS' "
                                  "wd_on_out, or use it in ComfyUI / AUTOMATIC1111")
            # peft keeps a convolution's magnitude as (1, out, 1, 1), a linear layer's as (out,)
            sd[f"{module}.lora_magnitude_vector"] = scale.reshape((1, out, 1, 1) if weight.ndim == 4 else (out,))
    return LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=sorted(ranks),
                      rank_pattern=dict(ranks), alpha_pattern=dict(ranks), use_dora=True), sd


def _check_peft_fit(lora: LoraFile, model, component: str, what: str, sdxl: bool) -> None:
    """Every module a LoHa/LoKr/OFT file names exists in ``model`` with the output size its tensors make."""
    config, sd = _peft_component(lora, component, model, sdxl)
    for key, tensor in sd.items():
        module_name, _, suffix = key.rpartition(".")
        if suffix == "weight":  # oft_R.weight
            module_name = module_name.rpartition(".")[0]
        try:
            layer = model.get_submodule(module_name)
        except AttributeError:
            raise SdtuneError(f"LoRA {lora.path} does not fit the {what}: it has no layer {module_name} "
                              "(an adapter for another model family?)") from None
        weight = getattr(layer, "weight", None)
        if weight is None:
            raise SdtuneError(f"LoRA {lora.path} does not fit the {what}: {module_name} has no weight")
        if suffix in ("hada_w1_a", "hada_w2_a") and tensor.shape[0] != weight.shape[0]:
            raise SdtuneError(f"LoRA {lora.path} does not fit the {what}: layer {module_name} has {weight.shape[0]} "
                              f"outputs but the adapter makes {tensor.shape[0]} (another model family?)")


def _inject_peft(lora: LoraFile, model, component: str, sdxl: bool) -> None:
    """peft's own injection and state dict for a LoHa / LoKr / OFT component."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    config, sd = _peft_component(lora, component, model, sdxl)
    if config is None:
        return
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    set_peft_model_state_dict(model, sd, adapter_name=ADAPTER)
    loaded = {n for n, _ in model.named_parameters() if f".{ADAPTER}" in n}
    if len(loaded) < len(sd):
        raise SdtuneError(f"LoRA {lora.path} has {len(sd)} {lora.kind} tensors for the {component.replace('_', ' ')} "
                          f"but only {len(loaded)} found a place (a damaged file?)")
    model.to(device=next(model.parameters()).device)


def check_family(lora: LoraFile, sdxl: bool) -> None:
    """A LoRA with layers for SDXL's second text encoder cannot be for SD 1.x/2.x (sizes are checked per layer)."""
    if lora.text_encoder_2_keys and not sdxl:
        raise SdtuneError(f"LoRA {lora.path} is an SDXL LoRA (it has layers for SDXL's second text encoder) but the "
                          "model is SD 1.x/2.x; use it with an SDXL model")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _unet_peft_keys(sd: dict) -> dict:
    from diffusers.utils import convert_unet_state_dict_to_peft

    part = {k.removeprefix("unet."): v for k, v in sd.items() if k.startswith("unet.")}
    if part and not any("lora_A" in k for k in part):
        part = convert_unet_state_dict_to_peft(part)
    return part


def _text_encoder_peft_keys(sd: dict, text_encoder, prefix: str = "text_encoder") -> dict:
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
    )

    part = {k.removeprefix(f"{prefix}."): v for k, v in sd.items() if k.startswith(f"{prefix}.")}
    if not part:
        return part
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(text_encoder, "text_model"):  # same flattening diffusers' loader applies
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
    return part


def check_fit(model: torch.nn.Module, peft_sd: dict, what: str, lora_path) -> None:
    """Raise SdtuneError unless every LoRA A/B pair names a layer of ``model`` with matching sizes."""
    for key, tensor in peft_sd.items():
        for marker, axis in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if not key.endswith(marker):
                continue
            name = key[: -len(marker)]
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise SdtuneError(f"LoRA {lora_path} does not fit the {what}: it has no layer {name} "
                                  "(a LoRA for another model family?)") from None
            weight = getattr(module, "weight", None)
            if weight is None or weight.ndim != tensor.ndim or weight.shape[axis] != tensor.shape[axis]:
                have = tuple(weight.shape) if weight is not None else None
                raise SdtuneError(f"LoRA {lora_path} does not fit the {what}: layer {name} is {have} but the "
                                  f"LoRA expects size {tensor.shape[axis]} on axis {axis} (another model family?)")


def check_fits(lora: LoraFile, unet=None, text_encoder=None, unet_what: str = "UNet",
               prefix: str = "text_encoder") -> None:
    if lora.kind not in ("lora", "dora"):
        sdxl = unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time"
        if unet is not None and lora.unet_keys:
            _check_peft_fit(lora, unet, "unet", unet_what, sdxl)
        if text_encoder is not None:
            what = "second text encoder" if prefix == "text_encoder_2" else "text encoder"
            _check_peft_fit(lora, text_encoder, prefix, what, False)
        return
    try:
        if unet is not None:
            check_fit(unet, _unet_peft_keys(lora.state_dict), unet_what, lora.path)
        if text_encoder is not None:
            what = "second text encoder" if prefix == "text_encoder_2" else "text encoder"
            check_fit(text_encoder, _text_encoder_peft_keys(lora.state_dict, text_encoder, prefix), what, lora.path)
    except (ValueError, KeyError, IndexError) as exc:  # diffusers' key conversion meets names of no known layout
        raise SdtuneError(f"LoRA {lora.path} names its layers in no layout sdtune or diffusers knows "
                          f"({type(exc).__name__}: {_first_line(exc)}); is it a LoRA for this model?") from None


def _lora_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@torch.no_grad()
def fuse_error(model) -> float:
    """Worst relative error of the LoRA delta if fused into ``model``'s weights in their dtype."""
    worst = 0.0
    for m in _lora_layers(model):
        w = m.get_base_layer().weight
        if hasattr(m, "oft_R") and w.ndim == 4:
            return float("inf")  # peft 0.21 merges an OFT convolution inexactly (measured: 0.19 off in pixels)
        if w.dtype == torch.float32:
            continue  # fp32 addition keeps the delta to rounding: exact enough by construction
        if ADAPTER not in getattr(m, "lora_A", {}) or m.use_dora.get(ADAPTER, False):
            return float("inf")  # DoRA, LoHa, LoKr, OFT in low precision: not checked, so not fused
        a = m.lora_A[ADAPTER].weight.float()
        b = m.lora_B[ADAPTER].weight.float()
        if a.ndim != 2:
            return float("inf")  # conv LoRA in low precision: not checked, so not fused
        delta = (b @ a) * float(m.scaling[ADAPTER])
        norm = delta.norm()
        if norm == 0:
            continue
        fused = (w.float() + delta).to(w.dtype).float()
        worst = max(worst, float((fused - w.float() - delta).norm() / norm))
    return worst


def _scale(model, scale: float) -> None:
    for m in _lora_layers(model):
        m.scale_layer(scale)


def _merge_and_remove(model) -> None:
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    for m in _lora_layers(model):
        m.merge(adapter_names=[ADAPTER])
    # Replace each LoRA wrapper by its (now merged) base layer: no adapter cost left when sampling.
    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False


def load_into(lora: LoraFile, *, unets=(), text_encoder=None, prefix: str = "text_encoder") -> None:
    """Inject the LoRA (unscaled) into each UNet (diffusers' loader) and the text encoder whose keys start with
    ``prefix`` (``text_encoder_2`` for SDXL's second one)."""
    try:
        if lora.kind not in ("lora", "dora"):
            for unet in unets if lora.unet_keys else ():
                _inject_peft(lora, unet, "unet", getattr(unet.config, "addition_embed_type", None) == "text_time")
            if text_encoder is not None:
                _inject_peft(lora, text_encoder, prefix, False)
            return
        for unet in unets:
            if lora.unet_keys:
                unet.load_lora_adapter(dict(lora.state_dict), prefix="unet", network_alphas=lora.network_alphas,
                                       adapter_name=ADAPTER, metadata=lora.metadata)  # it strips "unet." itself
        count = lora.text_encoder_2_keys if prefix == "text_encoder_2" else lora.text_encoder_keys
        if text_encoder is not None and count:
            _load_into_text_encoder(lora, text_encoder, prefix)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise SdtuneError(f"LoRA {lora.path} could not be loaded into the model: {_first_line(exc)}") from exc


def _part(mapping: dict | None, prefix: str) -> dict | None:
    if not mapping:
        return None
    part = {k.removeprefix(f"{prefix}."): v for k, v in mapping.items() if k.startswith(f"{prefix}.")}
    return part or None


def _load_into_text_encoder(lora: LoraFile, text_encoder, prefix: str = "text_encoder") -> None:
    """peft injection + state dict, as diffusers' text-encoder loader does.

    diffusers routes this through transformers' ``load_adapter``, which needs peft >= 0.22 while
    sdtune pins 0.21 (the newest release), so the same steps are taken with peft directly: the
    config from the file's adapter metadata (or ranks/alphas read off the tensors), then injection.
    """
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    sd = _text_encoder_peft_keys(lora.state_dict, text_encoder, prefix)
    meta = _part(lora.metadata, prefix)
    if meta:
        config = LoraConfig(**meta)
    else:
        ranks = {k: v.shape[1] for k, v in sd.items() if k.endswith("lora_B.weight")}
        config = LoraConfig(**get_peft_kwargs(ranks, _part(lora.network_alphas, prefix), sd, is_unet=False))
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER)
    result = set_peft_model_state_dict(text_encoder, sd, adapter_name=ADAPTER)
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k and ADAPTER in k]
    if missing:
        raise SdtuneError(f"LoRA {lora.path} lacks text-encoder weights for {missing[0]} (a damaged file?)")
    text_encoder.to(device=text_encoder.device, dtype=text_encoder.dtype)


def scale_and_fuse(models, scale: float, fuse: bool | str = "auto") -> bool:
    """Scale every LoRA layer of ``models``; fuse (and drop the adapters) if asked or exact enough.

    Returns whether the LoRA was fused. All models are fused or none, so every mode behaves alike.
    """
    models = [m for m in models if m is not None and _lora_layers(m)]
    if scale != 1.0 and any(hasattr(layer, "oft_R") for m in models for layer in _lora_layers(m)):
        raise SdtuneError(f"an OFT adapter is a rotation and cannot be scaled (asked: {scale:g}); use a LoRA scale of "
                          "1, or train another adapter kind to dose it")
    for m in models:
        _scale(m, scale)
    if fuse is True and any(hasattr(layer, "oft_R") and layer.get_base_layer().weight.ndim == 4
                            for m in models for layer in _lora_layers(m)):
        fuse = "auto"  # an OFT convolution does not fuse exactly; auto keeps it unfused and says so
    if fuse == "auto":
        worst = max((fuse_error(m) for m in models), default=0.0)
        fuse = worst <= FUSE_TOLERANCE
        if not fuse and worst == float("inf"):
            log.info("adapter kept unfused: this kind (DoRA, LoHa, LoKr or OFT in half precision, an OFT convolution "
                     "in any) is not fused exactly")
        elif not fuse:
            log.info("LoRA kept unfused: fusing would change its delta by %.1f%% in this dtype", 100 * worst)
    if fuse:
        for m in models:
            _merge_and_remove(m)
    return bool(fuse)


def identifier_token_ids(tokenizer, word: str) -> list[int]:
    """The token ids ``tokenizer`` reads ``word`` as (no start/end tokens)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise SdtuneError(f"the identifier {word!r} reads as no token; use a word such as sks")
    return list(ids)


def identifier_file_of(lora_path: str | os.PathLike) -> Path | None:
    """The identifier embedding written with the LoRA at ``lora_path`` (a folder or its file), if any."""
    p = Path(lora_path).expanduser()
    candidate = (p if p.is_dir() else p.parent) / IDENTIFIER_FILE
    return candidate if candidate.is_file() else None


def read_identifier_embedding(path: str | os.PathLike, tokenizer, width: int) -> list[tuple[list[int], torch.Tensor]]:
    """The (token ids, rows) of an identifier-embedding file, checked to fit ``tokenizer`` and a token width of
    ``width``: one line for a file that is not one, or was trained on another model."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            rows = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own types for a damaged file
        raise SdtuneError(f"{path} is not a readable safetensors file ({_first_line(exc)}); retrain, or remove "
                          "it to use the LoRA without the identifier's embedding") from None
    updates = []
    for word, tensor in rows.items():
        ids = [int(i) for i in meta.get(f"token_ids.{word}", "").split(",") if i.strip().isdigit()]
        if ids != identifier_token_ids(tokenizer, word):
            raise SdtuneError(f"{path}: the identifier {word!r} was trained as tokens {ids}, but this model's "
                              "tokenizer reads it otherwise; use the base model the LoRA was trained on")
        if tuple(tensor.shape) != (len(ids), width):
            raise SdtuneError(f"{path}: the embedding of {word!r} is {tuple(tensor.shape)}, this text encoder's "
                              f"tokens are {width} wide; use the base model the LoRA was trained on")
        updates.append((ids, tensor))
    return updates


def load_identifier_embedding(updates: list[tuple[list[int], torch.Tensor]], text_encoder, scale: float = 1.0) -> None:
    """Write ``read_identifier_embedding``'s rows into ``text_encoder``'s token table: base + scale * (trained -
    base), so scale 1 is as trained and 0 leaves the table as it was."""
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for ids, tensor in updates:
            index = torch.tensor(ids, device=table.device)
            base = table[index].float()
            table[index] = (base + scale * (tensor.to(table.device).float() - base)).to(table.dtype)


RECOMMENDED_KEY = "sdtune_recommended"  # JSON {"guidance", "lora_scale", "guidance_interval"} a trained run wrote


def recommended_settings(path: str | os.PathLike) -> dict | None:
    """The settings an sdtune run recommends for its LoRA (its settings sweep, ``sdtune_recommended`` in the
    safetensors metadata): {"guidance": float, "lora_scale": float, "guidance_interval": [lo, hi] or None}; None
    when the file (or folder) carries none, or is not a safetensors LoRA."""
    import json

    from safetensors import safe_open

    try:
        file = find_lora_file(path, allow_pickle=False)
        with safe_open(str(file), framework="pt") as f:
            text = (f.metadata() or {}).get(RECOMMENDED_KEY)
        value = json.loads(text) if text else None
    except (SdtuneError, OSError, ValueError, RuntimeError):
        return None
    if not isinstance(value, dict) or not all(isinstance(value.get(k), (int, float)) for k in ("guidance",
                                                                                              "lora_scale")):
        return None
    interval = value.get("guidance_interval")
    return {"guidance": float(value["guidance"]), "lora_scale": float(value["lora_scale"]),
            "guidance_interval": [float(x) for x in interval] if isinstance(interval, list) and len(interval) == 2
            else None}
