"""The recipe under two real processes (DDP on gloo, CPU): identical weights on both ranks, loss falls.

Launcher: ``torchrun --standalone --nproc_per_node 2`` with ``ACCELERATE_USE_CPU=true``. Without that
variable accelerate sees no GPU and runs each process alone (DistributedType.NO) - and so does
``accelerate launch --cpu --num_processes 2`` - which would make this test pass vacuously; the driver
therefore also records the world size accelerate actually used.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file
from test_train_recipe import ROOT, make_images


DRIVER = """
import json, os, sys
from sdtune.training import dreambooth
from safetensors.torch import save_file
from sdtune.training.config import load_config
from accelerate import PartialState
result = dreambooth.train(load_config(sys.argv[1], sys.argv[2:]))
state = PartialState()
weights = {{n: p.detach().contiguous() for n, p in result.unet.named_parameters() if p.requires_grad}}
save_file(weights, os.path.join(result.output_dir, f"rank{{state.process_index}}.safetensors"))
with open(os.path.join(result.output_dir, f"rank{{state.process_index}}.json"), "w") as f:
    json.dump({{"losses": result.losses, "world": state.num_processes, "type": str(state.distributed_type)}}, f)
"""


def run_on_gloo(tmp_path, cfg: dict, driver: str = DRIVER):
    """Train ``cfg`` in two processes on gloo (torchrun, ACCELERATE_USE_CPU=true) with a ``driver`` that saves
    each rank's weights and run info; return ([info of rank 0, 1], weights of rank 0, weights of rank 1)."""
    out = Path(cfg["output_dir"])
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    driver_path = tmp_path / "driver.py"
    driver_path.write_text(driver.format())
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(driver_path), str(cfg_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(i["world"] == 2 and i["type"] == "DistributedType.MULTI_CPU" for i in info), info
    return info, load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))


@pytest.mark.slow
def test_two_processes_on_gloo_end_identical_and_learn(tiny_models, tmp_path):
    one = make_images(tmp_path / "one", 2)
    out = tmp_path / "out"
    info, w0, w1 = run_on_gloo(tmp_path, dict(
        model=str(tiny_models["sd1"]), instance_dir=str(one), instance_prompt="a photo of sks dog", resolution=32,
        method="full", max_steps=10, learning_rate=2e-3, train_batch_size=1, caption_dropout=0.0,
        output_dir=str(out), seed=0))
    assert w0.keys() == w1.keys() and len(w0) > 10
    for key in w0:  # DDP all-reduces the gradients: both replicas take the very same steps
        assert (w0[key] == w1[key]).all(), key
    losses = info[0]["losses"]
    assert info[1]["losses"] == losses and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert (out / "model_index.json").is_file()  # the main process saved the pipeline


def _launch(tmp_path, tiny_models, accelerate_config: dict, env_extra: dict):
    one = make_images(tmp_path / "one", 2)
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        model=str(tiny_models["sd1"]), instance_dir=str(one), instance_prompt="a photo of sks dog", resolution=32,
        method="full", max_steps=2, train_batch_size=1, output_dir=str(out), seed=0)))
    acc = tmp_path / "accelerate.yaml"
    acc.write_text(yaml.safe_dump(accelerate_config))
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env_extra)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc),
                           "-m", "sdtune.training.dreambooth", str(cfg)], capture_output=True, text=True, env=env, timeout=600)
    return proc, out


CONFIGS = ROOT / "configs" / "accelerate"
FSDP_ON_CPU = {**yaml.safe_load((CONFIGS / "fsdp_full.yaml").read_text()),
               "use_cpu": True, "mixed_precision": "no"}
FSDP_ON_CPU["fsdp_config"] = {**FSDP_ON_CPU["fsdp_config"], "fsdp_sync_module_states": False,
                              "fsdp_cpu_ram_efficient_loading": False}  # accelerate demands a GPU for syncing


