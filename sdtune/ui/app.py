"""The page: Gradio Blocks wiring the Generate, Train, Runs and Inspect tabs to ``generate``/``training``/``runs``.

Every handler turns an ``SdtuneError`` into one line in the tab's status box ("sdtune: error: ..."), never a
traceback. Requests are queued one at a time (one engine, two CPU cores). ``launch`` binds 127.0.0.1 unless told
otherwise, never makes a share link, serves files only from the outputs folder, and loads no web fonts.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sdtune.errors import SdtuneError
from sdtune.ui.generate import Generator, mask_from_editor, recommended_for, recommended_line, restore_from_png
from sdtune.ui.runs import find_run, list_runs, lora_choices, model_choices
from sdtune.ui.safety import MAX_UPLOAD_BYTES, Sandbox
from sdtune.ui.training import Trainer, advanced_help, eval_view, losses

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

MODES = ("txt2img", "img2img", "inpaint", "depth2img")
GALLERY_SIZE = 24
UNCHANGED = {"__type__": "update"}  # gr.update(): leave the field as it is (spelled out: no gradio import here)
CSS = "#gallery img { image-rendering: pixelated; } .gen-status, .train-status { font-family: monospace; }"


@dataclass
class State:
    sandbox: Sandbox
    generator: Generator
    trainer: Trainer


def make_state(outputs: str | os.PathLike = "outputs", allow=(), device=None, dtype=None) -> State:
    sandbox = Sandbox(Path(outputs), list(allow))
    return State(sandbox, Generator(sandbox, device=device, dtype=dtype), Trainer(sandbox))


def _err(exc: SdtuneError) -> str:
    return f"sdtune: error: {exc}"


def _caption(params: dict) -> str:
    lora = f", LoRA {Path(params['lora']).name} x{params['lora_scale']}" if params.get("lora") else ""
    return (f"{params['mode']} seed {params['seed']} · {params['steps']} steps · cfg {params['guidance']} · "
            f"{params['width']}x{params['height']}{lora} · {params.get('prompt', '')}")


# ---------------------------------------------------------------- handlers (plain functions: tested without a page)

def generate_handler(state: State, mode, model, inpaint_model, depth_model, lora, lora_scale, prompt, negative,
                     steps, guidance, seed, width, height, scheduler, num_images, strength, editor, depth_upload,
                     gallery_state, guidance_interval=""):
    """-> (gallery items, params JSON text, status line, depth estimate, gallery state)."""
    gallery_state = list(gallery_state or [])
    try:
        image, mask = mask_from_editor(editor) if mode != "txt2img" else (None, None)
        if mode in ("img2img", "inpaint", "depth2img") and image is None:
            raise SdtuneError(f"{mode} needs an input image: upload one in the image box")
        results = state.generator.generate(
            mode, prompt=prompt, negative_prompt=negative, steps=steps, guidance=guidance, seed=seed,
            width=width or None, height=height or None, scheduler=None if scheduler == "default" else scheduler,
            num_images=num_images, image=image, mask=mask, strength=strength if mode != "txt2img" else None,
            depth_map=depth_upload if mode == "depth2img" else None, model=model, inpaint_model=inpaint_model,
            depth_model=depth_model, lora=lora or None, lora_scale=lora_scale,
            guidance_interval=(guidance_interval or "").strip() or None)
        depth = None
        if mode == "depth2img" and depth_upload is None:
            depth = state.generator.estimate_depth(image, state.generator.key)
    except SdtuneError as exc:
        return [(p, c) for p, c, _ in gallery_state], None, _err(exc), None, gallery_state
    for path, _, params in results:
        gallery_state.insert(0, (str(path), _caption(params), params))
    del gallery_state[GALLERY_SIZE:]  # the page shows the newest; all of them stay in the outputs folder
    last = results[-1][2]
    status = (f"done: {len(results)} image(s) in {state.generator.images_dir}; engine loads so far: "
              f"{state.generator.loads}")
    return ([(p, c) for p, c, _ in gallery_state], json.dumps(last, indent=1, sort_keys=True, default=str), status,
            depth, gallery_state)


def lora_settings_handler(state: State, lora):
    """A LoRA just picked -> (guidance, LoRA scale, guidance interval, status): the settings its run recommends
    (``sdtune_recommended``, from the run's settings sweep), or every field left as it is when it carries none.
    Wired to the picker's ``input`` event only, so a restored PNG's settings and later edits by hand win."""
    keep = [dict(UNCHANGED) for _ in range(4)]
    rec = recommended_for(state.sandbox, lora)
    if rec is None:
        return keep
    interval = rec["guidance_interval"]
    text = ",".join(f"{x:g}" for x in interval) if interval else ""
    return [rec["guidance"], rec["lora_scale"], text, recommended_line(rec)]


def select_handler(gallery_state, evt_index):
    if evt_index is None or not gallery_state or evt_index >= len(gallery_state):
        return None
    return json.dumps(gallery_state[evt_index][2], indent=1, sort_keys=True, default=str)


def restore_handler(state: State, file):
    """A dropped PNG -> the form's values (mode, prompt, ... ) and a status line."""
    keys = ("mode", "prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height", "scheduler",
            "strength", "model", "lora", "lora_scale", "guidance_interval")
    if file is None:
        return [None] * len(keys) + [""]
    try:
        params = restore_from_png(file if isinstance(file, str) else file.name, state.sandbox)
    except SdtuneError as exc:
        return [dict(UNCHANGED) for _ in keys] + [_err(exc)]
    values = [params.get(k) for k in keys]
    values[keys.index("scheduler")] = params.get("scheduler") or "default"
    values[keys.index("lora")] = params.get("lora") or ""
    values[keys.index("lora_scale")] = params.get("lora_scale") or 1.0
    values[keys.index("strength")] = params.get("strength") if params.get("strength") is not None else 0.8
    interval = params.get("guidance_interval")
    values[keys.index("guidance_interval")] = ",".join(f"{x:g}" for x in interval) if interval else ""
    return values + [f"restored the settings of {Path(str(file if isinstance(file, str) else file.name)).name}"]


def train_form(name, images, folder, identifier, class_noun, method, steps, prior, num_class, model, advanced):
    files = [f if isinstance(f, str) else getattr(f, "name", None) for f in (images or [])]
    return dict(name=name, images=files, folder=folder, identifier=identifier, class_noun=class_noun, method=method,
                steps=steps, prior_preservation=prior, num_class_images=num_class, model=model or None,
                advanced=advanced)


def train_start_handler(state: State, *form):
    try:
        job = state.trainer.start(**train_form(*form))
    except SdtuneError as exc:
        return _err(exc)
    return f"started {job.run_dir.name} (pid {job.process.pid})"


def train_resume_handler(state: State, name):
    try:
        job = state.trainer.start(resume=True, name=name)
    except SdtuneError as exc:
        return _err(exc)
    return f"resuming {job.run_dir.name} from its latest checkpoint (pid {job.process.pid})"


def train_stop_handler(state: State, name):
    try:
        state.trainer.stop(name)
    except SdtuneError as exc:
        return _err(exc)
    return f"stopping {name}: finishing the step and saving a checkpoint"


def _run_dir_or_none(state: State, name) -> Path | None:
    try:
        return state.sandbox.run_dir(name)
    except SdtuneError:
        return None  # a name being typed: nothing to show yet


def train_poll(state: State, name):
    """-> (progress line, loss points, samples, log tail, evaluation curves, best-step line). The curves come from
    the run folder's eval.jsonl, so a run trained before the page was (re)started shows them too."""
    import pandas as pd

    job = state.trainer.job(name)
    curves, best = eval_view(job.run_dir if job else _run_dir_or_none(state, name))
    if job is None:
        return "", pd.DataFrame({"step": [], "loss": []}), [], "", curves, best
    state_word = job.state
    if state_word == "failed":
        line = f"failed (exit {job.returncode}): {job.error_line()}"
    else:
        line = f"{state_word}: step {job.step}/{job.total or '?'}"
        if job.loss is not None:
            line += f", loss {job.loss:.4f}"
        if state_word == "finished":
            line += f" - LoRA in {job.run_dir}"
    points = losses(job.run_dir)
    frame = pd.DataFrame({"step": [s for s, _ in points], "loss": [v for _, v in points]})
    samples = [str(p) for p in sorted((job.run_dir / "samples").glob("*.png"))] if (job.run_dir / "samples").is_dir() \
        else []
    return line, frame, samples, "\n".join(list(job.lines)[-25:]), curves, best


def runs_handler(state: State, label):
    run = find_run(state.sandbox, label) if label else None
    if run is None:
        return "(pick a run)", [], None, ""
    metrics = run.metrics()
    info = f"{run.kind} · checkpoints: {', '.join(run.checkpoints()) or 'none'}"
    return run.card(), [str(p) for p in run.samples()], metrics, info


def inspect_tokens_handler(state: State, text):
    from sdtune.generation import teaching

    try:
        with state.generator._lock:
            pipe = state.generator.current().pipeline("txt2img")
            return teaching.format_tokens(teaching.inspect_tokens(pipe, text or ""))
    except SdtuneError as exc:
        return _err(exc)


def inspect_schedule_handler(state: State, scheduler):
    from sdtune.generation import teaching
    from sdtune.models.schedulers import make_scheduler

    try:
        with state.generator._lock:
            pipe = state.generator.current().pipeline("txt2img")
        sched = pipe.scheduler if scheduler in (None, "", "default") else make_scheduler(scheduler, pipe.scheduler.config)
        out = state.sandbox.outputs / "ui" / "inspect" / f"schedule-{scheduler or 'default'}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        return str(teaching.plot_schedule(sched, out)), teaching.format_scheduler(sched)
    except SdtuneError as exc:
        return None, _err(exc)


def _list(text, what, convert=str):
    items = [x.strip() for x in str(text or "").split(",") if x.strip()]
    if not items:
        raise SdtuneError(f"{what} is empty; give a comma-separated list")
    try:
        return [convert(x) for x in items]
    except ValueError:
        raise SdtuneError(f"{what} {text!r} is not a comma-separated list of numbers") from None


def inspect_grid_handler(state: State, tool, prompt, items, steps, seed):
    from sdtune.generation import teaching

    try:
        teaching._check_generation(int(steps), None, None)
        with state.generator._lock:
            pipe = state.generator.current().pipeline("txt2img")
            if tool == "guidance":
                grid, _ = teaching.guidance_grid(pipe, prompt, _list(items, "scales", float), seed=int(seed),
                                                 steps=int(steps))
            else:
                from sdtune.models.schedulers import SCHEDULERS
                names = _list(items, "schedulers")
                unknown = [n for n in names if n.lower() not in SCHEDULERS]
                if unknown:
                    raise SdtuneError(f"unknown scheduler {unknown[0]!r}; choose from: {', '.join(SCHEDULERS)}")
                grid, _ = teaching.scheduler_grid(pipe, prompt, names, seed=int(seed), steps=int(steps))
        return grid, f"{tool}: {items}"
    except SdtuneError as exc:
        return None, _err(exc)


# ---------------------------------------------------------------- the page

def build(state: State):
    """The page: one Blocks with the Generate, Train, Runs and Inspect tabs (``_generate_tab`` ...), queued one at a time."""
    import gradio as gr

    from sdtune.models.schedulers import scheduler_names

    sb = state.sandbox
    schedulers = ["default", *scheduler_names()]
    models = model_choices(sb)
    base = models[0][1] if models else None

    # gradio's own copies of uploads and outputs (its cache) are deleted after a day
    with gr.Blocks(title="sdtune", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## sdtune · DreamBooth and generation, offline\nOutputs: `{sb.outputs}`")
        with gr.Tabs():
            _generate_tab(state, models, base, schedulers)
            _train_tab(state, models, base)
            _runs_tab(state)
            _inspect_tab(state, schedulers)
    demo.queue(default_concurrency_limit=1)
    return demo


def _generate_tab(state: State, models: list, base, schedulers: list[str]) -> None:
    """The Generate tab: pickers, prompt and settings, the input image (and mask) editor, the gallery."""
    import gradio as gr

    sb = state.sandbox
    none = [("none", "")]
    with gr.Tab("Generate", id="generate") as gen_tab:
        gallery_state = gr.State([])
        with gr.Row():
            model = gr.Dropdown(models, value=base, label="model", elem_id="model", allow_custom_value=True)
            inpaint_model = gr.Dropdown(none + [m for m in models if "inpaint" in m[0]], value="",
                                        label="inpaint model (default: the embedded one)", elem_id="inpaint-model")
            depth_model = gr.Dropdown(none + [m for m in models if "depth" in m[0]], value="",
                                      label="depth model (default: the embedded one)", elem_id="depth-model")
            lora = gr.Dropdown(none + lora_choices(sb), value="", label="LoRA", elem_id="lora",
                               allow_custom_value=True)
            lora_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA scale")
            refresh = gr.Button("refresh pickers", size="sm", elem_id="refresh")
        mode = gr.Radio(list(MODES), value="txt2img", label="mode", elem_id="mode")
        prompt = gr.Textbox("a photo of a red ball on grass", label="prompt", elem_id="prompt")
        negative = gr.Textbox("", label="negative prompt", elem_id="negative")
        with gr.Row():
            steps = gr.Slider(1, 100, value=20, step=1, label="steps", elem_id="steps")
            guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="guidance")
            guidance_interval = gr.Textbox("", label="guidance interval LO,HI (noise levels; empty = every "
                                           "step)", elem_id="guidance-interval")
            seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
            width = gr.Number(0, precision=0, label="width (0 = the model's)")
            height = gr.Number(0, precision=0, label="height (0 = the model's)")
            scheduler = gr.Dropdown(schedulers, value="default", label="scheduler")
            num_images = gr.Slider(1, 8, value=1, step=1, label="images")
            strength = gr.Slider(0, 1, value=0.8, step=0.05, label="strength (img2img/inpaint/depth)")
        with gr.Row():
            editor = gr.ImageEditor(type="pil", label="input image (inpaint: paint the area to repaint)",
                                    elem_id="editor", sources=["upload", "clipboard"], height=360,
                                    brush=gr.Brush(colors=["#ffffff"], default_size=12, color_mode="fixed"),
                                    layers=False, transforms=())
            with gr.Column():
                depth_upload = gr.Image(type="filepath", label="depth map (optional; white = near)",
                                        sources=["upload"], height=160)
                depth_view = gr.Image(label="estimated depth (depth2img)", interactive=False, height=160,
                                      elem_id="depth-view")
                restore = gr.File(label="drop an sdtune PNG to restore its settings", file_types=[".png"],
                                  elem_id="restore")
        go = gr.Button("Generate", variant="primary", elem_id="generate")
        gen_status = gr.Textbox(label="status", interactive=False, elem_id="gen-status", elem_classes="gen-status")
        with gr.Row():
            gallery = gr.Gallery(label="images", columns=4, height=320, elem_id="gallery", format="png")
            params_box = gr.Code(label="parameters", language="json", elem_id="params")
        go.click(lambda *a: generate_handler(state, *a),
                 [mode, model, inpaint_model, depth_model, lora, lora_scale, prompt, negative, steps, guidance,
                  seed, width, height, scheduler, num_images, strength, editor, depth_upload, gallery_state,
                  guidance_interval],
                 [gallery, params_box, gen_status, depth_view, gallery_state], concurrency_limit=1,
                 api_name="generate")

        def _select(gs, evt: gr.SelectData):
            return select_handler(gs, evt.index)

        gallery.select(_select, [gallery_state], [params_box])
        restore.upload(lambda f: restore_handler(state, f), [restore],
                       [mode, prompt, negative, steps, guidance, seed, width, height, scheduler, strength,
                        model, lora, lora_scale, guidance_interval, gen_status])

        def _refresh():
            ms = model_choices(sb)
            return gr.update(choices=ms), gr.update(choices=none + lora_choices(sb))

        refresh.click(_refresh, None, [model, lora])
        # input, not change: fired by the user's pick only, not by a restored PNG setting the picker
        lora.input(lambda v: lora_settings_handler(state, v), [lora], [guidance, lora_scale, guidance_interval,
                                                                      gen_status], queue=False)
        gen_tab.select(_refresh, None, [model, lora])


def _train_tab(state: State, models: list, base) -> None:
    """The Train tab: the DreamBooth form, Start/Stop/Resume, and the run's progress, loss, evaluation curves, best
    step, samples and log (polled)."""
    import gradio as gr

    with gr.Tab("Train", id="train"):
        with gr.Row():
            with gr.Column():
                run_name = gr.Textbox("my_subject", label="run name (a folder under the outputs folder)",
                                      elem_id="train-name")
                images = gr.File(file_count="multiple", file_types=["image"], label="3-5 images of the subject",
                                 elem_id="train-images")
                folder = gr.Textbox("", label="...or a folder of images (inside the allowed folders)",
                                    elem_id="train-folder")
                with gr.Row():
                    identifier = gr.Textbox("sks", label="identifier", elem_id="train-identifier")
                    class_noun = gr.Textbox("box", label="class noun", elem_id="train-class")
                with gr.Row():
                    method = gr.Radio(["lora", "full"], value="lora", label="method")
                    train_steps = gr.Number(400, precision=0, label="steps", elem_id="train-steps")
                with gr.Row():
                    prior = gr.Checkbox(False, label="prior preservation", elem_id="train-prior")
                    num_class = gr.Number(16, precision=0, label="class images")
                train_model = gr.Dropdown([m for m in models if "inpaint" not in m[0] and "depth" not in m[0]],
                                          value=base, label="base model")
                with gr.Accordion("advanced: any config key, one key=value per line", open=False):
                    advanced = gr.Textbox("", lines=4, label="key=value lines (e.g. learning_rate=1e-4)",
                                          elem_id="train-advanced")
                    with gr.Accordion("every key, with its default and help", open=False):
                        gr.Markdown(advanced_help(), elem_id="train-keys-help")
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="train-start")
                    stop = gr.Button("Stop (checkpoint, then stop)", elem_id="train-stop")
                    resume = gr.Button("Resume", elem_id="train-resume")
                train_status = gr.Textbox(label="status", interactive=False, elem_id="train-status",
                                          elem_classes="train-status")
            with gr.Column():
                progress = gr.Textbox(label="progress", interactive=False, elem_id="train-progress")
                import pandas as pd
                loss_plot = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss",
                                        label="loss", height=220, elem_id="train-loss")
                eval_plot = gr.LinePlot(pd.DataFrame({"step": [], "value": [], "quantity": []}), x="step", y="value",
                                        color="quantity", label="evaluation: likeness, prompt following, drift, bleed",
                                        height=220, elem_id="train-eval")
                best_box = gr.Textbox(label="best step", interactive=False, elem_id="train-best")
                samples = gr.Gallery(label="validation samples", columns=4, height=160, elem_id="train-samples")
                log_box = gr.Textbox(label="log", lines=8, max_lines=8, interactive=False, elem_id="train-log")
        form = [run_name, images, folder, identifier, class_noun, method, train_steps, prior, num_class,
                train_model, advanced]
        start.click(lambda *a: train_start_handler(state, *a), form, [train_status])
        stop.click(lambda n: train_stop_handler(state, n), [run_name], [train_status])
        resume.click(lambda n: train_resume_handler(state, n), [run_name], [train_status])
        timer = gr.Timer(1.0)
        # one poll for everything the run shows: progress, loss, samples, log, evaluation curves and best step
        timer.tick(lambda n: train_poll(state, n), [run_name],
                   [progress, loss_plot, samples, log_box, eval_plot, best_box], show_progress="hidden", queue=False)


