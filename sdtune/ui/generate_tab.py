"""The Generate tab: its handlers (plain functions, tested without a page) and its layout.

Laid out as AUTOMATIC1111's txt2img/img2img tabs are: the pickers on top, then the prompt, negative prompt and the
Generate button; below, the settings on the left and the results (status, gallery, parameters) on the right, so a
result appears beside the values that made it. The mode decides which inputs show. Each bad value is said on its
own field (gradio's ``validator``: nothing runs), and the handler checks the same again for callers of the API.
(No ``from __future__ import annotations`` here: gradio reads ``evt: gr.SelectData`` from the real annotation.)
"""

import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

from sdtune.errors import SdtuneError
from sdtune.ui.checks import generate_problems
from sdtune.ui.generate import check_lora, mask_from_editor, recommended_for, recommended_line, restore_from_png
from sdtune.ui.runs import lora_choices, model_choices
from sdtune.ui.safety import check_upload
from sdtune.ui.views import caption, done_line, params_table

MODES = ("txt2img", "img2img", "inpaint", "depth2img")
GALLERY_SIZE = 24
UNCHANGED = {"__type__": "update"}  # gr.update(): leave the field as it is (spelled out: no gradio import here)
NO_LORA = ("none", "")
# The Generate click's inputs, in order: the validator marks a bad one by this name (``generate_problems``' keys).
INPUTS = ("mode", "model", "inpaint_model", "depth_model", "lora", "lora_scale", "prompt", "negative", "steps",
          "guidance", "seed", "width", "height", "scheduler", "num_images", "strength", "editor", "depth_upload",
          "gallery_state", "guidance_interval")


def err(exc: SdtuneError) -> str:
    return f"sdtune: error: {exc}"


def _problems(mode, prompt, steps, guidance, seed, width, height, num_images, strength, lora, lora_scale,
              guidance_interval) -> dict[str, str]:
    return generate_problems(mode, prompt=prompt, steps=steps, guidance=guidance, seed=seed, width=width,
                             height=height, num_images=num_images, strength=strength, lora=lora,
                             lora_scale=lora_scale, guidance_interval=guidance_interval)


def generate_problems_by_input(*values) -> dict[str, str]:
    """The click's inputs (``INPUTS`` order) -> {input name: message}."""
    v = dict(zip(INPUTS, values))
    return _problems(v["mode"], v["prompt"], v["steps"], v["guidance"], v["seed"], v["width"], v["height"],
                     v["num_images"], v["strength"], v["lora"], v["lora_scale"], v.get("guidance_interval"))


def generate_handler(state, mode, model, inpaint_model, depth_model, lora, lora_scale, prompt, negative,
                     steps, guidance, seed, width, height, scheduler, num_images, strength, editor, depth_upload,
                     gallery_state, guidance_interval=""):
    """-> (gallery items, params JSON text, status line, depth estimate, gallery state, params table)."""
    gallery_state = list(gallery_state or [])
    shown = [(p, c) for p, c, _ in gallery_state]
    try:
        problems = _problems(mode, prompt, steps, guidance, seed, width, height, num_images, strength, lora,
                             lora_scale, guidance_interval)
        if problems:
            raise SdtuneError(next(iter(problems.values())))
        image, mask = mask_from_editor(editor) if mode != "txt2img" else (None, None)
        if mode in ("img2img", "inpaint", "depth2img") and image is None:
            raise SdtuneError(f"{mode} needs an input image: upload one in the image box")
        seed = int(float(seed))
        if seed == -1:  # AUTOMATIC1111's "random": the seed drawn is the one recorded and captioned
            seed = random.randrange(2**32)
        start = time.perf_counter()
        results = state.generator.generate(
            mode, prompt=prompt, negative_prompt=negative, steps=int(float(steps)), guidance=float(guidance),
            seed=seed, width=int(float(width or 0)) or None, height=int(float(height or 0)) or None,
            scheduler=None if scheduler == "default" else scheduler, num_images=int(float(num_images)), image=image,
            mask=mask, strength=float(strength) if mode != "txt2img" else None,
            depth_map=depth_upload if mode == "depth2img" else None, model=model, inpaint_model=inpaint_model,
            depth_model=depth_model, lora=lora or None, lora_scale=float(lora_scale) if lora else 1.0,
            guidance_interval=(guidance_interval or "").strip() or None)
        depth = None
        if mode == "depth2img" and depth_upload is None:
            depth = state.generator.estimate_depth(image, state.generator.key)
        seconds = time.perf_counter() - start
    except SdtuneError as exc:
        return shown, None, err(exc), None, gallery_state, UNCHANGED
    for path, _, params in results:
        gallery_state.insert(0, (str(path), caption(params), params))
    del gallery_state[GALLERY_SIZE:]  # the page shows the newest; all of them stay in the outputs folder
    last = results[-1][2]
    status = done_line(results, seconds, state.generator.images_dir, state.generator.loads)
    return ([(p, c) for p, c, _ in gallery_state], json.dumps(last, indent=1, sort_keys=True, default=str), status,
            depth, gallery_state, params_table(last))


