"""The web UI, ``sdtune ui``: Generate, Train, Runs and Inspect tabs in the browser (Gradio, the ``[ui]`` extra).

It owns no model or training logic: generation goes through ``sdtune.generation.engine.Engine`` (one engine,
held and reused across requests), training runs the recipe (``sdtune train CONFIG``) in its own process,
configs are validated by ``sdtune.training.config`` and the inspect tools are ``sdtune.generation.teaching``.

* ``safety``      - what the UI may read and write: the outputs folder, the shipped data and the folders named at
  launch; upload checks
* ``checks``      - the forms' checks, field by field, in one line each (no gradio)
* ``train_form``  - the Train tab's key fields, from the config's key declarations, with the recipe's defaults
* ``views``       - how results are worded: gallery captions, the parameters table, status lines (no gradio)
* ``generate``    - the Generate tab's work over one held Engine (no gradio)
* ``training``    - a training run as a subprocess: start, progress, rate, loss, stop (checkpoint), resume (no gradio)
* ``runs``        - past runs under the outputs folder: cards, samples, files, metrics, pickers (no gradio)
* ``generate_tab``, ``train_tab``, ``runs_tab``, ``inspect_tab`` - each tab's handlers and layout (gradio, lazily)
* ``app``         - the page putting the tabs together, and ``launch``

Layer: at the commands level. It may import ``sdtune.world``, ``training``, ``generation``, ``models`` and the
shared modules; only ``sdtune.commands.ui`` imports it. gradio is imported lazily, by the tabs' build functions
and ``launch`` only.
"""
