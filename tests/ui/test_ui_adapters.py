"""The web UI's pickers offer runs of every adapter kind, and what they hand over loads (no browser)."""
import sys
from pathlib import Path

from sdtune.ui import runs
from sdtune.ui.generate import check_lora
from sdtune.ui.safety import Sandbox

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from test_train_recipe import make_images  # noqa: E402  (the recipe tests' two-tone subjects)


def test_a_loha_run_is_offered_as_a_lora_and_its_peft_file_is_handed_over(tiny_models, tmp_path, one_thread):
    from sdtune.training import adapters, dreambooth
    from sdtune.training.config import config_from_dict

    sandbox = Sandbox(tmp_path / "outputs")
    run = sandbox.outputs / "my-loha"
    dreambooth.train(config_from_dict(dict(
        model=str(tiny_models["sd1"]), instance_dir=str(make_images(tmp_path / "subject", 3)),
        instance_prompt="a photo of sks dog", resolution=32, max_steps=1, caption_dropout=0.0, output_dir=str(run),
        adapter="loha")))
    assert ("my-loha", str(run)) in runs.lora_choices(sandbox)
    assert check_lora(sandbox, str(run)).name == adapters.ADAPTER_FILE
