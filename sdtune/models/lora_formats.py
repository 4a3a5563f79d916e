"""Every LoRA file layout sdtune meets, read into one form: per module, the weight delta's factors.

The layouts (``detect_format`` names them):

* ``sdtune``: the diffusers-layout file an sdtune run writes (``unet.<block>.attn1.processor.to_q_lora.down.weight``,
  ``...lora.down.weight``, ``text_encoder.text_model...lora_linear_layer.down.weight``; scale folded into the up
  weights) and carrying ``sdtune_*`` metadata; ``diffusers`` is the same layout without it;
* ``peft``: diffusers' current layout, ``unet.down_blocks...to_q.lora_A.weight`` / ``lora_B.weight``, alpha in the
  adapter metadata (``lora_adapter_metadata``);
* ``kohya``: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (A1111, kohya's scripts,
  and sdtune's ``lora_kohya.safetensors``), ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for text encoders;
* ``lycoris``: LyCORIS LoHa (``hada_w1_a``...) and LoKr (``lokr_w1``...) under kohya's module names.

A DoRA file (``dora_scale`` / ``lora_magnitude_vector``) is recognised and described, not operated on: its delta
depends on the base weights' norms, so only a tool holding the base could apply it.

Module names are resolved by diffusers' own key conversion (``lora_state_dict`` and the ``convert_*_to_peft``
helpers), so sdtune maps kohya and diffusers names exactly as the loaders that will read the outputs do. LyCORIS
names are mapped the same way through a stand-in kohya key per module. Each resolved module is named by its
path in diffusers' model (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``; text encoders by their
path in a transformers 5 ``CLIPTextModel``, without the ``text_model.`` root).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdtune.errors import SdtuneError
from sdtune.models.lora import find_lora_file

PARTS = ("unet", "text_encoder", "text_encoder_2")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
TUCKER_KEYS = ("hada_t1", "hada_t2", "lokr_t2")
PEFT_CONFIG_KEY = "sdtune_adapter"  # JSON {part: peft config} in sdtune's adapter_model.safetensors (LoHa/LoKr/OFT)
# kernel sizes of the SD UNet's 3x3 convolutions, for LyCORIS files that store a conv's factors flattened
CONV3_LEAVES = ("conv1", "conv2", "conv", "conv_in", "conv_out")


@dataclass
class Module:
    """One adapted layer: ``kind`` "lora" (``down``, ``up``, ``alpha``), "loha" / "lokr" (LyCORIS ``tensors``,
    ``alpha``) or "dora" (a LoRA with a magnitude vector). ``delta()`` is the weight change at scale 1."""

    part: str  # "unet" | "text_encoder" | "text_encoder_2"
    name: str  # module path in diffusers' model
    kind: str = "lora"
    down: torch.Tensor | None = None  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor | None = None  # (out, r) or (out, r, 1, 1)
    alpha: float | None = None  # None: alpha = rank (scale 1)
    tensors: dict = field(default_factory=dict)
    fixed_scale: float | None = None  # peft-keyed LoHa/LoKr files: peft's alpha / r from the file's config

    @property
    def key(self) -> tuple[str, str]:
        return (self.part, self.name)

    @property
    def rank(self) -> int:
        if self.kind in ("lora", "dora"):
            return int(self.down.shape[0])
        t = self.tensors
        if self.kind == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.kind == "oft":
            return int(t["oft_R"].shape[0]) if "oft_R" in t else 0  # OFT: the number of blocks
        for name in ("lokr_w2_b", "lokr_w1_b"):
            if name in t:
                return int(t[name].shape[0])
        return 0  # full Kronecker factors: no rank

    @property
    def scale(self) -> float:
        """alpha / rank, LyCORIS's and kohya's rule (1 without an alpha, or for LoKr with full factors); peft's
        alpha / r for the files peft's keys and config describe."""
        if self.fixed_scale is not None:
            return self.fixed_scale
        if self.alpha is None or self.rank == 0:
            return 1.0
        return float(self.alpha) / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        """The adapted weight's shape (as the LoRA's factors give it)."""
        if self.kind in ("lora", "dora"):
            return (int(self.up.shape[0]), *self.down.shape[1:])
        return tuple(self._lycoris_delta().shape)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up (out, r), down (r, in_flat)) in float64 with the scale in ``up``: delta = up @ down."""
        if self.kind not in ("lora", "dora"):
            raise SdtuneError(f"{self.name} is a {self.kind} module, not a LoRA")
        return self.up.double().flatten(1) * self.scale, self.down.double().flatten(1)

    def delta(self) -> torch.Tensor:
        """The full weight delta at scale 1, shaped like the weight (float64)."""
        if self.kind == "dora":
            raise SdtuneError(f"{self.name}: a DoRA layer's change depends on the base weights; "
                              "DoRA files can be described (sdtune lora info) but not merged, resized or fused")
        if self.kind == "lora":
            up, down = self.factors()
            return (up @ down).reshape(self.shape)
        if self.kind == "oft":
            raise SdtuneError(f"{self.name}: an OFT layer rotates the base weights, so its change depends on them; "
                              "OFT files can be described (sdtune lora info) but not merged, resized or fused")
        return self._lycoris_delta()

    def _lycoris_delta(self) -> torch.Tensor:
        t = {k: v.double() for k, v in self.tensors.items()}
        if any(k in t for k in TUCKER_KEYS):
            raise SdtuneError(f"{self.name}: LyCORIS Tucker-decomposed convolutions ({', '.join(TUCKER_KEYS)}) are "
                              "not supported; only described by sdtune lora info")
        if self.kind == "loha":
            delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * self.scale
        else:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
            if w2.ndim == 4:  # a convolution's kernel lives in w2
                w1 = w1[:, :, None, None]
            delta = torch.kron(w1, w2) * self.scale
        if delta.ndim == 2 and self.part == "unet" and self.name.rsplit(".", 1)[-1] in CONV3_LEAVES \
                and delta.shape[1] % 9 == 0:
            delta = delta.reshape(delta.shape[0], delta.shape[1] // 9, 3, 3)  # LoHa stores conv factors flattened
        return delta


@dataclass
class LoraSet:
    """A LoRA file read: its modules by (part, name), the layout it was in, its safetensors metadata."""

    path: Path | None
    modules: dict  # (part, name) -> Module
    format: str
    metadata: dict = field(default_factory=dict)
    sgm_names: bool = False  # kohya SDXL names read without the UNet's config (block numbers not mapped)

    @property
    def kinds(self) -> set[str]:
        return {m.kind for m in self.modules.values()}

    @property
    def sdxl(self) -> bool:
        return any(part == "text_encoder_2" for part, _ in self.modules)


# ---- reading ---------------------------------------------------------------------------------------------------

def read_raw(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[Path, dict, dict]:
    """(file, tensors, metadata) of a LoRA file or of the LoRA in a run folder. Pickle only with ``allow_pickle``."""
    from safetensors import safe_open

    file = find_lora_file(path, allow_pickle=allow_pickle)
    if file.suffix in PICKLE_SUFFIXES or file.suffix != ".safetensors":
        try:
            data = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SdtuneError(f"{file} could not be read as a torch file ({type(exc).__name__})") from None
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise SdtuneError(f"{file} is not a state dict of tensors")
        return file, dict(data), {}
    try:
        with safe_open(str(file), framework="pt") as f:
            return file, {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise SdtuneError(f"{file} is not a readable safetensors file ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None


def detect_format(keys, metadata: dict) -> str:
    """The layout a file's keys are in (see the module docstring)."""
    keys = list(keys)
    lycoris = any(k.split(".")[-1] in LOHA_KEYS + LOKR_KEYS + TUCKER_KEYS or k.endswith(".oft_R.weight")
                  for k in keys)
    if lycoris and all(k.split(".")[0] in PARTS for k in keys):
        return "sdtune-peft" if PEFT_CONFIG_KEY in metadata else "peft-adapter"
    if lycoris:
        return "lycoris"
    if keys and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(k.startswith("sdtune_") for k in metadata):
        return "sdtune"
    return "diffusers"


