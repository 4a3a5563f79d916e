"""The LoRA tools behind ``sdtune lora``: merge, resize, extract, fuse, and writing the results.

All of them work on ``lora_formats``' per-module form, so any layout it reads (sdtune's, diffusers', peft's,
kohya's, LyCORIS LoHa/LoKr) goes in, and every output is written in sdtune's diffusers layout
(``adapters.diffusers_layout_unet`` / ``diffusers_layout_text_encoder``, through diffusers' own writer), which
``sdtune infer --lora``, stock ``pipe.load_lora_weights`` and ComfyUI read.

The math, per module (delta = up @ down * alpha / rank, flattened to a matrix for convolutions):

* merge without a rank: the factors are stacked - downs one above the other, ups side by side, each up times its
  weight and scale - so the merged delta is the weighted sum of the deltas exactly, at the summed rank;
* merge with a rank, resize: a truncated SVD of the (summed) delta. For LoRA inputs the delta is never formed: a
  QR of each factor leaves a (rank x rank) core whose SVD gives the same singular vectors and values;
* extract: the truncated SVD of W_tuned - W_base of every Linear / Conv2d weight that differs;
* the energy kept by a truncation is the share of the squared singular values kept, sum(s[:R]^2) / sum(s^2): the
  share of the delta's squared Frobenius norm that survives.

Outputs carry no alpha: the scale is folded into the up weights and the adapter metadata says lora_alpha = r per
module (``rank_pattern`` / ``alpha_pattern`` where ranks differ), so every reader applies the delta as computed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdtune.errors import SdtuneError
from sdtune.models.lora_formats import LoraSet, Module

TOOL_METADATA_KEY = "sdtune_lora_tool"  # JSON: which tool made the file, from what
# Linear/Conv2d weights of a UNet or CLIP state dict that are embedding tables, not layers a LoRA can adapt
EMBEDDING_TABLE = re.compile(r"(token_embedding|position_embedding|class_embedding)\.weight$")


@dataclass
class Outcome:
    """What a tool made: the modules to write, and what to tell the user."""

    modules: dict  # (part, name) -> Module (plain LoRA)
    energies: list = field(default_factory=list)  # per truncated module: share of squared singular values kept
    notes: list = field(default_factory=list)

    def energy_line(self) -> str | None:
        if not self.energies:
            return None
        e = torch.tensor(self.energies, dtype=torch.float64)
        return f"energy kept: mean {100 * e.mean():.2f}%, min {100 * e.min():.2f}% over {len(self.energies)} modules"


# ---- SVD ----------------------------------------------------------------------------------------------------------

def svd_factored(up: torch.Tensor, down: torch.Tensor):
    """SVD of up @ down (out x k, k x n) without forming it: QR of each factor, SVD of the small core."""
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return qu @ u, s, vh @ qd.T


def truncate(u, s, vh, rank: int, part: str, name: str, shape) -> tuple[Module, float]:
    """The rank-``rank`` LoRA nearest (Frobenius) to u diag(s) vh, its singular values split evenly between up and
    down; and the share of squared singular values kept."""
    r = max(1, min(rank, s.numel()))
    total = float((s ** 2).sum())
    energy = float((s[:r] ** 2).sum()) / total if total > 0 else 1.0
    root = s[:r].sqrt()
    up = (u[:, :r] * root).float()
    down = (root[:, None] * vh[:r]).float()
    down = down.reshape(r, *shape[1:]).contiguous()
    if len(shape) == 4:
        up = up.reshape(shape[0], r, 1, 1)
    return Module(part, name, "lora", down=down, up=up.contiguous(), alpha=None), energy


def thin_svd(a: torch.Tensor):
    """The thin SVD of ``a``; a wide or tall matrix (a 3x3 convolution's 1280 x 11520) is first cut to its square
    core by a QR, whose SVD costs far less than the rectangle's (measured on a CPU: 1280 x 11520 ten times faster)
    and gives the same singular values and vectors."""
    m, n = a.shape
    if n > 2 * m:
        q, r = torch.linalg.qr(a.T)  # a = r^T q^T
        u, s, vh = torch.linalg.svd(r.T, full_matrices=False)
        return u, s, vh @ q.T
    if m > 2 * n:
        q, r = torch.linalg.qr(a)
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        return q @ u, s, vh
    return torch.linalg.svd(a, full_matrices=False)


def low_rank(delta: torch.Tensor, rank: int, part: str, name: str, device=None) -> tuple[Module, float]:
    """Truncated SVD of a full delta (shaped like its weight), in float64 on ``device`` (default the CPU)."""
    u, s, vh = (t.cpu() for t in thin_svd(delta.double().flatten(1).to(device or "cpu")))
    return truncate(u, s, vh, rank, part, name, tuple(delta.shape))


def check_rank(rank) -> None:
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise SdtuneError(f"--rank must be a whole number above 0, got {rank}")


def _progress(items, what: str, quiet: bool):
    from tqdm.auto import tqdm

    # shown only when the work lasts over a second (a full-size model's SVDs), never for tiny files
    return tqdm(items, desc=what, unit="layer", disable=quiet, leave=False, delay=1.0)


# ---- merge and resize ----------------------------------------------------------------------------------------------

def lycoris_note(sets) -> str | None:
    kinds = {k for s in sets for k in s.kinds} & {"loha", "lokr"}
    if kinds:
        names = " and ".join(sorted({"loha": "LoHa", "lokr": "LoKr"}[k] for k in kinds))
        return f"note: the {names} layers were turned into a plain LoRA (an SVD of each full delta)"
    return None


def _refuse_dora(sets, what: str) -> None:
    """DoRA and OFT changes depend on the base weights (a norm, a rotation): no delta of their own to work on."""
    for s in sets:
        if "dora" in s.kinds:
            raise SdtuneError(f"{s.path} is a DoRA file: its change depends on the base weights' norms, so it "
                              f"cannot be {what}; sdtune lora info describes it")
        if "oft" in s.kinds:
            raise SdtuneError(f"{s.path} is an OFT file: it rotates the base weights, so it cannot be {what}; "
                              "sdtune lora info describes it")


def merge(sets: list[LoraSet], weights: list[float], rank: int | None = None, quiet: bool = True) -> Outcome:
    """The weighted sum of several LoRAs' deltas: exact by stacking (``rank`` None), else SVD-truncated to ``rank``."""
    check_rank(rank)
    if len(weights) != len(sets):
        raise SdtuneError(f"--weights gives {len(weights)} weight(s) for {len(sets)} LoRA files; give one per file")
    _refuse_dora(sets, "merged")
    lycoris = any(k in ("loha", "lokr") for s in sets for k in s.kinds)
    if lycoris and rank is None:
        raise SdtuneError("LoHa/LoKr layers have no LoRA factors to stack; pass --rank R to merge them by SVD")
    by_key: dict = {}
    for s, w in zip(sets, weights):
        for key, m in s.modules.items():
            by_key.setdefault(key, []).append((m, w, s))
    out = Outcome({})
    for key, items in _progress(list(by_key.items()), "merging", quiet):
        shapes = {tuple(m.shape) for m, _, _ in items}
        if len(shapes) > 1:
            raise SdtuneError(f"the LoRAs do not fit one model: layer {key[0]}.{key[1]} is "
                              f"{' in one and '.join(str(s) for s in sorted(shapes))} in another")
        shape = shapes.pop()
        if all(m.kind == "lora" for m, _, _ in items):
            ups, downs = zip(*[(m.factors()[0] * w, m.factors()[1]) for m, w, _ in items])
            up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
            if rank is None:
                down = down.float().reshape(down.shape[0], *shape[1:])
                up = up.float().reshape(shape[0], -1, *([1, 1] if len(shape) == 4 else []))
                out.modules[key] = Module(*key, "lora", down=down.contiguous(), up=up.contiguous(), alpha=None)
                continue
            module, energy = truncate(*svd_factored(up, down), rank, *key, shape)
        else:
            delta = sum(m.delta().reshape(shape) * w for m, w, _ in items)
            module, energy = low_rank(delta, rank, *key)
        out.modules[key] = module
        out.energies.append(energy)
    note = lycoris_note(sets)
    if note:
        out.notes.append(note)
    return out


def resize(lora: LoraSet, rank: int, quiet: bool = True) -> Outcome:
    """Every module truncated to ``rank`` by SVD (a module of lower rank keeps its own)."""
    check_rank(rank)
    _refuse_dora([lora], "resized")
    out = Outcome({})
    for key, m in _progress(list(lora.modules.items()), "resizing", quiet):
        if m.kind == "lora":
            module, energy = truncate(*svd_factored(*m.factors()), rank, *key, m.shape)
        else:
            module, energy = low_rank(m.delta(), rank, *key)
        out.modules[key] = module
        out.energies.append(energy)
    kept = sum(1 for m in lora.modules.values() if m.kind == "lora" and m.rank <= rank)
    if kept:
        out.notes.append(f"{kept} module(s) already had rank <= {rank}: kept at their own rank, unchanged")
    note = lycoris_note([lora])
    if note:
        out.notes.append(note)
    return out


# ---- models: extract and fuse --------------------------------------------------------------------------------------

def load_parts(source, config=None, allow_pickle: bool = False) -> tuple[dict, object]:
    """{part: state dict} of a model (diffusers folder, UNet folder, single file with ``config``, or a UNet's own
    .safetensors state dict), and the UNet's config when known. Weights on the CPU in their stored dtype."""
    from sdtune.models.loading import load_pipeline, resolve_source

    folder = Path(source).expanduser()
    if folder.is_dir() and not (folder / "model_index.json").is_file() and (folder / "config.json").is_file():
        from diffusers import UNet2DConditionModel

        where = folder

        try:
            unet = UNet2DConditionModel.from_pretrained(where, use_safetensors=not allow_pickle or None)
        except (OSError, ValueError) as exc:
            raise SdtuneError(f"could not load UNet folder {where}: {str(exc).strip().splitlines()[0]}") from None
        return {"unet": unet.state_dict()}, unet.config
    kind, where = resolve_source(source)
    if kind == "file" and where.suffix == ".safetensors" and config is None:
        from safetensors.torch import load_file

        try:
            sd = load_file(str(where))
        except Exception as exc:
            raise SdtuneError(f"{where} is not a readable safetensors file ({type(exc).__name__})") from None
        if any(k.startswith(("down_blocks.", "conv_in.")) for k in sd):
            return {"unet": sd}, None
        raise SdtuneError(f"{where} is a single-file checkpoint; pass --config with a local diffusers folder of the "
                          "same architecture (or pass diffusers folders)")
    pipe = load_pipeline(source, config=config, allow_pickle=allow_pickle)
    parts = {"unet": pipe.unet.state_dict(), "text_encoder": pipe.text_encoder.state_dict()}
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts["text_encoder_2"] = pipe.text_encoder_2.state_dict()
    return parts, pipe.unet.config


def _layer_keys(sd: dict) -> dict:
    """{state-dict key: module path} of the Linear and Conv2d weights a LoRA can adapt (not embedding tables);
    text-encoder paths without CLIP's ``text_model.`` root."""
    return {k: k[: -len(".weight")].removeprefix("text_model.") for k, v in sd.items()
            if k.endswith(".weight") and v.ndim in (2, 4) and not EMBEDDING_TABLE.search(k)}


def extract(base: dict, tuned: dict, rank: int, quiet: bool = True, device=None) -> Outcome:
    """A LoRA approximating tuned - base: per differing Linear/Conv2d weight, the truncated SVD of the difference."""
    check_rank(rank)
    out = Outcome({})
    missing = sorted(set(base) ^ set(tuned))
    if missing:
        raise SdtuneError(f"the models do not match: only one of them has a {missing[0]} (pass the same kind of "
                          "model for --base and --tuned)")
    other_changed = 0
    pairs = []
    for part in base:
        kb, kt = _layer_keys(base[part]), _layer_keys(tuned[part])
        if set(kb.values()) != set(kt.values()):
            name = sorted(set(kb.values()) ^ set(kt.values()))[0]
            raise SdtuneError(f"the models do not match: layer {part}.{name} is in only one of them "
                              "(another architecture?)")
        tuned_by_name = {name: tuned[part][k] for k, name in kt.items()}
        for key, name in kb.items():
            wb, wt = base[part][key], tuned_by_name[name]
            if wb.shape != wt.shape:
                raise SdtuneError(f"the models do not match: layer {part}.{name} is {tuple(wb.shape)} in --base and "
                                  f"{tuple(wt.shape)} in --tuned (another architecture?)")
            if not torch.equal(wb, wt):
                pairs.append((part, name, wb, wt))
        other_changed += sum(1 for k, v in base[part].items() if k not in kb and k in tuned[part]
                             and v.shape == tuned[part][k].shape and not torch.equal(v, tuned[part][k]))
    if not pairs:
        raise SdtuneError("--base and --tuned have the same Linear/Conv2d weights: there is nothing to extract")
    for part, name, wb, wt in _progress(pairs, "extracting", quiet):
        module, energy = low_rank(wt.double() - wb.double(), rank, part, name, device)
        out.modules[module.key] = module
        out.energies.append(energy)
    parts = sorted({p for p, _, _, _ in pairs})
    out.notes.append(f"{len(pairs)} differing layer(s) in {', '.join(parts)}")
    if other_changed:
        out.notes.append(f"note: {other_changed} other changed tensor(s) (biases, norms, embedding tables) cannot be "
                         "expressed as a LoRA and are left out")
    return out


def _target(model, part: str, name: str):
    for path in (name, "text_model." + name) if part != "unet" else (name,):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    return None


def check_fits_model(lora: LoraSet, pipe) -> None:
    """Every module names a layer of ``pipe`` with the LoRA's weight shape; else one line saying which does not."""
    for (part, name), m in lora.modules.items():
        model = getattr(pipe, part, None)
        where = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}[part]
        if model is None:
            raise SdtuneError(f"LoRA {lora.path} has layers for a {where} the model does not have (an SDXL LoRA on "
                              "an SD 1.x/2.x model?)")
        layer = _target(model, part, name)
        weight = getattr(layer, "weight", None)
        if weight is None:
            raise SdtuneError(f"LoRA {lora.path} does not fit the model: its {where} has no layer {name} "
                              "(a LoRA for another model family?)")
        if weight.numel() != _numel(m.shape) or weight.shape[0] != m.shape[0]:
            raise SdtuneError(f"LoRA {lora.path} does not fit the model: {where} layer {name} is "
                              f"{tuple(weight.shape)}, the LoRA's change is {tuple(m.shape)} (another model family?)")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@torch.no_grad()
