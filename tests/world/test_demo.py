"""`sdtune demo --quick` end to end on tiny random models (the embedded family hidden), via the CLI."""
import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from sdtune.commands.cli import main
from sdtune.errors import SdtuneError
from sdtune.generation.metadata import read_params
from sdtune.models import embedded
from sdtune.world.demo import DEFAULT_SUBJECT, DEMO_CONFIG, MODE_GROUPS, TINY_NOTICE

REAL_MODELS_DIR = embedded.MODELS_DIR
ROOT_SUBJECTS = DEFAULT_SUBJECT.parent
DEMO_YAML = yaml.safe_load(DEMO_CONFIG.read_text())
SCORES = ("base_prompt_adherence", "guidance_gain", "inpaint_in_region", "depth_layout_kept", "subject_fidelity",
          "prompt_fidelity", "prior_preservation")


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def no_embedded(tmp_path_factory):
    """Hide the embedded family (whether or not it is built), so the demo takes its tiny-random path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embedded, "MODELS_DIR", tmp_path_factory.mktemp("no_models"))
        yield


@pytest.fixture(scope="module")
def quick_run(no_embedded, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    code, stdout, stderr = run_cli(["demo", "--quick", "--out", str(out)])
    assert code == 0, stderr[-2000:]
    return out, stdout


def test_quick_demo_runs_end_to_end_and_says_it_is_tiny_random(quick_run):
    out, stdout = quick_run
    assert TINY_NOTICE in stdout
    for n in range(1, 6):
        assert f"[{n}/5]" in stdout  # progress per phase

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"] == "tiny-random"
    for key in SCORES:
        assert key in metrics, key
    for key in ("base_prompt_adherence", "inpaint_in_region", "depth_layout_kept", "subject_fidelity",
                "prompt_fidelity", "prior_preservation"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert metrics["inpaint_outside_change"] >= 0
    # the run evaluated itself and the demo generated with the step it kept
    assert (out / "lora" / "eval.jsonl").is_file() and metrics["eval"]["verdict"]
    assert metrics["kept_step"] in [json.loads(x)["step"] for x in (out / "lora" / "eval.jsonl").read_text().splitlines()]
    # the subject in its stated context: both in one image, so never above either share alone
    assert 0.0 <= metrics["subject_in_context"] <= min(metrics["subject_fidelity"], metrics["prompt_fidelity"])
    # every target is stated and checked: the whole-image ones as booleans, per attribute / per mode as dicts
    met = metrics["targets_met"]
    assert met["base_prompt_adherence"] == (metrics["base_prompt_adherence"] >= 0.9)
    assert set(met["subject_fidelity_by_mode"]) == set(MODE_GROUPS)
    assert set(met["base_attribute_accuracy"]) == set(metrics["base_attribute_accuracy"])
    assert -1.0 <= metrics["guidance_gain"] <= 1.0
    assert metrics["guidance_gain"] == pytest.approx(
        metrics["base_prompt_adherence"] - metrics["base_prompt_adherence_guidance_1"], abs=1e-3)
    timings = metrics["timings"]
    for key in ("train_s", "generate_s", "total_s"):
        assert timings[key] > 0, key
    assert timings["total_s"] >= timings["train_s"] + timings["generate_s"] - 1
    assert metrics["steps"] == 3 and metrics["resolution"] == 32  # --quick, tiny models' native size
    assert metrics["training"]["with_prior_preservation"] and metrics["training"]["caption_dropout"] > 0
    assert metrics["modes"] == list(MODE_GROUPS)
    # the class prompts drawn by the base too, the same count, so the prior before training is reported
    assert metrics["counts"]["base_class_prompts"] == metrics["counts"]["class_prompts"]
    assert 0.0 <= metrics["base_prior_preservation"] <= 1.0 and "prior_kept" in metrics

    # The LoRA the recipe trained, and the class images for prior preservation.
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert len(list((out / "class_images").glob("*.png"))) == metrics["counts"]["class_images"] == 2
    # The default subject ships captions in context, so its class images are drawn and captioned in the world's
    # contexts (captions in context need a prior in context).
    from sdtune.world.demo import prior_prompts
    from sdtune.world.subjects import load_subject

    contexts = prior_prompts(load_subject(DEFAULT_SUBJECT))
    assert len(set(contexts)) == 20 and all(p.startswith("a photo of a box ") for p in contexts)
    assert [(out / "class_images" / f"class_0000{i}.txt").read_text().strip() for i in range(2)] == contexts[:2]
    assert metrics["training"]["instance_captions"] == 4 and metrics["training"]["class_prompts"] == 20
    assert "4 with their own caption" in (out / "report.md").read_text()

    # Every mode has images, each saved with its parameters; the four modes ran with the LoRA.
    for mode in MODE_GROUPS:
        pngs = sorted((out / "images" / mode).glob("*.png"))
        assert len(pngs) == metrics["counts"][mode] >= 1, mode
        params = read_params(pngs[0])
        assert params["mode"] == mode and params["lora"] and params["lora_scale"] == 1.0
        assert "sks" in params["prompt"]
        assert params["guidance"] == metrics["subject_guidance"] != metrics["guidance"]  # the LoRA's own guidance
    base = read_params(next((out / "images" / "base_guidance_1.0").glob("*.png")))
    assert base["guidance"] == 1.0 and base["lora"] is None  # before training: no LoRA
    base = read_params(next((out / "images" / "base_guidance_7.5").glob("*.png")))
    assert base["guidance"] == metrics["guidance"] == 7.5
    # the same world prompts at the LoRA's guidance, before training: reported with their gain over 1.0
    base = read_params(next((out / "images" / "base_subject_guidance").glob("*.png")))
    assert base["guidance"] == metrics["subject_guidance"] and base["lora"] is None
    assert metrics["counts"]["base_subject_guidance"] == metrics["counts"]["base_guidance_7.5"]
    assert metrics["guidance_gain_at_subject_guidance"] == pytest.approx(
        metrics["base_prompt_adherence_at_subject_guidance"] - metrics["base_prompt_adherence_guidance_1"], abs=1e-3)
    assert set(metrics["base_attribute_accuracy_at_subject_guidance"]) == set(metrics["base_attribute_accuracy"])
    # ... and at 7.5 guided only in the plan's interval of noise levels: txt2img and the inpaint check, scored
    # against the same targets
    base = read_params(next((out / "images" / "base_guidance_interval").glob("*.png")))
    assert base["guidance"] == metrics["guidance"] and base["guidance_interval"] == metrics["guidance_interval"]
    assert metrics["guidance_interval"] == [0.3, 0.8] and base["lora"] is None
    painted = read_params(next((out / "images" / "world_inpaint_interval").glob("*.png")))
    assert painted["mode"] == "inpaint" and painted["guidance_interval"] == [0.3, 0.8]
    assert metrics["counts"]["world_inpaint_interval"] == metrics["counts"]["world_inpaint"]
    assert metrics["guidance_gain_interval"] == pytest.approx(
        metrics["base_prompt_adherence_interval"] - metrics["base_prompt_adherence_guidance_1"], abs=1e-3)
    assert met["base_prompt_adherence_interval"] == (metrics["base_prompt_adherence_interval"] >= 0.9)
    assert set(met["base_attribute_accuracy_interval"]) == set(metrics["base_attribute_accuracy"])
    assert 0.0 <= metrics["inpaint_in_region_interval"] <= 1.0
    assert "| base_prompt_adherence_interval |" in (out / "report.md").read_text()
    cls = read_params(next((out / "images" / "class_prompts").glob("*.png")))
    assert cls["prompt"] == "a photo of a box" and cls["lora"]


def test_an_uncaptioned_subject_gets_the_class_prompt_alone(no_embedded, tmp_path):
    """The instance prompt alone goes with class images of the class prompt alone, uncaptioned."""
    from sdtune.world.subjects import write_subject

    subject = write_subject("crescent", tmp_path / "crescent", size=32, captions=False)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["demo", "--quick", "--subject", str(subject), "--out", str(out)])
    assert code == 0, stderr[-2000:]
    assert len(list((out / "class_images").glob("*.png"))) == 2 and not list((out / "class_images").glob("*.txt"))
    assert "of 'a photo of a ring'" in stdout and "class prompts (" not in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["instance_captions"] == 0 and metrics["training"]["class_prompts"] == 0
    assert "0 with their own caption" in (out / "report.md").read_text()


def test_a_subject_folder_recommends_training_keys_and_the_command_line_wins(tmp_path):
    """subject.json's "training" goes over configs/demo.yaml and under key=value; a bad one is a one-line error."""
    from sdtune.world.demo import demo_config
    from sdtune.world.subjects import load_subject, write_subject

    ball = load_subject(write_subject("twotone_ball", tmp_path / "ball", size=32))
    box = load_subject(write_subject("checker_box", tmp_path / "box", size=32))
    crescent = load_subject(write_subject("crescent", tmp_path / "crescent", size=32))
    assert ball.training == {"output_preservation_weight": 1.0, "masked_loss_mean": "pixels"} and box.training == {}
    assert crescent.training == {"lora_targets": "attention"}  # a silhouette: attention reaches it (README)
    assert demo_config(crescent, "m", tmp_path / "o", 32, True).lora_targets == "attention"
    assert demo_config(box, "m", tmp_path / "o", 32, True).lora_targets == "all"
    assert demo_config(ball, "m", tmp_path / "o", 32, True).output_preservation_weight == 1.0
    assert demo_config(box, "m", tmp_path / "o", 32, True).output_preservation_weight == 1.0  # configs/demo.yaml's
    assert demo_config(ball, "m", tmp_path / "o", 32, True).masked_loss_mean == "pixels"
    assert demo_config(box, "m", tmp_path / "o", 32, True).masked_loss_mean == "weights"
    assert demo_config(ball, "m", tmp_path / "o", 32, True, ["output_preservation_weight=0"]) \
        .output_preservation_weight == 0.0
    meta = json.loads((ball.folder / "subject.json").read_text())
    meta["training"] = ["output_preservation_weight"]
    (ball.folder / "subject.json").write_text(json.dumps(meta))
    with pytest.raises(SdtuneError, match="must be an object of training keys"):
        load_subject(ball.folder)
    meta["training"] = {"output_preservation_weight": -1}
    (ball.folder / "subject.json").write_text(json.dumps(meta))
    with pytest.raises(SdtuneError, match="output_preservation_weight"):  # the config's own validation
        demo_config(load_subject(ball.folder), "m", tmp_path / "o", 32, True)