def read_lora_set(path: str | os.PathLike, allow_pickle: bool = False, unet_config=None) -> LoraSet:
    """Read any supported LoRA file into per-module factors (``unet_config``: maps kohya SDXL block names)."""
    file, raw, meta = read_raw(path, allow_pickle)
    return parse(raw, meta, unet_config, file)


def parse(raw: dict, meta: dict, unet_config=None, file: Path | None = None) -> LoraSet:
    where = file or "the LoRA"
    if not raw:
        raise SdtuneError(f"{where} holds no tensors")
    fmt = detect_format(raw, meta)
    try:
        if fmt in ("kohya", "lycoris"):
            modules, sgm = _parse_kohya_like(raw, unet_config, where)
        elif fmt in ("sdtune-peft", "peft-adapter"):
            modules, sgm = _parse_peft_adapter(raw, meta, where), False
        else:
            modules, sgm = _parse_diffusers_like(raw, meta, where), False
    except SdtuneError:
        raise
    except (ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise SdtuneError(f"{where} names its layers in no layout sdtune or diffusers knows "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})"
                          ) from None
    if not modules:
        raise SdtuneError(f"{where} is not a LoRA file: no key names a LoRA layer of a UNet or text encoder")
    for m in modules.values():
        _check_module(m, where)
    return LoraSet(file, modules, fmt, meta, sgm)


