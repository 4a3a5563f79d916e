"""LoRA adapters for training: attach with peft, save as diffusers and as kohya/A1111 files.

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


def lora_config(rank: int, alpha: float | None, targets: list[str]):
    from peft import LoraConfig

    # Gaussian A, zero B: the adapter starts as an exact no-op, like the diffusers training scripts.
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                      target_modules=list(targets))


def add_unet_lora(unet, rank: int, alpha: float | None, targets: str = "attention") -> None:
    """Attach a trainable LoRA to the UNet's attention projections, or with ``targets="all"`` also to its
    feed-forward layers, ResNet convolutions and time projections (all other weights frozen)."""
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank, alpha, UNET_TARGETS_ALL if targets == "all" else UNET_TARGETS))


def add_text_encoder_lora(text_encoder, rank: int, alpha: float | None) -> None:
    """Attach a trainable LoRA to the text encoder's attention projections, in place."""
    from peft import inject_adapter_in_model

    text_encoder.requires_grad_(False)
    config = lora_config(rank, alpha, TEXT_ENCODER_TARGETS)
    inject_adapter_in_model(config, text_encoder)
    text_encoder._sdtune_lora_config = config  # read back when saving (no peft_config on the model)


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
                        sdxl: bool = False) -> Path:
    """Write ``output_dir/pytorch_lora_weights.safetensors`` atomically, in the layout diffusers and ComfyUI both
    load (see the module docstring).

    ``sdxl``: SDXL's writer, with ``text_encoder_2`` (SDXL's second encoder) when it has a LoRA."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    te_layers, te_meta = _te_layers(text_encoder)
    scratch = Path(tempfile.mkdtemp(prefix=".lora-", dir=output_dir))
    try:
        extra = {}
        if sdxl:
            te2_layers, te2_meta = _te_layers(text_encoder_2)
            extra = dict(text_encoder_2_lora_layers=te2_layers, text_encoder_2_lora_adapter_metadata=te2_meta)
        writer = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        unet_config = unet.peft_config["default"]
        writer.save_lora_weights(
            scratch, unet_lora_layers=diffusers_layout_unet(unet_lora_state_dict(unet), _scale(unet_config)),
            text_encoder_lora_layers=te_layers,
            unet_lora_adapter_metadata=_adapter_metadata(unet_config, folded=True),
            text_encoder_lora_adapter_metadata=te_meta, safe_serialization=True, **extra)
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
    """Every LoRA file a run writes into ``output_dir`` (each atomically); returns their names.

    ``text_encoder`` / ``text_encoder_2``: pass them only when they carry a LoRA."""
    save_diffusers_lora(output_dir, unet, text_encoder, metadata, text_encoder_2=text_encoder_2, sdxl=sdxl)
    save_kohya_lora(Path(output_dir) / KOHYA_FILE, unet, text_encoder, rank=rank, alpha=alpha,
                    extra_metadata=metadata, text_encoder_2=text_encoder_2, sdxl=sdxl)
    return [LORA_FILE, KOHYA_FILE]
