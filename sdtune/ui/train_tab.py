"""The Train tab: its handlers (plain functions, tested without a page) and its layout.

As kohya_ss lays a run out: the run's name and Start/Stop/Resume with the status on top (in view while the form is
filled in); below, the photos (with thumbnails) and the common keys as fields on the left, made from the config's key
declarations (``train_form``) with each key's help under it, "Advanced" ``key=value`` lines for the rest; and the
run as it goes on the right: progress with a measured rate and time left, loss and evaluation curves, best step,
validation samples labelled with their step and prompt, the log. One timer polls it all; the status line follows
the run to its end.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

from sdtune.errors import SdtuneError
from sdtune.ui.checks import train_problems
from sdtune.ui.runs import ADAPTER_FILES, sample_label, validation_prompts
from sdtune.ui.safety import check_upload
from sdtune.ui.train_form import BY_KEY, FIELDS
from sdtune.ui.training import advanced_help, duration, eval_view, losses

UNCHANGED = {"__type__": "update"}
# The Start click's inputs before the key fields (``train_form.FIELDS``, in their order).
FORM = ("name", "images", "folder", "identifier", "class_noun", "model", "advanced")


def _err(exc: SdtuneError) -> str:
    return f"sdtune: error: {exc}"


def _files(images) -> list[str]:
    return [f if isinstance(f, str) else getattr(f, "name", None) for f in (images or [])]


def train_form(name, images, folder, identifier, class_noun, model, advanced, *key_values) -> dict:
    """The Start click's values -> ``Trainer.start``'s keyword arguments (the key fields as ``keys``)."""
    return dict(name=name, images=_files(images), folder=folder, identifier=identifier, class_noun=class_noun,
                model=model or None, advanced=advanced,
                keys={f.key: v for f, v in zip(FIELDS, key_values)})


def start_problems(name, images, folder, identifier, class_noun, model, advanced, *key_values) -> dict[str, str]:
    """{input name: message} for the fields a validator can mark before anything starts."""
    return train_problems({f.key: v for f, v in zip(FIELDS, key_values)})


def train_start_handler(state, *form):
    try:
        job = state.trainer.start(**train_form(*form))
    except SdtuneError as exc:
        return _err(exc)
    job.reported = "starting"
    return status_line(job)


def train_resume_handler(state, name):
    try:
        job = state.trainer.start(resume=True, name=name)
    except SdtuneError as exc:
        return _err(exc)
    job.reported = "starting"
    return f"resuming {job.run_dir.name} from its latest checkpoint (pid {job.process.pid})"


def train_stop_handler(state, name):
    try:
        state.trainer.stop(name)
    except SdtuneError as exc:
        return _err(exc)
    return f"stopping {name}: finishing the step and saving a checkpoint"


def status_line(job) -> str:
    """The run's state in a line, to its end: started, training, finished (when, how long, where), stopped, failed."""
    name, word = job.run_dir.name, job.state
    if word == "starting":
        return f"started {name} (pid {job.process.pid}): loading the model, then class images if they are missing"
    if word in ("running", "stopping"):
        return f"{name} is {'stopping' if word == 'stopping' else 'training'} (pid {job.process.pid}): progress below"
    took = duration((job.ended or time.time()) - job.started)
    at = time.strftime("%H:%M:%S", time.localtime(job.ended or time.time()))
    if word == "finished":
        return (f"{name} finished at {at} after {took}: {job.step} steps, results in {job.run_dir} "
                "(Runs tab to download, or pick it as the LoRA in Generate)")
    if word == "stopped":
        return f"{name} stopped at {at} at step {job.step}, with a checkpoint: press Resume to continue"
    return f"{name} failed at {at}: {job.error_line() or f'exit {job.returncode}'}"


def progress_line(job) -> str:
    word = job.state
    if word == "failed":
        return f"failed (exit {job.returncode}): {job.error_line()}"
    line = f"{word}: step {job.step}/{job.total or '?'}"
    if job.loss is not None:
        line += f", loss {job.loss:.4f}"
    if word in ("running", "stopping") and job.rate:
        eta = job.eta()
        line += f" · {job.rate:.2f} steps/s" + (f", about {duration(eta)} left" if eta is not None else "")
    if word == "finished":
        adapter = any((job.run_dir / name).is_file() for name in ADAPTER_FILES)
        line += f" - LoRA in {job.run_dir}" if adapter else f" - results in {job.run_dir}"
    return line


