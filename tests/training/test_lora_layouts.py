"""Every LoRA file sdtune writes loads completely in ComfyUI and in stock diffusers, as the weights trained.

ComfyUI cannot run here, so its expectation is kept in code: ``comfy_unet_key_map``, ``comfy_clip_key_map`` and
``comfy_load`` below restate, small, the rules ComfyUI's own loader applies (read from its source, each function
names the ComfyUI function it mirrors). ComfyUI logs "lora key not loaded" for every file key those maps do not
reach, and applies ``up @ down * alpha / rank`` (scale 1 when the file has no ``.alpha``) to the weight a key maps to.

For SD 1.x and SDXL tiny models, ``lora_targets`` attention and all, with and without the text encoders, alpha !=
rank: every key of every file ``save_lora_files`` writes must map to a module (none left unloaded), every trained
module must be reached, and the delta each reader applies must be the trained one; stock diffusers must load the
diffusers file without an unexpected-key warning, to the same fused weights as the trained adapters.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.training import adapters

RANK, ALPHA = 4, 8.0  # alpha != rank: a reader that drops alpha applies half the trained delta
CASES = [(family, targets, te) for family in ("sd1", "sdxl") for targets in ("attention", "all")
         for te in (False, True)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ---- ComfyUI's LoRA key maps, restated ----------------------------------------------------------------------------

# comfy/utils.py, UNET_MAP_RESNET: a diffusers ResNet layer -> its name in the original (LDM) UNet's ResBlock.
RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
          "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
# comfy/utils.py, UNET_MAP_ATTENTIONS + TRANSFORMER_BLOCKS: the layers of a transformer (attention) block it maps.
ATTENTION = re.compile(r"proj_in|proj_out|norm|transformer_blocks\.\d+\.(norm[123]|attn[12]\.to_(q|k|v|out\.0)"
                       r"|ff\.net\.0\.proj|ff\.net\.2)")
# comfy/utils.py, UNET_MAP_BASIC: the layers outside the blocks.
BASIC = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
         "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# comfy/lora.py, LORA_CLIP_MAP: the CLIP layers its text-encoder maps name.
CLIP_LAYERS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")


def ldm_name(unet, name: str) -> str | None:
    """The original-UNet name of diffusers UNet layer ``name``, or None where ComfyUI has none.

    Mirrors comfy/utils.py ``unet_to_diffusers``: input block n = 1 + (layers_per_block + 1) * block + i with the
    ResNet at ``.0`` and the transformer at ``.1``; the downsampler closes a block at ``.0.op``; the middle block is
    ResNet, transformer, ResNet; output block n = (layers_per_block + 1) * block + i (one more ResNet per up block),
    the upsampler after the block's last ResNet (and transformer, if it has one)."""
    per_block = unet.config.layers_per_block
    assert isinstance(per_block, int)
    if name in BASIC:
        return BASIC[name]
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        side, block, kind, i, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        n = 1 + (per_block + 1) * block + i if side == "down" else (per_block + 1) * block + i
        where = "input_blocks" if side == "down" else "output_blocks"
        if kind == "resnets":
            return f"{where}.{n}.0.{RESNET[rest]}" if rest in RESNET else None
        return f"{where}.{n}.1.{rest}" if ATTENTION.fullmatch(rest) else None
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name)
    if m:
        return f"input_blocks.{(per_block + 1) * (int(m[1]) + 1)}.0.op"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name)
    if m:
        block = int(m[1])
        at = 2 if hasattr(unet.up_blocks[block], "attentions") else 1
        return f"output_blocks.{(per_block + 1) * block + per_block}.{at}.conv"
    m = re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", name)
    if m:
        return f"middle_block.{2 * int(m[1])}.{RESNET[m[2]]}" if m[2] in RESNET else None
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name)
    if m:
        return f"middle_block.1.{m[1]}" if ATTENTION.fullmatch(m[1]) else None
    return None


