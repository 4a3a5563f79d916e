"""The Runs tab: a run's card (its images served), labelled samples, metrics (or why there are none), its files to
download, and "Use in Generate", which puts its LoRA (or model) in the Generate tab with the settings it recommends.
"""
from __future__ import annotations

from types import SimpleNamespace

from sdtune.errors import SdtuneError
from sdtune.ui.runs import find_run, list_runs, lora_choices, model_choices

UNCHANGED = {"__type__": "update"}


def runs_handler(state, label):
    """-> (card Markdown, labelled samples, metrics or None, a line about the metrics, info line, files)."""
    run = find_run(state.sandbox, label) if label else None
    if run is None:
        return "(pick a run)", [], None, "", "", []
    metrics, about = run.metrics_view()
    info = f"{run.kind} · checkpoints: {', '.join(run.checkpoints()) or 'none'} · folder `{run.path}`"
    return run.card(), run.labelled_samples(), metrics, about, info, [str(p) for p in run.files()]


def use_in_generate(state, label) -> dict:
    """What "Use in Generate" sets: {"model"|"lora"|"guidance"|"lora_scale"|"guidance_interval"|"status": value}
    (a key left out: the field stays as it is). A LoRA comes with its run's recommended settings when it has them,
    else LoRA scale 1; a full fine-tune becomes the model, with no LoRA."""
    from sdtune.models.lora import recommended_settings
    from sdtune.ui.generate import check_lora

    run = find_run(state.sandbox, label) if label else None
    if run is None or run.kind not in ("lora", "full"):
        what = "pick a run first" if run is None else f"run {run.name} has no weights yet ({run.kind})"
        return {"status": f"sdtune: error: {what}"}
    if run.kind == "full":
        return {"model": str(run.path), "lora": "", "status": f"using the model {run.name} (no LoRA)"}
    try:
        check_lora(state.sandbox, str(run.path))
    except SdtuneError as exc:
        return {"status": f"sdtune: error: {exc}"}
    out = {"lora": str(run.path)}
    rec = recommended_settings(run.path)
    if rec is None:
        out.update(lora_scale=1.0, status=f"using the LoRA {run.name} at scale 1: its run recommends no settings "
                                          "(it had no settings sweep: eval_every was 0)")
        return out
    interval = rec["guidance_interval"]
    out.update(guidance=rec["guidance"], lora_scale=rec["lora_scale"],
               guidance_interval=",".join(f"{x:g}" for x in interval) if interval else "",
               status=f"using the LoRA {run.name} with its recommended settings: guidance {rec['guidance']:g}, "
                      f"LoRA scale {rec['lora_scale']:g}" + (f", guidance interval {interval}" if interval else ""))
    return out


def build_runs_tab(state, tabs, gen: SimpleNamespace) -> SimpleNamespace:
    """The tab; ``tabs`` is the page's Tabs (to switch to Generate), ``gen`` the Generate tab's components."""
    import gradio as gr

    sb = state.sandbox
    c = SimpleNamespace()

    def labels():
        return [str(r.path.relative_to(sb.outputs)) for r in list_runs(sb)]

    with gr.Tab("Runs", id="runs") as c.tab:
        with gr.Row(equal_height=True):
            c.pick = gr.Dropdown(labels(), label="run", elem_id="run-pick", scale=4)
            c.use = gr.Button("Use in Generate", variant="primary", elem_id="run-use", scale=1, min_width=150)
            c.refresh = gr.Button("↻ refresh", size="sm", scale=0, min_width=90)
        c.info = gr.Markdown("", elem_id="run-info")
        with gr.Row(equal_height=False):
            c.card = gr.Markdown("(pick a run)", elem_id="run-card")
            with gr.Column():
                c.files = gr.File(label="files (click one to download)", file_count="multiple", interactive=False,
                                  elem_id="run-files")
                c.samples = gr.Gallery(label="samples (step · prompt)", columns=4, height=200,
                                       elem_id="run-samples", object_fit="scale-down")
                c.metrics_note = gr.Markdown("", elem_id="run-metrics-note")
                c.metrics = gr.JSON(label="metrics", elem_id="run-metrics")
    c.pick.change(lambda lb: runs_handler(state, lb), [c.pick],
                  [c.card, c.samples, c.metrics, c.metrics_note, c.info, c.files])
    c.refresh.click(lambda: gr.update(choices=labels()), None, [c.pick])
    c.tab.select(lambda: gr.update(choices=labels()), None, [c.pick])

    def _use(label):
        out = use_in_generate(state, label)
        if set(out) == {"status"}:  # refused: said on this tab, the page stays here
            return [gr.update()] * 7 + [out["status"]]
        lora = gr.update(choices=[("none", ""), *lora_choices(sb)], value=out["lora"]) if "lora" in out \
            else gr.update()
        model = gr.update(choices=model_choices(sb, "base"), value=out["model"]) if "model" in out else gr.update()
        return [model, lora, *(out.get(k, gr.update()) for k in ("lora_scale", "guidance", "guidance_interval")),
                out["status"], gr.Tabs(selected="generate"), gr.update()]

    c.use.click(_use, [c.pick], [gen.model, gen.lora, gen.lora_scale, gen.guidance, gen.guidance_interval,
                                 gen.status, tabs, c.info])
    return c
