"""Adapters other than plain LoRA (LoHa, LoKr, OFT, and DoRA's magnitude) in the files other tools read.

peft trains them and names their tensors ``<module>.hada_w1_a`` / ``<module>.lokr_w1`` / ``<module>.oft_R.weight``;
LyCORIS - which ComfyUI, AUTOMATIC1111/Forge and kohya's scripts read - uses the same tensor names (peft's LoHa and
LoKr follow LyCORIS) under kohya's module names: ``lora_unet_down_blocks_0_..._to_q.hada_w1_a`` plus a
``.alpha`` scalar. Two things differ and are handled here:

* the scale. peft multiplies by alpha / r; LyCORIS readers by alpha / (the rank they read off the tensors), and
  for a LoKr whose factors are both full (no low-rank pair) by 1. So the export folds peft's scale into the first
  factor and writes alpha = rank: every reader then applies the trained delta exactly;
* the names. kohya's names are module paths with ``.`` turned into ``_``, which cannot be turned back by string
  rules alone (``to_out_0`` vs ``to_out.0``); ``kohya_names`` maps each module of the actual model instead.

DoRA (peft's ``use_dora``) is a LoRA plus a per-output magnitude; kohya's files carry it as ``dora_scale`` of shape
(out, 1) beside ``lora_down``/``lora_up``, as LyCORIS writes it with its weight decomposition on the output axis.

This module only converts tensors and names; loading them into a model is peft's (``sdtune.models.lora``).
"""
from __future__ import annotations

import torch

# The peft tensor suffixes of each adapter kind (after the module path).
SUFFIXES = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "oft": ("oft_R.weight",),
}
# The factor the scale is folded into: LoHa's product is linear in w1_a; LoKr's Kronecker product in w1 (or w1_a).
FOLD_INTO = {"loha": ("hada_w1_a",), "lokr": ("lokr_w1", "lokr_w1_a")}
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def kind_of_keys(keys) -> str | None:
    """``loha``, ``lokr`` or ``oft`` when the keys hold that adapter's tensors, else None."""
    for kind, suffixes in SUFFIXES.items():
        if any(k.rsplit(".", 1)[-1] in suffixes or k.endswith("." + suffixes[0]) for k in keys):
            return kind
    return None


def split_key(key: str, kind: str) -> tuple[str, str]:
    """``<module>.<suffix>`` -> (module, suffix) for ``kind``'s tensor names."""
    for suffix in SUFFIXES[kind] + ("alpha",):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise KeyError(key)


def rank_of(tensors: dict[str, torch.Tensor], kind: str) -> int | None:
    """The rank of one module's factors as LyCORIS readers read it; None for LoKr with both factors full."""
    if kind == "loha":
        return int(tensors["hada_w1_b"].shape[0])
    for pair in ("lokr_w2_b", "lokr_w1_b"):
        if pair in tensors:
            return int(tensors[pair].shape[0])
    return None


def to_lycoris(peft_sd: dict[str, torch.Tensor], kind: str, scale: float, name_of) -> dict[str, torch.Tensor]:
    """peft LoHa/LoKr keys (no adapter name) -> LyCORIS keys: ``name_of(module)`` is its kohya name; ``scale``
    (alpha / r) is folded into the first factor and alpha written as the rank (see the module docstring)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft_sd.items():
        module, suffix = split_key(key, kind)
        modules.setdefault(module, {})[suffix] = value
    out = {}
    for module, tensors in modules.items():
        name = name_of(module)
        for suffix, value in tensors.items():
            if suffix in FOLD_INTO[kind]:
                value = value * scale
            out[f"{name}.{suffix}"] = value.detach().float().cpu().contiguous()
        rank = rank_of(tensors, kind)
        out[f"{name}.alpha"] = torch.tensor(float(rank if rank is not None else 1))
    return out


def from_lycoris(sd: dict[str, torch.Tensor], kind: str, module_of) -> tuple[dict, dict[str, float], dict[str, int]]:
    """LyCORIS keys -> (peft keys, scale per module, rank per module); ``module_of(kohya_name)`` is the module path
    (a KeyError for a name the model lacks). The scale is what LyCORIS readers apply: alpha / rank, or 1."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name, suffix = split_key(key, kind)
        grouped.setdefault(name, {})[suffix] = value
    peft_sd, scales, ranks = {}, {}, {}
    for name, tensors in grouped.items():
        module = module_of(name)
        rank = rank_of(tensors, kind)
        alpha = tensors.pop("alpha", None)
        scales[module] = float(alpha) / rank if alpha is not None and rank else 1.0
        ranks[module] = rank or 1
        for suffix, value in tensors.items():
            peft_sd[f"{module}.{suffix}"] = value
    return peft_sd, scales, ranks


def kohya_names(model, prefix: str, root: str = "", sgm_config=None) -> dict[str, str]:
    """kohya name -> module path, for every Linear and Conv2d of ``model`` (peft wrappers' inner layers skipped).

    ``prefix``: ``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``; ``root``: a path every name gets
    (``text_model.``, the root of the original CLIP layout); ``sgm_config``: an SDXL UNet's config, whose kohya
    names follow the original (SGM) UNet's blocks."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = {}
    for path, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        elif ".base_layer" in path:  # a wrapper's inner layer: named by its wrapper above
            continue
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        names[kohya_name(path, prefix, root, sgm_config)] = path
    return names


def kohya_name(module: str, prefix: str, root: str = "", sgm_config=None) -> str:
    """One module path in kohya's naming (see ``kohya_names``)."""
    if sgm_config is not None:
        from sdtune.models.convert import unet_to_ldm

        (module,) = unet_to_ldm({module + ".weight": None}, sgm_config)
        module = module.removesuffix(".weight")
    if root and not module.startswith(root):
        module = root + module
    return prefix + module.replace(".", "_")


def dora_scale(magnitude: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """peft's DoRA magnitude (out,) -> kohya's ``dora_scale`` (out, 1[, 1, 1]) for a layer of ``weight``'s shape."""
    return magnitude.detach().float().cpu().reshape(weight.shape[0], *[1] * (weight.dim() - 1)).contiguous()