def test_prior_before_and_after_training_compares_the_same_draws():
    """base_prior_preservation is the base's share; prior_kept counts only prompts the base drew as the class."""
    from sdtune.world.demo import prior_before_after

    class Judge:  # reads each "image" as its prediction
        def predict(self, images):
            return list(images)

    box, ball = {"kind": "box", "subject": None}, {"kind": "ball", "subject": None}
    leak = {"kind": "box", "subject": "checker_box"}
    got = prior_before_after(Judge(), "box", [box, box, ball, box], [box, leak, box, box])
    # the base: 3 of 4 the class; of those 3 the LoRA keeps 2 (one drew the subject); the third prompt, which the
    # base missed, does not count for prior_kept though the LoRA drew a box there
    assert got == {"base_prior_preservation": 0.75, "prior_kept": pytest.approx(2 / 3)}
    assert prior_before_after(Judge(), "box", [ball], [box]) == {"base_prior_preservation": 0.0, "prior_kept": None}


def test_demo_dot_keys_set_the_generation_plan_and_not_training(tmp_path):
    """demo.KEY=VALUE overrides the plan (configs/demo.yaml's demo: section), over --quick too; others train."""
    from sdtune.world.demo import FULL, QUICK, demo_config, demo_plan
    from sdtune.world.subjects import load_subject, write_subject

    given = ["demo.subject_guidance=5", "demo.guidance_interval=[0.2, 0.9]", "max_steps=7"]
    plan, quick = demo_plan(False, given), demo_plan(True, given)
    assert plan.subject_guidance == 5 and plan.guidance_interval == (0.2, 0.9)
    assert quick.subject_guidance == 5 and quick.base_prompts == QUICK.base_prompts != FULL.base_prompts
    assert demo_plan(True) == QUICK
    box = load_subject(write_subject("checker_box", tmp_path / "box", size=32))
    assert demo_config(box, "m", tmp_path / "o", 32, True, given).max_steps == 7  # demo.* is not a training key
    with pytest.raises(SdtuneError, match="takes a number"):
        demo_plan(False, ["demo.subject_guidance=high"])


