"""The run that knows when its subject is learned: in-loop evaluation, the kept step, the early stop and the settings
recommended - on tiny random models, with tiny CLIP and DINO built in code and scorers whose answers are known."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.models.lora import recommended_settings
from sdtune.training import dreambooth, evaluation as ev
from sdtune.training.config import config_from_dict
from sdtune.training.eval_prompts import EvalPrompts, class_noun, concept_prompts, default_prompts
from sdtune.training.selection import Selection, combine, headline

R = 32
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = np.zeros((R, R, 3), np.uint8)
        a[:, : R // 2] = rng.integers(0, 255, 3)
        a[R // 3: R // 2] = 255
        Image.fromarray(a).save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def subject(tmp_path):
    return make_images(tmp_path / "subject", 3)


def config(tiny_models, subject, out, **overrides):
    base = dict(model=str(tiny_models["sd1"]), instance_dir=str(subject), instance_prompt="a photo of sks dog",
                class_prompt="a photo of a dog", resolution=R, max_steps=4, train_batch_size=1, learning_rate=1e-3,
                caption_dropout=0.0, output_dir=str(out), seed=0, eval_every=2, eval_steps=2,
                eval_prompts=["a photo of sks dog on the beach", "a photo of sks dog in the snow"],
                eval_other_prompts=["a photo of a car"], sweep_guidance=[3.0], sweep_lora_scale=[1.0],
                max_drift=2.0, max_bleed=1.0, min_prompt_following=0.0)
    base.update(overrides)
    return config_from_dict(base)


class Scripted:
    """A scorer whose likeness follows a script, one value per evaluation (the settings sweep repeats the last)."""

    name = "scripted"

    def __init__(self, likeness):
        self.likeness, self.calls = list(likeness), 0

    def metrics(self, ci):
        value = self.likeness[min(self.calls, len(self.likeness) - 1)]
        self.calls += 1
        return {"likeness": value, "likeness_img2img": 1.0}  # the img2img probe never the lower


class MeanColour:
    """Embeds an image as its unit mean colour (+ a constant), so every cosine below is known in advance."""

    name = "colour"

    def image_embeds(self, images):
        x = torch.from_numpy(np.stack([np.asarray(i.convert("RGB"), np.float32).mean((0, 1)) / 255 for i in images]))
        return torch.nn.functional.normalize(torch.cat([x, torch.full((len(images), 1), 0.1)], 1), dim=-1)


def png(printed: str) -> str:
    return [w for w in printed.split() if w.endswith(".png")][-1]


def solid(rgb, n=2):
    return [Image.new("RGB", (8, 8), rgb) for _ in range(n)]


# ---------------------------------------------------------------- metrics from the right images

def test_feature_metrics_read_each_set_against_the_right_images():
    red, blue, green = (255, 0, 0), (0, 0, 255), (0, 255, 0)
    prompts = EvalPrompts(subject=("s1", "s2"), klass=("c1", "c2"), other=("o1",))
    ci = ev.ConceptImages(name="x", class_noun="dog", prompts=prompts, references=solid(red, 3),
                          subject=solid(red), klass=solid(blue), other=solid(green, 1),
                          base={"subject": solid(blue), "klass": solid(blue), "other": solid(green, 1)})
    m = ev.feature_metrics(MeanColour(), ci)
    assert m["likeness_colour"] == pytest.approx(1.0, abs=1e-6)  # the subject images are the references' colour
    assert m["likeness_colour_base"] < 0.1  # the base drew blue
    assert m["drift_colour"] == pytest.approx(0.0, abs=1e-6) and m["bleed_colour"] == 0.0  # class kept exactly

    ci.klass = solid(red)  # the class prompt now draws the subject: drift, and bleed on the two class images
    m = ev.feature_metrics(MeanColour(), ci)
    assert m["drift_colour"] > 0.9
    assert m["bleed_colour"] == pytest.approx(2 / 3)  # 2 of the 3 images without the identifier look like it


def test_clip_prompt_following_is_a_share_of_the_base_models(tiny_clip):
    from sdtune.models.image_features import ClipScorer

    clip = ClipScorer(tiny_clip)
    imgs = solid((200, 30, 30))
    ci = ev.ConceptImages(name="x", class_noun="dog", prompts=EvalPrompts(("a red dog", "a red dog"), (), ()),
                          references=imgs, subject=imgs, base={"subject": imgs})
    m = ev.feature_metrics(clip, ci)
    assert m["prompt_following_clip"] == pytest.approx(1.0)  # the same images as the base: its share is 1
    assert m["likeness_clip"] == pytest.approx(1.0, abs=1e-5)


def test_the_img2img_probe_bounds_the_likeness():
    h = headline({"likeness_dino": 0.8, "likeness_img2img_dino": 0.6}, ["dino"])
    assert h["likeness"] == 0.6
    assert headline({"likeness": 1.0, "likeness_img2img": 0.5}, ["judge"])["likeness"] == 0.5


def test_headline_prefers_a_scorers_own_then_dino_then_clip_and_several_concepts_take_the_worst():
    metrics = {"likeness_clip": 0.5, "likeness_dino": 0.7, "drift_clip": 0.3, "drift_dino": 0.1,
               "bleed_dino": 0.0, "crosstalk_dino": 0.25, "prompt_following_clip": 0.9}
    h = headline(metrics, ["clip", "dino"])
    assert h == {"likeness": 0.7, "drift": 0.1, "bleed": 0.25, "prompt_following": 0.9}
    assert headline({**metrics, "likeness": 0.95}, ["clip", "dino"])["likeness"] == 0.95
    assert combine([h, {"likeness": 0.2, "drift": 0.4}]) == {"likeness": 0.2, "drift": 0.4, "bleed": 0.25,
                                                            "prompt_following": 0.9}


def test_default_prompts_are_new_contexts_without_the_training_caption():
    p = default_prompts("sks", "dog")
    assert all(s.startswith("a photo of sks dog ") for s in p.subject)
    assert [s.replace("sks dog", "a dog") for s in p.subject] == list(p.klass)
    assert "a photo of sks dog" not in p.subject and all("dog" not in o for o in p.other)
    assert class_noun("a photo of a dog", "a photo of sks dog", "sks") == "dog"
    assert class_noun(None, "a photo of sks red car", "sks") == "red car"
    concept = SimpleNamespace(identifier=None, instance_prompt="a photo of zwx cat", class_prompt="a photo of a cat",
                              eval_prompts=("zwx cat surfing",), eval_class_prompts=None)
    own = concept_prompts(concept, None)
    assert own.subject == ("zwx cat surfing",) and own.klass == ("cat surfing",)


# ---------------------------------------------------------------- the rule

def _cfg(**kw):
    return SimpleNamespace(**{"max_drift": 0.3, "max_bleed": 0.2, "min_prompt_following": 0.8,
                              "learned_likeness": None, "stop_patience": 2, **kw})


def test_selection_takes_the_highest_likeness_within_the_bounds_and_the_later_of_a_tie():
    s = Selection(_cfg())
    s.add({"step": 0, "likeness": 0.99})  # the base model itself: never kept
    s.add({"step": 100, "likeness": 0.6, "drift": 0.1, "bleed": 0.0, "prompt_following": 0.9})
    s.add({"step": 200, "likeness": 0.9, "drift": 0.1, "bleed": 0.0, "prompt_following": 0.9})
    s.add({"step": 300, "likeness": 0.95, "drift": 0.5, "bleed": 0.0, "prompt_following": 0.9})  # drifted
    s.add({"step": 400, "likeness": 0.97, "drift": 0.1, "bleed": 0.3, "prompt_following": 0.9})  # bleeds
    s.add({"step": 500, "likeness": 0.99, "drift": 0.1, "bleed": 0.0, "prompt_following": 0.5})  # ignores prompts
    assert s.best["step"] == 200 and s.should_stop()  # 3 evaluations after it, none better; patience 2
    s.add({"step": 600, "likeness": 0.9, "drift": 0.1, "bleed": 0.0, "prompt_following": 0.9})  # a tie
    assert s.best["step"] == 600  # the later of a tie: more training within the bounds
    assert "step 600 kept" in s.verdict() and "drift <= 0.3" in s.verdict()
    assert s.should_stop()  # a tie is no rise: the patience still counts from step 200


def test_stop_waits_for_learned_likeness_and_patience():
    s = Selection(_cfg(learned_likeness=0.9, stop_patience=1))
    s.add({"step": 10, "likeness": 0.5})
    s.add({"step": 20, "likeness": 0.6})
    assert not s.should_stop()  # best 0.6 < 0.9: not learned, whatever the plateau
    s.add({"step": 30, "likeness": 0.92})
    assert not s.should_stop()  # learned, but no evaluation after it yet
    s.add({"step": 40, "likeness": 0.92})
    assert s.should_stop() and s.best["step"] == 40  # a tie: kept the later, stopped all the same


# ---------------------------------------------------------------- in a run

def test_a_run_writes_eval_jsonl_keeps_the_best_step_and_its_export_loads_in_stock_diffusers(
        tiny_models, subject, tmp_path, tiny_dino, tiny_clip):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    scripted = Scripted([0.1, 0.9, 0.5])  # step 0, 2, 4: step 2 is the best
    result = dreambooth.train(config(tiny_models, subject, out, keep_best=True, eval_dino=str(tiny_dino),
                                     eval_clip=str(tiny_clip), eval_img2img_strength=0.6), scorers=[scripted])
    records = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    for key in ("likeness_dino", "likeness_clip", "clip_t_clip", "prompt_following_clip", "likeness_img2img_dino"):
        assert all(np.isfinite(r[key]) for r in records[1:]), key
    for key in ("drift_dino", "bleed_dino", "drift_clip", "bleed_clip"):
        assert key in records[1], key
    assert [r["likeness"] for r in records] == [0.1, 0.9, 0.5]  # the scorer's own headline stands for likeness
    assert result.evaluation["kept_step"] == 2 and result.global_step == 4
    assert (out / "eval.svg").read_text().startswith("<svg") and "step 2 kept" in (out / "README.md").read_text()

    # best/ holds the weights of step 2: those of a run stopped there
    short = dreambooth.train(config(tiny_models, subject, tmp_path / "short", max_steps=2, eval_every=0,
                                    keep_best=False))
    del short
    best, two, last = (load_file(str(p / LORA)) for p in (out / "best", tmp_path / "short", out))
    assert best.keys() == two.keys()
    assert all(torch.equal(best[k], two[k]) for k in best)
    assert any(not torch.equal(best[k], last[k]) for k in best)
    assert (out / "best/lora_kohya.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd1"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(out / "best"))  # stock diffusers loads the kept export


def test_evaluating_changes_nothing_the_run_trains(tiny_models, subject, tmp_path, tiny_dino):
    dreambooth.train(config(tiny_models, subject, tmp_path / "a", eval_every=0, train_text_encoder=True))
    dreambooth.train(config(tiny_models, subject, tmp_path / "b", eval_dino=str(tiny_dino), train_text_encoder=True))
    a, b = load_file(str(tmp_path / "a" / LORA)), load_file(str(tmp_path / "b" / LORA))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stop_when_learned_ends_the_run_and_keeps_the_learned_step(tiny_models, subject, tmp_path):
    out = tmp_path / "run"
    result = dreambooth.train(config(tiny_models, subject, out, max_steps=12, keep_best=True, stop_when_learned=True,
                                     learned_likeness=0.8, stop_patience=1, recommend_settings=False),
                              scorers=[Scripted([0.0, 0.5, 0.85, 0.8, 0.99])])
    assert result.global_step == 6 and result.stopped_early  # learned at 4 (0.85), not beaten at 6
    assert result.evaluation["kept_step"] == 4
    assert json.loads((out / "best" / LORA).with_suffix(".safetensors").read_bytes()[8:8 + int.from_bytes(
        (out / "best" / LORA).read_bytes()[:8], "little")])["__metadata__"]["sdtune_steps"] == "4"


def test_a_resumed_run_keeps_the_evaluation_history(tiny_models, subject, tmp_path, tiny_dino):
    whole = tmp_path / "whole"
    dreambooth.train(config(tiny_models, subject, whole, eval_dino=str(tiny_dino), keep_best=True))
    out = tmp_path / "resumed"
    dreambooth.train(config(tiny_models, subject, out, eval_dino=str(tiny_dino), keep_best=True, max_steps=4,
                            checkpoint_every=2, checkpoints_keep=5))
    first = (out / "eval.jsonl").read_text().splitlines()
    # the same run resumed from its step-2 checkpoint: steps 0 and 2 come from the file, 4 is evaluated again
    result = dreambooth.train(config(tiny_models, subject, out, eval_dino=str(tiny_dino), keep_best=True,
                                     resume=str(out / "checkpoint-2")))
    again = (out / "eval.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in again] == [0, 2, 4]
    assert again[:2] == first[:2]
    assert [json.loads(x)["likeness"] for x in again] == [json.loads(x)["likeness"] for x in
                                                         (whole / "eval.jsonl").read_text().splitlines()]
    assert len(result.evaluation["history"]) == 3


def test_recommended_settings_round_trip_through_the_metadata_into_infer(tiny_models, subject, tmp_path, capsys):
    from sdtune.commands.cli import main
    from sdtune.generation.metadata import read_params

    out = tmp_path / "run"
    result = dreambooth.train(config(tiny_models, subject, out, keep_best=True, sweep_guidance=[2.0, 4.0],
                                     sweep_lora_scale=[0.5, 1.0], sweep_guidance_interval=[0.2, 1.0]),
                              scorers=[Scripted([0.0, 0.9, 0.5, 0.1, 0.2, 0.3, 0.95, 0.4])])
    settings = result.evaluation["settings"]
    assert len(settings["table"]) == 8  # 2 guidances x 2 intervals x 2 scales
    best_row = max(settings["table"], key=lambda r: r["likeness"])
    assert (settings["guidance"], settings["lora_scale"]) == (best_row["guidance"], best_row["lora_scale"])
    rec = recommended_settings(out / "best")
    assert rec == {"guidance": settings["guidance"], "lora_scale": settings["lora_scale"],
                   "guidance_interval": settings["guidance_interval"]}
    assert recommended_settings(out / "best/lora_kohya.safetensors") == rec
    assert recommended_settings(tmp_path) is None  # no LoRA there

    code = main(["infer", "txt2img", "--model", str(tiny_models["sd1"]), "--lora", str(out / "best"), "--prompt",
                 "a photo of sks dog", "--steps", "2", "--out", str(tmp_path / "imgs"), "--quiet"])
    printed, err = capsys.readouterr()
    assert code == 0 and "recommended settings" in err
    params = read_params(png(printed))
    assert params["guidance"] == rec["guidance"] and params["lora_scale"] == rec["lora_scale"]
    code = main(["infer", "txt2img", "--model", str(tiny_models["sd1"]), "--lora", str(out / "best"), "--prompt",
                 "x", "--steps", "2", "--guidance", "6", "--lora-scale", "0.7", "--guidance-interval", "0,1",
                 "--out", str(tmp_path / "imgs2"), "--quiet"])
    printed, err = capsys.readouterr()
    assert "recommended" not in err and read_params(png(printed))["guidance"] == 6.0


def test_bad_evaluation_settings_are_one_line_each(tiny_models, subject, tmp_path):
    with pytest.raises(SdtuneError, match="keep_best chooses among evaluations; set eval_every"):
        config(tiny_models, subject, tmp_path, eval_every=0, keep_best=True)
    with pytest.raises(SdtuneError, match="sweep_guidance must be a list of numbers"):
        config(tiny_models, subject, tmp_path, sweep_guidance=["high"])
    with pytest.raises(SdtuneError, match="sweep_guidance_interval must be null or two noise levels"):
        config(tiny_models, subject, tmp_path, sweep_guidance_interval=[0.8, 0.2])
    with pytest.raises(SdtuneError, match="eval_every needs a model to measure likeness with"):
        dreambooth.train(config(tiny_models, subject, tmp_path / "x"))
    with pytest.raises(SdtuneError, match="neither a model folder nor a hub id"):
        dreambooth.train(config(tiny_models, subject, tmp_path / "y", eval_dino=str(tmp_path / "no" / "dino")))
