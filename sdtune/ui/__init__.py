"""The web UI, ``sdtune ui``: Generate, Train, Runs and Inspect tabs in the browser (Gradio, the ``[ui]`` extra).

It owns no model or training logic: generation goes through ``sdtune.generation.engine.Engine`` (one engine,
held and reused across requests), training runs the recipe (``sdtune train CONFIG``) in its own process,
configs are validated by ``sdtune.training.config`` and the inspect tools are ``sdtune.generation.teaching``.

* ``safety``   - what the UI may read and write: the outputs folder and the folders named at launch; upload checks
* ``generate`` - the Generate tab's handler over one held Engine (no gradio)
* ``training`` - a training run as a subprocess: start, progress, loss, stop (checkpoint), resume (no gradio)
* ``runs``     - past runs under the outputs folder: model cards, samples, metrics, LoRA pickers (no gradio)
* ``app``      - the Gradio Blocks wiring those to the page, and ``launch``

Layer: at the commands level. It may import ``sdtune.world``, ``training``, ``generation``, ``models`` and the
shared modules; only ``sdtune.commands.ui`` imports it. gradio is imported by ``app`` alone, lazily.
"""
