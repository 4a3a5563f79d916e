"""The LoRA tools (``sdtune.models.lora_formats``, ``sdtune.training.lora_tools``) against references computed here.

Every reference is worked out from the files' raw tensors by hand (up @ down * alpha / rank, the LyCORIS products,
``torch.linalg.svd`` / ``svdvals``), never through the code under test; every output is loaded back by stock
diffusers and by sdtune's engine and compared with the delta it should apply.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.errors import SdtuneError
from sdtune.models.lora_formats import describe, read_lora_set
from sdtune.training import adapters
from sdtune.training import lora_tools as tools

RANK, ALPHA = 4, 8.0
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
CONV = "down_blocks.0.resnets.0.conv1"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from sdtune.models.fixtures import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("sd1") / "model", "sd1")


def plain_pipe(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def randomise(*models, seed=0):
    g = torch.Generator().manual_seed(seed)
    for model in models:
        for name, p in model.named_parameters():
            if ".lora_" in name:  # peft starts B at zero: random A and B so every delta is non-zero
                p.data = torch.randn(p.shape, generator=g) * 0.2


@pytest.fixture(scope="module")
def run_dir(sd1, tmp_path_factory):
    """An sdtune run's two LoRA files: every UNet target and the text encoder, rank 4, alpha 8."""
    pipe = plain_pipe(sd1)
    adapters.add_unet_lora(pipe.unet, RANK, ALPHA, "all")
    adapters.add_text_encoder_lora(pipe.text_encoder, RANK, ALPHA)
    randomise(pipe.unet, pipe.text_encoder)
    out = tmp_path_factory.mktemp("run")
    meta = {**adapters.config_metadata({"lora_rank": RANK, "max_steps": 7}), "sdtune_base_model": str(sd1),
            "sdtune_recommended": json.dumps({"guidance": 5.0, "lora_scale": 0.8})}
    adapters.save_lora_files(out, pipe.unet, pipe.text_encoder, rank=RANK, alpha=ALPHA, metadata=meta)
    return out


@pytest.fixture(scope="module")
def peft_file(sd1, tmp_path_factory):
    """A diffusers/peft-format file (lora_A/lora_B keys): UNet attention only, rank 2, alpha 3 in its metadata."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = plain_pipe(sd1)
    adapters.add_unet_lora(pipe.unet, 2, 3.0, "attention")
    randomise(pipe.unet, seed=1)
    out = tmp_path_factory.mktemp("peft")
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(pipe.unet), safe_serialization=True,
        unet_lora_adapter_metadata=adapters._adapter_metadata(pipe.unet.peft_config["default"]))
    return out / "pytorch_lora_weights.safetensors"


def kohya_deltas(path) -> dict:
    """{kohya module name: delta} from a kohya file's raw tensors: up @ down * alpha / rank."""
    sd = load_file(str(path))
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = sd[key].double(), sd[name + ".lora_up.weight"].double()
            scale = float(sd[name + ".alpha"]) / down.shape[0] if name + ".alpha" in sd else 1.0
            out[name] = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * scale
    return out


def kohya_name(part, name):
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}[part]
    return prefix + name.replace(".", "_")


def peft_deltas(path) -> dict:
    """{module: delta} of a peft-format UNet file: lora_B @ lora_A * lora_alpha / r from its metadata."""
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    scale = meta["unet.lora_alpha"] / meta["unet.r"]
    return {k[len("unet."): -len(".lora_A.weight")]: sd[k.replace("lora_A", "lora_B")].double() @ v.double() * scale
            for k, v in sd.items() if k.endswith(".lora_A.weight")}


def close(a, b, tol=1e-5):
    return torch.allclose(a.double(), b.double().reshape(a.shape), atol=tol, rtol=1e-4)


def fused_weights(folder, lora_file):
    """Stock diffusers: load the LoRA, fuse it, and return (UNet, text encoder) weights before and after."""
    pipe = plain_pipe(folder)
    before = {("unet", k): v.clone() for k, v in pipe.unet.state_dict().items()}
    before.update({("text_encoder", k): v.clone() for k, v in pipe.text_encoder.state_dict().items()})
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    pipe.fuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    after = {("unet", k): v for k, v in pipe.unet.state_dict().items()}
    after.update({("text_encoder", k): v for k, v in pipe.text_encoder.state_dict().items()})
    return before, after