def _run_dir_or_none(state, name):
    try:
        return state.sandbox.run_dir(name)
    except SdtuneError:
        return None  # a name being typed: nothing to show yet


def labelled_samples(run_dir) -> list[tuple[str, str]]:
    folder = run_dir / "samples"
    if not folder.is_dir():
        return []
    prompts = validation_prompts(run_dir)
    return [(str(p), sample_label(p, prompts)) for p in sorted(folder.glob("*.png"))]


def train_poll(state, name):
    """-> (progress line, loss points, labelled samples, log tail, evaluation curves, best-step line, status). The
    curves come from the run folder's eval.jsonl, so a run trained before the page was (re)started shows them too.
    The status changes only when the run's state does, so an error said by Start stays in view."""
    import pandas as pd

    job = state.trainer.job(name)
    curves, best = eval_view(job.run_dir if job else _run_dir_or_none(state, name))
    if job is None:
        return "", pd.DataFrame({"step": [], "loss": []}), [], "", curves, best, UNCHANGED
    status = UNCHANGED
    if job.reported != job.state:
        job.reported = job.state
        status = status_line(job)
    points = losses(job.run_dir)
    frame = pd.DataFrame({"step": [s for s, _ in points], "loss": [v for _, v in points]})
    return (progress_line(job), frame, labelled_samples(job.run_dir), "\n".join(list(job.lines)[-25:]), curves, best,
            status)


def photos_handler(images):
    """Uploaded photos -> (thumbnails, a line): each checked as an image at once, a bad one named there."""
    thumbs, notes = [], []
    for path in _files(images):
        try:
            image = check_upload(path, "training image")
        except SdtuneError as exc:
            notes.append(_err(exc))
            continue
        thumbs.append((path, f"{image.width}x{image.height}"))
    if not notes:
        notes = [f"{len(thumbs)} photo(s); DreamBooth wants 3-5 of the subject" if thumbs else ""]
    return thumbs, notes[0]


def estimate_handler(state, steps):
    return state.trainer.estimate(steps)


def method_defaults(method):
    """A method's learning rate, set visibly in its field when the method is picked (full weights want less)."""
    from sdtune.ui.train_form import recipe

    return 1e-4 if method == "full" else recipe().get("learning_rate", BY_KEY["learning_rate"].default)


# ---------------------------------------------------------------- the tab

def _key_widget(field):
    import gradio as gr

    common = dict(label=field.label, info=field.info, elem_id=f"train-{field.key.replace('_', '-')}")
    if field.kind == "bool":
        return gr.Checkbox(field.default, **common)
    if field.kind == "choice":
        return gr.Radio(list(field.choices), value=field.default, **common)
    return gr.Number(field.default, step=1 if field.kind == "int" else None, min_width=120, **common)


