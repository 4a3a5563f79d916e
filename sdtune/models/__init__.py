"""Models: getting Stable Diffusion weights in and out.

Owns loading a pipeline from a hub id, a local diffusers folder or a single-file checkpoint
(``loading``), LoRA files (``lora``: finding, applying, fusing), prompts of any length through the text
encoder, as inference and training both read them (``prompts``), export to the original single-file
layout (``convert``), the scheduler names (``schedulers``), the embedded family's paths
(``embedded``) and the tiny random models the tests and the quick demo build in code (``fixtures``).
May import only the shared modules (``sdtune.errors``, ``devices``, ``imageio``) and the libraries.
"""