def check_loads_everywhere(sd1, lora_file, expected: dict) -> None:
    """Stock diffusers and sdtune's engine both apply exactly ``expected`` {(part, module): delta}, nothing else."""
    from sdtune.generation.engine import Engine

    before, after = fused_weights(sd1, lora_file)
    moved = {(p, k.removesuffix(".weight")) for (p, k) in after if not torch.equal(after[(p, k)], before[(p, k)])}
    assert moved == set(expected), sorted(moved ^ set(expected))[:4]
    for (part, name), delta in expected.items():
        key = (part, name + ".weight")
        assert close(after[key] - before[key], delta), (part, name)
    engine = Engine.load(str(sd1), lora=str(lora_file), device="cpu", dtype="fp32", fuse_lora=True)
    unet = engine.unets["base"].state_dict()
    te = engine.text_encoder.state_dict()
    for (part, name), delta in expected.items():
        got = (unet if part == "unet" else te)[name + ".weight"] - before[(part, name + ".weight")]
        assert close(got, delta), ("engine", part, name)


# ---- reading and info ----------------------------------------------------------------------------------------------

def test_sdtune_kohya_and_peft_files_read_to_the_deltas_computed_by_hand(run_dir, peft_file):
    sdtune_file = read_lora_set(run_dir)  # the run folder: its pytorch_lora_weights.safetensors
    kohya = read_lora_set(run_dir / adapters.KOHYA_FILE)
    peft = read_lora_set(peft_file)
    assert (sdtune_file.format, kohya.format, peft.format) == ("sdtune", "kohya", "peft")
    by_hand = kohya_deltas(run_dir / adapters.KOHYA_FILE)
    assert len(kohya.modules) == len(sdtune_file.modules) == len(by_hand)
    for (part, name), m in kohya.modules.items():
        assert close(m.delta(), by_hand[kohya_name(part, name)]), name
        assert close(sdtune_file.modules[(part, name)].delta(), by_hand[kohya_name(part, name)]), name
    by_hand = peft_deltas(peft_file)
    assert {n for _, n in peft.modules} == set(by_hand)
    for (_, name), m in peft.modules.items():
        assert close(m.delta(), by_hand[name]), name


def test_info_reports_format_ranks_targets_base_and_training_metadata(run_dir, peft_file, sd1):
    raw = load_file(str(run_dir / adapters.KOHYA_FILE))
    downs = {k: v for k, v in raw.items() if k.endswith(".lora_down.weight")}
    info = describe(read_lora_set(run_dir / adapters.KOHYA_FILE))
    assert info["modules"] == len(downs)
    assert info["rank_counts"] == {str(RANK): len(downs)} and info["ranks"] == f"rank {RANK} on {len(downs)} modules"
    assert info["alphas"] == {"8": len(downs)}
    unet_attention = sum(1 for k in downs if "_attn" in k and k.startswith("lora_unet_"))
    assert info["targets"]["unet attention"] == unet_attention
    assert info["targets"]["text_encoder"] == sum(1 for k in downs if k.startswith("lora_te_"))
    assert info["targets"]["unet convolutions"] == sum(1 for k in downs if "_conv" in k)
    assert info["base_model"] == str(sd1) and info["training_config"]["max_steps"] == 7
    assert info["recommended"]["lora_scale"] == 0.8
    assert info["kohya_metadata"]["ss_network_dim"] == str(RANK)
    peft = describe(read_lora_set(peft_file))
    assert peft["format"] == "peft" and peft["rank_counts"] == {"2": peft["modules"]}
    assert set(peft["targets"]) == {"unet attention"}


