"""The Inspect tab: tokens of a text, a scheduler's noise schedule, guidance and scheduler grids
(``sdtune.generation.teaching``) on the held engine."""
from __future__ import annotations

from sdtune.errors import SdtuneError


def _err(exc: SdtuneError) -> str:
    return f"sdtune: error: {exc}"


def inspect_tokens_handler(state, text):
    from sdtune.generation import teaching

    try:
        with state.generator._lock:
            pipe = state.generator.current().pipeline("txt2img")
            return teaching.format_tokens(teaching.inspect_tokens(pipe, text or ""))
    except SdtuneError as exc:
        return _err(exc)


def inspect_schedule_handler(state, scheduler):
    from sdtune.generation import teaching
    from sdtune.models.schedulers import make_scheduler

    try:
        with state.generator._lock:
            pipe = state.generator.current().pipeline("txt2img")
        sched = pipe.scheduler if scheduler in (None, "", "default") else \
            make_scheduler(scheduler, pipe.scheduler.config)
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


def inspect_grid_handler(state, tool, prompt, items, steps, seed):
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



def build_inspect_tab(state, schedulers: list[str]):
    """The Inspect tab: tokens of a text, a scheduler's noise schedule, guidance and scheduler grids."""
    import gradio as gr

    with gr.Tab("Inspect", id="inspect") as tab:
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
    return tab
