"""The shipped judge: held-out accuracy per attribute, agreement logic, loading errors."""
import json

import pytest

from sdtune.errors import SdtuneError
from sdtune.world import scenes
from sdtune.world.judge import DEFAULT_DIR, Judge

HELDOUT_SEED = 777_001  # not a seed the training recipe renders from


@pytest.fixture(scope="module")
def judge():
    return Judge.load()


@pytest.fixture(scope="module")
def heldout():
    return list(scenes.dataset(600, seed=HELDOUT_SEED, subject_share=0.2))


def test_heldout_accuracy_per_attribute(judge, heldout):
    preds = judge.predict([r.image for r in heldout])
    for name in scenes.ATTRIBUTES:
        pairs = [(p[name], r.scene.attrs()[name]) for p, r in zip(preds, heldout) if not (name == "colour" and r.subject)]
        acc = sum(a == b for a, b in pairs) / len(pairs)
        assert acc >= 0.95, (name, acc)
    subj = sum(p["subject"] == r.subject for p, r in zip(preds, heldout)) / len(heldout)
    assert subj >= 0.95, subj
    for name, spec in scenes.SUBJECTS.items():  # each subject: recognised as itself, and as its class
        mine = [p for p, r in zip(preds, heldout) if r.subject == name]
        assert len(mine) >= 20, name
        assert sum(p["subject"] == name for p in mine) / len(mine) >= 0.99, name
        assert sum(p["kind"] == spec["class_noun"] for p in mine) / len(mine) >= 0.95, name


def test_agrees_checks_only_stated_attributes(judge):
    r = scenes.render(scenes.Scene("ring", "yellow", "large", "right", "sand", seed=4))
    assert judge.agrees(r.image, scenes.parse(r.caption))
    assert judge.agrees(r.image, {"background": "sand"})
    assert judge.agrees(r.image, {})
    assert not judge.agrees(r.image, {"kind": "star"})
    assert not judge.agrees(r.image, {"kind": "ring", "position": "left"})
    assert not judge.agrees(r.image, {"subject": True})
    s = scenes.render(scenes.Scene("box", "red", "large", "center", "grass", seed=4), subject="checker_box")
    assert judge.agrees(s.image, scenes.parse(s.caption))  # includes subject=True and kind=box


def test_judge_reads_images_of_other_sizes(judge):
    r = scenes.render(scenes.Scene("star", "blue", "large", "left", "snow", seed=8), size=128)
    assert judge.predict([r.image])[0]["kind"] == "star"


def test_shipped_files_and_recipe_record():
    cfg = json.loads((DEFAULT_DIR / "config.json").read_text())
    assert (DEFAULT_DIR / "judge.safetensors").stat().st_size < 1_000_000
    assert set(cfg["heads"]) == {*scenes.ATTRIBUTES, "subject"}
    assert cfg["training"]["recipe"].startswith("python train/judge.py")


def test_missing_judge_is_a_clear_error(tmp_path):
    with pytest.raises(SdtuneError, match="train/judge.py"):
        Judge.load(tmp_path)


def test_a_random_weight_model_scores_near_chance(judge, tiny_models):
    """Honest: images from an untrained model match their prompts only as often as guessing would."""
    import numpy as np
    import torch

    from sdtune.models.loading import load_pipeline
    from sdtune.world import evaluation

    pipe = load_pipeline(str(tiny_models["sd1"]), device="cpu", dtype=torch.float32)
    rng = np.random.default_rng(0)
    prompts = [scenes.caption(scenes.sample_scene(rng)) for _ in range(30)]
    images = pipe(prompts, num_inference_steps=2, height=32, width=32, output_type="pil",
                  generator=torch.Generator().manual_seed(0)).images
    acc = evaluation.attribute_accuracy(images, prompts, judge)
    chance = {name: 1 / len(values) for name, values in scenes.CHOICES.items()}
    for name, value in acc.items():  # 30 images: chance plus a generous 3.5 binomial standard errors
        assert value <= chance[name] + 3.5 * (chance[name] * (1 - chance[name]) / 30) ** 0.5 + 1e-9, (name, value)
    assert evaluation.prompt_adherence(images, prompts, judge) <= 0.05
    subject_prompts = [scenes.caption(scenes.Scene(kind=s["class_noun"]), identifier=s["identifier"],
                                      stated={"kind"}) for s in scenes.SUBJECTS.values()]
    noise = pipe(subject_prompts * 4, num_inference_steps=2, height=32, width=32, output_type="pil",
                 generator=torch.Generator().manual_seed(1)).images
    assert evaluation.subject_fidelity(noise, judge) <= 0.1
