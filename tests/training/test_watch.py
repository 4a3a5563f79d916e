"""The run that knows when its subject is learned: in-loop evaluation, the kept step, the early stop, the settings
recommended (tiny random models, CLIP and DINO built in code)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.training import dreambooth, evaluation as ev
from sdtune.training.config import config_from_dict
from sdtune.training.eval_prompts import EvalPrompts
from sdtune.training.selection import Selection

R = 32


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = np.zeros((R, R, 3), np.uint8)
        a[:, : R // 2] = rng.integers(0, 255, 3)
        a[R // 3: R // 2] = 255
        Image.fromarray(a).save(folder / f"img{i}.png")
    return folder


def config(tiny_models, subject, out, **overrides):
    base = dict(model=str(tiny_models["sd1"]), instance_dir=str(subject), instance_prompt="a photo of sks dog",
                class_prompt="a photo of a dog", resolution=R, max_steps=4, train_batch_size=1, learning_rate=1e-3,
                caption_dropout=0.0, output_dir=str(out), seed=0, eval_every=2, eval_steps=2,
                eval_prompts=["a photo of sks dog on the beach", "a photo of sks dog in the snow"],
                eval_other_prompts=["a photo of a car"], sweep_guidance=[3.0], sweep_lora_scale=[1.0])
    base.update(overrides)
    return config_from_dict(base)


def test_smoke(tiny_models, tiny_dino, tiny_clip, tmp_path):
    subject = make_images(tmp_path / "subject", 3)
    cfg = config(tiny_models, subject, tmp_path / "out", eval_dino=str(tiny_dino), eval_clip=str(tiny_clip),
                 keep_best=True, max_drift=2.0, max_bleed=1.0, min_prompt_following=0.0)
    result = dreambooth.train(cfg)
    lines = (tmp_path / "out/eval.jsonl").read_text().splitlines()
    print(lines)
    print(result.evaluation["verdict"], result.evaluation["settings"])
    print(sorted(p.name for p in (tmp_path / "out").iterdir()), sorted(p.name for p in (tmp_path / "out/best").iterdir()))
