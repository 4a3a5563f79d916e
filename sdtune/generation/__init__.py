"""Generation: one engine for txt2img, img2img, inpainting and depth2img.

Owns the ``Engine`` (one load of the shared VAE, text encoder(s) and tokenizer(s) serves every mode, SD and
SDXL), the depth images a depth ControlNet reads (``control``: from an estimator or a given map),
guidance in a limited interval of noise levels (``guidance``), what only it uses - PNG/JSON generation metadata
(``metadata``) - the course's hand-written sampling loop (``sampling``) and the course's inspection tools
(``teaching``: tokens, VAE round trip, noise schedule, guidance and scheduler grids).
May import ``sdtune.models`` and the shared modules; never training, world or commands.
"""
