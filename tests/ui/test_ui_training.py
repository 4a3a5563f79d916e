"""The Train tab's work: the CLI's validation, the recipe's lock, a real run in a subprocess, Stop and Resume."""
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


def form(**kw):
    return {"name": "run1", "identifier": "sks", "class_noun": "box", "steps": 20, **kw}


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
    card, samples, metrics, info = runs_handler(State(sandbox, None, None), "dog")
    assert card.startswith("```yaml\nbase_model: x\n```") and samples == [str(lora / "samples" / "final-0.png")]
    assert "checkpoint-10" in info and metrics is None
    assert runs_handler(State(sandbox, None, None), "demo/checker_box")[2] == {"subject_fidelity": 0.4}


def test_progress_and_loss_for_the_page(trainer, subject_images):
    needs_embedded()
    from sdtune.ui.app import State, train_poll, train_start_handler, train_stop_handler

    state = State(trainer.sandbox, None, trainer)
    assert train_start_handler(state, "run1", [], "", "sks", "box", "lora", 20, False, 4, None, "") == \
        "sdtune: error: no training images: upload 3-5 images of the subject or name a folder"
    assert train_stop_handler(state, "run1") == "sdtune: error: run run1 is not training"
    status = train_start_handler(state, "run1", subject_images, "", "sks", "box", "lora", 20, False, 4, None, "")
    assert status.startswith("started run1")
    job = trainer.job("run1")
    job.process.wait(120)
    wait(job, lambda j: j.ended is not None, 10)
    line, frame, samples, log = train_poll(state, "run1")
    assert line.startswith("finished: step 20/20, loss ") and list(frame["step"]) == list(range(1, 21))
    assert samples and all(s.endswith(".png") for s in samples) and "done: 20 steps" in log


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