def _check_module(m: Module, where) -> None:
    """Finite values, and factors that multiply: a damaged or diverged file is one line here, not an error deep in
    an SVD."""
    if not all(bool(torch.isfinite(t).all()) for t in _tensors(m) if t.is_floating_point()):
        raise SdtuneError(f"{where}: layer {m.name} holds NaN or infinite values (a damaged or diverged file)")
    try:
        if m.kind in ("lora", "dora"):
            if m.down.ndim not in (2, 4) or m.up.ndim != m.down.ndim or m.up.shape[1] != m.down.shape[0]:
                raise ValueError(f"down {tuple(m.down.shape)} and up {tuple(m.up.shape)} do not multiply")
        elif m.kind in ("loha", "lokr") and not any(k in m.tensors for k in TUCKER_KEYS):
            m._lycoris_delta()
    except (ValueError, RuntimeError, KeyError, IndexError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdtuneError(f"{where}: layer {m.name} is damaged ({text[:160]})") from None


def _module_prefixes(raw: dict) -> dict[str, dict]:
    """kohya-named keys grouped by module: {"lora_unet_...": {"lora_down.weight": t, "alpha": t, ...}}."""
    groups: dict[str, dict] = {}
    for key, value in raw.items():
        prefix, _, rest = key.partition(".")
        groups.setdefault(prefix, {})[rest] = value
    return groups


def resolve_kohya_names(prefixes: list[str], unet_config=None) -> dict[str, tuple[str, str]]:
    """kohya module names -> (part, diffusers module path), by diffusers' own conversion.

    A stand-in LoRA with one 1x1 down weight per module, each holding the module's index, goes through
    ``StableDiffusionPipeline.lora_state_dict`` (kohya -> diffusers names, SGM blocks mapped with ``unet_config``)
    and diffusers' peft conversion; the index read back off each converted key says which module it names."""
    from diffusers import StableDiffusionPipeline

    fake = {}
    for i, prefix in enumerate(prefixes):
        fake[f"{prefix}.lora_down.weight"] = torch.full((1, 1), float(i))
        fake[f"{prefix}.lora_up.weight"] = torch.full((1, 1), float(i))
    sd, _ = StableDiffusionPipeline.lora_state_dict(fake, unet_config=unet_config)
    out = {}
    for part, peft in _peft_parts(sd).items():
        for key, value in peft.items():
            if key.endswith(".lora_A.weight"):
                out[prefixes[int(value.item())]] = (part, key[: -len(".lora_A.weight")])
    return out


def _peft_parts(sd: dict) -> dict[str, dict]:
    """diffusers' prefixed state dict -> {part: peft-keyed dict (``<module>.lora_A.weight``)} by diffusers' helpers;
    text-encoder module paths without CLIP's ``text_model.`` root."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, \
        convert_unet_state_dict_to_peft

    out = {}
    for part in PARTS:
        piece = {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}
        if not piece:
            continue
        if part == "unet":
            if not any("lora_A" in k for k in piece):
                piece = convert_unet_state_dict_to_peft(piece)
        else:
            piece = convert_state_dict_to_peft(convert_state_dict_to_diffusers(piece))
            piece = {k.removeprefix("text_model."): v for k, v in piece.items()}
        out[part] = piece
    return out


def _parse_kohya_like(raw: dict, unet_config, where) -> tuple[dict, bool]:
    groups = _module_prefixes(raw)
    unknown = [p for p in groups if not p.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))]
    if unknown:
        raise SdtuneError(f"{where}: key {unknown[0]} names no kohya/LyCORIS module (lora_unet_* / lora_te_*)")
    names = resolve_kohya_names(list(groups), unet_config)
    sgm = unet_config is None and any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", p)
                                      for p in groups)
    modules = {}
    for prefix, tensors in groups.items():
        if prefix not in names:
            raise SdtuneError(f"{where}: diffusers could not name module {prefix}")
        part, name = names[prefix]
        alpha = tensors.pop("alpha", None)
        alpha = float(alpha.float().item()) if alpha is not None else None
        weights = {k.removesuffix(".weight"): v for k, v in tensors.items()}
        if ("lora_down" in weights) != ("lora_up" in weights):
            raise SdtuneError(f"{where}: module {prefix} has only one of lora_down / lora_up (a damaged file?)")
        if "lora_down" in weights:
            kind = "dora" if "dora_scale" in weights else "lora"
            m = Module(part, name, kind, down=weights["lora_down"], up=weights["lora_up"], alpha=alpha)
            if kind == "dora":
                m.tensors = {"dora_scale": weights["dora_scale"]}
        elif "hada_w1_a" in weights:
            m = Module(part, name, "loha", alpha=alpha, tensors=weights)
        elif any(k.startswith("lokr_") for k in weights):
            m = Module(part, name, "lokr", alpha=alpha, tensors=weights)
        else:
            raise SdtuneError(f"{where}: module {prefix} has keys {sorted(tensors)} of no known adapter")
        modules[m.key] = m
    return modules, sgm


def _parse_peft_adapter(raw: dict, meta: dict, where) -> dict:
    """peft's own keys for LoHa / LoKr / OFT (``unet.<module>.hada_w1_a``, ``text_encoder.<module>.lokr_w1``,
    ``unet.<module>.oft_R.weight``), as sdtune's adapter_model.safetensors holds them; the scale is peft's
    alpha / r from the config in the file's metadata (``sdtune_adapter``), 1 without one."""
    configs = _json_field(meta.get(PEFT_CONFIG_KEY)) or {}
    groups: dict = {}
    for key, value in raw.items():
        part, _, rest = key.partition(".")
        suffix = next((sx for sx in (*LOHA_KEYS, *LOKR_KEYS, *TUCKER_KEYS, "oft_R.weight", "alpha")
                       if rest.endswith("." + sx)), None)
        if suffix is None:
            raise SdtuneError(f"{where}: key {key} is no LoHa / LoKr / OFT tensor")
        module = rest[: -len(suffix) - 1].removeprefix("text_model.")
        groups.setdefault((part, module), {})[suffix.removesuffix(".weight")] = value
    modules = {}
    for (part, name), tensors in groups.items():
        kind = "loha" if "hada_w1_a" in tensors else "lokr" if any(k.startswith("lokr_") for k in tensors) else "oft"
        config = configs.get(part) if isinstance(configs, dict) else None
        scale = None
        if isinstance(config, dict) and kind != "oft":
            alpha = _pattern_value(name, config.get("alpha_pattern")) or config.get("alpha")
            r = _pattern_value(name, config.get("rank_pattern")) or config.get("r")
            scale = float(alpha) / float(r) if alpha is not None and r else None
        alpha = tensors.pop("alpha", None)
        m = Module(part, name, kind, alpha=float(alpha) if alpha is not None else None, tensors=tensors,
                   fixed_scale=scale)
        modules[m.key] = m
    return modules