def fuse_into(lora: LoraSet, pipe, scale: float = 1.0, quiet: bool = True) -> int:
    """W += scale * delta for every module of ``lora`` in ``pipe`` (computed in float64, stored in W's dtype).
    Returns the number of layers changed."""
    _refuse_dora([lora], "fused here")
    check_fits_model(lora, pipe)
    for (part, name), m in _progress(list(lora.modules.items()), "fusing", quiet):
        weight = _target(getattr(pipe, part), part, name).weight
        delta = m.delta().reshape(weight.shape)
        weight.copy_((weight.double() + scale * delta).to(weight.dtype))
    return len(lora.modules)


def save_model(pipe, out: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """The pipeline as a diffusers folder (``out`` a folder), or as one original-layout .safetensors file."""
    from sdtune.models.convert import export_single_file
    from sdtune.training.export import save_full_pipeline

    out = Path(out)
    if out.suffix == ".safetensors":
        return export_single_file(pipe, out)
    if out.exists() and not out.is_dir():
        raise SdtuneError(f"--out {out} is a file; pass a folder, or a name ending in .safetensors for one file")
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise SdtuneError(f"--out {out} is a folder holding other files; pass a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    save_full_pipeline(out, pipe, pipe.unet, pipe.text_encoder, metadata)
    return out


# ---- writing -------------------------------------------------------------------------------------------------------

def _peft_metadata(ranks: dict[str, int]) -> dict:
    """diffusers adapter metadata for modules of these ranks at scale 1 (lora_alpha = r for each module)."""
    from peft import LoraConfig

    r = Counter(ranks.values()).most_common(1)[0][0]
    other = {name: rank for name, rank in ranks.items() if rank != r}
    config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=dict(other),
                        alpha_pattern=dict(other))
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}


