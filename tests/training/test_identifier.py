"""train_identifier_embedding: the identifier's own embedding rows trained beside the LoRA, saved beside it,
loaded by the engine (scaled like the LoRA), resumed exactly, and refused where it cannot apply."""
import pytest
import torch
from safetensors import safe_open

from sdtune.errors import SdtuneError
from sdtune.models.lora import IDENTIFIER_FILE, identifier_token_ids
from sdtune.training import identifier
from sdtune.training.config import config_from_dict
# The recipe module (loaded once) and the recipe tests' helpers and fixtures (one torch thread, a 3-image subject).
from test_train_recipe import _one_thread, config, make_images, recipe, subject  # noqa: F401


def test_only_the_identifier_rows_change_and_only_they_get_gradients():
    base = torch.nn.Embedding(10, 4)
    module = identifier.IdentifierEmbedding(base, [3, 7])
    ids = torch.tensor([[1, 3, 5, 7, 3]])
    with torch.no_grad():
        module.identifier_rows += 1.0
    out = module(ids)
    assert torch.equal(out[0, [0, 2]], base(ids)[0, [0, 2]])  # other words read as before
    assert torch.allclose(out[0, 1], base.weight[3] + 1) and torch.allclose(out[0, 4], base.weight[3] + 1)
    assert torch.allclose(out[0, 3], base.weight[7] + 1)
    base.weight.requires_grad_(False)
    out.sum().backward()
    assert module.identifier_rows.grad is not None and torch.equal(module.identifier_rows.grad[0], torch.full((4,), 2.))
    assert module.weight is base.weight  # what transformers reads for dtype/device