def test_subjects_trained_together_must_agree_on_their_training_keys(no_embedded, tmp_path):
    from sdtune.world.subjects import write_subject

    one = write_subject("twotone_ball", tmp_path / "ball", size=32)
    two = write_subject("crescent", tmp_path / "crescent", size=32)
    meta = json.loads((two / "subject.json").read_text())
    meta["training"] = {"output_preservation_weight": 0.5}
    (two / "subject.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    code, _, stderr = run_cli(["demo", "--quick", "--together", "--subjects", str(one), str(two), "--out", str(out)])
    assert code == 2 and "recommend different output_preservation_weight (1.0 and 0.5)" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not out.exists()


def test_together_keeps_the_demos_value_for_a_key_only_some_folders_recommend():
    from types import SimpleNamespace

    from sdtune.world.together import agreed_training

    def subj(name, **training):
        return SimpleNamespace(name=name, training=training)

    defaults = {"lora_targets": "all", "output_preservation_weight": 1.0, "masked_loss_mean": "weights"}
    said = []
    got = agreed_training([subj("box"), subj("crescent", lora_targets="attention"),
                           subj("ball", output_preservation_weight=1.0)], set(), defaults, said.append)
    assert got == {"output_preservation_weight": 1.0}  # the same as the demo's: nothing to choose between
    assert any("keeps lora_targets=all" in x and "crescent recommends attention" in x for x in said)
    # every folder recommending the same value: it applies to all
    assert agreed_training([subj("a", lora_targets="attention"), subj("b", lora_targets="attention")], set(),
                           defaults, said.append) == {"lora_targets": "attention"}
    # the command line settles a key for all, conflicts included
    assert agreed_training([subj("a", lora_targets="attention"), subj("b", lora_targets="all_linear")],
                           {"lora_targets"}, defaults, said.append) == {}
    with pytest.raises(SdtuneError, match="recommend different lora_targets"):
        agreed_training([subj("a", lora_targets="attention"), subj("b", lora_targets="x")], set(), defaults)


def test_report_links_existing_grids_and_is_honest(quick_run):
    out, _ = quick_run
    report = (out / "report.md").read_text()
    assert "tiny RANDOM" in report and "meaningless" in report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert {Path(link).stem for link in links} >= set(MODE_GROUPS) | {"base_guidance_7.5", "class_prompts",
                                                                     "world_inpaint", "world_depth2img"}
    for link in links:
        with Image.open(out / link) as grid:
            assert grid.width >= 128 and grid.height >= 128
    metrics = json.loads((out / "metrics.json").read_text())
    for key in SCORES:
        assert f"| {key} | {metrics[key]:.3f} | >= " in report


@pytest.mark.slow
def test_rerun_into_the_same_out_reuses_class_images_and_replaces_results(quick_run):
    out, _ = quick_run
    class_files = {p.name: p.stat().st_mtime_ns for p in (out / "class_images").glob("*.png")}
    before = {m: len(list((out / "images" / m).glob("*.png"))) for m in MODE_GROUPS}
    code, _, stderr = run_cli(["demo", "--quick", "--out", str(out)])
    assert code == 0, stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "class_images").glob("*.png")} == class_files
    assert {m: len(list((out / "images" / m).glob("*.png"))) for m in MODE_GROUPS} == before  # replaced, not added
    assert not list(out.rglob("*.partial")), "temporary files left behind"