def _parse_diffusers_like(raw: dict, meta: dict, where) -> dict:
    """diffusers' layouts (old attention-processor names, peft's lora_A/lora_B), via its own conversion."""
    from diffusers import StableDiffusionPipeline

    dora = {k: v for k, v in raw.items() if "lora_magnitude_vector" in k or "dora_scale" in k}
    plain = {k: v for k, v in raw.items() if k not in dora and not k.endswith(".alpha")}
    if not all("lora" in k for k in plain):
        raise SdtuneError(f"{where} is not a LoRA file (key {next(k for k in plain if 'lora' not in k)} names no "
                          "LoRA layer)")
    # files with a part prefix (unet., text_encoder.) as diffusers writes them; bare UNet keys as old files do
    if not any(k.split(".")[0] in PARTS for k in plain):
        plain = {f"unet.{k}": v for k, v in plain.items()}
    sd, _ = StableDiffusionPipeline.lora_state_dict(plain)
    adapter_meta = _adapter_metadata(meta)
    dora_modules = {k.split(".lora_magnitude_vector")[0].split(".dora_scale")[0] for k in dora}
    modules = {}
    for part, peft in _peft_parts(sd).items():
        config = {k[len(part) + 1:]: v for k, v in adapter_meta.items() if k.startswith(part + ".")}
        for key, value in peft.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[: -len(".lora_A.weight")]
            up = peft.get(name + ".lora_B.weight")
            if up is None:
                raise SdtuneError(f"{where}: module {name} has a down (lora_A) weight and no up (lora_B) weight")
            alpha = _alpha_for(name, config, int(value.shape[0]))
            kind = "dora" if any(d.endswith(name) or name in d for d in dora_modules) else "lora"
            m = Module(part, name, kind, down=value, up=up, alpha=alpha)
            modules[m.key] = m
    return modules


