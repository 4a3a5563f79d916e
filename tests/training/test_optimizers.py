"""The optimizers (adamw, prodigy, adafactor, schedulefree, lion) and the EMA of the trained weights: their keys and
rules, exact resume for each, schedule-free's evaluation weights and the EMA in what is exported."""
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.training import adapters, checkpointing, dreambooth, optimizers
from sdtune.training.config import TrainConfig, config_from_dict
from sdtune.training.ema import EMA
from sdtune.training.keys_help import format_keys_help

from test_train_recipe import config, make_images  # noqa: F401 - the recipe tests' helpers

EXTRA = "pip install 'sdtune[optimizers]'"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def subject(tmp_path):
    return make_images(tmp_path / "subject", 3)


def base(**kw) -> dict:
    return {"instance_dir": "x", "instance_prompt": "a photo of sks dog", **kw}


def trainables(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def same_tensors(file_tensors: dict, module_tensors: dict) -> bool:
    """Whether a LoRA file holds exactly the module's trainable tensors (names differ between the layouts; with
    lora_alpha = lora_rank the values are unscaled)."""
    def order(ts):
        return sorted(ts, key=lambda t: (tuple(t.shape), t.double().sum().item(), t.double().abs().sum().item()))
    a, b = order(file_tensors.values()), order(module_tensors.values())
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------- keys and rules

def test_each_optimizer_is_built_from_its_keys_and_optimizer_args():
    from lion_pytorch import Lion
    from prodigyopt import Prodigy
    from schedulefree import AdamWScheduleFree
    from transformers.optimization import Adafactor

    def build(**kw):
        cfg = config_from_dict(base(**kw))
        return optimizers.make_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(3))],
                                                "lr": cfg.learning_rate}], torch.device("cpu"))

    opt = build(optimizer="prodigy", learning_rate=1.0, prodigy_d_coef=0.5, optimizer_args={"d0": "1e-5"})
    assert isinstance(opt, Prodigy)
    g = opt.param_groups[0]
    assert (g["d_coef"], g["d"], g["use_bias_correction"], g["safeguard_warmup"], g["lr"]) == (0.5, 1e-5, True, True,
                                                                                               1.0)
    opt = build(optimizer="adafactor", learning_rate=1e-4)
    assert isinstance(opt, Adafactor) and not opt.param_groups[0]["relative_step"]
    opt = build(optimizer="schedulefree", schedulefree_warmup_steps=5)
    assert isinstance(opt, AdamWScheduleFree) and opt.param_groups[0]["train_mode"]  # ready to step
    assert opt.param_groups[0]["warmup_steps"] == 5
    opt = build(optimizer="lion", learning_rate=3e-5, optimizer_args={"decoupled_weight_decay": True})
    assert isinstance(opt, Lion) and opt.param_groups[0]["betas"] == (0.9, 0.99)
    assert opt.decoupled_wd
    opt = build(optimizer="adamw", optimizer_args={"amsgrad": True})
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["amsgrad"]


@pytest.mark.parametrize("kw, error", [
    (dict(optimizer="prodigy"), "takes learning_rate 1"),  # AdamW's default lr with prodigy: a wasted run
    (dict(optimizer="prodigy", learning_rate=1.0, text_encoder_learning_rate=0.5), "one learning rate"),
    (dict(optimizer="schedulefree", lr_scheduler="cosine"), "replaces the learning-rate schedule"),
    (dict(optimizer="schedulefree", lr_warmup_steps=10), "schedulefree_warmup_steps"),
    (dict(optimizer="schedulefree", ema_decay=0.99), "already exports an average"),
    (dict(optimizer="lion", optimizer_args={"beta": 0.9}), "takes no argument 'beta'; did you mean 'betas'"),
    (dict(optimizer="lion", optimizer_args={"betas": [0.9, 0.98]}), "set by lion_beta1 and lion_beta2"),
    (dict(optimizer="adamw", optimizer_args={"lr": 1.0}), "learning_rate"),
    (dict(optimizer="adamw", optimizer_args={"amsgrad": {"a": 1}}), "must be a number, true/false"),
    (dict(optimizer="adamw", optimizer_args=[1, 2]), "must be a mapping"),
    (dict(ema_export="both"), "set ema_decay"),
    (dict(ema_decay=1.0), "ema_decay must be"),
])
def test_optimizer_and_ema_rules_are_one_line(kw, error):
    with pytest.raises(SdtuneError, match=error) as info:
        config_from_dict(base(**kw))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, module", [("prodigy", "prodigyopt"), ("schedulefree", "schedulefree"),
                                          ("lion", "lion_pytorch")])
def test_a_missing_optimizer_package_names_the_extra(monkeypatch, name, module):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == module else find(m, *a))
    with pytest.raises(SdtuneError, match=rf"optimizer {name} needs .*{re.escape(EXTRA)}"):
        config_from_dict(base(optimizer=name, learning_rate=1.0))


