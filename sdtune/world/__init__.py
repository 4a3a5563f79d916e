"""The built-in world: sdtune's own offline proof that fine-tuning works.

Owns the scene renderer and caption grammar (``scenes``), the judge that reads images back into
attributes (``judge``) and the metrics built on it (``evaluation``), the embedded model family's
architectures (``family``), the main job (``demo``), its ablations (``ablations``) and their reports
(``report``). May import training, generation, models and the shared modules; never commands.
"""