def lycoris_file(path):
    """A LyCORIS file: LoHa on to_q (rank 2, alpha 1), LoKr on to_k (w1 full, w2 factored rank 2, alpha 4),
    LoKr on a 3x3 convolution (w2 a full 4-D kernel, no alpha); and the deltas by LyCORIS's formulas."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    q, k, c = (kohya_name("unet", n) for n in (Q, K, CONV))
    sd = {f"{q}.hada_w1_a": r(32, 2), f"{q}.hada_w1_b": r(2, 32), f"{q}.hada_w2_a": r(32, 2),
          f"{q}.hada_w2_b": r(2, 32), f"{q}.alpha": torch.tensor(1.0),
          f"{k}.lokr_w1": r(4, 2), f"{k}.lokr_w2_a": r(8, 2), f"{k}.lokr_w2_b": r(2, 16), f"{k}.alpha": torch.tensor(4.0),
          f"{c}.lokr_w1": r(2, 2), f"{c}.lokr_w2": r(16, 16, 3, 3)}
    save_file(sd, str(path))
    s = {k_: v.double() for k_, v in sd.items()}
    deltas = {
        ("unet", Q): (s[f"{q}.hada_w1_a"] @ s[f"{q}.hada_w1_b"]) * (s[f"{q}.hada_w2_a"] @ s[f"{q}.hada_w2_b"]) * 0.5,
        ("unet", K): torch.kron(s[f"{k}.lokr_w1"], s[f"{k}.lokr_w2_a"] @ s[f"{k}.lokr_w2_b"]) * 2.0,
        ("unet", CONV): torch.kron(s[f"{c}.lokr_w1"][:, :, None, None], s[f"{c}.lokr_w2"]),
    }
    return path, deltas


def test_lycoris_loha_and_lokr_are_described_resized_to_a_plain_lora_and_fused(sd1, tmp_path):
    path, deltas = lycoris_file(tmp_path / "lycoris.safetensors")
    lora = read_lora_set(path)
    info = describe(lora)
    assert info["format"] == "lycoris" and info["adapters"] == ["LoHa (LyCORIS)", "LoKr (LyCORIS)"]
    for key, delta in deltas.items():
        assert close(lora.modules[key].delta(), delta), key
    outcome = tools.resize(lora, 32)  # at full rank the SVD keeps each delta whole
    assert any("plain LoRA" in n for n in outcome.notes)
    assert min(outcome.energies) > 1 - 1e-9
    out = tools.write_lora(outcome.modules, tmp_path / "plain.safetensors")
    plain = read_lora_set(out)
    assert plain.kinds == {"lora"}
    expected = {key: delta for key, delta in deltas.items()}
    for key, delta in expected.items():
        assert close(plain.modules[key].delta(), delta), key
    check_loads_everywhere(sd1, out, expected)
    pipe = plain_pipe(sd1)
    before = pipe.unet.get_submodule(CONV).weight.detach().clone()
    tools.fuse_into(lora, pipe, 0.5)
    assert close(pipe.unet.get_submodule(CONV).weight - before, 0.5 * deltas[("unet", CONV)])


def test_dora_files_are_described_and_refused_by_merge_resize_fuse(run_dir, tmp_path, sd1):
    raw = load_file(str(run_dir / adapters.KOHYA_FILE))
    for key in [k for k in raw if k.endswith(".lora_down.weight")]:
        raw[key.replace(".lora_down.weight", ".dora_scale")] = torch.ones(1, raw[key].shape[1])
    save_file(raw, str(tmp_path / "dora.safetensors"))
    lora = read_lora_set(tmp_path / "dora.safetensors")
    assert describe(lora)["adapters"] == ["DoRA"]
    with pytest.raises(SdtuneError, match="DoRA"):
        tools.resize(lora, 2)
    with pytest.raises(SdtuneError, match="DoRA"):
        tools.merge([lora, lora], [1, 1])
    with pytest.raises(SdtuneError, match="DoRA"):
        tools.fuse_into(lora, plain_pipe(sd1))


# ---- merge ---------------------------------------------------------------------------------------------------------

def test_merge_without_rank_is_the_weighted_sum_exactly_and_loads_everywhere(run_dir, peft_file, sd1, tmp_path):
    kohya, peft = read_lora_set(run_dir / adapters.KOHYA_FILE), read_lora_set(peft_file)
    outcome = tools.merge([kohya, peft], [0.7, 0.5])
    out = tools.write_lora(outcome.modules, tmp_path / "merged.safetensors", tools.carried_metadata([kohya, peft]))
    merged = read_lora_set(out)
    a, b = kohya_deltas(run_dir / adapters.KOHYA_FILE), peft_deltas(peft_file)
    expected = {}
    for (part, name) in kohya.modules:
        expected[(part, name)] = 0.7 * a[kohya_name(part, name)] + (0.5 * b[name] if name in b else 0)
    assert set(merged.modules) == set(expected)
    for key, delta in expected.items():
        assert close(merged.modules[key].delta(), delta), key
        assert merged.modules[key].rank == RANK + (2 if key[1] in b else 0)  # ranks stacked
    check_loads_everywhere(sd1, out, expected)


def test_merge_to_a_rank_is_the_truncated_svd_of_the_sum(run_dir, peft_file):
    kohya, peft = read_lora_set(run_dir / adapters.KOHYA_FILE), read_lora_set(peft_file)
    outcome = tools.merge([kohya, peft], [1.0, -2.0], rank=3)
    a, b = kohya_deltas(run_dir / adapters.KOHYA_FILE), peft_deltas(peft_file)
    energies = []
    for (part, name), m in outcome.modules.items():
        total = a[kohya_name(part, name)] + (-2.0 * b[name] if name in b else 0)
        u, s, vh = torch.linalg.svd(total.flatten(1), full_matrices=False)
        assert m.rank == 3
        assert close(m.delta(), (u[:, :3] * s[:3]) @ vh[:3], tol=1e-4), name
        energies.append(float((s[:3] ** 2).sum() / (s ** 2).sum()))
    assert outcome.energies == pytest.approx(energies, abs=1e-9)


def test_merge_refuses_mismatched_models_wrong_weights_and_bad_ranks(run_dir, tmp_path):
    kohya = read_lora_set(run_dir / adapters.KOHYA_FILE)
    raw = load_file(str(run_dir / adapters.KOHYA_FILE))
    name = kohya_name("unet", Q)
    other = {f"{name}.lora_down.weight": torch.randn(2, 48), f"{name}.lora_up.weight": torch.randn(32, 2)}
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(SdtuneError, match="do not fit one model"):
        tools.merge([kohya, read_lora_set(tmp_path / "other.safetensors")], [1, 1])
    with pytest.raises(SdtuneError, match="one per file"):
        tools.merge([kohya, kohya], [1.0])
    for rank in (0, -3):
        with pytest.raises(SdtuneError, match="above 0"):
            tools.merge([kohya, kohya], [1, 1], rank=rank)
    assert raw  # the input is untouched
    with pytest.raises(SdtuneError, match="not found"):
        read_lora_set(tmp_path / "missing.safetensors")


# ---- resize --------------------------------------------------------------------------------------------------------

def test_resize_keeps_the_energy_svdvals_give_and_the_best_approximation(run_dir, sd1, tmp_path):
    lora = read_lora_set(run_dir)
    outcome = tools.resize(lora, 2)
    by_hand = kohya_deltas(run_dir / adapters.KOHYA_FILE)
    energies = {}
    for key, m in outcome.modules.items():
        full = by_hand[kohya_name(*key)].flatten(1)
        s = torch.linalg.svdvals(full)
        energies[key] = float((s[:2] ** 2).sum() / (s ** 2).sum())
        u, s2, vh = torch.linalg.svd(full, full_matrices=False)
        assert m.rank == 2 and close(m.delta(), (u[:, :2] * s2[:2]) @ vh[:2], tol=1e-4), key
    assert outcome.energies == pytest.approx([energies[k] for k in outcome.modules], abs=1e-9)
    line = outcome.energy_line()
    values = list(energies.values())
    assert f"mean {100 * sum(values) / len(values):.2f}%" in line and f"min {100 * min(values):.2f}%" in line
    out = tools.write_lora(outcome.modules, tmp_path / "r2.safetensors")
    check_loads_everywhere(sd1, out, {k: m.delta() for k, m in outcome.modules.items()})
    with pytest.raises(SdtuneError, match="above 0"):
        tools.resize(lora, 0)


# ---- extract -------------------------------------------------------------------------------------------------------

def test_extract_gives_back_a_known_low_rank_change(sd1, tmp_path):
    g = torch.Generator().manual_seed(5)
    tuned = plain_pipe(sd1)
    known = {}
    with torch.no_grad():
        for part, name in (("unet", Q), ("unet", CONV), ("unet", "mid_block.attentions.0.proj_in"),
                           ("text_encoder", "encoder.layers.1.mlp.fc1")):
            w = getattr(tuned, part).get_submodule(name).weight
            flat = w.flatten(1)
            delta = (torch.randn(flat.shape[0], 3, generator=g) @ torch.randn(3, flat.shape[1], generator=g) * 0.05)
            w += delta.reshape(w.shape)
            known[(part, name)] = delta.double()
    tuned.save_pretrained(tmp_path / "tuned")
    base_parts, _ = tools.load_parts(sd1)
    tuned_parts, _ = tools.load_parts(tmp_path / "tuned")
    outcome = tools.extract(base_parts, tuned_parts, rank=3)
    assert set(outcome.modules) == set(known)
    for key, delta in known.items():
        assert close(outcome.modules[key].delta(), delta, tol=1e-5), key
    assert min(outcome.energies) > 1 - 1e-6
    out = tools.write_lora(outcome.modules, tmp_path / "extracted.safetensors")
    check_loads_everywhere(sd1, out, known)
    # UNets alone: a UNet folder and a UNet's own .safetensors state dict
    unet_file, _ = tools.load_parts(sd1 / "unet" / "diffusion_pytorch_model.safetensors")
    unet_folder, _ = tools.load_parts(tmp_path / "tuned" / "unet")
    assert set(unet_file) == set(unet_folder) == {"unet"}
    only_unet = tools.extract(unet_file, unet_folder, rank=3)
    assert set(only_unet.modules) == {k for k in known if k[0] == "unet"}


def test_extract_refuses_models_of_another_architecture(sd1, tmp_path):
    from sdtune.models.fixtures import tiny_unet

    base_parts, _ = tools.load_parts(sd1)
    other = tiny_unet(cross_dim=48)
    other.save_pretrained(tmp_path / "other_unet")
    other_parts, _ = tools.load_parts(tmp_path / "other_unet")
    with pytest.raises(SdtuneError, match="do not match"):
        tools.extract(base_parts, other_parts, rank=2)
    with pytest.raises(SdtuneError, match="do not match"):
        tools.extract({"unet": base_parts["unet"]}, {"unet": other_parts["unet"]}, rank=2)
    with pytest.raises(SdtuneError, match="nothing to extract"):
        tools.extract(base_parts, base_parts, rank=2)
    with pytest.raises(SdtuneError, match="above 0"):
        tools.extract(base_parts, base_parts, rank=0)


# ---- fuse ----------------------------------------------------------------------------------------------------------

def test_fused_model_is_w_plus_scale_delta_and_draws_the_engines_lora_image(run_dir, sd1, tmp_path):
    import numpy as np

    from sdtune.generation.engine import Engine

    lora = read_lora_set(run_dir)
    pipe = plain_pipe(sd1)
    before = {("unet", k): v.clone() for k, v in pipe.unet.state_dict().items()}
    before.update({("text_encoder", k): v.clone() for k, v in pipe.text_encoder.state_dict().items()})
    by_hand = kohya_deltas(run_dir / adapters.KOHYA_FILE)
    assert tools.fuse_into(lora, pipe, 0.6) == len(by_hand)
    for part, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for name, w in model.state_dict().items():
            module = name.removesuffix(".weight")
            delta = by_hand.get(kohya_name(part, module)) if name.endswith(".weight") else None
            if delta is None:
                assert torch.equal(w, before[(part, name)]), name
            else:
                assert close(w - before[(part, name)], 0.6 * delta), name
    folder = tools.save_model(pipe, tmp_path / "fused", {"note": "x"})
    single = tools.save_model(pipe, tmp_path / "fused.safetensors", {})
    assert single.is_file() and (folder / "model_index.json").is_file()
    kw = dict(prompt="a photo of sks dog", steps=3, seed=1, width=32, height=32)
    fused_img = Engine.load(str(folder), device="cpu", dtype="fp32").generate("txt2img", **kw)[0].image
    lora_img = Engine.load(str(sd1), lora=str(run_dir), lora_scale=0.6, device="cpu",
                           dtype="fp32").generate("txt2img", **kw)[0].image
    diff = np.abs(np.asarray(fused_img, dtype=np.int16) - np.asarray(lora_img, dtype=np.int16))
    assert diff.max() <= 1, diff.max()
    one = Engine.load(str(single), config=str(sd1), device="cpu", dtype="fp32").generate("txt2img", **kw)[0].image
    assert np.abs(np.asarray(one, dtype=np.int16) - np.asarray(fused_img, dtype=np.int16)).max() <= 1


def test_fuse_refuses_a_lora_of_another_model(sd1, tmp_path):
    name = kohya_name("unet", Q)
    save_file({f"{name}.lora_down.weight": torch.randn(2, 48), f"{name}.lora_up.weight": torch.randn(32, 2)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(SdtuneError, match="does not fit"):
        tools.fuse_into(read_lora_set(tmp_path / "other.safetensors"), plain_pipe(sd1))


def layer_weight(model, name):
    """A layer's weight by its path, CLIP's ``text_model.`` root or not (transformers 5 keeps it for
    CLIPTextModelWithProjection)."""
    for path in (name, "text_model." + name):
        try:
            return model.get_submodule(path).weight.detach()
        except AttributeError:
            continue
    raise AssertionError(name)


# ---- SDXL and kohya output -----------------------------------------------------------------------------------------

def test_sdxl_files_read_alike_and_both_output_formats_load_in_stock_sdxl(tmp_path):
    """sdtune's SDXL files (diffusers layout; kohya's with original-UNet block names, mapped with the UNet's config)
    read to the same deltas for all three parts; a resized LoRA written in either layout loads in stock SDXL."""
    from sdtune.models.fixtures import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    adapters.add_unet_lora(pipe.unet, RANK, ALPHA, "attention")
    for te in (pipe.text_encoder, pipe.text_encoder_2):
        adapters.add_text_encoder_lora(te, RANK, ALPHA)
    randomise(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    adapters.save_lora_files(tmp_path, pipe.unet, pipe.text_encoder, pipe.text_encoder_2, rank=RANK, alpha=ALPHA,
                             metadata={}, sdxl=True)
    config = pipe.unet.config
    diffusers_file = read_lora_set(tmp_path / adapters.LORA_FILE)
    kohya = read_lora_set(tmp_path / adapters.KOHYA_FILE, unet_config=config)
    assert {p for p, _ in kohya.modules} == {"unet", "text_encoder", "text_encoder_2"} and kohya.sdxl
    assert set(kohya.modules) == set(diffusers_file.modules)
    for key, m in kohya.modules.items():
        assert close(m.delta(), diffusers_file.modules[key].delta()), key
    assert read_lora_set(tmp_path / adapters.KOHYA_FILE).sgm_names  # without the config: said, not guessed
    outcome = tools.resize(kohya, 2)
    expected = {k: m.delta() for k, m in outcome.modules.items()}
    for fmt in ("diffusers", "kohya"):
        out = tools.write(outcome.modules, tmp_path / f"r2-{fmt}.safetensors", fmt=fmt, sdxl=True, unet_config=config)
        back = read_lora_set(out, unet_config=config)
        assert set(back.modules) == set(expected)
        for key, delta in expected.items():
            assert close(back.modules[key].delta(), delta), (fmt, key)
        stock = tiny_sdxl_pipeline()
        parts = {"unet": stock.unet, "text_encoder": stock.text_encoder, "text_encoder_2": stock.text_encoder_2}
        before = {key: layer_weight(parts[key[0]], key[1]).clone() for key in expected}
        stock.load_lora_weights(str(out.parent), weight_name=out.name)
        stock.fuse_lora(components=list(parts))
        stock.unload_lora_weights()
        for key, delta in expected.items():
            assert close(layer_weight(parts[key[0]], key[1]) - before[key], delta), (fmt, key)
    with pytest.raises(SdtuneError, match="pass --model"):
        tools.write(outcome.modules, tmp_path / "x.safetensors", fmt="kohya", sdxl=True)


def test_kohya_output_of_an_exact_merge_keeps_each_modules_delta(run_dir, peft_file, sd1, tmp_path):
    """Stacked ranks differ per module (4 or 6); kohya's one alpha is made up for in each up weight."""
    kohya, peft = read_lora_set(run_dir / adapters.KOHYA_FILE), read_lora_set(peft_file)
    outcome = tools.merge([kohya, peft], [1.0, 1.0])
    out = tools.write(outcome.modules, tmp_path / "merged_kohya.safetensors", fmt="kohya")
    back = read_lora_set(out)
    assert back.format == "kohya" and {m.rank for m in back.modules.values()} == {4, 6}
    expected = {k: m.delta() for k, m in outcome.modules.items()}
    for key, delta in expected.items():
        assert close(back.modules[key].delta(), delta), key
    check_loads_everywhere(sd1, out, expected)


