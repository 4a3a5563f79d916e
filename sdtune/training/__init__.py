"""Training: the DreamBooth recipe (``dreambooth``) and its components.

Owns the validated run config (``config``), instance/class data (``data``), class-image generation
for prior preservation (``class_images``), peft adapters and their export (``adapters``), the identifier's own
embedding rows (``identifier``, pivotal tuning), cached
latents and prompt embeddings (``caching``), the denoising objective (``objectives``), resumable
checkpoints (``checkpointing``), the model card (``model_card``), SDXL's pieces of the recipe - both text
encoders, pooled embeddings, size/crop time ids, caption dropout's zeros (``sdxl``) - and the recipe
itself (``dreambooth``: ``train``, ``dry_run``, ``main`` for ``accelerate launch -m``). May import ``sdtune.models`` and the shared modules; never generation, world or commands.
"""