def _runs_tab(state: State) -> None:
    """The Runs tab: pick a run under the outputs folder, see its card, samples and metrics."""
    import gradio as gr

    sb = state.sandbox
    with gr.Tab("Runs", id="runs") as runs_tab:
        def _run_labels():
            return [str(r.path.relative_to(sb.outputs)) for r in list_runs(sb)]

        with gr.Row():
            run_pick = gr.Dropdown(_run_labels(), label="run", elem_id="run-pick")
            runs_refresh = gr.Button("refresh", size="sm")
        run_info = gr.Markdown("")
        with gr.Row():
            card = gr.Markdown("(pick a run)", elem_id="run-card")
            with gr.Column():
                run_samples = gr.Gallery(label="samples", columns=4, height=200)
                run_metrics = gr.JSON(label="metrics")
        run_pick.change(lambda lb: runs_handler(state, lb), [run_pick], [card, run_samples, run_metrics, run_info])
        runs_refresh.click(lambda: gr.update(choices=_run_labels()), None, [run_pick])
        runs_tab.select(lambda: gr.update(choices=_run_labels()), None, [run_pick])


def _inspect_tab(state: State, schedulers: list[str]) -> None:
    """The Inspect tab: tokens of a text, a scheduler's noise schedule, guidance and scheduler grids."""
    import gradio as gr

    with gr.Tab("Inspect", id="inspect"):
        with gr.Row():
            with gr.Column():
                tok_text = gr.Textbox("A painting of a flooble", label="tokens: text", elem_id="tok-text")
                tok_go = gr.Button("tokenize", elem_id="tok-go")
                tok_out = gr.Textbox(label="tokens", lines=8, elem_id="tok-out")
                sched_pick = gr.Dropdown(schedulers, value="default", label="noise schedule of")
                sched_go = gr.Button("plot schedule", elem_id="sched-go")
                sched_img = gr.Image(label="alphas_cumprod", interactive=False, height=220, elem_id="sched-img")
                sched_txt = gr.Textbox(label="scheduler", lines=3)
            with gr.Column():
                grid_tool = gr.Radio(["guidance", "schedulers"], value="guidance", label="grid")
                grid_prompt = gr.Textbox("a photo of a red ball", label="prompt")
                grid_items = gr.Textbox("1.1,8,12", label="guidance scales, or scheduler names (pndm,lms,euler)")
                with gr.Row():
                    grid_steps = gr.Number(20, precision=0, label="steps")
                    grid_seed = gr.Number(42, precision=0, label="seed")
                grid_go = gr.Button("make grid", elem_id="grid-go")
                grid_img = gr.Image(label="grid", interactive=False, height=220, elem_id="grid-img")
                grid_status = gr.Textbox(label="status", interactive=False)
        tok_go.click(lambda t: inspect_tokens_handler(state, t), [tok_text], [tok_out])
        sched_go.click(lambda s: inspect_schedule_handler(state, s), [sched_pick], [sched_img, sched_txt])
        grid_go.click(lambda *a: inspect_grid_handler(state, *a),
                      [grid_tool, grid_prompt, grid_items, grid_steps, grid_seed], [grid_img, grid_status],
                      concurrency_limit=1)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def wait_for_interrupt() -> None:
    """Block until Ctrl-C (KeyboardInterrupt) while the server threads serve."""
    import time

    while True:
        time.sleep(0.5)


def launch(state: State, *, host: str = "127.0.0.1", port: int | None = None, auth: tuple[str, str] | None = None,
           block: bool = True, quiet: bool = False):
    """Start the server (never a share link); returns (demo, url)."""
    import gradio as gr

    demo = build(state)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    _, url, _ = demo.launch(server_name=host, server_port=port, auth=auth, share=False, inbrowser=False,
                            prevent_thread_lock=not block, quiet=quiet, show_error=True,
                            allowed_paths=[str(state.sandbox.outputs)], max_file_size=MAX_UPLOAD_BYTES,
                            theme=theme, css=CSS, footer_links=[], ssr_mode=False, pwa=False, mcp_server=False,
                            enable_monitoring=False)
    return demo, url