def build_train_tab(state, models: list) -> SimpleNamespace:
    import gradio as gr
    import pandas as pd

    c = SimpleNamespace()
    with gr.Tab("Train", id="train") as c.tab:
        with gr.Row(equal_height=True):
            c.name = gr.Textbox("my_subject", label="run name (a folder under the outputs folder)",
                                elem_id="train-name", scale=3)
            c.start = gr.Button("Start training", variant="primary", elem_id="train-start", scale=1, min_width=140)
            c.stop = gr.Button("Stop (saves a checkpoint)", elem_id="train-stop", scale=1, min_width=200)
            c.resume = gr.Button("Resume", elem_id="train-resume", scale=1, min_width=100)
        c.status = gr.Textbox(label="status", interactive=False, elem_id="train-status", elem_classes="train-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                c.images = gr.File(file_count="multiple", label="3-5 photos of the subject (drop them here)",
                                   elem_id="train-images", height=110)
                c.thumbs = gr.Gallery(label="photos", columns=8, height=90, elem_id="train-thumbs",
                                      object_fit="contain", show_label=False, allow_preview=False)
                c.photos_note = gr.Markdown("", elem_id="train-photos-note")
                c.folder = gr.Textbox("", label="...or a folder of photos (e.g. data/subjects/checker_box)",
                                      elem_id="train-folder")
                with gr.Row():
                    c.identifier = gr.Textbox("sks", label="identifier (a rare word)", elem_id="train-identifier")
                    c.class_noun = gr.Textbox("box", label="class noun (what it is)", elem_id="train-class")
                c.model = gr.Dropdown(models, value=models[0][1] if models else None, label="base model",
                                      elem_id="train-model")
                c.keys = []
                fields = list(FIELDS)
                for i in range(0, len(fields), 2):
                    with gr.Row():
                        c.keys += [_key_widget(f) for f in fields[i:i + 2]]
                c.estimate = gr.Markdown("", elem_id="train-estimate")
                with gr.Accordion("Advanced: any other config key, one key=value per line", open=False):
                    c.advanced = gr.Textbox("", lines=4, label="key=value lines (e.g. eval_every=50)",
                                            elem_id="train-advanced")
                    with gr.Accordion("every key, with its default and help", open=False):
                        gr.Markdown(advanced_help(), elem_id="train-keys-help")
            with gr.Column(scale=1):
                c.progress = gr.Textbox(label="progress", interactive=False, elem_id="train-progress")
                c.loss = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss", label="loss",
                                     height=200, elem_id="train-loss")
                c.eval = gr.LinePlot(pd.DataFrame({"step": [], "value": [], "quantity": []}), x="step", y="value",
                                     color="quantity", label="evaluation: likeness, prompt following, drift, bleed",
                                     height=200, elem_id="train-eval")
                c.best = gr.Textbox(label="best step", interactive=False, elem_id="train-best")
                c.samples = gr.Gallery(label="validation samples (step · prompt)", columns=4, height=180,
                                       elem_id="train-samples", object_fit="scale-down")
                c.log = gr.Textbox(label="log", lines=8, max_lines=8, interactive=False, elem_id="train-log")
        _wire(state, c)  # inside the tab: its Timer is a component, and a Tabs must hold nothing but tabs
    return c


def _wire(state, c: SimpleNamespace) -> None:
    import gradio as gr

    form = [c.name, c.images, c.folder, c.identifier, c.class_noun, c.model, c.advanced, *c.keys]

    def validator(*values):
        # While a run trains, the poll's ticks would clear a field's message at once: the Start handler says the
        # same line in the status box instead (``build_config`` checks the fields first).
        problems = {} if state.trainer.running() else start_problems(*values)
        keys = [f.key for f in FIELDS]
        return [gr.validate(True, "") for _ in FORM] + \
            [gr.validate(k not in problems, problems.get(k, "")) for k in keys]

    # The timer ticks only while a run is being watched: a ticking timer clears the messages gradio's validators put
    # on fields (gradio 6.31), so an idle page keeps them in view.
    timer = c.timer = gr.Timer(1.0, active=False)
    watch = [c.progress, c.loss, c.samples, c.log, c.eval, c.best, c.status, timer]

    def _poll(name):
        job = state.trainer.job(name)
        watching = job is not None and (job.returncode is None or job.ended is None or job.reported != job.state)
        return (*train_poll(state, name), gr.Timer(active=watching))

    def _watch(name):
        job = state.trainer.job(name)  # a refused Start or Resume starts no poll
        return gr.Timer(active=job is not None and job.returncode is None)

    c.start.click(lambda *a: train_start_handler(state, *a), form, [c.status], validator=validator) \
        .then(_watch, [c.name], [timer], queue=False)
    c.stop.click(lambda n: train_stop_handler(state, n), [c.name], [c.status])
    c.resume.click(lambda n: train_resume_handler(state, n), [c.name], [c.status]).then(_watch, [c.name], [timer],
                                                                                        queue=False)
    c.images.change(photos_handler, [c.images], [c.thumbs, c.photos_note], queue=False)
    steps = c.keys[[f.key for f in FIELDS].index("max_steps")]
    lr = c.keys[[f.key for f in FIELDS].index("learning_rate")]
    method = c.keys[[f.key for f in FIELDS].index("method")]
    steps.change(lambda s: estimate_handler(state, s), [steps], [c.estimate], queue=False)
    c.tab.select(lambda s: estimate_handler(state, s), [steps], [c.estimate], queue=False)
    method.input(method_defaults, [method], [lr], queue=False)
    # one poll for everything the run shows: progress, loss, samples, log, evaluation curves, best step, status;
    # also once when the tab opens or another run is named (a run trained before the page shows its curves)
    timer.tick(_poll, [c.name], watch, show_progress="hidden", queue=False)
    c.tab.select(_poll, [c.name], watch, show_progress="hidden", queue=False)
    c.name.blur(_poll, [c.name], watch, show_progress="hidden", queue=False)
