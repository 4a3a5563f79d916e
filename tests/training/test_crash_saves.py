"""kill -9 at random moments while checkpoints and the final outputs are written (seeded trials).

Each trial counts every file write of a reference run (safetensors/torch saves, renames, text writes),
then kills a fresh run with SIGKILL right before write number k (k seeded). Whatever moment it lands on:
the newest complete checkpoint loads and resumes to the uninterrupted run's weights, and nothing partial
looks complete - to ``resume: latest``, to ``sdtune infer --lora`` (the LoRA file) or to stock diffusers.
"""
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from sdtune.training import adapters, checkpointing
from sdtune.training.config import config_from_dict

from test_train_recipe import make_images, recipe  # noqa: F401

TRIALS = 20

DRIVER = """
import os, signal, sys, json
import torch
torch.set_num_threads(1)
import builtins, safetensors.torch as st
from sdtune.training import dreambooth
from sdtune.training.config import load_config
kill_at, count = int(sys.argv[2]), [0]
def counted(fn):
    def wrapper(*a, **k):
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapper
st.save_file = counted(st.save_file)
torch.save = counted(torch.save)
os.replace = counted(os.replace)
dreambooth.train(load_config(sys.argv[1], []))
print(json.dumps({{"writes": count[0]}}))
"""


def run(driver, cfg_path, kill_at):
    return subprocess.run([sys.executable, str(driver), str(cfg_path), str(kill_at)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def lora_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / adapters.LORA_FILE))


@pytest.mark.slow
def test_kill_at_any_write_leaves_a_resumable_run_and_nothing_half_done(tiny_models, tmp_path):
    from diffusers import StableDiffusionPipeline

    images = make_images(tmp_path / "imgs", 2)
    common = dict(model=str(tiny_models["sd1"]), instance_dir=str(images), instance_prompt="a photo of sks dog",
                  resolution=32, max_steps=3, learning_rate=1e-3, caption_dropout=0.0, checkpoint_every=1,
                  checkpoints_keep=2, seed=3, resume="latest", train_batch_size=1)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format())
    ref_cfg = tmp_path / "ref.yaml"
    ref_cfg.write_text(yaml.safe_dump({**common, "output_dir": str(tmp_path / "ref")}))
    ref = run(driver, ref_cfg, 0)
    assert ref.returncode == 0, ref.stderr[-2000:]
    writes = json.loads(ref.stdout.strip().splitlines()[-1])["writes"]
    assert writes >= 10  # checkpoints, model card, LoRA files: many moments to die at
    reference = lora_weights(tmp_path / "ref")

    rng = random.Random(0)
    for trial in range(TRIALS):
        kill_at = rng.randint(1, writes)
        out = tmp_path / f"trial{trial}"
        cfg_path = tmp_path / f"trial{trial}.yaml"
        cfg_path.write_text(yaml.safe_dump({**common, "output_dir": str(out)}))
        proc = run(driver, cfg_path, kill_at)
        assert proc.returncode == -signal.SIGKILL, (trial, kill_at, proc.stderr[-2000:])
        # What a reader sees right after the crash: only complete things under their final names.
        latest = checkpointing.resolve_resume("latest", out)
        if latest is not None:
            assert (latest / checkpointing.STATE_FILE).is_file() and (latest / "model.safetensors").is_file()
        if (out / adapters.LORA_FILE).exists():  # a LoRA file under its name is a whole, loadable LoRA
            pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd1"], safety_checker=None,
                                                           requires_safety_checker=False)
            pipe.load_lora_weights(str(out))
        # Resuming (with whatever was left) ends exactly where the uninterrupted run did.
        resumed = recipe.train(config_from_dict({**common, "output_dir": str(out)}))
        assert resumed.global_step == 3
        got = lora_weights(out)
        assert got.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(got[key], reference[key], atol=1e-5, rtol=1e-4, msg=f"trial {trial} at {kill_at}")