@pytest.mark.parametrize("case", ["missing_subject", "no_subject_json", "bad_class_noun", "out_is_a_file",
                                  "bad_override", "bad_plan_override"])
def test_user_errors_are_one_line_and_write_nothing(case, no_embedded, tmp_path):
    out = tmp_path / "out"
    argv = ["demo", "--quick", "--out", str(out)]
    if case == "missing_subject":
        argv += ["--subject", str(tmp_path / "nope")]
    elif case == "no_subject_json":
        folder = tmp_path / "subject"
        folder.mkdir()
        Image.new("RGB", (64, 64)).save(folder / "a.png")
        argv += ["--subject", str(folder)]
    elif case == "bad_class_noun":
        folder = tmp_path / "subject"
        folder.mkdir()
        Image.new("RGB", (64, 64)).save(folder / "a.png")
        (folder / "subject.json").write_text(json.dumps({"class_noun": "dog"}))
        argv += ["--subject", str(folder)]
    elif case == "out_is_a_file":
        out.write_text("not a folder")
        argv[argv.index(str(out))] = str(out)
    elif case == "bad_override":
        argv += ["max_stepz=3"]
    else:
        argv += ["demo.subject_guidanse=3"]
    code, stdout, stderr = run_cli(argv)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdtune: error: "), stderr
    assert "Traceback" not in stderr
    if case != "out_is_a_file":
        assert not out.exists() or not any(out.iterdir()), "something was written"
    expected = {"missing_subject": "not a folder", "no_subject_json": "subject.json", "bad_class_noun": "class_noun",
                "out_is_a_file": "--out", "bad_override": "max_steps",
                "bad_plan_override": "demo.subject_guidanse"}[case]
    assert expected in lines[0]


