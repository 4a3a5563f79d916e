"""bench/optimizers.py on tiny random models: a run trains in its own process and its LoRA is judged."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_optimizer_bench_trains_judges_and_averages(tiny_models, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import optimizers as bench

    from sdtune.world.subjects import DEFAULT_SUBJECT

    result = bench.measure(str(tiny_models["sd1"]), [DEFAULT_SUBJECT], tmp_path / "bench", runs=["prodigy+ema"],
                           steps=1, prompts=2, sample_steps=1, class_images=1, threads=1, say=lambda s: None)
    (row,) = result["rows"]
    assert row["run"] == "prodigy+ema" and row["steps"] == 1 and row["peak_rss_mb"] > 0
    assert all(0 <= row[k] <= 1 for k in bench.METRICS)
    assert result["means"]["prodigy+ema"]["subject_fidelity"] == row["subject_fidelity"]
    lora = tmp_path / "bench" / DEFAULT_SUBJECT.name / "prodigy+ema" / "lora"
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    used = json.loads((lora.parent / "config.json").read_text())  # the demo's recipe with the run's overrides
    assert (used["optimizer"], used["learning_rate"], used["ema_decay"], used["max_steps"]) == ("prodigy", 1.0, 0.99, 1)
