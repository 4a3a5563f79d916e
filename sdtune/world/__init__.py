"""The built-in world: sdtune's own offline proof that fine-tuning works.

Owns the scene renderer and caption grammar (``scenes``), the judge that reads images back into
attributes (``judge``), the metrics built on it (``evaluation``) and the judge as a training run's in-loop
scorer (``judge_scorer``), the embedded model family's
architectures (``family``), the main job (``demo``: its phases, end to end), which it splits by concern -
its plan, models and training config (``demo_plan``), prompts and inputs (``demo_prompts``), generation groups
(``demo_groups``), scoring against its targets (``demo_scoring``) and its report.md/metrics.json
(``demo_report``) - its ablations (``ablations``), several subjects as one LoRA (``together``) and the grids and
tables their reports share (``report``). May import training, generation, models and the shared modules; never
commands.
"""
