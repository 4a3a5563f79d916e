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