def lora_settings_handler(state, lora):
    """A LoRA just picked -> (guidance, LoRA scale, guidance interval, status): the settings its run recommends
    (``sdtune_recommended``, from the run's settings sweep), or every field left as it is when it carries none; a
    file that is no readable LoRA is said at once, in the status line. Wired to the picker's ``input`` event only,
    so a restored PNG's settings and later edits by hand win."""
    keep = [dict(UNCHANGED) for _ in range(4)]
    if lora is None or not str(lora).strip():
        return keep
    try:
        check_lora(state.sandbox, lora)
    except SdtuneError as exc:
        return keep[:3] + [err(exc)]
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


def restore_handler(state, file):
    """A dropped PNG -> the form's values (mode, prompt, ... ) and a status line."""
    keys = ("mode", "prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height", "scheduler",
            "strength", "model", "lora", "lora_scale", "guidance_interval")
    if file is None:
        return [dict(UNCHANGED) for _ in keys] + [""]
    name = file if isinstance(file, str) else file.name
    try:
        params = restore_from_png(name, state.sandbox)
    except SdtuneError as exc:
        return [dict(UNCHANGED) for _ in keys] + [err(exc)]
    values = [params.get(k) for k in keys]
    values[keys.index("scheduler")] = params.get("scheduler") or "default"
    values[keys.index("lora")] = params.get("lora") or ""
    values[keys.index("lora_scale")] = params.get("lora_scale") or 1.0
    values[keys.index("strength")] = params.get("strength") if params.get("strength") is not None else 0.8
    values[keys.index("width")] = params.get("width") or 0
    values[keys.index("height")] = params.get("height") or 0
    if not params.get("model"):
        values[keys.index("model")] = UNCHANGED  # its model is not inside the sandbox: the picker keeps its own
    interval = params.get("guidance_interval")
    values[keys.index("guidance_interval")] = ",".join(f"{x:g}" for x in interval) if interval else ""
    return values + [f"restored the settings of {Path(str(name)).name}"]


def input_image_handler(file):
    """An input image dropped on the page -> (the image editor's value, a note under the drop box, the drop box
    emptied for the next one). A file that is not an image is said there and then, not at Generate."""
    if file is None:
        return UNCHANGED, "", UNCHANGED
    path = file if isinstance(file, str) else file.name
    try:
        image = check_upload(path, "input image")
    except SdtuneError as exc:
        return UNCHANGED, err(exc), None
    return ({"background": path, "layers": [], "composite": path},
            f"input image {Path(path).name}: {image.width}x{image.height}", None)


def depth_map_handler(file):
    """A depth map dropped on the page -> (the drop box: kept, or emptied when it is no image, a note)."""
    if file is None:
        return UNCHANGED, ""
    path = file if isinstance(file, str) else file.name
    try:
        image = check_upload(path, "depth map")
    except SdtuneError as exc:
        return None, err(exc)
    return UNCHANGED, f"depth map {Path(path).name}: {image.width}x{image.height}"


