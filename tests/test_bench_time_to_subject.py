"""bench/time_to_subject.py on tiny random models: both recipes train and are judged, on the shipped default subject
(captioned, so its class images carry captions the stock example loop must not read as images)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_time_to_subject_runs_both_recipes_on_the_captioned_default_subject(tiny_models, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import time_to_subject

    from sdtune.world.demo import demo_plan
    from sdtune.world.subjects import DEFAULT_SUBJECT

    assert list(DEFAULT_SUBJECT.glob("*.txt"))  # the case this covers: a captioned subject
    result = time_to_subject.measure(str(tiny_models["sd1"]), DEFAULT_SUBJECT, tmp_path / "tts", every=1, max_steps=1,
                                     stock_factor=1, prompts=2, sample_steps=1, say=lambda s: None)
    assert result["guidance"] == demo_plan(False).subject_guidance
    assert [c["step"] for c in result["sdtune"]["checks"]] == [1]
    assert [c["step"] for c in result["stock"]["checks"]] == [1]
    assert list((tmp_path / "tts" / "sdtune" / "class_images").glob("*.txt"))  # drawn in context, captioned
    assert not list((tmp_path / "tts" / "stock_class").glob("*.txt"))  # the stock loop sees images only