def test_help_keys_shows_the_optimizer_and_ema_keys():
    text = format_keys_help()
    for key in ("optimizer_args", "prodigy_d_coef", "prodigy_use_bias_correction", "prodigy_safeguard_warmup",
                "schedulefree_warmup_steps", "lion_beta1", "lion_beta2", "ema_decay", "ema_warmup",
                "ema_update_after_step", "ema_export"):
        assert f"  {key} = " in text, key
    assert "one of adamw, adamw8bit, prodigy, adafactor, schedulefree, lion" in text
    assert "3-10x smaller than AdamW's" in text


def test_ema_decay_warmup_and_exact_swap():
    p = torch.nn.Parameter(torch.tensor([0.0, 4.0]))
    ema = EMA([p], decay=0.5, warmup=False, update_after_step=1)
    with torch.no_grad():
        for step, value in ((1, 2.0), (2, 6.0), (3, 10.0)):
            p.fill_(value)
            ema.update(step)
    assert ema.shadow[0].tolist() == [0.25 * 2 + 0.25 * 6 + 0.5 * 10] * 2  # step 1 copied, then halved twice
    with ema.swapped_in():
        assert p.tolist() == [7.0, 7.0]
    assert p.tolist() == [10.0, 10.0]
    warm = EMA([p], decay=0.999)
    assert [warm.decay_at(k) for k in (1, 2, 10_000)] == [2 / 11, 3 / 12, 0.999]


# ----------------------------------------------------------------------------------------------- resume

RESUME_CASES = {
    "adamw": {},
    "prodigy": {"optimizer": "prodigy", "learning_rate": 1.0},
    "adafactor": {"optimizer": "adafactor"},
    # validation at every step: schedule-free's eval/train switch around it, and around the checkpoint
    "schedulefree": {"optimizer": "schedulefree", "schedulefree_warmup_steps": 2, "validation_prompts": ["a sks dog"],
                     "validation_every": 1, "validation_steps": 1},
    "lion": {"optimizer": "lion", "learning_rate": 1e-4},
    "adamw+ema": {"ema_decay": 0.9, "ema_warmup": False},
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_each_optimizer_resumes_bit_for_bit(tiny_models, subject, tmp_path, case):
    """4 steps in one go == 2 steps, the checkpoint, and 2 more from it (weights, EMA and losses identical)."""
    kw = dict(RESUME_CASES[case], max_steps=4, checkpoint_every=2, checkpoints_keep=5, train_text_encoder=True,
              lr_scheduler="constant")
    whole = dreambooth.train(config(tiny_models, subject, tmp_path / "whole", **kw))
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", out / "checkpoint-2")
    resumed = dreambooth.train(config(tiny_models, subject, out, resume="latest", **kw))
    assert resumed.global_step == 4 and resumed.losses == whole.losses[2:]
    a, b = trainables(whole.unet), trainables(resumed.unet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = trainables(whole.text_encoder), trainables(resumed.text_encoder)
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    for name in (adapters.LORA_FILE, adapters.KOHYA_FILE):
        fa, fb = load_file(str(tmp_path / "whole" / name)), load_file(str(out / name))
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    first_steps = dreambooth.train(config(tiny_models, subject, tmp_path / "short", **{**kw, "max_steps": 2,
                                                                                      "checkpoint_every": 0}))
    if case != "schedulefree":  # (its 2-step run warms up over other steps' lr: not the same first steps)
        assert first_steps.losses == whole.losses[:2]


def test_a_run_with_ema_refuses_a_checkpoint_without_it(tiny_models, subject, tmp_path):
    dreambooth.train(config(tiny_models, subject, tmp_path / "out", max_steps=3, checkpoint_every=2))
    with pytest.raises(SdtuneError, match="without ema_decay"):
        dreambooth.train(config(tiny_models, subject, tmp_path / "out", max_steps=3, checkpoint_every=2,
                                resume="latest", ema_decay=0.9))


# ----------------------------------------------------------------------------------------------- what is exported

def test_schedulefree_exports_its_evaluation_weights(tiny_models, subject, tmp_path, monkeypatch):
    """The exported LoRA is x = (y - (1 - beta1) z) / beta1, from the training weights y and schedule-free's z after
    the last step, not y."""
    after_step = {}
    real = dreambooth.make_optimizer

    def recording(cfg, groups, device):
        opt = real(cfg, groups, device)

        def hook(optimizer, args, kwargs):
            for p in (p for g in optimizer.param_groups for p in g["params"]):
                after_step[id(p)] = (p.detach().clone(), optimizer.state[p]["z"].detach().clone())
        opt.register_step_post_hook(hook)
        return opt

    monkeypatch.setattr(dreambooth, "make_optimizer", recording)
    result = dreambooth.train(config(tiny_models, subject, tmp_path / "out", optimizer="schedulefree", max_steps=3,
                                     learning_rate=1e-2))
    beta1 = 0.9
    exported = {}
    for name, p in result.unet.named_parameters():
        if p.requires_grad:
            y, z = after_step[id(p)]
            x = (y - (1 - beta1) * z) / beta1
            torch.testing.assert_close(p.detach(), x, rtol=1e-5, atol=1e-6)
            exported[name] = p.detach()
    assert any(not torch.allclose(after_step[id(p)][0], p) for p in result.unet.parameters() if p.requires_grad)
    assert same_tensors(load_file(str(tmp_path / "out" / adapters.LORA_FILE)), exported)


def test_ema_export_is_the_average_of_the_step_weights(tiny_models, subject, tmp_path):
    """decay 0.5 from step 1 on (no warm-up): EMA = 0.25 w1 + 0.25 w2 + 0.5 w3, w_k from a run without EMA; the raw
    weights are written beside it with ema_export: both."""
    kw = dict(max_steps=3, checkpoint_every=1, checkpoints_keep=5)
    plain = dreambooth.train(config(tiny_models, subject, tmp_path / "plain", **kw))
    w = [load_file(str(tmp_path / "plain" / f"checkpoint-{k}" / "model.safetensors")) for k in (1, 2)]
    w.append(trainables(plain.unet))
    expected = {n: 0.5 * (0.5 * w[0][n] + 0.5 * w[1][n]) + 0.5 * w[2][n] for n in w[2]}

    averaged = dreambooth.train(config(tiny_models, subject, tmp_path / "ema", ema_decay=0.5, ema_warmup=False,
                                       ema_update_after_step=1, ema_export="both", **kw))
    got = trainables(averaged.unet)
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-6, atol=1e-7)
    assert same_tensors(load_file(str(tmp_path / "ema" / adapters.LORA_FILE)), got)
    raw, plain_file = (load_file(str(tmp_path / d / adapters.LORA_FILE)) for d in ("ema/raw", "plain"))
    assert raw.keys() == plain_file.keys() and all(torch.equal(raw[k], plain_file[k]) for k in raw)
    # the raw weights trained on as without EMA: the same losses, the checkpoints hold them (not the average)
    assert averaged.losses == plain.losses
    ck = load_file(str(tmp_path / "ema" / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(ck[n], w[1][n]) for n in ck)
    assert checkpointing.latest_checkpoint(tmp_path / "ema").name == "checkpoint-2"


def test_adamw8bit_is_still_refused_off_cuda():
    cfg = TrainConfig(optimizer="adamw8bit")
    with pytest.raises(SdtuneError, match="CUDA"):
        optimizers.make_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], torch.device("cpu"))


