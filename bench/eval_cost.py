"""What the in-loop evaluation costs: the demo's training (configs/demo.yaml, its evaluation settings) for a number of
steps, once with ``eval_every`` as the demo ships it and once without, on the same model, subject and seed.

    python bench/eval_cost.py [--steps 300] [--subject data/subjects/checker_box] [--out /tmp/eval_cost]

Prints the training loop's seconds both ways, the evaluations' share (the issue's budget: at most 15 % of the
training time) and the settings sweep's seconds after the loop. Early stopping is off in both runs, so both train
the same steps; needs the embedded family (the judge reads only its world).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(steps: int, subject_dir, out: Path) -> dict:
    from sdtune.models.embedded import embedded_model
    from sdtune.training import dreambooth
    from sdtune.training.class_images import ensure_class_images
    from sdtune.generation.engine import Engine
    from sdtune.world import demo
    from sdtune.world.judge_scorer import JudgeScorer

    subj = demo.load_subject(subject_dir)
    model = str(embedded_model("base"))
    rows = {}
    for name, extra in (("without", ["eval_every=0", "keep_best=false", "stop_when_learned=false"]),
                        ("with", ["stop_when_learned=false"])):
        cfg = demo.demo_config(subj, model, out / name, 64, False, [f"max_steps={steps}", *extra])
        cfg.class_dir = str(out / "class_images")  # drawn once, shared by both runs
        ensure_class_images(cfg, pipeline=Engine.load(model).pipeline("txt2img"))
        t = time.perf_counter()
        result = dreambooth.train(cfg, scorers=[JudgeScorer()] if cfg.eval_every else ())
        rows[name] = {"wall_s": round(time.perf_counter() - t, 1), "loop_s": round(result.loop_s, 1),
                      "eval_s": round(result.eval_s, 1),
                      "sweep_s": (result.evaluation or {}).get("sweep_seconds", 0.0),
                      "evaluations": len((result.evaluation or {}).get("history", []))}
    in_loop = rows["with"]["eval_s"] - rows["with"]["sweep_s"]
    train = rows["without"]["loop_s"]
    return {"steps": steps, "subject": subj.name, "runs": rows, "in_loop_eval_s": round(in_loop, 1),
            "eval_share_of_training": round(in_loop / train, 3) if train else None,
            "with_sweep_share": round(rows["with"]["eval_s"] / train, 3) if train else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--subject", default=str(ROOT / "data/subjects/checker_box"))
    p.add_argument("--out", default="/tmp/sdtune_eval_cost")
    args = p.parse_args(argv)
    res = measure(args.steps, args.subject, Path(args.out))
    print(json.dumps(res, indent=2))
    print(f"in-loop evaluation: {res['in_loop_eval_s']} s = {100 * res['eval_share_of_training']:.1f} % of "
          f"{res['runs']['without']['loop_s']} s of training ({res['runs']['with']['evaluations']} evaluations); "
          f"the settings sweep after it: {res['runs']['with']['sweep_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
