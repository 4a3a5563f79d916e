"""LoHa, LoKr, DoRA and OFT through the recipe, the files other tools read, and sdtune's engine (tiny models, CPU)."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.errors import SdtuneError
from sdtune.generation.engine import Engine
from sdtune.models.loading import load_pipeline
from sdtune.training import adapters, dreambooth
from sdtune.training.config import config_from_dict
from sdtune.training.export import sampling_pipeline

from test_train_recipe import make_images  # the same two-tone subjects as the recipe tests

KINDS = ("loha", "lokr", "dora", "oft")
PROMPT = "a photo of sks dog"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("subject"), 3)


def train(model, subject, out, kind, **overrides):
    cfg = dict(model=str(model), instance_dir=str(subject), instance_prompt=PROMPT, resolution=32, max_steps=3,
               learning_rate=2e-2, caption_dropout=0.0, output_dir=str(out), seed=0, adapter=kind, oft_block_size=8,
               lora_rank=2, lora_alpha=3)
    cfg.update(overrides)
    return dreambooth.train(config_from_dict(cfg))


def reference(model, result, sdxl=False):
    """The trained modules in memory, through a stock pipeline: what every exported file must reproduce."""
    pipe = load_pipeline(str(model), device="cpu", dtype=torch.float32)
    sampler = sampling_pipeline(pipe, result.unet.eval(), result.text_encoder.eval(), result.text_encoder_2)
    sampler.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return sampler(PROMPT, num_inference_steps=3, guidance_scale=3.0, height=32, width=32,
                       generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]


def engine_image(model, lora, scale=1.0):
    engine = Engine.load(model, lora=lora, lora_scale=scale)
    result = engine.generate("txt2img", prompt=PROMPT, steps=3, guidance=3.0, seed=0, width=32, height=32)[0]
    return np.asarray(result.image, dtype=np.float32) / 255.0, engine


def files_of(kind):
    return {"loha": [adapters.ADAPTER_FILE, adapters.LYCORIS_FILE], "lokr": [adapters.ADAPTER_FILE,
            adapters.LYCORIS_FILE], "oft": [adapters.ADAPTER_FILE],
            "dora": [adapters.LORA_FILE, adapters.KOHYA_FILE]}[kind]


@pytest.fixture(scope="module", params=KINDS)
def trained(request, tiny_models, subject, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"run-{request.param}")
    result = train(tiny_models["sd1"], subject, out, request.param, train_text_encoder=True,
                   lora_targets="attention" if request.param == "oft" else "all")
    return request.param, out, result


def test_each_adapter_trains_exports_and_the_engine_draws_what_training_ended_with(trained, tiny_models):
    kind, out, result = trained
    names = {p.name for p in out.iterdir()}
    assert set(files_of(kind)) <= names and "README.md" in names
    assert result.global_step == 3 and all(np.isfinite(result.losses))
    ref = reference(tiny_models["sd1"], result)
    off, _ = engine_image(tiny_models["sd1"], out / files_of(kind)[0], scale=1.0 if kind == "oft" else 0.0)
    for name in files_of(kind):
        got, engine = engine_image(tiny_models["sd1"], out / name)
        assert np.abs(got - ref).max() <= 1.5 / 255, f"{kind} {name}: not the trained pixels"
    if kind not in ("oft", "dora"):  # OFT cannot be scaled; a DoRA at scale 0 keeps its learned magnitudes
        base = np.asarray(Engine.load(tiny_models["sd1"]).generate(
            "txt2img", prompt=PROMPT, steps=3, guidance=3.0, seed=0, width=32, height=32)[0].image) / 255.0
        assert np.abs(off - base).max() <= 1.5 / 255, "scale 0 must give the base model"
        assert np.abs(ref - base).max() > 4 / 255, "the adapter did not change the image"


def test_lycoris_files_name_every_trained_module_as_kohya_does(trained):
    kind, out, result = trained
    if kind not in ("loha", "lokr"):
        pytest.skip("LyCORIS layout is written for LoHa and LoKr")
    from sdtune.models.lycoris import kohya_name

    trained_modules = {k.rsplit(".", 1)[0] for k in adapters.adapter_state_dict(result.unet)}
    te_modules = {k.rsplit(".", 1)[0] for k in adapters.adapter_state_dict(result.text_encoder)}
    with safe_open(str(out / adapters.LYCORIS_FILE), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    expected = {kohya_name(m, "lora_unet_") for m in trained_modules}
    expected |= {kohya_name(m, "lora_te_", root="text_model.") for m in te_modules}
    assert {k.rsplit(".", 1)[0] for k in keys} == expected
    assert all(f"{m}.alpha" in keys for m in expected)
    first = "hada_w1_a" if kind == "loha" else "lokr_w1"
    assert any(k.endswith(first) for k in keys) and json.loads(meta["ss_network_args"])["algo"] == kind
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in keys)  # lora_targets: all


def test_a_lycoris_file_with_its_own_alpha_loads_with_the_scale_lycoris_readers_apply(trained, tiny_models, tmp_path):
    """Another tool's file: alpha != rank. Rescaling the first factor by rank/alpha keeps the delta, so the
    engine must draw the same pixels if it reads the scale as LyCORIS' readers do (alpha / rank)."""
    kind, out, _ = trained
    if kind not in ("loha", "lokr"):
        pytest.skip("LyCORIS layout")
    sd = load_file(str(out / adapters.LYCORIS_FILE))
    foreign = {}
    for key, value in sd.items():
        name, suffix = key.rsplit(".", 1)
        if suffix == "alpha":
            foreign[key] = torch.tensor(float(value) * 4)  # scale x4 ...
        elif suffix in ("hada_w1_a", "lokr_w1", "lokr_w1_a"):
            w2b = sd.get(f"{name}.lokr_w2_b") if kind == "lokr" else sd[f"{name}.hada_w1_b"]
            factor = 4 if (kind == "loha" or w2b is not None or f"{name}.lokr_w1_b" in sd) else 1
            foreign[key] = value / factor  # ... and the factor / 4 (a LoKr with both factors full ignores alpha)
        else:
            foreign[key] = value
    save_file(foreign, str(tmp_path / "foreign.safetensors"))
    a, _ = engine_image(tiny_models["sd1"], out / adapters.LYCORIS_FILE)
    b, _ = engine_image(tiny_models["sd1"], tmp_path / "foreign.safetensors")
    assert np.abs(a - b).max() <= 1.5 / 255