def mode_view(mode: str) -> dict[str, dict]:
    """Which inputs a mode uses: {name: gr.update(visible=...)} (AUTOMATIC1111 shows img2img's inputs only there)."""
    needs_image = mode != "txt2img"
    show = {"strength": needs_image, "input_file": needs_image, "input_note": needs_image, "editor": needs_image,
            "inpaint_model": mode == "inpaint", "depth_model": mode == "depth2img",
            "depth_upload": mode == "depth2img", "depth_view": mode == "depth2img"}
    out = {name: {"__type__": "update", "visible": visible} for name, visible in show.items()}
    out["editor"]["label"] = ("input image: paint the area to repaint (white brush)" if mode == "inpaint"
                              else "input image")
    return out


MODE_OUTPUTS = ("strength", "input_file", "input_note", "editor", "inpaint_model", "depth_model", "depth_upload",
                "depth_view")


# ---------------------------------------------------------------- the tab

def build_generate_tab(state, schedulers: list[str]) -> SimpleNamespace:
    """The Generate tab's components and events; returns the components other tabs set (Runs' "Use in Generate")."""
    import gradio as gr

    sb = state.sandbox
    models = model_choices(sb, "base")
    c = SimpleNamespace()
    with gr.Tab("Generate", id="generate") as c.tab:
        c.gallery_state = gr.State([])
        with gr.Row(equal_height=True):
            c.model = gr.Dropdown(models, value=models[0][1] if models else None, label="model (txt2img, img2img)",
                                  elem_id="model", allow_custom_value=True, scale=3)
            c.lora = gr.Dropdown([NO_LORA, *lora_choices(sb)], value="", label="LoRA", elem_id="lora",
                                 allow_custom_value=True, scale=3)
            c.lora_scale = gr.Number(1.0, step=0.05, label="LoRA scale", elem_id="lora-scale", scale=1, min_width=90)
            c.refresh = gr.Button("↻ refresh", size="sm", elem_id="refresh", scale=0, min_width=90)
        with gr.Row(equal_height=True):
            with gr.Column(scale=6):
                c.prompt = gr.Textbox("a photo of a red ball on grass", label="prompt", elem_id="prompt", lines=2,
                                      max_lines=4)
                c.negative = gr.Textbox("", label="negative prompt", elem_id="negative", lines=1, max_lines=3)
            with gr.Column(scale=1, min_width=150):
                c.go = gr.Button("Generate", variant="primary", elem_id="generate", size="lg", elem_classes="big")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, elem_id="settings"):
                c.mode = gr.Radio(list(MODES), value="txt2img", label="mode", elem_id="mode")
                with gr.Row():
                    c.steps = gr.Number(20, step=1, label="steps", elem_id="steps", min_width=80)
                    c.guidance = gr.Number(7.5, step=0.5, label="guidance (CFG)", elem_id="guidance", min_width=80)
                    c.seed = gr.Number(0, step=1, label="seed (-1: random)", elem_id="seed", min_width=80)
                with gr.Row():
                    c.width = gr.Number(0, step=8, label="width (0: the model's)", elem_id="width", min_width=80)
                    c.height = gr.Number(0, step=8, label="height (0: the model's)", elem_id="height", min_width=80)
                    c.num_images = gr.Number(1, step=1, label="images", elem_id="num-images", min_width=80)
                with gr.Row():
                    c.scheduler = gr.Dropdown(schedulers, value="default", label="scheduler", elem_id="scheduler")
                    c.guidance_interval = gr.Textbox("", label="guidance interval LO,HI (empty: every step)",
                                                     elem_id="guidance-interval")
                c.strength = gr.Number(0.8, step=0.05, label="denoising strength (0-1]", elem_id="strength",
                                       visible=False)
                with gr.Row():
                    c.inpaint_model = gr.Dropdown(model_choices(sb, "inpaint"), value="", label="inpaint model",
                                                  elem_id="inpaint-model", visible=False)
                    c.depth_model = gr.Dropdown(model_choices(sb, "depth"), value="", label="depth model",
                                                elem_id="depth-model", visible=False)
                c.input_file = gr.File(label="input image: drop a PNG, JPEG or WEBP here, or click",
                                       elem_id="input-file", height=90, visible=False)
                c.input_note = gr.Markdown("", elem_id="input-note", visible=False)
                c.editor = gr.ImageEditor(type="pil", label="input image", elem_id="editor", sources=["clipboard"],
                                          height=300, brush=gr.Brush(colors=["#ffffff"], default_size=12,
                                                                     color_mode="fixed"),
                                          layers=False, transforms=(), visible=False)
                with gr.Row():
                    c.depth_upload = gr.File(label="depth map (optional; white = near): drop it here",
                                             height=90, visible=False, elem_id="depth-upload")
                    c.depth_view = gr.Image(label="estimated depth", interactive=False, height=160,
                                            elem_id="depth-view", visible=False)
                with gr.Accordion("restore the settings of an sdtune PNG", open=False):
                    c.restore = gr.File(label="drop an sdtune PNG", elem_id="restore")
            with gr.Column(scale=6, elem_id="results"):
                c.status = gr.Textbox(label="status", interactive=False, elem_id="gen-status",
                                      elem_classes="gen-status", lines=2, max_lines=3)
                c.gallery = gr.Gallery(label="images (newest first; click one for its parameters)", columns=4,
                                       height=300, elem_id="gallery", format="png", object_fit="scale-down",
                                       preview=False, allow_preview=True)
                c.table = gr.Markdown(params_table(None), elem_id="params-table")
                with gr.Accordion("parameters as JSON", open=False):
                    c.params = gr.Code(label="parameters", language="json", elem_id="params")
    _wire(state, c)
    return c


