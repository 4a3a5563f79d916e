"""Generation: one engine for txt2img, img2img, inpainting and depth2img.

Owns the ``Engine`` (one load of the shared VAE, text encoder and tokenizer serves every mode),
what only it uses - PNG/JSON generation metadata (``metadata``) - the course's hand-written sampling loop (``sampling``) and the course's inspection tools
(``teaching``: tokens, VAE round trip, noise schedule, guidance and scheduler grids).
May import ``sdtune.models`` and the shared modules; never training, world or commands.
"""