def test_dora_file_loads_in_stock_diffusers_to_the_engines_pixels(tiny_models, subject, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "dora"
    train(tiny_models["sd1"], subject, out, "dora")
    got, _ = engine_image(tiny_models["sd1"], out)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd1"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(out))
    assert any(getattr(m, "use_dora", {}).get("default_0") for m in pipe.unet.modules())
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        stock = pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, height=32, width=32,
                     generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
    assert np.abs(stock - got).max() <= 1.5 / 255


def test_kohya_dora_scale_gives_peft_s_merged_weight_by_lycoris_formula(trained):
    """dora_scale (out, 1) with LyCORIS' output-axis decomposition: W' = dora_scale * (W + dW) / ||W + dW||_row,
    computed here from the kohya file alone, equals the weight peft merges."""
    kind, out, result = trained
    if kind != "dora":
        pytest.skip("DoRA")
    sd = load_file(str(out / adapters.KOHYA_FILE))
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    name = "lora_unet_" + module.replace(".", "_")
    layer = result.unet.get_submodule(module)
    w = layer.get_base_layer().weight.detach().float()
    alpha, rank = float(sd[f"{name}.alpha"]), sd[f"{name}.lora_down.weight"].shape[0]
    delta = sd[f"{name}.lora_up.weight"] @ sd[f"{name}.lora_down.weight"] * (alpha / rank)
    merged = w + delta
    theirs = sd[f"{name}.dora_scale"] * merged / merged.norm(dim=1, keepdim=True)
    import copy

    merged_layer = copy.deepcopy(layer)
    merged_layer.merge()  # peft's own DoRA merge
    ours = merged_layer.get_base_layer().weight.detach().float()
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_is_exact(tiny_models, subject, tmp_path, kind):
    whole = train(tiny_models["sd1"], subject, tmp_path / "whole", kind, max_steps=4)
    part = tmp_path / "part"
    train(tiny_models["sd1"], subject, part, kind, max_steps=2, checkpoint_every=1)
    resumed = train(tiny_models["sd1"], subject, part, kind, max_steps=4, resume=str(part / "checkpoint-1"))
    np.testing.assert_allclose(resumed.losses, whole.losses[1:], rtol=1e-4)
    a, b = adapters.adapter_state_dict(whole.unet), adapters.adapter_state_dict(resumed.unet)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


def test_sdxl_lokr_loads_from_both_files_with_kohya_sdxl_names(tiny_sdxl, subject, tmp_path):
    out = tmp_path / "xl"
    result = train(tiny_sdxl["sdxl"], subject, out, "lokr", train_text_encoder=True)
    with safe_open(str(out / adapters.LYCORIS_FILE), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    ref = reference(tiny_sdxl["sdxl"], result, sdxl=True)
    for name in (adapters.ADAPTER_FILE, adapters.LYCORIS_FILE):
        got, _ = engine_image(tiny_sdxl["sdxl"], out / name)
        assert np.abs(got - ref).max() <= 1.5 / 255, name


def test_bad_adapter_settings_are_one_line(tiny_models, subject, tmp_path):
    with pytest.raises(SdtuneError, match="oft_block_size must divide"):
        train(tiny_models["sd1"], subject, tmp_path / "a", "oft", oft_block_size=7)
    with pytest.raises(SdtuneError, match="adapter oft works on linear layers"):
        train(tiny_models["sd1"], subject, tmp_path / "c", "oft", lora_targets="all")
    with pytest.raises(SdtuneError, match="adapter must be one of"):
        train(tiny_models["sd1"], subject, tmp_path / "b", "lycoris")


def test_an_oft_adapter_refuses_a_scale(trained, tiny_models):
    kind, out, _ = trained
    if kind != "oft":
        pytest.skip("OFT")
    with pytest.raises(SdtuneError, match="cannot be scaled"):
        Engine.load(tiny_models["sd1"], lora=out, lora_scale=0.5)


@pytest.mark.slow
def test_a_lokr_trains_identically_on_two_gloo_processes_and_exports_once(tiny_models, subject, tmp_path):
    from test_train_multiprocess import run_on_gloo

    out = tmp_path / "out"
    info, w0, w1 = run_on_gloo(tmp_path, dict(
        model=str(tiny_models["sd1"]), instance_dir=str(subject), instance_prompt=PROMPT, resolution=32,
        adapter="lokr", lora_rank=2, max_steps=3, learning_rate=2e-2, caption_dropout=0.0, output_dir=str(out),
        seed=0))
    assert w0.keys() == w1.keys() and any("lokr_w" in k for k in w0)
    for key in w0:
        torch.testing.assert_close(w0[key], w1[key], atol=0, rtol=0)
    assert (out / adapters.ADAPTER_FILE).is_file() and (out / adapters.LYCORIS_FILE).is_file()
    assert info[0]["losses"] == info[1]["losses"]


def test_sdxl_dora_loads_in_stock_sdxl_diffusers_to_the_engines_pixels(tiny_sdxl, subject, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "xl-dora"
    train(tiny_sdxl["sdxl"], subject, out, "dora")
    got, _ = engine_image(tiny_sdxl["sdxl"], out)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl["sdxl"])
    pipe.load_lora_weights(str(out))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        stock = pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, height=32, width=32,
                     generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
    assert np.abs(stock - got).max() <= 1.5 / 255