def _wire(state, c: SimpleNamespace) -> None:
    import gradio as gr

    sb = state.sandbox
    inputs = [getattr(c, n) for n in INPUTS]

    def validator(*values):
        # While a run trains, the Train tab's poll may tick and clear a field's message at once: the handler then
        # says the same line in the status box instead (it checks the same problems first).
        problems = {} if state.trainer is not None and state.trainer.running() else generate_problems_by_input(*values)
        return [gr.validate(name not in problems, problems.get(name, "")) for name in INPUTS]

    c.go.click(lambda *a: generate_handler(state, *a), inputs,
               [c.gallery, c.params, c.status, c.depth_view, c.gallery_state, c.table], concurrency_limit=1,
               api_name="generate", validator=validator)

    def _select(gs, evt: gr.SelectData):
        text = select_handler(gs, evt.index)
        return text, params_table(json.loads(text)) if text else params_table(None)

    c.gallery.select(_select, [c.gallery_state], [c.params, c.table])
    c.restore.upload(lambda f: restore_handler(state, f), [c.restore],
                     [c.mode, c.prompt, c.negative, c.steps, c.guidance, c.seed, c.width, c.height, c.scheduler,
                      c.strength, c.model, c.lora, c.lora_scale, c.guidance_interval, c.status])
    c.input_file.upload(input_image_handler, [c.input_file], [c.editor, c.input_note, c.input_file])
    c.depth_upload.upload(depth_map_handler, [c.depth_upload], [c.depth_upload, c.input_note])
    c.mode.change(lambda m: [mode_view(m)[n] for n in MODE_OUTPUTS], [c.mode],
                  [getattr(c, n) for n in MODE_OUTPUTS], queue=False)

    def _refresh():
        return (gr.update(choices=model_choices(sb, "base")), gr.update(choices=[NO_LORA, *lora_choices(sb)]),
                gr.update(choices=model_choices(sb, "inpaint")), gr.update(choices=model_choices(sb, "depth")))

    refresh_targets = [c.model, c.lora, c.inpaint_model, c.depth_model]
    c.refresh.click(_refresh, None, refresh_targets)
    # input, not change: fired by the user's pick only, not by a restored PNG or "Use in Generate" setting it
    c.lora.input(lambda v: lora_settings_handler(state, v), [c.lora], [c.guidance, c.lora_scale, c.guidance_interval,
                                                                       c.status], queue=False)
    c.tab.select(_refresh, None, refresh_targets)
