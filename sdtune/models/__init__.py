"""Models: getting Stable Diffusion weights in and out.

Owns loading a pipeline from a hub id, a local diffusers folder or a single-file checkpoint
(``loading``, SD and SDXL, plus ControlNets and depth estimators), LoRA files (``lora``: finding, applying, fusing, every adapter kind; ``lycoris``: LyCORIS'
LoHa/LoKr layout and kohya's DoRA ``dora_scale``; ``lora_formats``: any LoRA file read into per-module factors, for
``sdtune lora``), prompts of any length through the text
encoder, as inference and training both read them (``prompts``), SDXL's conditioning - both text encoders,
the pooled embedding, the size/crop time ids (``sdxl``), export to the original single-file
layout (``convert``), the scheduler names (``schedulers``), the embedded family's paths
(``embedded``), the CLIP and DINO image features likeness is measured in (``image_features``) and the tiny
random models the tests and the quick demo build in code (``fixtures``).
May import only the shared modules (``sdtune.errors``, ``devices``, ``imageio``) and the libraries.
"""