def comfy_unet_key_map(unet) -> dict[str, tuple[str, str]]:
    """LoRA module name -> ("unet", diffusers layer). Mirrors comfy/lora.py ``model_lora_keys_unet`` for SD/SDXL:
    kohya names of the original UNet (``lora_unet_input_blocks_1_1_...``) and the bare ``diffusion_model.*`` names;
    kohya names of the diffusers UNet (``lora_unet_down_blocks_0_...``) and SimpleTuner's ``lycoris_``; diffusers
    names with or without ``unet.``, in which ``.to_q`` reads ``.processor.to_q`` and ``to_out.0`` reads
    ``processor.to_out`` (diffusers' old attention-processor LoRA names: a peft ``...attn1.to_q.lora_A`` key maps
    to nothing)."""
    key_map = {}
    for name, module in unet.named_modules():
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        ldm = ldm_name(unet, name)
        if ldm is None:
            continue
        target = ("unet", name)
        key_map["lora_unet_" + ldm.replace(".", "_")] = target
        key_map["diffusion_model." + ldm] = target
        key_map["lora_unet_" + name.replace(".", "_")] = target
        key_map["lycoris_" + name.replace(".", "_")] = target
        diffusers_name = name.replace(".to_", ".processor.to_")
        if diffusers_name.endswith(".to_out.0"):
            diffusers_name = diffusers_name[: -len(".0")]
        key_map[diffusers_name] = target
        key_map["unet." + diffusers_name] = target
    return key_map


def clip_layer(text_encoder, b: int, layer: str) -> str | None:
    """The module path of CLIP layer ``b``'s ``layer`` in a transformers model: ``encoder.layers...`` in
    transformers 5 (flattened), ``text_model.encoder.layers...`` in 4.x."""
    for path in (f"encoder.layers.{b}.{layer}", f"text_model.encoder.layers.{b}.{layer}"):
        try:
            text_encoder.get_submodule(path)
            return path
        except AttributeError:
            continue
    return None


def comfy_clip_key_map(text_encoder, text_encoder_2=None) -> dict[str, tuple[str, str]]:
    """LoRA module name -> (encoder, module path). Mirrors comfy/lora.py ``model_lora_keys_clip`` for SD 1.x
    (``clip_l``) and SDXL (``clip_l`` + ``clip_g``): ComfyUI's own CLIP always has the ``text_model.`` root, so
    the diffusers names it maps are ``text_encoder.text_model.encoder.layers.N.<layer>`` (and
    ``text_encoder_2.text_model...`` for SDXL's second encoder); kohya's are ``lora_te_``/``lora_te1_`` and, SDXL,
    ``lora_te2_``."""
    key_map = {}
    for b in range(32):
        for layer in CLIP_LAYERS:
            kohya = f"text_model_encoder_layers_{b}_{layer.replace('.', '_')}"
            path = clip_layer(text_encoder, b, layer)
            if path is not None:
                target = ("text_encoder", path)
                key_map["lora_te_" + kohya] = target
                key_map["lora_te1_" + kohya] = target
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{layer}"] = target
            path = clip_layer(text_encoder_2, b, layer) if text_encoder_2 is not None else None
            if path is not None:
                target = ("text_encoder_2", path)
                key_map["lora_te2_" + kohya] = target
                key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{layer}"] = target
    return key_map


