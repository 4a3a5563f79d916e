"""Adapters for training (LoRA, DoRA, LoHa, LoKr, OFT): attach with peft, save in the files each tool reads.

LoRA is described first; the other kinds (``adapter_config``, ``save_lora_files``) reuse its parts: a DoRA writes the
diffusers file in peft's keys and kohya's file with ``dora_scale``, a LoHa / LoKr peft's own file plus the LyCORIS
layout (``sdtune.models.lycoris``), an OFT peft's file only.

* UNet: LoRA on the attention projections ``to_q, to_k, to_v, to_out.0`` (self- and cross-attention),
  through diffusers' peft integration (``unet.add_adapter``), so the UNet stays a stock
  ``UNet2DConditionModel`` a pipeline can sample with during training.
* Text encoder (when asked): ``q_proj, k_proj, v_proj, out_proj`` via ``peft.inject_adapter_in_model``.
  (transformers' own ``add_adapter`` wants peft >= 0.22; sdtune pins 0.21, and in-place injection
  keeps the encoder a stock ``CLIPTextModel`` too.)

Saving writes two files, each under a temporary name and renamed:

* ``pytorch_lora_weights.safetensors``, written with diffusers' own writer (adapter metadata, the training config
  added to the file's metadata) in the one key layout that stock diffusers (``pipe.load_lora_weights(folder)``, SD
  and SDXL pipelines) and ComfyUI's LoRA loader both read completely (``diffusers_layout_*``): UNet attention
  projections under their attention-processor names (``unet.<block>.attn1.processor.to_q_lora.down.weight``,
  ``...processor.to_out_lora.up.weight``), the UNet's other targets as ``unet.<module>.lora.down.weight``, text
  encoders rooted at ``text_model.`` (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer
  .down.weight``: transformers 4.x's module path; diffusers drops the root for transformers 5's flattened CLIP).
  The file has no ``.alpha`` keys (diffusers refuses keys without "lora" in them): alpha / rank is folded into the
  up weights and the adapter metadata says ``lora_alpha = r``, so every reader applies the trained delta exactly.
* ``lora_kohya.safetensors``: kohya/A1111 keys (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``, ``lora_te_text_model_<module>...``), for AUTOMATIC1111, Forge and kohya's tools (ComfyUI and
  diffusers read it too).

SDXL (``text_encoder_2`` given): the diffusers file through ``StableDiffusionXLPipeline.save_lora_weights``
(``unet.``, ``text_encoder.``, ``text_encoder_2.`` keys, read by stock SDXL ``load_lora_weights``); the kohya
file in kohya's SDXL layout: ``lora_te1_``/``lora_te2_`` for the two text encoders and UNet modules named as
in the original (SGM) UNet, ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, which diffusers'
kohya conversion maps back with the UNet's config.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from sdtune.errors import SdtuneError
from sdtune.imageio import atomic_path

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# lora_targets "all": also the transformer blocks' feed-forward layers and the ResNet blocks' convolutions
# (kohya's LoCon reaches the same convolutions). Not proj_in/proj_out: given a file that also held those,
# stock diffusers' load_lora_weights dropped the attention LoRAs (measured, diffusers 0.42). The cause was the
# file's mixed key formats: diffusers converts old-style UNet names only when the first key is not peft's lora_A,
# so the export now has no peft-form key at all (see diffusers_layout_unet); the targets are left as the demo was
# measured with.
UNET_TARGETS_ALL = UNET_TARGETS + ["ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"  # must not end in LORA_FILE: diffusers would pick it by name
CONFIG_METADATA_KEY = "sdtune_config"


def adapter_config(cfg, targets: list[str]):
    """The peft config of the run's ``adapter`` (``cfg``: a TrainConfig) on ``targets``; each starts as a no-op.

    lora and dora are peft's ``LoraConfig`` (dora: ``use_dora``, a learned magnitude per output); loha, lokr and oft
    peft's ports of LyCORIS' Hadamard and Kronecker products and of orthogonal fine-tuning."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig

    kind, rank = cfg.adapter, cfg.lora_rank
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else rank
    targets = list(targets)
    if kind in ("lora", "dora"):
        # Gaussian A, zero B: the adapter starts as an exact no-op, like the diffusers training scripts.
        return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets,
                          lora_dropout=cfg.lora_dropout, use_dora=kind == "dora")
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout,
                          target_modules=targets)
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout,
                          decompose_both=cfg.lokr_decompose_both, decompose_factor=cfg.lokr_factor,
                          target_modules=targets)
    if kind == "oft":
        return OFTConfig(r=0, oft_block_size=cfg.oft_block_size, module_dropout=cfg.module_dropout, coft=cfg.oft_coft,
                         eps=cfg.oft_eps, target_modules=targets)
    raise SdtuneError(f"adapter must be one of lora, loha, lokr, dora, oft; got {kind!r}")


