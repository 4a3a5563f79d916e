"""Which config a run takes: a file, a shipped config by name, or - with no file - the model family's defaults."""
import pytest
import yaml

from sdtune import CONFIGS_DIR, DATA_DIR
from sdtune.errors import SdtuneError
from sdtune.training.presets import (config_path, default_config, load_run_config, with_native_resolution,
                                     with_shipped_data)

SUBJECT = ["instance_dir=photos/my_dog", "instance_prompt=a photo of sks dog", "class_prompt=a photo of a dog"]


def test_no_file_takes_the_sd_familys_defaults_at_the_models_own_size(tiny_models):
    cfg = default_config([f"model={tiny_models['sd1']}", *SUBJECT])
    preset = yaml.safe_load((CONFIGS_DIR / "sd15_lora.yaml").read_text())
    assert cfg.max_steps == preset["max_steps"] and cfg.lora_rank == preset["lora_rank"]
    assert cfg.num_class_images == preset["num_class_images"] and cfg.snr_gamma == preset["snr_gamma"]
    assert cfg.resolution == 32  # the tiny UNet's sample size x the VAE's scale factor, not the preset's 512
    assert cfg.instance_dir == "photos/my_dog" and cfg.class_prompt == "a photo of a dog"
    # the subject's own folders, named after it; nothing of the preset's example dog
    assert cfg.output_dir == "outputs/my_dog-lora"
    assert cfg.class_dir == "outputs/class_images/a_photo_of_a_dog-sd"
    assert cfg.validation_prompts == ["a photo of sks dog on the beach", "a photo of sks dog, an oil painting"]


def test_no_file_takes_the_sdxl_preset_for_an_sdxl_model(tiny_sdxl):
    cfg = default_config([f"model={tiny_sdxl['sdxl']}", *SUBJECT, "max_steps=7"])
    preset = yaml.safe_load((CONFIGS_DIR / "sdxl_lora.yaml").read_text())
    assert cfg.buckets == preset["buckets"] == "auto" and cfg.num_class_images == preset["num_class_images"]
    assert cfg.max_steps == 7  # the user's keys win
    assert cfg.class_dir.endswith("-sdxl")


def test_gpu_presets_fall_back_to_what_runs_here(tiny_models, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = default_config([f"model={tiny_models['sd1']}", *SUBJECT])
    assert cfg.optimizer == "adamw" and cfg.mixed_precision == "no"  # the preset says adamw8bit / fp16
    with pytest.raises(SdtuneError, match="needs a CUDA GPU"):  # asked for explicitly: refused, not replaced
        default_config([f"model={tiny_models['sd1']}", *SUBJECT, "optimizer=adamw8bit"])


def test_no_file_without_a_model_is_the_embedded_world_recipe():
    cfg = default_config(SUBJECT)
    assert cfg.model is None and cfg.lora_targets == "all" and cfg.validation_prompts == ["a photo of sks dog"]


def test_no_file_and_no_subject_is_one_line():
    with pytest.raises(SdtuneError, match="no config file and no subject: give instance_dir="):
        default_config(["max_steps=5"])


def test_a_hub_model_not_in_the_cache_is_one_line_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SdtuneError, match="could not read model nobody/nothing from the hub: it is not in the local"):
        default_config(["model=nobody/nothing", *SUBJECT])


def test_shipped_configs_by_name_and_their_data_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty folder: no data/ here
    assert config_path("dreambooth_lora") == config_path("dreambooth_lora.yaml") == CONFIGS_DIR / "dreambooth_lora.yaml"
    cfg = load_run_config("dreambooth_lora", ["max_steps=3"])
    assert cfg.instance_dir == str(DATA_DIR / "subjects" / "checker_box") and cfg.max_steps == 3
    (tmp_path / "data" / "subjects" / "checker_box").mkdir(parents=True)  # a folder of the user's own wins
    assert with_shipped_data({"instance_dir": "data/subjects/checker_box"})["instance_dir"] == "data/subjects/checker_box"
    with pytest.raises(SdtuneError, match="config nope not found: it is neither a file nor a shipped config"):
        config_path("nope")


def test_resolution_null_is_filled_from_the_model_before_training(tiny_models, tmp_path):
    """null stays null in the config (a YAML without resolution, or resolution=null) and is the model's native size
    once the recipe reads it; a stated size is kept."""
    (tmp_path / "mine.yaml").write_text(f"model: {tiny_models['sd2v']}\ninstance_dir: photos\ninstance_prompt: x\n")
    cfg = load_run_config(str(tmp_path / "mine.yaml"), [])
    assert cfg.resolution is None and with_native_resolution(cfg).resolution == 32
    assert with_native_resolution(load_run_config(str(tmp_path / "mine.yaml"), ["resolution=24"])).resolution == 24