def write_lora(modules: dict, out: str | os.PathLike, metadata: dict[str, str] | None = None,
               sdxl: bool = False) -> Path:
    """Write plain-LoRA ``modules`` to ``out`` in sdtune's diffusers layout, atomically (temporary name, renamed)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sdtune.imageio import atomic_path
    from sdtune.training.adapters import diffusers_layout_text_encoder, diffusers_layout_unet

    out = Path(out)
    if out.suffix != ".safetensors":
        raise SdtuneError(f"--out {out} must end in .safetensors")
    peft: dict = {}
    ranks: dict = {}
    for (part, name), m in modules.items():
        if m.kind != "lora":
            raise SdtuneError(f"internal: {name} is {m.kind}, not a plain LoRA")
        peft.setdefault(part, {})[f"{name}.lora_A.weight"] = m.down.float().contiguous()
        peft[part][f"{name}.lora_B.weight"] = (m.up.float() * m.scale).contiguous()
        ranks.setdefault(part, {})[name] = m.rank
    if not peft:
        raise SdtuneError("the result has no layers; nothing to write")
    kwargs = dict(unet_lora_layers=diffusers_layout_unet(peft["unet"]) if "unet" in peft else None,
                  text_encoder_lora_layers=diffusers_layout_text_encoder(peft["text_encoder"])
                  if "text_encoder" in peft else None)
    kwargs["unet_lora_adapter_metadata"] = _peft_metadata(ranks["unet"]) if "unet" in peft else None
    kwargs["text_encoder_lora_adapter_metadata"] = (_peft_metadata(ranks["text_encoder"])
                                                    if "text_encoder" in peft else None)
    sdxl = sdxl or "text_encoder_2" in peft
    if sdxl:
        kwargs["text_encoder_2_lora_layers"] = (diffusers_layout_text_encoder(peft["text_encoder_2"])
                                                if "text_encoder_2" in peft else None)
        kwargs["text_encoder_2_lora_adapter_metadata"] = (_peft_metadata(ranks["text_encoder_2"])
                                                          if "text_encoder_2" in peft else None)
    writer = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".lora-tool-", dir=out.parent))
    try:
        writer.save_lora_weights(scratch, safe_serialization=True, **kwargs)
        # diffusers' writer takes no extra metadata: add ours to what it wrote
        with safe_open(str(scratch / "pytorch_lora_weights.safetensors"), framework="pt") as f:
            meta = {**(f.metadata() or {}), **(metadata or {})}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def write_kohya(modules: dict, out: str | os.PathLike, metadata: dict[str, str] | None = None,
                unet_config=None, sdxl: bool = False) -> Path:
    """Write plain-LoRA ``modules`` to ``out`` in kohya/A1111's layout (``adapters.kohya_state_dict``), atomically.

    kohya's writer gives every module one alpha A; a module of rank r then applies up @ down * A / r, so each up
    is stored times r / A and the delta stays the one computed. A = the most common rank (scale 1 for most).
    SDXL: kohya names the UNet's blocks as the original UNet does, which needs ``unet_config``."""
    from safetensors.torch import save_file

    from sdtune.imageio import atomic_path
    from sdtune.training.adapters import kohya_state_dict

    out = Path(out)
    if out.suffix != ".safetensors":
        raise SdtuneError(f"--out {out} must end in .safetensors")
    sdxl = sdxl or any(part == "text_encoder_2" for part, _ in modules)
    if sdxl and unet_config is None:
        raise SdtuneError("kohya's SDXL layout names UNet blocks as the original UNet does; pass --model with the "
                          "SDXL base's diffusers folder (or write --format diffusers)")
    alpha = float(Counter(m.rank for m in modules.values()).most_common(1)[0][0]) if modules else 1.0
    peft: dict = {part: {} for part in ("unet", "text_encoder", "text_encoder_2")}
    for (part, name), m in modules.items():
        peft[part][f"{name}.lora_A.weight"] = m.down.float().contiguous()
        peft[part][f"{name}.lora_B.weight"] = (m.up.float() * (m.scale * m.rank / alpha)).contiguous()
    tensors = kohya_state_dict(peft["unet"], peft["text_encoder"] or None, alpha, te2_sd=peft["text_encoder_2"] or None,
                               unet_config=unet_config if sdxl else None)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(int(alpha)), "ss_network_alpha": str(alpha),
            **(metadata or {})}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return out


def write(modules: dict, out, metadata=None, *, fmt: str = "diffusers", sdxl: bool = False, unet_config=None) -> Path:
    """Write in sdtune's diffusers layout (``fmt`` "diffusers") or kohya's ("kohya")."""
    if fmt == "kohya":
        return write_kohya(modules, out, metadata, unet_config=unet_config, sdxl=sdxl)
    return write_lora(modules, out, metadata, sdxl=sdxl)


def tool_metadata(tool: str, **fields) -> dict[str, str]:
    return {TOOL_METADATA_KEY: json.dumps({"tool": tool, **fields}, sort_keys=True, default=str)}


def carried_metadata(sets: list[LoraSet]) -> dict[str, str]:
    """What an output keeps from its inputs: the base model when they agree on one."""
    bases = {s.metadata.get("sdtune_base_model") for s in sets}
    return {"sdtune_base_model": bases.pop()} if len(bases) == 1 and None not in bases else {}
