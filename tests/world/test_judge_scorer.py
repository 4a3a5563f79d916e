"""The world's judge as the in-loop evaluation's scorer: each share is read from the images it is about."""
import pytest

from sdtune.training.eval_prompts import EvalPrompts
from sdtune.training.evaluation import ConceptImages, feature_metrics
from sdtune.world import scenes
from sdtune.world.judge_scorer import JudgeScorer


@pytest.fixture(scope="module")
def scorer():
    return JudgeScorer()


def renders(n, seed, subject=None, kind="box", position="left", background="grass"):
    return [scenes.render(scenes.Scene(kind=kind, colour="red", size="large", position=position,
                                       background=background, seed=seed + i), subject=subject).image
            for i in range(n)]


def concept(subject, klass, base_klass, prompts_subject=None):
    n = len(subject)
    prompts = EvalPrompts(subject=tuple(prompts_subject or ["a photo of a large sks box on the left, on grass"] * n),
                          klass=("a photo of a large box on the left, on grass",) * len(klass), other=())
    return ConceptImages(name="checker_box", class_noun="box", prompts=prompts,
                         references=renders(4, 900, "checker_box"), subject=subject, klass=klass,
                         base={"subject": renders(n, 300), "klass": base_klass, "other": []})


def test_the_judges_shares_come_from_the_right_images(scorer):
    boxes = renders(8, 100)
    learned = concept(renders(8, 0, "checker_box"), boxes, boxes)
    m = scorer.metrics(learned)
    assert m["likeness"] == m["judge_subject"] >= 0.9  # the subject drawn: the judge sees it
    assert m["judge_prior"] >= 0.9 and m["drift"] == 0.0 and m["bleed"] == 0.0  # the class kept as the base drew it
    assert m["judge_context"] >= 0.9 and m["prompt_following"] == pytest.approx(m["judge_context"] /
                                                                                m["judge_context_base"])

    drifted = concept(renders(8, 0), renders(8, 200, "checker_box"), boxes)  # identifier ignored, class bleeds
    m = scorer.metrics(drifted)
    assert m["likeness"] <= 0.1
    assert m["drift"] >= 0.9 and m["bleed"] >= 0.9 and m["judge_prior"] <= 0.1


def test_its_features_tell_the_subject_from_its_class(scorer):
    ci = concept(renders(8, 0, "checker_box"), renders(8, 100), renders(8, 100))
    own = feature_metrics(scorer, ci)
    ci.subject = renders(8, 0)
    plain = feature_metrics(scorer, ci)
    assert own["likeness_judge"] > plain["likeness_judge"] + 0.1
    assert own["drift_judge"] == pytest.approx(0.0, abs=1e-5)


def test_sdtune_train_measures_the_embedded_family_with_the_judge_and_nothing_else_with_it(tmp_path, tiny_models):
    from sdtune.training.config import config_from_dict
    from sdtune.world.judge_scorer import world_scorers

    folder = tmp_path / "photos"
    folder.mkdir()
    renders(1, 0, "checker_box")[0].save(folder / "a.png")
    common = dict(instance_dir=str(folder), instance_prompt="a photo of sks box", output_dir=str(tmp_path / "o"))
    embedded = config_from_dict({**common, "model": None, "eval_every": 10})
    assert [s.name for s in world_scorers(embedded)] == ["judge"]
    assert world_scorers(config_from_dict({**common, "model": None})) == []  # no evaluation asked for
    assert world_scorers(config_from_dict({**common, "model": str(tiny_models["sd1"]), "eval_every": 10})) == []
