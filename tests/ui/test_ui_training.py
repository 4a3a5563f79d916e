"""The Train tab's work: the CLI's validation, the recipe's lock, a real run in a subprocess, Stop and Resume."""
import json
import subprocess
import sys
import time

import pytest
from PIL import Image
from uihelpers import needs_embedded

from sdtune.errors import SdtuneError
from sdtune.training.config import load_config


@pytest.fixture
def trainer(sandbox, monkeypatch):
    from sdtune.ui.training import Trainer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    t = Trainer(sandbox)
    yield t
    t.shutdown()


def form(steps=20, prior=False, **kw):
    """Trainer.start's arguments: the form's key fields at the recipe's values but for the steps and prior
    preservation (off here: class images would cost every test their generation)."""
    return {"name": "run1", "identifier": "sks", "class_noun": "box",
            "keys": {"max_steps": steps, "with_prior_preservation": prior}, **kw}


def page_form(name, images, steps=20, prior=False, num_class=4, folder=""):
    """The Start click's values as the page sends them: the form's fields, then the key fields in their order."""
    from sdtune.ui.train_form import FIELDS

    keys = {f.key: f.default for f in FIELDS}
    keys.update(max_steps=steps, with_prior_preservation=prior, num_class_images=num_class)
    return [name, images, folder, "sks", "box", None, "", *(keys[f.key] for f in FIELDS)]


