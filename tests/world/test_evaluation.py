"""Evaluation: judge metrics on renders, CLIP-T / CLIP-I / DINO on tiny random local models, `sdtune eval`."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdtune.errors import SdtuneError
from sdtune.world import evaluation, scenes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def judge():
    from sdtune.world.judge import Judge

    return Judge.load()


def _renders(n, seed, **kw):
    return list(scenes.dataset(n, seed, **kw))


def test_prompt_adherence_separates_right_and_wrong_prompts(judge):
    rs = _renders(40, seed=101)
    images = [r.image for r in rs]
    right = evaluation.prompt_adherence(images, [r.caption for r in rs], judge)
    # Every prompt describes a different scene than its image: rotate the captions by one.
    wrong = evaluation.prompt_adherence(images, [rs[(i + 1) % len(rs)].caption for i in range(len(rs))], judge)
    assert right >= 0.9 and wrong <= 0.2
    # Only stated attributes count: a prompt stating nothing but the true background is honoured.
    only_bg = [scenes.caption(r.scene, stated={"background"}) for r in rs]
    assert evaluation.prompt_adherence(images, only_bg, judge) >= 0.9


def test_attribute_accuracy_names_the_attribute_that_is_wrong(judge):
    rs = _renders(30, seed=102)
    images = [r.image for r in rs]
    acc = evaluation.attribute_accuracy(images, [r.caption for r in rs], judge)
    assert set(acc) == set(scenes.ATTRIBUTES) and min(acc.values()) >= 0.9
    # The same prompts with each colour replaced by another: only colour drops.
    other = {c: scenes.COLOURS[(scenes.COLOURS.index(c) + 1) % len(scenes.COLOURS)] for c in scenes.COLOURS}
    recoloured = [scenes.caption(scenes.Scene(**{**r.scene.attrs(), "colour": other[r.scene.colour]})) for r in rs]
    acc = evaluation.attribute_accuracy(images, recoloured, judge)
    assert acc["colour"] <= 0.1 and min(v for k, v in acc.items() if k != "colour") >= 0.9
    # Attributes no prompt states are left out.
    assert set(evaluation.attribute_accuracy(images, [scenes.caption(r.scene, stated={"kind"}) for r in rs],
                                             judge)) == {"kind"}


def test_subject_and_prior_metrics(judge):
    rng = np.random.default_rng(5)
    boxes = [scenes.Scene(**{**scenes.sample_scene(rng).attrs(), "kind": "box"}, seed=i) for i in range(24)]
    plain = [scenes.render(s) for s in boxes]
    subj = [scenes.render(s, subject="checker_box") for s in boxes]
    assert evaluation.subject_fidelity([r.image for r in subj], judge, class_noun="box") >= 0.9
    assert evaluation.subject_fidelity([r.image for r in plain], judge) <= 0.1
    assert evaluation.prior_preservation([r.image for r in plain], "box", judge) >= 0.9
    assert evaluation.prior_preservation([r.image for r in subj], "box", judge) <= 0.1
    # Context: the subject's real captions are honoured, another scene's are not (mostly).
    assert evaluation.prompt_fidelity([r.image for r in subj], [r.caption for r in subj], judge) >= 0.9
    other = [scenes.caption(scenes.Scene(kind="box", size="small" if s.size == "large" else "large",
                                       position=s.position, background=s.background), identifier="sks") for s in boxes]
    assert evaluation.prompt_fidelity([r.image for r in subj], other, judge) <= 0.2
    # Both at once: the subject in its stated context; the plain box in it, or the subject elsewhere, is not.
    own = [r.caption for r in subj]
    both = lambda images, prompts: evaluation.subject_in_context(  # noqa: E731
        images, prompts, judge, class_noun="box", subject="checker_box", identifier="sks")
    assert both([r.image for r in subj], own) >= 0.9
    assert both([r.image for r in plain], own) <= 0.1
    assert both([r.image for r in subj], other) <= 0.2
    with pytest.raises(SdtuneError):
        evaluation.prompt_adherence([subj[0].image], [], judge)


def test_clip_metrics_on_tiny_random_clip(tiny_clip):
    rs = _renders(4, seed=3)
    images = [r.image for r in rs]
    scorer = evaluation.ClipScorer(tiny_clip)
    t = evaluation.clip_t(images, [r.caption for r in rs], scorer)
    i_self = evaluation.clip_i(images[:1], images[:1], scorer)
    i_other = evaluation.clip_i(images[:2], images[2:], scorer)
    assert -1 <= t <= 1 and -1 <= i_other <= 1
    assert i_self == pytest.approx(1.0, abs=1e-5)
    assert i_other < 0.99999
    # A path works as well as a loaded scorer.
    assert evaluation.clip_i(images[:1], images[:1], tiny_clip) == pytest.approx(1.0, abs=1e-5)


def test_dino_metric_on_tiny_random_vit(tiny_dino):
    rs = _renders(3, seed=4)
    images = [r.image for r in rs]
    same = evaluation.dino(images[:1], images[:1], tiny_dino)
    other = evaluation.dino(images[:1], images[1:], tiny_dino)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert -1 <= other < 0.99999


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SdtuneError, match="not a model folder"):
        evaluation.ClipScorer(tmp_path)
    with pytest.raises(SdtuneError, match="neither a model folder nor a hub id"):
        evaluation.DinoScorer(tmp_path / "missing")


def _save_png(img: Image.Image, path: Path, prompt: str):
    info = PngImagePlugin.PngInfo()
    info.add_itxt("sdtune", json.dumps({"prompt": prompt, "seed": 0}))
    img.save(path, pnginfo=info)


def test_sdtune_eval_cli(tmp_path, tiny_clip, tiny_dino):
    from sdtune.commands.cli import main

    gen = tmp_path / "gen"
    gen.mkdir()
    boxes = [scenes.Scene("box", "red", size, pos, bg, seed=i) for i, (size, pos, bg) in
              enumerate([("large", "left", "grass"), ("small", "center", "snow"), ("large", "right", "night")])]
    for i, s in enumerate(boxes):
        r = scenes.render(s, subject="checker_box")
        _save_png(r.image, gen / f"subject-{i}.png", r.caption)
        plain = scenes.render(s)
        _save_png(plain.image, gen / f"class-{i}.png", scenes.caption(s, stated={"kind"}))
        _save_png(plain.image, gen / f"world-{i}.png", plain.caption)
    subject_dir = ROOT / "data/subjects/checker_box"
    out = tmp_path / "metrics.json"
    rc = main(["eval", "--images", str(gen), "--subject-dir", str(subject_dir), "--clip", str(tiny_clip),
               "--dino", str(tiny_dino), "--out", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["images"] == 9 and m["images_with_prompt"] == 9
    assert m["subject_fidelity_n"] == 3 and m["subject_fidelity"] >= 2 / 3
    assert m["prior_preservation_n"] == 6 and m["prior_preservation"] >= 5 / 6
    assert m["prompt_adherence_n"] == 6 and m["prompt_adherence"] >= 5 / 6
    assert m["prompt_fidelity_n"] == 3
    for key in ("clip_t", "clip_i", "dino"):
        assert -1 <= m[key] <= 1
    # Bad input: one line, exit 2.
    assert main(["eval", "--images", str(tmp_path / "nope"), "--out", str(out)]) == 2
