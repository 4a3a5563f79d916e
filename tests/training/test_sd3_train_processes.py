"""SD 3.5 DreamBooth LoRA under two real processes (DDP on gloo, CPU): identical LoRAs (transformer and both CLIP
encoders) and losses on both ranks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train_multiprocess import run_on_gloo
from test_train_recipe import make_images

GLOO_DRIVER = """
import json, os, sys
from sdtune.training import dreambooth
from safetensors.torch import save_file
from sdtune.training.config import load_config
from accelerate import PartialState
result = dreambooth.train(load_config(sys.argv[1], sys.argv[2:]))
state = PartialState()
weights = {{}}
for part, module in (("transformer", result.unet), ("text_encoder", result.text_encoder),
                     ("text_encoder_2", result.text_encoder_2)):
    for n, p in module.named_parameters():
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
def test_sd3_two_processes_on_gloo_end_identical(tiny_sd3, tmp_path):
    one = make_images(tmp_path / "one", 2)
    out = tmp_path / "out"
    info, w0, w1 = run_on_gloo(tmp_path, dict(
        model=str(tiny_sd3["sd3"]), instance_dir=str(one), instance_prompt="a photo of sks dog", resolution=32,
        max_steps=3, learning_rate=2e-3, train_batch_size=1, caption_dropout=0.3, lora_rank=4, lora_targets="all",
        weighting_scheme="logit_normal", train_text_encoder=True, output_dir=str(out), seed=0), driver=GLOO_DRIVER)
    assert w0.keys() == w1.keys() and len(w0) > 10
    for part in ("transformer.", "text_encoder.", "text_encoder_2."):  # the CLIP LoRAs synchronised too
        assert any(k.startswith(part) for k in w0), part
    for key in w0:  # DDP all-reduces the gradients: both replicas take the very same steps
        assert torch.equal(w0[key], w1[key]), key
    assert info[0]["losses"] == info[1]["losses"] and all(np.isfinite(info[0]["losses"]))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
