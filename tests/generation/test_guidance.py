"""Guidance in a limited interval of noise levels: parsing, the hook's exact effect, metadata, the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.guidance_interval import guided_at, parse_interval

STEPS = 4


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


@pytest.fixture(scope="module")
def engine(tiny_models):
    from sdtune.generation.engine import Engine

    return Engine.load(tiny_models["sd1"], inpaint_model=tiny_models["inpaint"])


def draw(engine, **kw):
    (result,) = engine.generate("txt2img", prompt="a red ball on grass", steps=STEPS, seed=3, **kw)
    return result


def test_parse_interval_accepts_text_and_pairs_and_refuses_the_rest():
    assert parse_interval(None) is None
    assert parse_interval("0.3,0.8") == (0.3, 0.8)
    assert parse_interval([0, 1]) == (0.0, 1.0)
    for bad in ("0.8,0.3", "0.5,0.5", "-0.1,0.5", "0.2,1.5", "mid", "0.1,0.2,0.3", "nan,1", [0.3]):
        with pytest.raises(SdtuneError, match="guidance_interval must be two noise levels"):
            parse_interval(bad)


def test_guided_at_reads_the_noise_level_of_the_timestep():
    assert guided_at(999, None, 1000)
    assert guided_at(torch.tensor([500]), (0.3, 0.8), 1000)
    assert not guided_at(torch.tensor(800), (0.3, 0.8), 1000)  # the upper end is open ...
    assert guided_at(999, (0.3, 1.0), 1000)  # ... except at 1, which holds the last timestep
    assert guided_at(300.0, (0.3, 0.8), 1000) and not guided_at(299.0, (0.3, 0.8), 1000)


def test_the_whole_interval_is_stock_guidance_and_the_hook_is_removed(engine):
    plain = draw(engine, guidance=7.5)
    whole = draw(engine, guidance=7.5, guidance_interval=(0.0, 1.0))
    assert np.array_equal(pixels(plain), pixels(whole))
    assert all(not unet._forward_hooks for unet in engine.unets.values())


def test_outside_the_interval_the_step_is_the_conditional_prediction(engine):
    """An interval no timestep falls in samples the conditional prediction alone: guidance 1.0's image."""
    none_guided = draw(engine, guidance=7.5, guidance_interval=(0.9995, 1.0))
    unguided = draw(engine, guidance=1.0)
    guided = draw(engine, guidance=7.5)
    assert np.abs(pixels(none_guided) - pixels(unguided)).max() <= 1  # a batch of 2 rounds a little differently
    assert np.abs(pixels(guided) - pixels(unguided)).max() > 10
    part = draw(engine, guidance=7.5, guidance_interval=(0.3, 0.8))
    assert not np.array_equal(pixels(part), pixels(guided)) and not np.array_equal(pixels(part), pixels(unguided))


def test_the_interval_reaches_inpaint_and_the_metadata_regenerates_it(engine, tmp_path):
    from PIL import Image

    from sdtune.generation.engine import regenerate
    from sdtune.generation.metadata import read_params, save_results

    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8"))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    kw = dict(prompt="a hat", image=image, mask=mask, steps=STEPS, seed=1, guidance=7.5)
    (plain,) = engine.generate("inpaint", **kw)
    (limited,) = engine.generate("inpaint", guidance_interval="0.3,0.8", **kw)
    assert not np.array_equal(pixels(plain), pixels(limited))
    assert limited.params["guidance_interval"] == [0.3, 0.8] and plain.params["guidance_interval"] is None

    (path,) = save_results([draw(engine, guidance=7.5, guidance_interval=(0.3, 0.8))], tmp_path)
    params = read_params(path)
    assert params["guidance_interval"] == [0.3, 0.8]
    (again,) = regenerate(params, engine=engine)
    assert np.array_equal(pixels(again), np.asarray(Image.open(path).convert("RGB"), dtype=np.int16))


def test_the_cli_passes_the_interval_on(tiny_models, tmp_path, capsys):
    from sdtune.commands.cli import main
    from sdtune.generation.metadata import read_params

    code = main(["infer", "txt2img", "--model", str(tiny_models["sd1"]), "--prompt", "x", "--steps", "2",
                 "--guidance-interval", "0.3,1", "--out", str(tmp_path), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert read_params(out.split()[0])["guidance_interval"] == [0.3, 1.0]


def test_the_hook_leaves_a_batch_the_pipeline_did_not_stack_alone():
    """A guidance-distilled UNet (or scale <= 1) gets no unconditional half: nothing is replaced."""
    from sdtune.guidance_interval import limited_guidance

    class Echo(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False):
            return (sample * 2,)

    net, x = Echo(), torch.arange(4.0).view(2, 2)
    with limited_guidance(net, (0.3, 0.8), 1000, guiding=lambda: False):
        assert torch.equal(net(x, 100)[0], x * 2)
    with limited_guidance(net, (0.3, 0.8), 1000):
        assert torch.equal(net(x, 100)[0], torch.cat([x[1:] * 2, x[1:] * 2]))  # outside: cond for both halves
        assert torch.equal(net(x, torch.tensor(500))[0], x * 2)  # inside: untouched
    assert not net._forward_hooks


def test_sdxl_takes_the_interval_too(tiny_sdxl):
    from sdtune.generation.engine import Engine

    xl = Engine.load(tiny_sdxl["sdxl"])
    kw = dict(prompt="a red ball", steps=STEPS, seed=2, guidance=7.5)
    (plain,) = xl.generate("txt2img", **kw)
    (whole,) = xl.generate("txt2img", guidance_interval=(0.0, 1.0), **kw)
    (part,) = xl.generate("txt2img", guidance_interval=(0.3, 0.8), **kw)
    assert np.array_equal(pixels(plain), pixels(whole)) and not np.array_equal(pixels(plain), pixels(part))
