"""The page: the Gradio Blocks putting the Generate, Train, Runs and Inspect tabs together, and ``launch``.

Each tab is its own module (``generate_tab``, ``train_tab``, ``runs_tab``, ``inspect_tab``: its handlers, plain
functions tested without a page, and its layout); this one holds the shared ``State`` and the page around them.
Every handler turns an ``SdtuneError`` into one line ("sdtune: error: ..."), never a traceback; a bad value of a
form is said on its own field before anything runs. Requests are queued one at a time (one engine, two CPU cores).
``launch`` binds 127.0.0.1 unless told otherwise, never makes a share link, serves files only from the outputs
folder, and loads no web fonts.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from sdtune.ui.generate import Generator
from sdtune.ui.generate_tab import (UNCHANGED, generate_handler, input_image_handler, lora_settings_handler,
                                    mode_view, restore_handler, select_handler)
from sdtune.ui.inspect_tab import inspect_grid_handler, inspect_schedule_handler, inspect_tokens_handler
from sdtune.ui.runs_tab import runs_handler, use_in_generate
from sdtune.ui.safety import MAX_UPLOAD_BYTES, Sandbox
from sdtune.ui.train_tab import (photos_handler, train_poll, train_resume_handler, train_start_handler,
                                 train_stop_handler)
from sdtune.ui.training import Trainer

# The page's handlers, one import away for scripts and tests (each lives with its tab).
__all__ = ["State", "make_state", "build", "launch", "wait_for_interrupt", "LOOPBACK", "UNCHANGED",
           "generate_handler", "input_image_handler", "lora_settings_handler", "mode_view", "restore_handler",
           "select_handler", "inspect_grid_handler", "inspect_schedule_handler", "inspect_tokens_handler",
           "runs_handler", "use_in_generate", "photos_handler", "train_poll", "train_resume_handler",
           "train_start_handler", "train_stop_handler"]

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# Small results are shown crisp (a 64 px image zoomed is still 64 pixels, not a blur); the Generate button is as
# tall as the prompt boxes beside it, as in AUTOMATIC1111; status lines in a fixed-width font.
CSS = """
#gallery img, #train-samples img, #run-samples img, #train-thumbs img { image-rendering: pixelated; }
#gallery .caption-label, #train-samples .caption-label, #run-samples .caption-label {
  white-space: normal; max-width: 100%; left: 0; right: 0; opacity: 0.9; }
#generate.big { min-height: 7.5em; font-size: 1.25em; }
.gen-status textarea, .train-status textarea { font-family: ui-monospace, monospace; }
#train-stop, #train-start, #train-resume, #run-use { white-space: nowrap; }
"""


@dataclass
class State:
    sandbox: Sandbox
    generator: Generator
    trainer: Trainer


def make_state(outputs: str | os.PathLike = "outputs", allow=(), device=None, dtype=None) -> State:
    sandbox = Sandbox(Path(outputs), list(allow))
    return State(sandbox, Generator(sandbox, device=device, dtype=dtype), Trainer(sandbox))


def build(state: State):
    """The page: one Blocks with the Generate, Train, Runs and Inspect tabs, queued one at a time."""
    import gradio as gr

    from sdtune.models.schedulers import scheduler_names
    from sdtune.ui.generate_tab import build_generate_tab
    from sdtune.ui.inspect_tab import build_inspect_tab
    from sdtune.ui.runs import model_choices
    from sdtune.ui.runs_tab import build_runs_tab
    from sdtune.ui.train_tab import build_train_tab

    sb = state.sandbox
    schedulers = ["default", *scheduler_names()]
    # gradio's own copies of uploads and outputs (its cache) are deleted after a day
    with gr.Blocks(title="sdtune", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"**sdtune** · DreamBooth and generation, offline · outputs: `{sb.outputs}`")
        with gr.Tabs() as tabs:
            gen = build_generate_tab(state, schedulers)
            train = build_train_tab(state, model_choices(sb, "base"))
            runs = build_runs_tab(state, tabs, gen)
            inspect = build_inspect_tab(state, schedulers)
        # The Train tab's poll stops while another tab is shown (opening Train again polls once and resumes it):
        # a ticking timer clears the messages gradio's validators put on the other tabs' fields.
        for other in (gen.tab, runs.tab, inspect):
            other.select(lambda: gr.Timer(active=False), None, [train.timer], queue=False)
    demo.queue(default_concurrency_limit=1)
    return demo


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
