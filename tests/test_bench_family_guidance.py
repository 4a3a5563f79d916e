"""bench/family_guidance.py on tiny random models: every guidance is drawn and judged on both sets, and its demo set
repeats the demo's own world inpaint check."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_family_guidance_judges_every_scale_on_both_sets(tiny_models):
    sys.path.insert(0, str(ROOT / "bench"))
    import family_guidance

    sets = {"demo": (2, 1234, 0, 2, 4321, 600), "held_out": (3, 999, 5000, 2, 9876, 6000)}
    result = family_guidance.measure(str(tiny_models["sd1"]), str(tiny_models["inpaint"]), [1.0, 3.0], sets=sets,
                                     sample_steps=1, say=lambda s: None)
    assert list(result["guidance"]) == ["1.0", "3.0"]
    for row in result["guidance"].values():
        assert set(row) == {"demo", "held_out"}
        for cell in row.values():
            assert 0.0 <= cell["adherence"] <= 1.0 and 0.0 <= cell["inpaint_in_region"] <= 1.0
            assert set(cell["per_attribute"]) == {"kind", "colour", "size", "position", "background"}


def test_the_demo_set_is_the_demos_own_inpaint_check(tiny_models):
    sys.path.insert(0, str(ROOT / "bench"))
    import family_guidance

    from sdtune.generation.engine import Engine
    from sdtune.world import demo

    engine = Engine.load(str(tiny_models["sd1"]), inpaint_model=str(tiny_models["inpaint"]))
    plan = demo.Plan(base_prompts=1, world_checks=3, sample_steps=1, batch_size=4)
    groups = {g.name: g for g in demo.family_groups(engine, plan, 32, say=lambda s: None)}
    ours = groups["world_inpaint"]
    requests, truth = family_guidance.inpaint_checks(3, 4321, 600, 32)
    assert [r["prompt"] for r in requests] == ours.prompts and truth == ours.truth
    assert [r["seed"] for r in requests] == [r.params["seed"] for r in ours.results]


def test_family_guidance_records_the_interval_it_guided_in(tiny_models, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import family_guidance

    from sdtune.generation.engine import Engine

    seen = []
    real = Engine.generate_many

    def spy(self, mode, requests, **kw):
        seen.append(kw.get("guidance_interval"))
        return real(self, mode, requests, **kw)

    monkeypatch.setattr(Engine, "generate_many", spy)
    sets = {"demo": (2, 1234, 0, 1, 4321, 600)}
    result = family_guidance.measure(str(tiny_models["sd1"]), str(tiny_models["inpaint"]), [7.5], sets=sets,
                                     sample_steps=2, say=lambda s: None, interval=(0.3, 0.8))
    assert result["guidance_interval"] == [0.3, 0.8]
    assert seen == [(0.3, 0.8), (0.3, 0.8)]  # txt2img and the inpaint check