def kind_of_config(config) -> str:
    """lora, dora, loha, lokr or oft: which adapter a peft config builds."""
    name = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    if name == "lora":
        return "dora" if getattr(config, "use_dora", False) else "lora"
    return name


def _inject(attach, config, what: str) -> None:
    """peft's injection, its size complaints (an OFT block that does not divide a layer) as one line."""
    try:
        attach(config)
    except ValueError as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (oft_block_size must divide every targeted layer's input size)" if kind_of_config(config) == "oft" \
            else ""
        raise SdtuneError(f"the {kind_of_config(config)} adapter does not fit the {what}: {text}{hint}") from None


def check_oft_blocks(model, targets: list[str], block: int, what: str) -> None:
    """Each targeted layer's input size (a convolution's: channels x kernel area) is a multiple of ``block``;
    peft would otherwise pick another block size with only a warning."""
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            size = module.in_features
        elif isinstance(module, torch.nn.Conv2d):
            size = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        else:
            continue
        if size % block:
            raise SdtuneError(f"oft_block_size {block} does not divide the {what}'s layer {name} ({size} inputs); "
                              "oft_block_size must divide every targeted layer's input size (e.g. 4, 8 or 16)")


def add_unet_adapter(unet, cfg) -> None:
    """Attach the run's trainable adapter (``cfg.adapter``) to the UNet's attention projections, or with
    ``lora_targets: all`` also to its feed-forward layers, ResNet convolutions and time projections (all other
    weights frozen)."""
    unet.requires_grad_(False)
    targets = UNET_TARGETS_ALL if cfg.lora_targets == "all" else UNET_TARGETS
    if cfg.adapter == "oft":
        check_oft_blocks(unet, targets, cfg.oft_block_size, "UNet")
    _inject(unet.add_adapter, adapter_config(cfg, targets), "UNet")


def add_text_encoder_adapter(text_encoder, cfg) -> None:
    """Attach the run's adapter to the text encoder's attention projections, in place."""
    from peft import inject_adapter_in_model

    text_encoder.requires_grad_(False)
    if cfg.adapter == "oft":
        check_oft_blocks(text_encoder, TEXT_ENCODER_TARGETS, cfg.oft_block_size, "text encoder")
    config = adapter_config(cfg, TEXT_ENCODER_TARGETS)
    _inject(lambda c: inject_adapter_in_model(c, text_encoder), config, "text encoder")
    text_encoder._sdtune_lora_config = config  # read back when saving (no peft_config on the model)


def plain_lora(rank: int, alpha: float | None, targets: str = "attention"):
    """The settings ``add_unet_adapter`` reads, for a plain LoRA built in code (tests, benchmarks, the UI)."""
    from types import SimpleNamespace

    return SimpleNamespace(adapter="lora", lora_rank=rank, lora_alpha=alpha, lora_dropout=0.0, lora_targets=targets)


def add_unet_lora(unet, rank: int, alpha: float | None, targets: str = "attention") -> None:
    """A plain LoRA on the UNet (``add_unet_adapter`` with adapter: lora)."""
    add_unet_adapter(unet, plain_lora(rank, alpha, targets))


def add_text_encoder_lora(text_encoder, rank: int, alpha: float | None) -> None:
    """A plain LoRA on the text encoder, in place."""
    add_text_encoder_adapter(text_encoder, plain_lora(rank, alpha))


def trainable_parameters(module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def unet_lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """peft-format keys ``<module>.lora_A.weight`` / ``lora_B.weight`` of the UNet adapter."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def text_encoder_lora_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """The same key format for the text encoder (its adapter was injected without a peft_config)."""
    out = {}
    for name, value in text_encoder.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name:
            out[name.replace(".default.", ".")] = value.detach().float().cpu().contiguous()
    return out


def _adapter_metadata(config, folded: bool = False) -> dict:
    """The peft config as diffusers' adapter metadata; ``folded``: alpha / rank is in the up weights (scale 1)."""
    data = config.to_dict()
    if folded:
        data["lora_alpha"] = data["r"]
        data["alpha_pattern"] = {}
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}


def _scale(config) -> float:
    return float(config.lora_alpha) / float(config.r)


ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v")


def diffusers_layout_unet(unet_sd: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """peft UNet keys -> the names both diffusers and ComfyUI read (no ``unet.`` prefix; the writer adds it).

    ComfyUI maps a diffusers UNet LoRA by module name with ``.to_q`` read as ``.processor.to_q`` and ``to_out.0`` as
    ``processor.to_out`` (the attention-processor names of diffusers' old LoRA files); diffusers converts exactly
    those names back (``.processor.`` dropped, ``to_q_lora.down`` -> ``to_q.lora_A``, ``to_out_lora`` ->
    ``to_out.0``, ``.lora.down`` -> ``.lora_A``) - but only when the first UNet key is not in peft's form, so no
    key here says ``lora_A``. ``scale`` (alpha / rank) is folded into the up weights."""
    out = {}
    for key, value in unet_sd.items():
        module, _, kind = key.rpartition(".lora_")  # "<module>", "A.weight" | "B.weight"
        down = kind.startswith("A")
        head, _, leaf = module.rpartition(".")
        if module.endswith(".to_out.0"):
            name = module[: -len(".to_out.0")] + ".processor.to_out_lora"
        elif leaf in ATTENTION_PROJECTIONS:
            name = f"{head}.processor.{leaf}_lora"
        else:  # feed-forward layers, ResNet convolutions, time projections
            name = module + ".lora"
        value = value if down else value * scale
        out[f"{name}.{'down' if down else 'up'}.weight"] = value.contiguous()
    return out


def diffusers_layout_text_encoder(te_sd: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """peft text-encoder keys -> ``text_model.encoder.layers.N.<proj>.lora_linear_layer.down/up.weight`` (no
    ``text_encoder.`` prefix): CLIP's module path as transformers 4.x names it, which ComfyUI maps; transformers 5
    flattens CLIPTextModel (no ``text_model``) and diffusers' loader drops the root then. ``scale`` as above."""
    out = {}
    for key, value in te_sd.items():
        module, _, kind = key.rpartition(".lora_")
        down = kind.startswith("A")
        if not module.startswith("text_model."):
            module = "text_model." + module
        value = value if down else value * scale
        out[f"{module}.lora_linear_layer.{'down' if down else 'up'}.weight"] = value.contiguous()
    return out


def _te_layers(text_encoder):
    """(diffusers-layout LoRA layers, adapter metadata) of a text encoder, or (None, None) without a LoRA."""
    config = getattr(text_encoder, "_sdtune_lora_config", None) if text_encoder is not None else None
    if config is None:
        return None, None
    return (diffusers_layout_text_encoder(text_encoder_lora_state_dict(text_encoder), _scale(config)),
            _adapter_metadata(config, folded=True))


def save_diffusers_lora(output_dir: str | os.PathLike, unet, text_encoder=None,
                        extra_metadata: dict[str, str] | None = None, text_encoder_2=None,
                        sdxl: bool = False, layers: dict | None = None) -> Path:
    """Write ``output_dir/pytorch_lora_weights.safetensors`` atomically, in the layout diffusers and ComfyUI both
    load (see the module docstring).

    ``sdxl``: SDXL's writer, with ``text_encoder_2`` (SDXL's second encoder) when it has a LoRA. ``layers``:
    {component: (tensors, adapter metadata)} to write instead of the modules' LoRA in that layout (a DoRA's)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if layers is None:
        unet_config = unet.peft_config["default"]
        layers = {"unet": (diffusers_layout_unet(unet_lora_state_dict(unet), _scale(unet_config)),
                           _adapter_metadata(unet_config, folded=True)),
                  "text_encoder": _te_layers(text_encoder), "text_encoder_2": _te_layers(text_encoder_2)}
    none = (None, None)
    te_layers, te_meta = layers.get("text_encoder", none)
    scratch = Path(tempfile.mkdtemp(prefix=".lora-", dir=output_dir))
    try:
        extra = {}
        if sdxl:
            te2_layers, te2_meta = layers.get("text_encoder_2", none)
            extra = dict(text_encoder_2_lora_layers=te2_layers, text_encoder_2_lora_adapter_metadata=te2_meta)
        writer = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        writer.save_lora_weights(
            scratch, unet_lora_layers=layers["unet"][0], text_encoder_lora_layers=te_layers,
            unet_lora_adapter_metadata=layers["unet"][1], text_encoder_lora_adapter_metadata=te_meta,
            safe_serialization=True, **extra)
        written = scratch / LORA_FILE
        # diffusers' writer takes no extra metadata: add ours to what it wrote and write the final file.
        with safe_open(str(written), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata.update(extra_metadata or {})
        final = output_dir / LORA_FILE
        with atomic_path(final) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def sgm_module_name(module: str, unet_config) -> str:
    """A diffusers UNet module path in the original (SGM/LDM) UNet's names, as kohya's SDXL LoRAs use:
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``."""
    from sdtune.models.convert import unet_to_ldm

    (name,) = unet_to_ldm({module + ".weight": None}, unet_config)
    return name.removesuffix(".weight")


def kohya_state_dict(unet_sd: dict[str, torch.Tensor], te_sd: dict[str, torch.Tensor] | None,
                     alpha: float, te2_sd: dict[str, torch.Tensor] | None = None,
                     unet_config=None) -> dict[str, torch.Tensor]:
    """peft-format LoRA state dicts -> kohya/A1111 keys.

    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` becomes
    ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight``; text encoder
    modules get ``lora_te_`` and the ``text_model.`` root of the original CLIP layout that A1111 expects.
    Each module also gets an ``.alpha`` scalar (effective scale = alpha / rank).
    SDXL (``unet_config`` given): kohya's SDXL layout - UNet modules in the original UNet's names
    (``sgm_module_name``), text encoders as ``lora_te1_`` and ``lora_te2_`` (``te2_sd``).
    """
    out: dict[str, torch.Tensor] = {}
    sdxl = unet_config is not None

    def convert(sd, prefix, root="", sgm=False):
        for key, value in sd.items():
            module, _, kind = key.rpartition(".lora_")  # "<module>", "A.weight" | "B.weight"
            if sgm:
                module = sgm_module_name(module, unet_config)
            if root and not module.startswith(root):
                module = root + module
            name = prefix + module.replace(".", "_")
            out[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))

    convert(unet_sd, "lora_unet_", sgm=sdxl)
    if te_sd:
        convert(te_sd, "lora_te1_" if sdxl else "lora_te_", root="text_model.")
    if te2_sd:
        convert(te2_sd, "lora_te2_", root="text_model.")
    return out


def save_kohya_lora(path: str | os.PathLike, unet, text_encoder=None, *, rank: int, alpha: float,
                    extra_metadata: dict[str, str] | None = None, text_encoder_2=None, sdxl: bool = False) -> Path:
    """Write the kohya/A1111 export of the adapters to ``path`` atomically (``sdxl``: kohya's SDXL layout)."""
    from safetensors.torch import save_file

    def te_state(te):
        if te is not None and getattr(te, "_sdtune_lora_config", None) is not None:
            return text_encoder_lora_state_dict(te)
        return None

    tensors = kohya_state_dict(unet_lora_state_dict(unet), te_state(text_encoder), alpha,
                               te2_sd=te_state(text_encoder_2) if sdxl else None,
                               unet_config=unet.config if sdxl else None)
    # kohya's own "ss_" keys, which A1111/ComfyUI show in their LoRA info panels.
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha), **(extra_metadata or {})}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def config_metadata(config_dict: dict) -> dict[str, str]:
    """The training config as a safetensors metadata entry (string values only)."""
    return {CONFIG_METADATA_KEY: json.dumps(config_dict, sort_keys=True, default=str)}


@contextlib.contextmanager
def disabled(*modules):
    """Inside, every peft adapter of ``modules`` (None ones skipped) is switched off, so they compute the base model's
    outputs; on leaving, each is back on with the ``requires_grad`` it had.

    peft's switch also clears the adapters' ``requires_grad`` (and marks them trainable when switched back on); use it
    before the step's own forward pass, not between that pass and its backward."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules if module is not None for m in module.modules() if isinstance(m, BaseTunerLayer)]
    grads = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in grads.items():
            p.requires_grad_(flag)


def save_lora_files(output_dir: str | os.PathLike, unet, text_encoder=None, text_encoder_2=None, *, rank: int,
                    alpha: float, metadata: dict[str, str], sdxl: bool = False) -> list[str]:
    """Every adapter file a run writes into ``output_dir`` (each atomically); returns their names.

    lora: the diffusers file and kohya's. dora: the diffusers file in peft's keys (stock ``load_lora_weights`` reads
    the magnitude) and kohya's with ``dora_scale``. loha, lokr: peft's own keys (``ADAPTER_FILE``, which sdtune
    loads exactly) and the LyCORIS layout (``LYCORIS_FILE``, ComfyUI / A1111 / kohya). oft: peft's keys only.
    ``text_encoder`` / ``text_encoder_2``: pass them only when they carry an adapter."""
    kind = kind_of_config(unet.peft_config["default"])
    if kind == "lora":
        save_diffusers_lora(output_dir, unet, text_encoder, metadata, text_encoder_2=text_encoder_2, sdxl=sdxl)
        save_kohya_lora(Path(output_dir) / KOHYA_FILE, unet, text_encoder, rank=rank, alpha=alpha,
                        extra_metadata=metadata, text_encoder_2=text_encoder_2, sdxl=sdxl)
        return [LORA_FILE, KOHYA_FILE]
    components = _components(unet, text_encoder, text_encoder_2)
    if kind == "dora":
        save_dora_files(output_dir, components, metadata, sdxl=sdxl)
        return [LORA_FILE, KOHYA_FILE]
    files = [save_peft_file(Path(output_dir) / ADAPTER_FILE, components, metadata).name]
    if kind in ("loha", "lokr"):
        files.append(save_lycoris_file(Path(output_dir) / LYCORIS_FILE, components, kind, metadata, sdxl=sdxl).name)
    return files


# --------------------------------------------------------------------------- adapters other than plain LoRA

ADAPTER_FILE = "adapter_model.safetensors"  # peft's own keys, prefixed unet. / text_encoder. / text_encoder_2.
LYCORIS_FILE = "lycoris.safetensors"  # LoHa / LoKr under kohya's module names (sdtune.models.lycoris)
ADAPTER_METADATA_KEY = "sdtune_adapter"  # JSON {component: peft config}, so a loader rebuilds the exact layers
ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_magnitude_vector", "hada_", "lokr_", "oft_R")


def _components(unet, text_encoder, text_encoder_2) -> dict:
    """{"unet": (module, peft config), "text_encoder": ..., "text_encoder_2": ...} of the modules with an adapter."""
    out = {"unet": (unet, unet.peft_config["default"])}
    for name, te in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if te is not None and getattr(te, "_sdtune_lora_config", None) is not None:
            out[name] = (te, te._sdtune_lora_config)
    return out


def adapter_state_dict(module) -> dict[str, torch.Tensor]:
    """An adapter's tensors in peft's saved form (no adapter name: ``<module>.hada_w1_a``,
    ``<module>.lora_magnitude_vector``, ``<module>.oft_R.weight``), fp32 on the CPU, for any adapter kind; works on
    modules injected without a ``peft_config`` (the text encoders)."""
    out = {}
    for name, value in module.state_dict().items():
        if not any(f".{t}" in name for t in ADAPTER_TENSORS):
            continue
        name = name.replace(".default", "")
        if name.endswith(".lora_magnitude_vector.weight"):
            name = name.removesuffix(".weight")
        out[name] = value.detach().float().cpu().contiguous()
    return out


def config_json(config) -> dict:
    """A peft config as plain JSON (sets as sorted lists, enums as their names)."""
    data = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else getattr(v, "value", v)) for k, v in data.items()}


def save_peft_file(path: Path, components: dict, metadata: dict[str, str]) -> Path:
    """peft's keys of every component in one safetensors file, with their configs in its metadata."""
    from safetensors.torch import save_file

    tensors, configs = {}, {}
    for name, (module, config) in components.items():
        tensors.update({f"{name}.{k}": v for k, v in adapter_state_dict(module).items()})
        configs[name] = config_json(config)
    meta = {ADAPTER_METADATA_KEY: json.dumps(configs, sort_keys=True), **metadata}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def _kohya_namer(name: str, module, sdxl: bool):
    from sdtune.models.lycoris import kohya_name

    prefix = "lora_te1_" if sdxl and name == "text_encoder" else KOHYA_PREFIX[name]
    root = "" if name == "unet" else "text_model."
    sgm = module.config if sdxl and name == "unet" else None
    return lambda path: kohya_name(path, prefix, root, sgm)


def save_lycoris_file(path: Path, components: dict, kind: str, metadata: dict[str, str], sdxl: bool = False) -> Path:
    """The LoHa / LoKr in LyCORIS' layout under kohya's names, the scale folded in (``sdtune.models.lycoris``)."""
    from safetensors.torch import save_file

    from sdtune.models.lycoris import to_lycoris

    tensors = {}
    for name, (module, config) in components.items():
        scale = float(config.alpha) / float(config.r)
        tensors.update(to_lycoris(adapter_state_dict(module), kind, scale, _kohya_namer(name, module, sdxl)))
    algo = {"loha": "loha", "lokr": "lokr"}[kind]
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": algo}), **metadata}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def save_dora_files(output_dir: str | os.PathLike, components: dict, metadata: dict[str, str],
                    sdxl: bool = False) -> None:
    """A DoRA: the diffusers file in peft's keys with its config (stock ``load_lora_weights`` builds DoRA layers
    from it), and kohya's file with each module's magnitude as ``dora_scale`` (out, 1), as LyCORIS writes it."""
    from safetensors.torch import save_file

    from sdtune.models.lycoris import dora_scale

    layers, kohya = {}, {}
    for name, (module, config) in components.items():
        sd = adapter_state_dict(module)
        layers[name] = (sd, config_json(config))
        namer, scale = _kohya_namer(name, module, sdxl), _scale(config)
        for key, value in sd.items():
            path, _, kind = key.rpartition(".")
            if kind == "lora_magnitude_vector":
                weight = module.get_submodule(path).get_base_layer().weight
                kohya[f"{namer(path)}.dora_scale"] = dora_scale(value, weight)
                continue
            path, _, kind = key.rpartition(".lora_")
            down = kind.startswith("A")
            kohya[f"{namer(path)}.{'lora_down' if down else 'lora_up'}.weight"] = value if down else value * scale
            kohya[f"{namer(path)}.alpha"] = torch.tensor(float(value.shape[0] if down else value.shape[1]))
    save_diffusers_lora(output_dir, components["unet"][0], extra_metadata=metadata, sdxl=sdxl, layers=layers)
    kohya_meta = {"ss_network_module": "networks.lora", "ss_network_args": json.dumps({"dora_wd": True}), **metadata}
    with atomic_path(Path(output_dir) / KOHYA_FILE) as tmp:
        save_file(kohya, str(tmp), metadata=kohya_meta)