# comfy/weight_adapter/lora.py ``LoRAAdapter.load``: the (up, down) key pairs of a plain LoRA, in its order.
LORA_FORMS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
              (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
              (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"))


def comfy_load(lora: dict[str, torch.Tensor], key_map: dict, models: dict) -> tuple[dict, list[str]]:
    """(weight deltas by (model, module), file keys left unloaded). Mirrors comfy/lora.py ``load_lora`` (each
    mapped name's ``.alpha`` and LoRA pair) and ``LoRAAdapter.calculate_weight``: up @ down, times alpha / rank
    when the file has an alpha, reshaped to the weight."""
    deltas, loaded = {}, set()
    for x, (model, path) in key_map.items():
        alpha = lora.get(f"{x}.alpha")
        if alpha is not None:
            loaded.add(f"{x}.alpha")
        for up_suffix, down_suffix in LORA_FORMS:
            if x + up_suffix in lora:
                up, down = lora[x + up_suffix].float(), lora[x + down_suffix].float()
                weight = models[model].get_submodule(path).weight
                scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
                deltas[(model, path)] = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale
                loaded |= {x + up_suffix, x + down_suffix}
                break
    return deltas, sorted(set(lora) - loaded)


# ---- the runs ------------------------------------------------------------------------------------------------------

def load_pipe(family, request):
    """The tiny SD 1.x or SDXL pipeline (the session fixtures ``tiny_models`` / ``tiny_sdxl``, built when needed)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline.from_pretrained(request.getfixturevalue("tiny_sdxl")["sdxl"])
    return StableDiffusionPipeline.from_pretrained(request.getfixturevalue("tiny_models")["sd1"],
                                                   safety_checker=None, requires_safety_checker=False)


def components(pipe) -> dict[str, torch.nn.Module]:
    out = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out["text_encoder_2"] = pipe.text_encoder_2
    return out


def trained_deltas(models: dict) -> dict[tuple[str, str], torch.Tensor]:
    """(model, module) -> the weight delta its peft adapter applies: B @ A * alpha / r."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for model_name, model in models.items():
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                weight = module.get_base_layer().weight
                delta = (b.flatten(1) @ a.flatten(1)).reshape(weight.shape) * module.scaling["default"]
                out[(model_name, path)] = delta.detach().float()
    return out


@dataclass
class Run:
    family: str
    out: Path
    files: list[str]
    deltas: dict  # (model, module) -> trained delta
    trained: set = field(default_factory=set)  # the model parts with a LoRA


_RUNS: dict = {}


def lora_run(case, request, tmp_path_factory) -> Run:
    """The adapters of ``case`` on the tiny model, with random (non-zero) weights, saved by ``save_lora_files``."""
    if case in _RUNS:
        return _RUNS[case]
    family, targets, with_te = case
    pipe = load_pipe(family, request)
    adapters.add_unet_lora(pipe.unet, RANK, ALPHA, targets)
    encoders = []
    if with_te:
        encoders = [pipe.text_encoder, pipe.text_encoder_2] if family == "sdxl" else [pipe.text_encoder]
    for te in encoders:
        adapters.add_text_encoder_lora(te, RANK, ALPHA)
    g = torch.Generator().manual_seed(0)
    for model in [pipe.unet, *encoders]:
        for name, p in model.named_parameters():
            if ".lora_" in name:  # peft starts B at zero: random A and B so every delta is non-zero
                p.data = torch.randn(p.shape, generator=g) * 0.2
    out = tmp_path_factory.mktemp(f"lora-{family}-{targets}-{with_te}")
    files = adapters.save_lora_files(out, pipe.unet, pipe.text_encoder if with_te else None,
                                     pipe.text_encoder_2 if with_te and family == "sdxl" else None,
                                     rank=RANK, alpha=ALPHA, metadata={"note": "test"}, sdxl=family == "sdxl")
    models = components(pipe)
    deltas = trained_deltas(models)
    run = Run(family, out, files, deltas, {m for m, _ in deltas})
    _RUNS[case] = run
    return run


def comfy_check(lora_file: Path, family, request, deltas) -> None:
    """The file loads in ComfyUI completely, reaching every trained module with its trained delta."""
    plain = load_pipe(family, request)  # the model ComfyUI would patch: no adapters
    models = components(plain)
    key_map = {**comfy_unet_key_map(plain.unet),
               **comfy_clip_key_map(plain.text_encoder, models.get("text_encoder_2"))}
    got, not_loaded = comfy_load(load_file(str(lora_file)), key_map, models)
    assert not not_loaded, f"{lora_file.name}: ComfyUI leaves {len(not_loaded)} keys unloaded, e.g. {not_loaded[:3]}"
    assert set(got) == set(deltas), sorted(set(got) ^ set(deltas))[:5]
    for key, delta in deltas.items():
        torch.testing.assert_close(got[key], delta, atol=1e-5, rtol=1e-4, msg=f"{lora_file.name} {key}")


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_every_file_loads_completely_in_comfyui_as_trained(case, request, tmp_path_factory):
    run = lora_run(case, request, tmp_path_factory)
    assert run.files == [adapters.LORA_FILE, adapters.KOHYA_FILE]
    assert run.trained == ({"unet", "text_encoder"} | ({"text_encoder_2"} if case[0] == "sdxl" else set())
                           if case[2] else {"unet"})
    for name in run.files:
        comfy_check(run.out / name, case[0], request, run.deltas)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_stock_diffusers_loads_the_diffusers_file_completely_as_trained(case, request, tmp_path_factory):
    run = lora_run(case, request, tmp_path_factory)
    fused = {}
    for name in run.files:  # the diffusers file, and the kohya file as a second opinion
        pipe = load_pipe(case[0], request)
        models = components(pipe)
        before = {m: {k: v.clone() for k, v in model.state_dict().items()} for m, model in models.items()}
        records = _Records()
        loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
        for lg in loggers:
            lg.addHandler(records)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pipe.load_lora_weights(str(run.out), weight_name=name)
        finally:
            for lg in loggers:
                lg.removeHandler(records)
        said = records.messages + [str(w.message) for w in caught]
        # diffusers says so when a part of the pipeline has no keys in the file; only the untrained parts may.
        untrained = set(models) - run.trained
        said = [s for s in said if not (s.startswith("No LoRA keys associated to")
                                        and any(f"prefix='{m}'" in s for m in untrained))]
        assert not [s for s in said if re.search(r"unexpected|missing|not loaded|no lora keys", s, re.I)], said
        pipe.fuse_lora(components=list(models))
        pipe.unload_lora_weights()
        after = {m: model.state_dict() for m, model in models.items()}
        for m in models:
            assert after[m].keys() == before[m].keys(), m  # adapters fused away
        moved = {(m, k.removesuffix(".weight")) for m in models for k in after[m]
                 if not torch.equal(after[m][k], before[m][k])}
        assert moved == set(run.deltas), (name, sorted(moved ^ set(run.deltas))[:5])  # every target, nothing else
        for (m, path), delta in run.deltas.items():
            got = after[m][path + ".weight"] - before[m][path + ".weight"]
            torch.testing.assert_close(got, delta, atol=1e-5, rtol=1e-4, msg=f"{name} {m} {path}")
        fused[name] = after
    a, b = fused.values()
    for m in a:
        for k in a[m]:
            torch.testing.assert_close(a[m][k], b[m][k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [("sd1", "all", True), ("sdxl", "attention", True)], ids=["sd1", "sdxl"])
def test_diffusers_file_layout_serves_transformers_4_and_5_and_sdtunes_loader(case, request, tmp_path_factory):
    """Text-encoder keys carry CLIP's ``text_model.`` root (transformers 4.x's module path, and what ComfyUI maps);
    with transformers 5's flattened CLIP diffusers drops it. No key is in peft's lora_A/lora_B form (diffusers
    would then skip converting the processor names) and there is no ``.alpha`` key (diffusers refuses keys without
    "lora"); the adapter metadata says scale 1, the scale being in the up weights. sdtune's loader reads it too."""
    import json

    from sdtune.models import lora as lora_mod

    run = lora_run(case, request, tmp_path_factory)
    path = run.out / adapters.LORA_FILE
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    plain = load_pipe(case[0], request)
    for key in keys:
        assert "lora_A" not in key and "lora_B" not in key and not key.endswith(".alpha"), key
        prefix, _, rest = key.partition(".")
        if prefix.startswith("text_encoder"):
            module = rest.split(".lora_linear_layer.")[0]
            assert module.startswith("text_model.encoder.layers."), key
            te = getattr(plain, prefix)
            tf4_path = module if hasattr(te, "text_model") else module.removeprefix("text_model.")
            te.get_submodule(tf4_path)  # the layer exists under the name this transformers gives it
    adapter_meta = json.loads(meta["lora_adapter_metadata"])
    parts = {k.split(".")[0] for k in adapter_meta}  # "unet.r", "text_encoder.lora_alpha", ...
    assert parts == {"unet", "text_encoder"} | ({"text_encoder_2"} if case[0] == "sdxl" else set())
    for part in parts:
        assert adapter_meta[f"{part}.r"] == adapter_meta[f"{part}.lora_alpha"] == RANK, part
    assert meta["note"] == "test"
    lora = lora_mod.read_lora(path, unet_config=plain.unet.config)
    lora_mod.check_fits(lora, unet=plain.unet, text_encoder=plain.text_encoder)
    assert lora.unet_keys and lora.text_encoder_keys


def test_recipe_trained_lora_loads_completely_in_comfyui(tiny_models, tmp_path, request):
    """The recipe's own files (SD 1.x, every target, text encoder, alpha != rank, one real step) pass the same
    ComfyUI check as the exports above."""
    from sdtune.training import dreambooth
    from sdtune.training.config import config_from_dict

    from test_train_recipe import make_images

    subject = make_images(tmp_path / "subject", 2)
    out = tmp_path / "out"
    cfg = config_from_dict(dict(model=str(tiny_models["sd1"]), instance_dir=str(subject),
                                instance_prompt="a photo of sks dog", resolution=32, max_steps=1, train_batch_size=1,
                                learning_rate=1e-2, caption_dropout=0.0, output_dir=str(out), seed=0,
                                lora_targets="all", train_text_encoder=True, lora_rank=RANK, lora_alpha=ALPHA))
    result = dreambooth.train(cfg)
    deltas = trained_deltas({"unet": result.unet, "text_encoder": result.text_encoder})
    assert {m for m, _ in deltas} == {"unet", "text_encoder"}
    assert any(d.abs().max() > 0 for d in deltas.values())
    for name in (adapters.LORA_FILE, adapters.KOHYA_FILE):
        comfy_check(out / name, "sd1", request, deltas)


# ---- full-size architectures (meta device: shapes only, no memory) -------------------------------------------------

def _full_size(family):
    """(UNet, text encoders by pipeline name) of SD 1.5 or SDXL base 1.0 at their real sizes, on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=77, vocab_size=49408)
    with torch.device("meta"):
        if family == "sd1":
            unet = UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults are SD 1.x's UNet
            return unet, {"text_encoder": CLIPTextModel(clip_l)}
        unet = UNet2DConditionModel(
            sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            use_linear_projection=True, transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                max_position_embeddings=77, vocab_size=49408, projection_dim=1280)
        return unet, {"text_encoder": CLIPTextModel(clip_l), "text_encoder_2": CLIPTextModelWithProjection(clip_g)}


def _peft_state_dict(model, targets) -> dict[str, torch.Tensor]:
    """peft-format LoRA tensors (meta) for every layer of ``model`` whose name ends in one of ``targets``."""
    out = {}
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets) and hasattr(module, "weight"):
            w = module.weight
            out[f"{name}.lora_A.weight"] = torch.empty(RANK, *w.shape[1:], device="meta")
            out[f"{name}.lora_B.weight"] = torch.empty(w.shape[0], RANK, *([1] * (w.ndim - 2)), device="meta")
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_full_size_files_load_completely_in_comfyui(family):
    """SD 1.5 and SDXL at their real layouts (every lora_targets: all layer, every text-encoder layer): both files'
    keys all land in ComfyUI's maps. The mirror reproduces the loss ComfyUI itself showed for the earlier layout
    (peft UNet names, transformers 5's flattened CLIP names): on SD 1.5, 352 of its 576 keys not loaded."""
    from diffusers.utils import convert_state_dict_to_diffusers

    unet, encoders = _full_size(family)
    unet_sd = _peft_state_dict(unet, adapters.UNET_TARGETS_ALL)
    te_sds = {name: _peft_state_dict(te, adapters.TEXT_ENCODER_TARGETS) for name, te in encoders.items()}
    scale = ALPHA / RANK
    diffusers_file = {"unet." + k: v for k, v in adapters.diffusers_layout_unet(unet_sd, scale).items()}
    for name, sd in te_sds.items():
        diffusers_file.update({f"{name}.{k}": v for k, v in adapters.diffusers_layout_text_encoder(sd, scale).items()})
    kohya_file = adapters.kohya_state_dict(unet_sd, te_sds["text_encoder"], ALPHA, te2_sd=te_sds.get("text_encoder_2"),
                                           unet_config=unet.config if family == "sdxl" else None)
    models = {"unet": unet, **encoders}
    key_map = {**comfy_unet_key_map(unet), **comfy_clip_key_map(encoders["text_encoder"],
                                                                encoders.get("text_encoder_2"))}
    modules = len(unet_sd) // 2 + sum(len(sd) for sd in te_sds.values()) // 2
    for lora, per_module in ((diffusers_file, 2), (kohya_file, 3)):
        got, not_loaded = comfy_load(lora, key_map, models)
        assert len(lora) == per_module * modules and not not_loaded, (len(lora), not_loaded[:3])
        assert len(got) == modules
    if family == "sd1":
        assert modules == 288  # 864 kohya keys, 576 diffusers keys: the full-size check's counts
        earlier = {"unet." + k: v for k, v in unet_sd.items()}
        earlier.update({"text_encoder." + k: v
                        for k, v in convert_state_dict_to_diffusers(te_sds["text_encoder"]).items()})
        _, not_loaded = comfy_load(earlier, key_map, models)
        assert (len(earlier), len(not_loaded)) == (576, 352)