def test_the_evaluation_keeps_the_ema_weights_of_its_best_step(tiny_models, subject, tmp_path):
    """keep_best under EMA: best/ (exported inside the in-loop evaluation) holds the average at the kept step."""
    from test_watch import Scripted, config as watch_config

    plain = dreambooth.train(config(tiny_models, subject, tmp_path / "plain", max_steps=4, checkpoint_every=1,
                                    checkpoints_keep=5, class_prompt="a photo of a dog"))
    w = {k: load_file(str(tmp_path / "plain" / f"checkpoint-{k}" / "model.safetensors")) for k in (1, 2)}
    at_2 = {n: 0.5 * w[1][n] + 0.5 * w[2][n] for n in w[2]}

    out = tmp_path / "run"
    result = dreambooth.train(watch_config(tiny_models, subject, out, resolution=32, keep_best=True, ema_decay=0.5,
                                           ema_warmup=False, ema_update_after_step=1, recommend_settings=False),
                              scorers=[Scripted([0.1, 0.9, 0.5])])  # steps 0, 2, 4: step 2 is the best
    assert result.evaluation["kept_step"] == 2
    kept = load_file(str(out / ".best_trainables.safetensors"))
    for n in at_2:
        torch.testing.assert_close(kept[f"unet.{n}"], at_2[n], rtol=1e-6, atol=1e-7)
    assert result.losses == plain.losses  # evaluating the average changed nothing the run trains


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(ema_decay=0.9), dict(optimizer="schedulefree")], ids=["ema", "schedulefree"])
def test_two_processes_end_identical_with_ema_or_schedulefree(tiny_models, tmp_path, kw):
    """DDP on gloo: both ranks hold the same final weights (the average, or schedule-free's evaluation weights) after
    a checkpoint mid-run, and the file the main process exported holds them."""
    from test_train_multiprocess import run_on_gloo

    one = make_images(tmp_path / "one", 2)
    common = dict(model=str(tiny_models["sd1"]), instance_dir=str(one), instance_prompt="a photo of sks dog",
                  resolution=32, max_steps=4, learning_rate=1e-3, train_batch_size=1, caption_dropout=0.0,
                  checkpoint_every=2, seed=0, **kw)
    info, w0, w1 = run_on_gloo(tmp_path, {**common, "output_dir": str(tmp_path / "two")})
    assert w0.keys() == w1.keys() and w0 and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert info[0]["losses"] == info[1]["losses"]
    saved = "custom_checkpoint_0.pkl" if "ema_decay" in kw else "optimizer.bin"  # the average, in the checkpoint
    assert (tmp_path / "two" / "checkpoint-2" / saved).is_file()
    assert same_tensors(load_file(str(tmp_path / "two" / adapters.LORA_FILE)), w0)