def wait(job, until, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if until(job):
            return
        if job.returncode is not None and not until(job):
            raise AssertionError(f"run ended ({job.state}, exit {job.returncode}): {list(job.lines)[-5:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out: {job.state} step {job.step}: {list(job.lines)[-5:]}")


@pytest.mark.parametrize("line", ["max_stepz=3", "learning_rate=-1", "method=dora", "lora_rank=abc"])
def test_advanced_keys_are_validated_with_the_clis_messages(trainer, subject_images, line):
    with pytest.raises(SdtuneError) as cli:
        load_config(None, ["instance_dir=x", "instance_prompt=a photo of sks box", line])
    with pytest.raises(SdtuneError) as ui:
        trainer.start(images=subject_images, **form(advanced=line))
    assert str(ui.value) == str(cli.value)
    assert not any(trainer.sandbox.outputs.iterdir())  # nothing written for a refused start


@pytest.mark.parametrize("kw, message", [
    (dict(folder="/etc"), "outside the folders"),
    (dict(folder="../.."), "'..' is not allowed"),
    (dict(advanced="class_dir=/tmp/x"), "outside the folders"),
    (dict(advanced="output_dir=/tmp/x"), "set by the run name"),
    (dict(name="../escape"), "run name"),
    (dict(identifier="two words"), "identifier"),
])
def test_paths_and_names_in_the_form_are_checked(trainer, subject_images, kw, message):
    images = [] if "folder" in kw else subject_images
    with pytest.raises(SdtuneError, match=message):
        trainer.start(images=images, **form(**kw))


def test_uploads_are_checked_as_images(trainer, tmp_path, subject_images):
    fake = tmp_path / "x.png"
    fake.write_bytes(b"not an image")
    with pytest.raises(SdtuneError, match="training image x.png is not an image"):
        trainer.start(images=[*subject_images, str(fake)], **form())
    with pytest.raises(SdtuneError, match="no training images"):
        trainer.start(images=[], **form())


def test_a_folder_another_run_holds_is_refused(trainer, subject_images):
    from sdtune.training.checkpointing import output_lock

    run = trainer.sandbox.outputs / "run1"
    run.mkdir()
    with output_lock(run):  # as a `sdtune train` into that folder holds it
        with pytest.raises(SdtuneError, match="in use by another training run"):
            trainer.start(images=subject_images, **form())
    assert not (run / "ui_config.yaml").exists()


def test_a_crash_in_training_is_reported_not_fatal(trainer, sandbox):
    tiny = sandbox.outputs / "tiny_photos"
    tiny.mkdir()
    for i in range(3):
        Image.new("RGB", (4, 4), (i * 80, 0, 0)).save(tiny / f"{i}.png")
    job = trainer.start(folder="tiny_photos", **form())
    job.process.wait(60)
    wait(job, lambda j: j.ended is not None, 10)
    assert job.state == "failed" and job.error_line().startswith("sdtune: error:")
    assert "4x4" in job.error_line()


def test_train_stop_with_a_checkpoint_then_resume_to_the_end(trainer, subject_images):
    needs_embedded()
    from sdtune.ui.training import losses

    job = trainer.start(images=subject_images, **form(steps=60, advanced="checkpoint_every=1000\nvalidation_every=0"))
    with pytest.raises(SdtuneError, match="already training"):
        trainer.start(resume=True, name="run1")
    wait(job, lambda j: j.step >= 5)
    trainer.stop("run1")
    job.process.wait(60)
    wait(job, lambda j: j.ended is not None, 10)
    assert job.state == "stopped", list(job.lines)
    ckpts = sorted(job.run_dir.glob("checkpoint-*"))
    assert len(ckpts) == 1, list(job.lines)
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert stopped_at >= 5 and any("saved checkpoint-" in ln for ln in job.lines)
    assert not (job.run_dir / "pytorch_lora_weights.safetensors").exists()
    with pytest.raises(SdtuneError, match="already exists"):
        trainer.start(images=subject_images, **form())

    again = trainer.start(resume=True, name="run1")
    again.process.wait(120)
    wait(again, lambda j: j.ended is not None, 10)
    assert again.state == "finished", list(again.lines)
    assert any("resumed from" in ln and f"at step {stopped_at}" in ln for ln in again.lines), list(again.lines)
    assert (again.run_dir / "pytorch_lora_weights.safetensors").is_file()
    steps = [s for s, _ in losses(again.run_dir)]
    assert steps[-1] == 60 and set(range(1, 61)) <= set(steps)


def test_runs_tab_lists_runs_with_card_samples_and_metrics(sandbox):
    import json

    from sdtune.ui.app import State, runs_handler
    from sdtune.ui.runs import list_runs, lora_choices, model_choices

    lora = sandbox.outputs / "dog"
    (lora / "samples").mkdir(parents=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (lora / "README.md").write_text("---\nbase_model: x\n---\n# DreamBooth LoRA\n")
    Image.new("RGB", (8, 8)).save(lora / "samples" / "final-0.png")
    (lora / "checkpoint-10").mkdir()
    demo = sandbox.outputs / "demo" / "checker_box"
    demo.mkdir(parents=True)
    (demo / "metrics.json").write_text(json.dumps({"subject_fidelity": 0.4}))
    full = sandbox.outputs / "cat_full"
    (full / "unet").mkdir(parents=True)
    (full / "model_index.json").write_text("{}")
    assert {(r.name, r.kind) for r in list_runs(sandbox)} == \
        {("dog", "lora"), ("checker_box", "metrics"), ("cat_full", "full")}
    assert lora_choices(sandbox) == [("dog", str(lora))]
    assert ("cat_full", str(full)) in model_choices(sandbox)  # a full fine-tune is offered as a model
    card, samples, metrics, about, info, files = runs_handler(State(sandbox, None, None), "dog")
    assert card.startswith("```yaml\nbase_model: x\n```") and samples == [(str(lora / "samples" / "final-0.png"),
                                                                           "final")]
    assert "checkpoint-10" in info and metrics is None and "no metrics for this run" in about
    assert files == [str(lora / "README.md"), str(lora / "pytorch_lora_weights.safetensors")]
    assert runs_handler(State(sandbox, None, None), "demo/checker_box")[2] == {"subject_fidelity": 0.4}


def test_progress_and_loss_for_the_page(trainer, subject_images):
    needs_embedded()
    from sdtune.ui.app import State, train_poll, train_start_handler, train_stop_handler

    state = State(trainer.sandbox, None, trainer)
    assert train_start_handler(state, *page_form("run1", [])) == \
        "sdtune: error: no training images: upload 3-5 images of the subject or name a folder"
    assert train_stop_handler(state, "run1") == "sdtune: error: run run1 is not training"
    status = train_start_handler(state, *page_form("run1", subject_images))
    assert status.startswith("started run1")
    job = trainer.job("run1")
    job.process.wait(120)
    wait(job, lambda j: j.ended is not None, 10)
    line, frame, samples, log, curves, best, status = train_poll(state, "run1")
    assert line.startswith("finished: step 20/20, loss ") and list(frame["step"]) == list(range(1, 21))
    assert status.startswith("run1 finished at ") and "20 steps" in status  # the status followed the run
    assert train_poll(state, "run1")[-1] == {"__type__": "update"}  # said once: an error Start says stays
    # each sample says its step and its prompt
    assert samples and all(p.endswith(".png") for p, _ in samples) and "done: 20 steps" in log
    assert {label for _, label in samples} == {"step 10 · a photo of sks box", "step 20 · a photo of sks box",
                                               "final · a photo of sks box"}
    assert curves.empty and best == ""  # eval_every is off by default: no eval.jsonl, no curves
    assert trainer.measured_rate()["steps_per_s"] > 0  # kept for the next run's estimate
    assert trainer.estimate(1500).startswith("estimated ") and "for 1500 steps at" in trainer.estimate(1500)


def test_a_start_that_fails_leaves_no_run_behind(trainer, subject_images):
    trainer.python = "/nonexistent/python"  # the recipe's process cannot start
    with pytest.raises(SdtuneError, match="the training process could not start"):
        trainer.start(images=subject_images, **form())
    assert not (trainer.sandbox.outputs / "run1").exists()


def test_the_advanced_box_shows_every_key_with_its_help(tmp_path):
    """The Train tab's advanced box lists every config key the form does not set, with the help it is declared with."""
    pytest.importorskip("gradio")
    from sdtune.training.config import FIELDS
    from sdtune.ui.app import build, make_state
    from sdtune.ui.training import FORM_KEYS

    demo = build(make_state(tmp_path / "outputs"))
    (box,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "train-keys-help"]
    for name in set(FIELDS) - set(FORM_KEYS):
        assert f"`{name} = " in box.value, name
    assert FIELDS["learning_rate"].metadata["help"] in box.value


# ---------------------------------------------------------------- evaluation curves and the best step (eval.jsonl)

# Written by hand as the recipe writes it: step 0 (the base model, never kept) has the highest likeness; step 20 beats
# every other step but drifts past the default max_drift (0.25) although its stale "eligible" flag says otherwise;
# steps 30 and 40 tie (the later is kept); step 50 measured likeness only.
EVALS = [
    {"step": 0, "likeness": 0.95, "prompt_following": 1.0, "drift": 0.0, "bleed": 0.0, "dino_raw": 0.1},
    {"step": 10, "likeness": 0.5, "prompt_following": 0.9, "drift": 0.1, "bleed": 0.05},
    {"step": 20, "likeness": 0.8, "prompt_following": 0.9, "drift": 0.5, "bleed": 0.05, "eligible": True},
    {"step": 30, "likeness": 0.7, "prompt_following": 0.85, "drift": 0.2, "bleed": 0.1},
    {"step": 40, "likeness": 0.7, "prompt_following": 0.95, "drift": 0.1, "bleed": 0.0},
    {"step": 50, "likeness": 0.6},
]


def write_evals(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_curves_and_best_step_come_from_eval_jsonl(sandbox):
    from sdtune.ui.app import State, train_poll
    from sdtune.ui.training import Trainer

    state = State(sandbox, None, Trainer(sandbox))
    assert train_poll(state, "run1")[4].empty and train_poll(state, "run1")[5] == ""  # no run folder yet
    write_evals(sandbox.outputs / "run1", EVALS)
    line, _, _, _, curves, best, _ = train_poll(state, "run1")  # no job: a run trained before the page started
    assert line == "" and list(curves.columns) == ["step", "value", "quantity"]
    likeness = curves[curves["quantity"] == "likeness"]
    assert list(likeness["step"]) == [0, 10, 20, 30, 40, 50] and list(likeness["value"]) == [r["likeness"] for r in EVALS]
    assert list(curves[curves["quantity"] == "drift"]["step"]) == [0, 10, 20, 30, 40]  # unmeasured: left out
    assert set(curves["quantity"]) == {"likeness", "prompt following", "drift", "bleed"}
    assert best.startswith("best so far: step 40 kept: likeness 0.700")


def test_the_best_step_uses_the_runs_own_bounds(sandbox):
    """A run whose config allows more drift keeps step 20, as its recipe does."""
    from sdtune.ui.training import CONFIG_NAME, eval_view

    run = sandbox.outputs / "run1"
    write_evals(run, EVALS)
    (run / CONFIG_NAME).write_text("max_drift: 0.6\nmin_prompt_following: 0.5\n")
    assert eval_view(run)[1].startswith("best so far: step 20 kept: likeness 0.800")
    (run / CONFIG_NAME).write_text("max_drift: not a number\n")  # a broken bound: the default, not a crash
    assert eval_view(run)[1].startswith("best so far: step 40 kept")


def test_no_best_step_yet_says_why(sandbox):
    from sdtune.ui.training import eval_view

    run = sandbox.outputs / "run1"
    write_evals(run, EVALS[:1])
    curves, best = eval_view(run)
    assert len(curves) == 4 and best == "no best step yet: only the base model (step 0) evaluated"
    write_evals(run, EVALS[:3:2])
    assert eval_view(run)[1] == "no best step yet: drift 0.500 > max_drift 0.25"


def test_a_running_jobs_poll_shows_the_curves_as_they_grow(sandbox):
    from sdtune.ui.app import State, train_poll
    from sdtune.ui.training import Job, Trainer

    trainer = Trainer(sandbox)
    run = sandbox.outputs / "run1"
    write_evals(run, EVALS[:2])
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        trainer.jobs[run] = Job(run_dir=run, process=process, step=10, total=60)
        state = State(sandbox, None, trainer)
        line, *_, curves, best, _ = train_poll(state, "run1")
        assert line.startswith("running: step 10/60") and sorted(set(curves["step"])) == [0, 10]
        assert best.startswith("best so far: step 10 kept")
        write_evals(run, EVALS)  # the recipe replaces the file whole after each evaluation
        *_, curves, best, _ = train_poll(state, "run1")
        assert sorted(set(curves["step"])) == [0, 10, 20, 30, 40, 50] and best.startswith("best so far: step 40")
    finally:
        process.kill()
        process.wait()


def test_the_page_polls_the_curves_and_sets_a_loras_settings_on_pick(tmp_path):
    """The wiring: the Train tab's one timer fills the curves and best-step boxes (and gradio accepts the frame);
    the LoRA picker's input event (not change: a restored PNG must win) sets guidance, scale and interval."""
    pytest.importorskip("gradio")
    from sdtune.ui.app import build, make_state
    from sdtune.ui.training import eval_frame

    demo = build(make_state(tmp_path / "outputs"))
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    plot, best = by_id["train-eval"], by_id["train-best"]
    (tick,) = [f for f in demo.fns.values() if any(e == "tick" for _, e in f.targets)]
    assert plot in tick.outputs and best in tick.outputs and by_id["train-progress"] in tick.outputs
    data = plot.postprocess(eval_frame(EVALS))
    assert data.columns == ["step", "value", "quantity"] and len(data.data) == 21
    lora = by_id["lora"]
    picks = [f for f in demo.fns.values() if (lora._id, "input") in f.targets]
    assert len(picks) == 1 and by_id["guidance-interval"] in picks[0].outputs
    assert [getattr(c, "label", None) for c in picks[0].outputs[:2]] == ["guidance (CFG)", "LoRA scale"]
    assert not [f for f in demo.fns.values() if (lora._id, "change") in f.targets]