@pytest.mark.slow
@pytest.mark.skipif(not embedded.has_embedded("base"), reason="the embedded model family is not built yet")
def test_quick_demo_on_the_embedded_family(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "MODELS_DIR", REAL_MODELS_DIR)  # undo the module's hiding, for this test
    code, stdout, stderr = run_cli(["demo", "--quick", "--out", str(tmp_path / "out")])
    assert code == 0, stderr[-2000:]
    assert TINY_NOTICE not in stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["models"] == "embedded" and metrics["resolution"] == 64
    assert DEFAULT_SUBJECT.name == metrics["subject"]


def test_ablations_train_each_variant_and_the_report_quotes_them(no_embedded, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["demo", "--ablations", "--quick", "--out", str(out)])
    assert code == 0, stderr[-2000:]
    result = json.loads((out / "ablations.json").read_text())
    variants = result["subjects"][DEFAULT_SUBJECT.name]
    assert list(variants) == ["main", "no_prior", "no_caption_dropout", "full", "attention_only", "stock"]
    from sdtune.world.demo import QUICK

    assert result["guidance"] == QUICK.subject_guidance  # what the LoRA draws at, as in the demo
    for name, row in variants.items():
        for key in ("subject_fidelity", "prompt_fidelity", "prior_preservation"):
            assert 0.0 <= row[key] <= 1.0, (name, key)
        assert (out / "grids" / f"ablation-{DEFAULT_SUBJECT.name}-{name}.png").is_file()
    # Each variant really trained what it says: LoRA files vs a complete full fine-tuned pipeline...
    runs = out / "ablations" / DEFAULT_SUBJECT.name
    for name in ("main", "no_prior", "no_caption_dropout", "attention_only", "stock"):
        assert (runs / name / "pytorch_lora_weights.safetensors").is_file(), name
    assert (runs / "full" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    # ...the stock defaults train a rank-4 attention-only UNet LoRA and nothing on the text encoder...
    from safetensors import safe_open

    with safe_open(str(runs / "stock" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert keys and all(k.startswith("unet.") for k in keys)
        assert all(any(a in k for a in ("to_q", "to_k", "to_v", "to_out")) for k in keys)
        down = [k for k in keys if k.endswith("down.weight")]  # (rank, in), as peft's lora_A
        assert down and {f.get_slice(k).get_shape()[0] for k in down} == {4}  # rank 4
    # ...and without prior preservation the loss is the instance loss alone, a different number.
    assert variants["no_prior"]["last_loss"] != variants["main"]["last_loss"]
    table = (out / "ablations.md").read_text()
    assert "| no_prior: prior preservation off |" in table and f"ablation-{DEFAULT_SUBJECT.name}-full.png" in table

    code, stdout, stderr = run_cli(["demo", "--quick", "--out", str(out)])
    assert code == 0, stderr[-2000:]
    report = (out / "report.md").read_text()
    assert "## Ablations" in report and "| full: full fine-tuning" in report and "| stock: diffusers'" in report


def test_every_subject_is_trained_and_summarised(no_embedded, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["demo", "--quick", "--subjects", "all", "--out", str(out)])
    assert code == 0, stderr[-2000:]
    summary = json.loads((out / "metrics.json").read_text())
    names = sorted(p.parent.name for p in (ROOT_SUBJECTS).glob("*/subject.json"))
    assert sorted(summary["subjects"]) == names and len(names) >= 3
    assert "base_prompt_adherence" in summary["family"]
    report = (out / "report.md").read_text()
    for name in names:
        per = json.loads((out / name / "metrics.json").read_text())
        assert per["subject"] == name and per["base_prompt_adherence"] == summary["family"]["base_prompt_adherence"]
        assert (out / name / "lora" / "pytorch_lora_weights.safetensors").is_file()
        assert f"[{name}]({name}/report.md)" in report
        # each trained with the keys its own folder recommends (the two-tone ball: output preservation)
        recommended = json.loads((ROOT_SUBJECTS / name / "subject.json").read_text()).get("training", {})
        weight = recommended.get("output_preservation_weight", DEMO_YAML["output_preservation_weight"])
        assert per["training"]["output_preservation_weight"] == weight
        assert ("output preservation" in (out / name / "report.md").read_text()) == bool(weight)
    assert any(json.loads((ROOT_SUBJECTS / n / "subject.json").read_text()).get("training") for n in names)
    assert "subject.json sets output_preservation_weight=1.0" in stdout


def test_subjects_trained_together_in_one_lora(no_embedded, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["demo", "--quick", "--together", "--out", str(out)])
    assert code == 0, stderr[-2000:]
    result = json.loads((out / "together.json").read_text())
    names = sorted(p.parent.name for p in ROOT_SUBJECTS.glob("*/subject.json"))
    assert sorted(result["subjects"]) == names
    from sdtune.world.demo import QUICK

    assert result["guidance"] == QUICK.subject_guidance
    # each subject gets the steps it would get alone
    from sdtune.world.demo import QUICK_TRAINING

    assert result["steps"] == QUICK_TRAINING["max_steps"] * len(names)
    for row in result["subjects"].values():
        assert 0 <= row["subject_fidelity"] <= 1 and 0 <= row["cross_talk"] <= 1
    # each concept evaluated on its own during training, cross-talk included: a curve per subject
    assert sorted(result["curves"]) == names
    for curve in result["curves"].values():
        assert [r["step"] for r in curve] == [0, 2, 4, 6, 8, 9]
        assert all(r["crosstalk"] is not None for r in curve[1:])
        assert 0 <= row["subject_in_context"] <= min(row["subject_fidelity"], row["prompt_fidelity"])
    assert "Per-concept evaluation during training" in (out / "together.md").read_text()
    # one LoRA, and its training read every subject's images under its own prompt
    from safetensors import safe_open

    from sdtune.training.adapters import CONFIG_METADATA_KEY

    with safe_open(str(out / "together_lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        config = json.loads(f.metadata()[CONFIG_METADATA_KEY])
    assert sorted(c["instance_prompt"] for c in config["concepts"]) == sorted(
        json.loads((ROOT_SUBJECTS / n / "subject.json").read_text())["instance_prompt"] for n in names)
    # A key every folder agrees on (a folder that sets none takes the demo's value) applies to all; a key only some
    # folders recommend, against the demo's value, is a per-subject choice: one LoRA keeps the demo's, and says so.
    from sdtune.world.demo import demo_defaults

    defaults = demo_defaults()
    folders = {n: json.loads((ROOT_SUBJECTS / n / "subject.json").read_text()).get("training", {}) for n in names}
    lines = [x for x in stdout.splitlines() if x.startswith("the subject folders ")]
    for key in {k for t in folders.values() for k in t}:
        values = {t.get(key, defaults[key]) for t in folders.values()}
        if len(values) == 1:
            assert config[key] == values.pop() and any(f"{key}=" in x and "for all of them" in x for x in lines)
        else:
            assert config[key] == defaults[key], key
            assert any(f"keeps {key}={defaults[key]}" in x or f"; {key}={defaults[key]}" in x for x in lines), key
    assert config["lora_targets"] == "all"  # the crescent's attention-only targets would cost the checker box
    assert "cross-talk (judged another subject)" in (out / "together.md").read_text()
