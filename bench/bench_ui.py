"""The web UI's overhead: one txt2img image through the Generate tab's handler vs through the Engine directly.

    python bench/bench_ui.py --model data/models/base [--steps 20] [--repeats 7] [--threads 1] [--size 256]

"Through the UI" is ``sdtune.ui.app.generate_handler``, exactly what the page's Generate button calls: the
sandbox check of the picked model, the CLI's request checks, the held engine, the PNG + JSON written under the
outputs folder and the gallery/parameters it returns. "Engine" is ``Engine.generate`` on an engine loaded once.
Both load the model once before timing, run interleaved, and are timed in process CPU seconds (median).
With gradio installed the same image is also requested from the running page over HTTP (gradio's queue, with
gradio_client), in wall seconds: that adds gradio's own fixed cost per request, shown by a 1-step request.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photo of a red ball on grass"


def measure(model: str, scratch: Path, steps: int = 20, repeats: int = 7, seed: int = 0, size: int = 0) -> dict:
    """``size``: width = height in pixels (0 = the model's own); the UI's fixed cost per request is the same at any
    size, the image's own cost grows with its pixels."""
    import numpy as np
    import torch
    from PIL import Image

    from sdtune.generation.engine import Engine
    from sdtune.ui.app import State, generate_handler
    from sdtune.ui.generate import Generator
    from sdtune.ui.safety import Sandbox

    model = str(Path(model).resolve())
    wh = size or None
    sandbox = Sandbox(scratch / "outputs", [Path(model).parent])
    state = State(sandbox, Generator(sandbox), None)
    engine = Engine.load(model)

    def through_ui():
        gallery, params, status, *_ = generate_handler(
            state, "txt2img", model, "", "", "", 1.0, PROMPT, "", steps, 7.5, seed, size, size, "default", 1, 0.8, None,
            None, [])
        if " done at " not in status:
            raise RuntimeError(status)
        return Image.open(gallery[0][0]).convert("RGB")

    def direct():
        return engine.generate("txt2img", prompt=PROMPT, steps=steps, guidance=7.5, seed=seed, width=wh,
                               height=wh)[0].image

    def cpu(fn):
        start = time.process_time()
        out = fn()
        return time.process_time() - start, out

    ui_image, direct_image = through_ui(), direct()  # warm-up: the UI's engine loads here, outside the timing
    times = {"ui": [], "engine": []}
    for _ in range(repeats):
        for side, fn in (("ui", through_ui), ("engine", direct)):
            t, _ = cpu(fn)
            times[side].append(t)
    ui, eng = statistics.median(times["ui"]), statistics.median(times["engine"])
    diff = int(np.abs(np.asarray(ui_image, dtype=int) - np.asarray(direct_image, dtype=int)).max())
    out = dict(model=model, steps=steps, size=size or "model's own", repeats=repeats,
               threads=torch.get_num_threads(), time_unit="cpu_s",
               per_image=dict(ui=ui, engine=eng), overhead=ui / eng - 1.0, all_cpu_s=times,
               engine_loads_in_ui=state.generator.loads, max_pixel_difference=diff)
    try:
        out["http"] = _through_the_server(state, model, engine, steps, repeats, seed, size)
    except ImportError as exc:  # no [ui] extra: the handler row above still stands
        out["http"] = dict(skipped=f"gradio not installed ({exc.name})")
    return out


def _through_the_server(state, model, engine, steps, repeats, seed, size=0) -> dict:
    """Wall seconds of the same image as an HTTP request to the running page (gradio's queue, gradio_client),
    vs Engine.generate's wall seconds, and a 1-step image to show gradio's fixed per-request cost."""
    import gradio  # noqa: F401
    from gradio_client import Client

    from sdtune.ui.app import launch

    demo, url = launch(state, host="127.0.0.1", port=None, block=False, quiet=True)
    try:
        client = Client(url, verbose=False, download_files=False)

        def request(n):
            return client.predict("txt2img", model, "", "", "", 1.0, PROMPT, "", n, 7.5, seed, size, size, "default", 1,
                                  0.8, None, None, api_name="/generate")

        def wall(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        request(steps)
        times = {"http": [], "engine": [], "http_1_step": []}
        for _ in range(repeats):
            times["http"].append(wall(lambda: request(steps)))
            times["engine"].append(wall(lambda: engine.generate("txt2img", prompt=PROMPT, steps=steps, guidance=7.5,
                                                                seed=seed, width=size or None, height=size or None)))
            times["http_1_step"].append(wall(lambda: request(1)))
    finally:
        demo.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(time_unit="wall_s", per_image=dict(ui=med["http"], engine=med["engine"]),
                overhead=med["http"] / med["engine"] - 1.0, one_step_request_s=med["http_1_step"], all_wall_s=times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=0, help="width = height in pixels (default: the model's own)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-ui-") as tmp:
        out = measure(args.model, Path(tmp), args.steps, args.repeats, size=args.size)
    print(f"per image: UI {out['per_image']['ui']:.3f} CPU s, engine {out['per_image']['engine']:.3f} CPU s, "
          f"overhead {out['overhead'] * 100:+.1f} %, max px diff {out['max_pixel_difference']}, "
          f"engine loads in the UI {out['engine_loads_in_ui']}")
    h = out["http"]
    if "per_image" in h:
        print(f"through the server: {h['per_image']['ui']:.3f} s vs engine {h['per_image']['engine']:.3f} s wall, "
              f"overhead {h['overhead'] * 100:+.1f} %; a 1-step request {h['one_step_request_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
