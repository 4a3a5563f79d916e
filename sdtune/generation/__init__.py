"""Generation: one engine for txt2img, img2img, inpainting and depth2img.

Owns the ``Engine`` (``engine``: one load of the shared VAE, text encoder(s) and tokenizer(s) serves every mode, SD
and SDXL), what it is built from (``components``: ``EngineSpec``, the load options declared once, and loading the
main, dedicated and ControlNet models), the weight arithmetic that carries full fine-tuning over to dedicated models
(``weights``), requests checked without a model (``requests``: errors name the parameters, ``ParameterError``),
regeneration from a PNG's metadata (``regenerate``), the depth images a depth ControlNet reads (``control``: from an estimator or a given map),
classifier-free guidance in a limited interval of noise levels (``sdtune.guidance_interval``, shared with training's
settings sweep), what only it uses - PNG/JSON generation metadata
(``metadata``) - the course's hand-written sampling loop (``sampling``) and the course's inspection tools
(``teaching``: tokens, VAE round trip, noise schedule, guidance and scheduler grids).
May import ``sdtune.models`` and the shared modules; never training, world or commands.
"""