# ---- files of sdtune's LoHa / LoKr runs ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_a_runs_peft_and_lycoris_files_read_to_peft_s_own_deltas(kind, tmp_path):
    """A LoHa / LoKr run writes peft's keys with its config (adapter_model.safetensors) and the LyCORIS layout: both
    read to the delta peft itself computes for each layer (``get_delta_weight``), alpha != r."""
    from peft import LoHaConfig, LoKrConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sdtune.models.fixtures import tiny_unet

    unet = tiny_unet()
    make = LoHaConfig if kind == "loha" else LoKrConfig
    config = make(r=2, alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    g = torch.Generator().manual_seed(7)
    for name, p in unet.named_parameters():
        if f".{'hada' if kind == 'loha' else 'lokr'}_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    config = unet.peft_config["default"]
    peft_path = adapters.save_peft_file(tmp_path / adapters.ADAPTER_FILE, {"unet": (unet, config)}, {})
    lyco_path = adapters.save_lycoris_file(tmp_path / adapters.LYCORIS_FILE, {"unet": (unet, config)}, kind, {})
    expected = {("unet", n): m.get_delta_weight("default").double() for n, m in unet.named_modules()
                if isinstance(m, BaseTunerLayer)}
    assert read_lora_set(tmp_path).path == peft_path  # the run folder: its adapter file
    for path, fmt in ((peft_path, "sdtune-peft"), (lyco_path, "lycoris")):
        lora = read_lora_set(path)
        assert lora.format == fmt and lora.kinds == {kind} and set(lora.modules) == set(expected)
        for key, delta in expected.items():
            assert close(lora.modules[key].delta(), delta), (fmt, key)
    outcome = tools.resize(read_lora_set(peft_path), 32)
    for key, delta in expected.items():
        assert close(outcome.modules[key].delta(), delta, tol=1e-4), key


def test_oft_and_peft_dora_files_are_described_and_refused(tmp_path):
    from peft import LoraConfig, OFTConfig

    from sdtune.models.fixtures import tiny_unet

    unet = tiny_unet()
    config = OFTConfig(oft_block_size=8, r=0, target_modules=["to_q", "to_v"])
    unet.add_adapter(config)
    path = adapters.save_peft_file(tmp_path / "oft.safetensors", {"unet": (unet, unet.peft_config["default"])}, {})
    lora = read_lora_set(path)
    layers = sum(1 for n, _ in unet.named_modules() if n.endswith((".to_q", ".to_v")))
    assert describe(lora)["adapters"] == ["OFT"] and describe(lora)["modules"] == layers
    with pytest.raises(SdtuneError, match="OFT"):
        tools.resize(lora, 2)
    dora = tiny_unet()
    dora.add_adapter(LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["to_q"]))
    sd = adapters.adapter_state_dict(dora)
    save_file({f"unet.{k}": v for k, v in sd.items()}, str(tmp_path / "dora.safetensors"))
    lora = read_lora_set(tmp_path / "dora.safetensors")
    assert describe(lora)["adapters"] == ["DoRA"]
    assert len(lora.modules) == sum(1 for n, _ in dora.named_modules() if n.endswith(".to_q"))
    with pytest.raises(SdtuneError, match="DoRA"):
        tools.merge([lora, lora], [1, 1], rank=2)


@pytest.mark.parametrize("shape", [(24, 200), (200, 24), (30, 40)], ids=["wide", "tall", "square"])
def test_thin_svd_through_a_qr_matches_torchs_svd(shape):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u, s, vh = tools.thin_svd(a)
    assert torch.allclose(s, torch.linalg.svdvals(a), atol=1e-10)
    assert torch.allclose((u * s) @ vh, a, atol=1e-10)
    assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=a.dtype), atol=1e-10)
    assert torch.allclose(vh @ vh.T, torch.eye(vh.shape[0], dtype=a.dtype), atol=1e-10)
