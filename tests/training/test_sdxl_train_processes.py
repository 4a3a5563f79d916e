"""SDXL DreamBooth under two real processes (DDP on gloo, CPU) and resumed after kill -9 (as for SD, see
test_train_multiprocess.py and test_train_recipe.py): identical weights on both ranks; a resumed run matches."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from test_train_multiprocess import run_on_gloo
from test_train_recipe import killed_at_checkpoint_2, DRIVER as KILL_DRIVER
from test_sdxl_train import PROMPT, make_images

from sdtune.training import adapters
from sdtune.training.config import config_from_dict
from sdtune.training import dreambooth

recipe = dreambooth

GLOO_DRIVER = """
import json, os, sys
from sdtune.training import dreambooth
from safetensors.torch import save_file
from sdtune.training.config import load_config
from accelerate import PartialState
result = dreambooth.train(load_config(sys.argv[1], sys.argv[2:]))
state = PartialState()
weights = {{}}
for part in ("unet", "text_encoder", "text_encoder_2"):
    for n, p in getattr(result, part).named_parameters():
        if p.requires_grad:
            weights[part + "." + n] = p.detach().contiguous()
save_file(weights, os.path.join(result.output_dir, f"rank{{state.process_index}}.safetensors"))
with open(os.path.join(result.output_dir, f"rank{{state.process_index}}.json"), "w") as f:
    json.dump({{"losses": result.losses, "world": state.num_processes, "type": str(state.distributed_type)}}, f)
"""


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.mark.slow
def test_sdxl_two_processes_on_gloo_end_identical(tiny_sdxl, tmp_path):
    one = make_images(tmp_path / "one", 2)
    out = tmp_path / "out"
    info, w0, w1 = run_on_gloo(tmp_path, dict(
        model=str(tiny_sdxl["sdxl"]), instance_dir=str(one), instance_prompt=PROMPT, resolution=32, max_steps=4,
        learning_rate=2e-3, train_batch_size=1, caption_dropout=0.3, train_text_encoder=True, output_dir=str(out),
        seed=0), driver=GLOO_DRIVER)
    assert w0.keys() == w1.keys()
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(part) for k in w0), part
    for key in w0:  # DDP all-reduces the gradients: both replicas take the very same steps
        assert torch.equal(w0[key], w1[key]), key
    assert info[0]["losses"] == info[1]["losses"] and all(np.isfinite(info[0]["losses"]))
    assert (out / adapters.LORA_FILE).is_file()


@pytest.mark.slow
def test_sdxl_resume_after_kill_matches_an_uninterrupted_run(tiny_sdxl, tmp_path):
    subject = make_images(tmp_path / "subject", 3)
    class_dir = make_images(tmp_path / "class", 2, seed=1)
    common = dict(model=str(tiny_sdxl["sdxl"]), instance_dir=str(subject), instance_prompt=PROMPT, resolution=32,
                  max_steps=4, learning_rate=1e-3, with_prior_preservation=True, class_prompt="a photo of dog",
                  class_dir=str(class_dir), num_class_images=2, caption_dropout=0.3, random_flip=True,
                  train_text_encoder=True, gradient_accumulation_steps=2, lr_scheduler="linear",
                  checkpoint_every=2, checkpoints_keep=1, seed=7, buckets="auto")
    whole = recipe.train(config_from_dict({**common, "output_dir": str(tmp_path / "whole")}))

    out = killed_at_checkpoint_2(tmp_path, common, KILL_DRIVER)
    assert (out / "checkpoint-2" / "model_2.safetensors").is_file()  # UNet, text_encoder, text_encoder_2

    resumed = recipe.train(config_from_dict({**common, "output_dir": str(out), "resume": "latest"}))
    assert resumed.global_step == 4 and len(resumed.losses) == 2
    np.testing.assert_allclose(resumed.losses, whole.losses[2:], rtol=1e-4)
    for get in (lambda r: adapters.unet_lora_state_dict(r.unet),
                lambda r: adapters.text_encoder_lora_state_dict(r.text_encoder),
                lambda r: adapters.text_encoder_lora_state_dict(r.text_encoder_2)):
        a, b = get(whole), get(resumed)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