def test_trained_rows_are_saved_and_the_engine_loads_them_scaled(tiny_models, subject, tmp_path):
    from sdtune.generation.engine import Engine

    out = tmp_path / "out"
    result = recipe.train(config(tiny_models, subject, out, train_text_encoder=True, train_identifier_embedding=True,
                                 identifier="sks", method="lora", max_steps=3, identifier_learning_rate=1e-2))
    plain = Engine.load(tiny_models["sd1"])
    ids = identifier_token_ids(plain.tokenizer, "sks")
    before = plain.text_encoder.get_input_embeddings().weight.detach().clone()
    with safe_open(str(out / IDENTIFIER_FILE), framework="pt") as f:
        assert f.keys() == ["sks"] and f.metadata()["token_ids.sks"] == ",".join(map(str, ids))
        rows = f.get_tensor("sks")
    assert (rows - before[ids]).abs().max() > 1e-3  # it trained (Adam moves each entry by about the lr per step)
    # The returned encoder holds the rows in its own table again, the rest of the table untouched.
    table = result.text_encoder.get_input_embeddings().weight.detach()
    assert torch.allclose(table[ids], rows)
    others = torch.ones(len(table), dtype=torch.bool)
    others[ids] = False
    assert torch.equal(table[others], before[others])

    full = Engine.load(tiny_models["sd1"], lora=out).text_encoder.get_input_embeddings().weight.detach()
    assert torch.allclose(full[ids], rows, atol=1e-6) and torch.equal(full[others], before[others])
    half = Engine.load(tiny_models["sd1"], lora=out, lora_scale=0.5).text_encoder.get_input_embeddings().weight
    assert torch.allclose(half.detach()[ids], (before[ids] + rows) / 2, atol=1e-6)

    # Stock diffusers: load_lora_weights, then the README's three lines put the rows in; the prompt then
    # encodes as the engine encodes it.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd1"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(out)
    with safe_open(str(out / IDENTIFIER_FILE), "pt") as f:
        for word in f.keys():
            ids_ = [int(i) for i in f.metadata()[f"token_ids.{word}"].split(",")]
            pipe.text_encoder.get_input_embeddings().weight.data[ids_] = f.get_tensor(word).to(pipe.text_encoder.dtype)
    engine = Engine.load(tiny_models["sd1"], lora=out, fuse_lora=False)
    tokens = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        stock_emb = pipe.text_encoder(tokens)[0]
        ours = engine.text_encoder(tokens)[0]
    assert torch.allclose(stock_emb, ours, atol=1e-5)

    # A damaged file, or one for another model, is one line, before anything is loaded.
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(out, bad, ignore=shutil.ignore_patterns("latent_cache", "logs"))
    (bad / IDENTIFIER_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(SdtuneError, match="is not a readable safetensors file"):
        Engine.load(tiny_models["sd1"], lora=bad)
    save_file({"sks": torch.zeros(1, 7)}, str(bad / IDENTIFIER_FILE), metadata={"token_ids.sks": str(ids[0])})
    with pytest.raises(SdtuneError, match="tokens are 32 wide; use the base model the LoRA was trained on"):
        Engine.load(tiny_models["sd1"], lora=bad)

    # A later run into the same folder without it leaves no stale embedding for the engine to pick up.
    recipe.train(config(tiny_models, subject, out, train_text_encoder=True, method="lora", max_steps=1))
    assert not (out / IDENTIFIER_FILE).exists()


@pytest.mark.parametrize("with_te_lora", [True, False])
def test_resumed_run_ends_on_the_same_rows(tiny_models, subject, tmp_path, with_te_lora):
    common = dict(train_text_encoder=with_te_lora, train_identifier_embedding=True, identifier="sks", max_steps=4,
                  checkpoint_every=2, identifier_learning_rate=1e-2)
    recipe.train(config(tiny_models, subject, tmp_path / "whole", **common))
    recipe.train(config(tiny_models, subject, tmp_path / "half", **{**common, "max_steps": 3}))
    recipe.train(config(tiny_models, subject, tmp_path / "resumed",
                        **{**common, "resume": str(tmp_path / "half" / "checkpoint-2")}))

    def rows(folder):
        with safe_open(str(folder / IDENTIFIER_FILE), framework="pt") as f:
            return f.get_tensor("sks")

    assert torch.equal(rows(tmp_path / "whole"), rows(tmp_path / "resumed"))


@pytest.mark.parametrize("keys, message", [
    (dict(train_text_encoder=True, method="full", identifier="sks"), "trains beside a LoRA"),
    (dict(train_text_encoder=False, method="full", identifier="sks"), "trains beside a LoRA"),
    (dict(train_text_encoder=True), "needs identifier"),
])
def test_refused_in_one_line_where_it_cannot_apply(tiny_models, subject, tmp_path, keys, message):
    with pytest.raises(SdtuneError, match=message):
        config(tiny_models, subject, tmp_path / "out", train_identifier_embedding=True, **keys)


def test_refused_for_sdxl(tiny_sdxl, tmp_path):
    subject = make_images(tmp_path / "subject", 1)
    cfg = config_from_dict(dict(model=str(tiny_sdxl["sdxl"]), instance_dir=str(subject),
                                instance_prompt="a photo of sks dog",
                                identifier="sks", resolution=32, max_steps=1, train_text_encoder=True,
                                train_identifier_embedding=True, output_dir=str(tmp_path / "out")))
    with pytest.raises(SdtuneError, match="SD 1.x/2.x models so far, not SDXL"):
        recipe.train(cfg)


def test_without_the_text_encoder_lora_only_the_identifier_rows_of_the_encoder_move(tiny_models, subject, tmp_path):
    """Pivotal tuning with every other word frozen: the encoder's only trained part is the identifier's rows,
    the LoRA file holds no text-encoder layers, and the engine applies the rows alone."""
    from safetensors.torch import load_file

    from sdtune.generation.engine import Engine

    out = tmp_path / "out"
    result = recipe.train(config(tiny_models, subject, out, train_text_encoder=False, train_identifier_embedding=True,
                                 identifier="sks", max_steps=3, identifier_learning_rate=1e-2))
    plain = Engine.load(tiny_models["sd1"])
    ids = identifier_token_ids(plain.tokenizer, "sks")
    base_state = plain.text_encoder.state_dict()
    trained_state = result.text_encoder.state_dict()
    emb = next(k for k in base_state if k.endswith("token_embedding.weight"))
    changed = [k for k, v in base_state.items() if k != emb and not torch.equal(trained_state[k], v)]
    assert not changed  # every layer as it was
    moved = (trained_state[emb] - base_state[emb]).abs().amax(dim=1) > 0
    assert moved.nonzero().flatten().tolist() == ids  # and in the table, the identifier's rows alone
    assert not any(k.startswith("text_encoder") for k in load_file(str(out / "pytorch_lora_weights.safetensors")))
    loaded = Engine.load(tiny_models["sd1"], lora=out).text_encoder.get_input_embeddings().weight.detach()
    assert torch.allclose(loaded[ids], trained_state[emb][ids], atol=1e-6)


def test_dry_run_counts_the_identifier_rows(tiny_models, subject, tmp_path):
    keys = dict(train_text_encoder=True, identifier="sks", method="lora")
    plain = recipe.dry_run(config(tiny_models, subject, tmp_path / "a", **keys))["trainable_parameters"]
    rows = recipe.dry_run(config(tiny_models, subject, tmp_path / "b", train_identifier_embedding=True,
                                 **keys))["trainable_parameters"]
    assert rows["unet"] == plain["unet"]
    assert rows["text_encoder"] - plain["text_encoder"] == 32  # "sks" is one token; the tiny encoder is 32 wide
    alone = recipe.dry_run(config(tiny_models, subject, tmp_path / "c", train_identifier_embedding=True,
                                  **{**keys, "train_text_encoder": False}))["trainable_parameters"]
    assert alone == {"unet": plain["unet"], "text_encoder": 32}  # the encoder's only trained part