@pytest.mark.slow
def test_fsdp_on_cpus_is_refused_in_one_line_not_run_as_something_else(tiny_models, tmp_path):
    """accelerate 1.15 sets FSDP up for GPU-like devices only: on CPUs the FSDP config would run as plain DDP
    (MULTI_CPU). The recipe says so instead of training something the config did not ask for."""
    proc, out = _launch(tmp_path, tiny_models, FSDP_ON_CPU, {"ACCELERATE_USE_CPU": "true"})
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("sdtune: error:")]
    assert proc.stderr.count("sdtune: error:") == 1  # said once, by the main process
    assert lines == ["sdtune: error: the accelerate config asks for FSDP, but accelerate runs it only on GPUs (here "
                     "it would run as MULTI_CPU); use configs/accelerate/multi_gpu.yaml on CPUs, or run on GPUs"]
    assert not (out / "model_index.json").exists() and not list(out.glob("checkpoint-*"))


@pytest.mark.slow
def test_two_processes_that_accelerate_runs_alone_are_refused(tiny_models, tmp_path):
    """Without ACCELERATE_USE_CPU accelerate runs each of two CPU processes alone: two runs into one folder."""
    proc, out = _launch(tmp_path, tiny_models, yaml.safe_load((CONFIGS / "multi_gpu.yaml").read_text()), {})
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("sdtune: error:")]
    assert proc.stderr.count("sdtune: error:") == 1 and len(lines) == 1 and "launched as 2 processes, but accelerate runs each one alone" in lines.pop()
    assert not (out / "model_index.json").exists()


EVAL_DRIVER = """
import json, os, sys
from sdtune.training import dreambooth
from sdtune.training.config import load_config
from accelerate import PartialState


class Scripted:  # a likeness per evaluation, as the main process measures it (the others never evaluate)
    name = "scripted"

    def __init__(self):
        self.values, self.calls = [0.0, 0.9, 0.5, 0.5, 0.5, 0.5], 0

    def metrics(self, ci):
        self.calls += 1
        return {{"likeness": self.values[min(self.calls - 1, len(self.values) - 1)]}}


result = dreambooth.train(load_config(sys.argv[1], sys.argv[2:]), scorers=[Scripted()])
state = PartialState()
with open(os.path.join(result.output_dir, f"rank{{state.process_index}}.json"), "w") as f:
    json.dump({{"steps": result.global_step, "world": state.num_processes, "type": str(state.distributed_type),
               "kept": result.evaluation.get("kept_step")}}, f)
"""


@pytest.mark.slow
def test_two_processes_evaluate_on_the_main_one_and_stop_together(tiny_models, tmp_path):
    one = make_images(tmp_path / "one", 2)
    out = tmp_path / "out"
    cfg = dict(model=str(tiny_models["sd1"]), instance_dir=str(one), instance_prompt="a photo of sks dog",
               class_prompt="a photo of a dog", resolution=32, max_steps=10, train_batch_size=1, output_dir=str(out),
               seed=0, eval_every=2, eval_steps=2, eval_prompts=["a photo of sks dog on the beach"],
               eval_other_prompts=["a photo of a car"], keep_best=True, stop_when_learned=True, stop_patience=1,
               recommend_settings=False, max_drift=2.0, max_bleed=1.0, min_prompt_following=0.0)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "driver.py").write_text(EVAL_DRIVER.format())
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "driver.py"), str(cfg_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(i["world"] == 2 and i["type"] == "DistributedType.MULTI_CPU" for i in info), info
    # step 2 is the best (0.9); step 4 does not beat it: both processes stop there, none waits for the other
    assert [i["steps"] for i in info] == [4, 4]
    assert info[0]["kept"] == 2 and (out / "best" / "pytorch_lora_weights.safetensors").is_file()
    assert [json.loads(x)["step"] for x in (out / "eval.jsonl").read_text().splitlines()] == [0, 2, 4]