def _adapter_metadata(meta: dict) -> dict:
    text = meta.get("lora_adapter_metadata")
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _pattern_value(name: str, patterns: dict):
    """peft's rule for rank_pattern/alpha_pattern keys: the key matches the module path's end."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return None


def _alpha_for(name: str, config: dict, rank: int) -> float | None:
    """The module's alpha from peft adapter metadata (None when there is none: scale 1, diffusers' rule)."""
    if not config:
        return None
    alpha = _pattern_value(name, config.get("alpha_pattern"))
    if alpha is None:
        alpha = config.get("lora_alpha")
    r = _pattern_value(name, config.get("rank_pattern")) or config.get("r")
    if alpha is None:
        return None
    # peft's scale is lora_alpha / r with r the configured rank, which is the tensors' rank
    return float(alpha) * rank / float(r) if r and int(r) != rank else float(alpha)


# ---- describing ------------------------------------------------------------------------------------------------

ATTENTION = re.compile(r"\.(attn\d)\.(to_q|to_k|to_v|to_out\.0)$")


def target_group(m: Module) -> str:
    """What kind of layer a module is, for ``info``: attention / feed-forward / convolution / other (UNet), or
    the text encoder it is in."""
    if m.part != "unet":
        return m.part
    leaf = m.name.rsplit(".", 1)[-1]
    if ATTENTION.search(m.name):
        return "unet attention"
    if ".ff.net." in m.name:
        return "unet feed-forward"
    if leaf in ("conv1", "conv2", "conv_shortcut", "conv", "conv_in", "conv_out") or "samplers" in m.name:
        return "unet convolutions"
    if leaf in ("proj_in", "proj_out"):
        return "unet attention projections (proj_in/out)"
    if leaf == "time_emb_proj":
        return "unet time-embedding projections"
    return "unet other"


def rank_summary(modules) -> str:
    """"rank 4 on 32 modules" (or "rank 4 on 30 modules, rank 8 on 2")."""
    counts = Counter(m.rank for m in modules)
    parts = [f"rank {r} on {n} module{'s' if n != 1 else ''}" for r, n in sorted(counts.items(), key=lambda x: -x[1])]
    return ", ".join(parts) if parts else "no modules"


ADAPTER_NAMES = {"lora": "LoRA", "loha": "LoHa (LyCORIS)", "lokr": "LoKr (LyCORIS)", "dora": "DoRA", "oft": "OFT"}
FORMAT_NAMES = {"sdtune": "sdtune (diffusers layout, sdtune metadata)", "diffusers": "diffusers (attention-processor "
                "layout)", "peft": "diffusers / peft (lora_A / lora_B)", "kohya": "kohya / A1111 (lora_unet_*)",
                "lycoris": "LyCORIS (kohya names)", "sdtune-peft": "sdtune adapter file (peft keys and config)",
                "peft-adapter": "peft adapter keys (hada_* / lokr_* / oft_R)"}


def describe(lora: LoraSet) -> dict:
    """Everything ``sdtune lora info`` reports, as plain data."""
    meta = lora.metadata
    modules = list(lora.modules.values())
    groups = Counter(target_group(m) for m in modules)
    alphas = Counter(m.alpha for m in modules)
    training = _json_field(meta.get("sdtune_config"))
    kohya = {k: v for k, v in meta.items() if k.startswith("ss_")}
    base = meta.get("sdtune_base_model") or (training or {}).get("model") or meta.get("ss_sd_model_name") \
        or meta.get("modelspec.architecture") or meta.get("ss_base_model_version")
    return {
        "file": str(lora.path) if lora.path else None,
        "format": lora.format,
        "format_name": FORMAT_NAMES.get(lora.format, lora.format),
        "adapters": sorted(ADAPTER_NAMES[k] for k in lora.kinds),
        "modules": len(modules),
        "ranks": rank_summary(modules),
        "rank_counts": {str(r): n for r, n in sorted(Counter(m.rank for m in modules).items())},
        "alphas": {("none" if a is None else _num(a)): n for a, n in alphas.items()},
        "targets": dict(sorted(groups.items())),
        "sdxl": lora.sdxl,
        "family": family_hint(lora),
        "sgm_names_unmapped": lora.sgm_names,
        "base_model": base,
        "steps": meta.get("sdtune_steps") or meta.get("ss_steps") or meta.get("ss_max_train_steps"),
        "recommended": _json_field(meta.get("sdtune_recommended")),
        "training_config": training,
        "kohya_metadata": kohya or None,
        "parameters": int(sum(t.numel() for m in modules for t in _tensors(m))),
    }


FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def family_hint(lora: LoraSet) -> str:
    """The model family the LoRA's layer sizes point to: SDXL when it has a second text encoder, else the UNet's
    cross-attention width (the text encoder's width: 768 SD 1.x, 1024 SD 2.x, 2048 SDXL)."""
    if lora.sdxl:
        return "SDXL"
    for (part, name), m in lora.modules.items():
        if part == "unet" and m.kind in ("lora", "dora") and re.search(r"attn2\.to_[kv]$", name):
            width = int(m.down.shape[1])
            return FAMILIES.get(width, f"unknown (cross-attention width {width})")
    return "unknown (no cross-attention key/value layer)"


def _tensors(m: Module):
    if m.kind in ("lora", "dora"):
        return [m.down, m.up, *m.tensors.values()]
    return list(m.tensors.values())


def _json_field(text):
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"

