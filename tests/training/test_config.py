"""Training config: YAML + overrides, defaults, and every validation error (one clear line each)."""
import json
import textwrap

import pytest

from sdtune.errors import SdtuneError
from sdtune.training import config as config_mod
from sdtune.training.config import (
    LR_SCHEDULERS,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    resolve_model,
)

BASE = ["instance_dir=subject", "instance_prompt=a photo of sks dog"]

ISSUE_KEYS = """model instance_dir instance_prompt class_prompt class_dir num_class_images with_prior_preservation
prior_loss_weight caption_dropout method lora_rank lora_alpha train_text_encoder resolution train_batch_size
gradient_accumulation_steps max_steps learning_rate text_encoder_learning_rate lr_scheduler lr_warmup_steps
optimizer mixed_precision gradient_checkpointing snr_gamma noise_offset seed validation_prompts validation_every
checkpoint_every checkpoints_keep resume output_dir center_crop random_flip""".split()


def error_of(*overrides, path=None) -> str:
    with pytest.raises(SdtuneError) as info:
        load_config(path, [*BASE, *overrides])
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


def write(tmp_path, text, name="train.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_every_issue_key_exists_with_its_name():
    names = set(config_mod.FIELD_NAMES)
    assert not set(ISSUE_KEYS) - names
    cfg = load_config(None, BASE)
    for key in ISSUE_KEYS:
        assert hasattr(cfg, key)


def test_defaults():
    cfg = load_config(None, BASE)
    assert cfg.model is None and cfg.method == "lora" and cfg.optimizer == "adamw"
    assert cfg.mixed_precision == "no" and cfg.lr_scheduler == "constant"
    assert cfg.with_prior_preservation is False and cfg.prior_loss_weight == 1.0
    assert 0 < cfg.caption_dropout < 1
    assert cfg.lora_rank == 4 and cfg.lora_alpha is None
    assert cfg.resolution is None and cfg.center_crop is True and cfg.random_flip is False
    assert cfg.validation_prompts == [] and cfg.resume is None
    assert cfg == TrainConfig(instance_dir="subject", instance_prompt="a photo of sks dog")


def test_yaml_file_then_overrides_win(tmp_path):
    path = write(tmp_path, """
        instance_dir: photos
        instance_prompt: a photo of sks cat
        max_steps: 50
        learning_rate: 5e-5          # YAML 1.1 reads this as a string; it must still be a float
        mixed_precision: no          # YAML 1.1 reads a bare `no` as false
        validation_prompts: a photo of sks cat on the moon
        method: full
    """)
    cfg = load_config(path, ["max_steps=10", "validation_prompts=[a, b c]", "resume=latest", "lora_alpha=8"])
    assert cfg.instance_dir == "photos" and cfg.instance_prompt == "a photo of sks cat"
    assert cfg.max_steps == 10 and isinstance(cfg.max_steps, int)
    assert cfg.learning_rate == pytest.approx(5e-5) and isinstance(cfg.learning_rate, float)
    assert cfg.mixed_precision == "no"
    assert cfg.validation_prompts == ["a", "b c"]
    assert cfg.resume == "latest"
    assert cfg.lora_alpha == 8.0 and isinstance(cfg.lora_alpha, float)
    assert cfg.method == "full"


def test_single_validation_prompt_becomes_a_list():
    cfg = load_config(None, [*BASE, "validation_prompts=a photo of sks dog in snow"])
    assert cfg.validation_prompts == ["a photo of sks dog in snow"]


@pytest.mark.parametrize("text, key, value", [
    ("max_steps=10", "max_steps", 10),
    ("learning_rate=1e-4", "learning_rate", 1e-4),
    ("validation_prompts=[a, b]", "validation_prompts", ["a", "b"]),
    ("resume=latest", "resume", "latest"),
    ("resume=", "resume", None),
    ("class_prompt=null", "class_prompt", None),
    ("with_prior_preservation=true", "with_prior_preservation", True),
    ("instance_prompt=photo: sks dog", "instance_prompt", "photo: sks dog"),  # YAML would make a mapping
    ("model=1.5", "model", "1.5"),  # a path, not a number
    ("snr_gamma=5", "snr_gamma", 5),
])
def test_override_parsing(text, key, value):
    assert parse_override(text) == (key, value)


def test_override_needs_key_equals_value():
    assert "is not key=value" in error_of("max_steps")


def test_unknown_key_suggests_close_match_and_lists_valid_keys(tmp_path):
    message = error_of("lora_rnk=8")
    assert message.startswith("unknown key 'lora_rnk'; did you mean 'lora_rank'?")
    assert "valid keys:" in message and "learning_rate" in message and "output_dir" in message
    path = write(tmp_path, "instance_dir: a\ninstance_prompt: b\nlearnig_rate: 0.1\n")
    assert "did you mean 'learning_rate'?" in error_of(path=path)
    far = error_of("zzzzzz=1")
    assert "unknown key 'zzzzzz'" in far and "did you mean" not in far


@pytest.mark.parametrize("override, expected", [
    ("max_steps=ten", "max_steps must be an integer, got 'ten'"),
    ("max_steps=1.5", "max_steps must be an integer"),
    ("train_text_encoder=maybe", "train_text_encoder must be true or false"),
    ("learning_rate=fast", "learning_rate must be a number"),
    ("caption_dropout=true", "caption_dropout must be a number"),
    ("validation_prompts=[1, 2]", "validation_prompts must be a list of strings"),
    ("lora_alpha=[1]", "lora_alpha must be a number or null"),
    ("seed=true", "seed must be an integer"),
])
def test_wrong_types(override, expected):
    assert expected in error_of(override)


@pytest.mark.parametrize("key, bad, choices", [
    ("method", "lorra", "lora, full"),
    ("optimizer", "sgd", "adamw, adamw8bit, prodigy, adafactor, schedulefree, lion"),
    ("mixed_precision", "fp8", "no, fp16, bf16"),
    ("lr_scheduler", "cosin", ", ".join(LR_SCHEDULERS)),
])
def test_enumerations_name_valid_choices(key, bad, choices):
    message = error_of(f"{key}={bad}")
    assert message.startswith(f"{key} must be one of {choices}; got '{bad}'")


def test_enumeration_suggests_close_choice():
    assert "did you mean 'cosine'?" in error_of("lr_scheduler=cosin")


def test_lr_scheduler_names_are_diffusers_names():
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}
    for name in LR_SCHEDULERS:
        assert load_config(None, [*BASE, f"lr_scheduler={name}"]).lr_scheduler == name


@pytest.mark.parametrize("override, expected", [
    ("caption_dropout=1.0", "caption_dropout must be in [0, 1)"),
    ("caption_dropout=-0.1", "caption_dropout must be in [0, 1)"),
    ("caption_dropout_on=instance", "caption_dropout_on must be one of all, class"),
    ("masked_loss_mean=mask", "masked_loss_mean must be one of weights, pixels"),
    ("resolution=500", "resolution must be a positive multiple of 8"),
    ("resolution=0", "resolution must be a positive multiple of 8"),
    ("learning_rate=0", "learning_rate must be > 0"),
    ("learning_rate=-1e-4", "learning_rate must be > 0"),
    ("text_encoder_learning_rate=0", "text_encoder_learning_rate must be > 0"),
    ("max_steps=0", "max_steps must be >= 1"),
    ("train_batch_size=0", "train_batch_size must be >= 1"),
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps must be >= 1"),
    ("lora_rank=0", "lora_rank must be >= 1"),
    ("lora_alpha=0", "lora_alpha must be > 0"),
    ("lr_warmup_steps=-1", "lr_warmup_steps must be >= 0"),
    ("num_class_images=0", "num_class_images must be >= 1"),
    ("prior_loss_weight=-1", "prior_loss_weight must be >= 0"),
    ("snr_gamma=0", "snr_gamma must be > 0"),
    ("noise_offset=-0.1", "noise_offset must be >= 0"),
    ("checkpoints_keep=0", "checkpoints_keep must be >= 1"),
    ("validation_every=-5", "validation_every must be >= 0"),
    ("adam_beta2=1", "adam_beta2 must be in [0, 1)"),
])
def test_ranges(override, expected):
    message = error_of(override)
    assert message.startswith(expected)
    assert "; got" in message


def test_accepted_edges_of_ranges():
    cfg = load_config(None, [*BASE, "caption_dropout=0", "resolution=8", "max_steps=1", "noise_offset=0",
                             "snr_gamma=null", "validation_every=0", "checkpoint_every=0"])
    assert cfg.caption_dropout == 0.0 and cfg.resolution == 8 and cfg.snr_gamma is None


def test_prior_preservation_needs_class_prompt_and_class_dir():
    assert "needs class_prompt" in error_of("with_prior_preservation=true", "class_dir=cls")
    assert "needs class_dir" in error_of("with_prior_preservation=true", "class_prompt=a photo of a dog")
    cfg = load_config(None, [*BASE, "with_prior_preservation=true", "class_dir=cls", "class_prompt=a dog"])
    assert cfg.with_prior_preservation and cfg.class_dir == "cls"
    # dropping only class images' captions needs class images
    assert "drops only class images' captions" in error_of("caption_dropout_on=class")
    cfg = load_config(None, [*BASE, "with_prior_preservation=true", "class_dir=cls", "class_prompt=a dog",
                             "caption_dropout_on=class"])
    assert cfg.caption_dropout_on == "class" and load_config(None, BASE).caption_dropout_on == "all"


def test_class_prompts_per_run_and_per_concept():
    from sdtune.training.config import concepts_of

    cfg = load_config(None, [*BASE, "with_prior_preservation=true", "class_dir=cls", "class_prompt=a dog",
                             "class_prompts=[a dog on a beach, a dog at night]"])
    assert concepts_of(cfg)[0].class_prompts == ("a dog on a beach", "a dog at night")
    assert concepts_of(load_config(None, [*BASE, "class_prompts=a dog on snow"]))[0].class_prompts == ("a dog on snow",)
    assert "class_prompts holds an empty prompt" in error_of("with_prior_preservation=true", "class_dir=cls",
                                                             "class_prompt=a dog", "class_prompts=[a dog, ' ']")
    assert "must be a list of strings" in error_of("class_prompts=[1, 2]")
    concept = {"instance_dir": "a", "instance_prompt": "sks dog", "class_prompt": "a dog", "class_dir": "c",
               "class_prompts": ["a dog on grass"]}
    cfg = load_config(None, ["with_prior_preservation=true", f"concepts=[{concept}]"])
    assert concepts_of(cfg)[0].class_prompts == ("a dog on grass",)
    with pytest.raises(SdtuneError, match=r"concepts\[0\]\.class_prompts must be a list of strings"):
        load_config(None, [f"concepts=[{ {**concept, 'class_prompts': [3]} }]"])
    with pytest.raises(SdtuneError, match="set class_prompts inside each concept"):
        load_config(None, [f"concepts=[{concept}]", "class_prompts=[a dog]"])


def test_instance_prompt_and_dir_required():
    with pytest.raises(SdtuneError, match="instance_prompt is empty"):
        load_config(None, ["instance_dir=subject"])
    with pytest.raises(SdtuneError, match="instance_prompt is empty"):
        load_config(None, ["instance_dir=subject", "instance_prompt=  "])
    with pytest.raises(SdtuneError, match="instance_dir is missing"):
        load_config(None, ["instance_prompt=a photo of sks dog"])


def test_adamw8bit_without_cuda_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = error_of("optimizer=adamw8bit")
    assert "needs a CUDA GPU" in message and "optimizer: adamw" in message


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import importlib.util

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert "needs bitsandbytes" in error_of("optimizer=adamw8bit")


def test_resume_path_must_exist(tmp_path):
    assert "resume checkpoint not found" in error_of(f"resume={tmp_path / 'checkpoint-7'}")
    (tmp_path / "checkpoint-7").mkdir()
    assert load_config(None, [*BASE, f"resume={tmp_path / 'checkpoint-7'}"]).resume == str(tmp_path / "checkpoint-7")


def test_missing_config_file(tmp_path):
    with pytest.raises(SdtuneError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_bad_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "instance_dir: a\ninstance_prompt: [unclosed\nmax_steps: 3\n")
    message = error_of(path=path)
    assert "is not valid YAML" in message and "line" in message and str(path) in message


def test_yaml_must_be_a_mapping(tmp_path):
    assert "must be a mapping" in error_of(path=write(tmp_path, "- a\n- b\n"))


def test_empty_yaml_means_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "# nothing yet\n"), BASE)
    assert cfg.max_steps == TrainConfig().max_steps


def test_config_to_dict_round_trips_through_json():
    cfg = load_config(None, [*BASE, "validation_prompts=[x, y]", "snr_gamma=5"])
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert set(data) == set(config_mod.FIELD_NAMES)
    assert config_from_dict(data) == cfg


def test_resolve_model_uses_given_model_or_embedded_base(tmp_path, monkeypatch):
    from sdtune.models import embedded

    assert resolve_model(load_config(None, [*BASE, "model=some/folder"])) == "some/folder"
    monkeypatch.setattr(embedded, "MODELS_DIR", tmp_path / "models")
    cfg = load_config(None, BASE)  # model: null is resolved lazily, not at load time
    with pytest.raises(SdtuneError, match="embedded base model is missing"):
        resolve_model(cfg)
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "model_index.json").write_text("{}")
    assert resolve_model(cfg) == str(tmp_path / "models" / "base")


def test_configs_built_in_code_are_validated_too():
    with pytest.raises(SdtuneError, match="method must be one of"):
        config_from_dict({"instance_dir": "a", "instance_prompt": "b", "method": "dora"})
    with pytest.raises(SdtuneError, match="unknown key 'metod'"):
        config_from_dict({"instance_dir": "a", "instance_prompt": "b", "metod": "lora"})


# ---------------------------------------------------------------- each key declared once, in its field

def test_every_key_declares_its_help_group_and_checks():
    import dataclasses
    import typing

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        assert meta["help"].strip() and meta["group"] in config_mod.GROUPS, f.name
        numeric = {int, float} & ({hints[f.name]} | set(typing.get_args(hints[f.name])))
        assert not numeric or meta["range"] is not None, f"{f.name}: a numeric key declares its range"
    assert set(config_mod.CONCEPT_KEYS) == {f.name for f in dataclasses.fields(config_mod.Concept)}
    assert {"instance_dir", "instance_prompt", "class_dir", "num_class_images", "repeats"} <= set(config_mod.CONCEPT_KEYS)


def outside(rng):
    """A value just outside a declared range (its low end, else its high end)."""
    low, low_in, high, high_in = rng._bounds()
    if low is not None:
        return low - 1 if low_in else low
    return high + 1 if high_in else high


def test_validate_checks_every_declared_range_with_the_keys_name():
    import typing

    for name, f in config_mod.FIELDS.items():
        rng = f.metadata["range"]
        if rng is None:
            continue
        value = outside(rng)
        tp = config_mod._TYPES[name]
        if int in (typing.get_args(tp) or (tp,)):
            value = int(value)
        message = error_of(f"{name}={value}")
        assert message.startswith(f"{name} must be "), message
        assert "; got" in message


def test_declared_choices_are_what_validate_checks():
    for name, f in config_mod.FIELDS.items():
        if f.metadata["choices"]:
            assert error_of(f"{name}=nope").startswith(f"{name} must be one of {', '.join(f.metadata['choices'])}")


@pytest.mark.parametrize("override", ["learning_rate=inf", "learning_rate=.inf", "learning_rate=nan",
                                      "learning_rate=.nan", "adam_epsilon=-.inf", "noise_offset=inf",
                                      "max_aspect=1e400", "caption_dropout=nan", "lora_alpha=inf", "snr_gamma=.nan",
                                      "prior_loss_weight=1e999"])
def test_non_finite_numbers_are_refused(override):
    key = override.partition("=")[0]
    assert error_of(override).startswith(f"{key} must be a finite number, got ")


def test_non_finite_numbers_in_the_yaml_file(tmp_path):
    path = write(tmp_path, "instance_dir: a\ninstance_prompt: b\nlearning_rate: .inf\n")
    assert error_of(path=path) == "learning_rate must be a finite number, got inf"
    for bad in ("max_steps: .inf", "max_steps: .nan", "max_steps: 1e400", "seed: -.inf"):
        path = write(tmp_path, f"instance_dir: a\ninstance_prompt: b\n{bad}\n")
        assert "must be an integer" in error_of(path=path)


def test_counts_must_be_positive_at_the_top_and_in_concepts():
    assert error_of("repeats=0").startswith("repeats must be >= 1; got 0")
    assert error_of("num_class_images=-3").startswith("num_class_images must be >= 1; got -3")
    concept = {"instance_dir": "a", "instance_prompt": "sks dog"}
    with pytest.raises(SdtuneError, match=r"^concepts\[0\]\.repeats must be >= 1; got 0$"):
        load_config(None, [f"concepts=[{ {**concept, 'repeats': 0} }]"])
    with pytest.raises(SdtuneError, match=r"^concepts\[0\]\.num_class_images must be an integer, got 'x'$"):
        load_config(None, [f"concepts=[{ {**concept, 'num_class_images': 'x'} }]"])


def test_a_concepts_unset_key_is_the_runs():
    from sdtune.training.config import concepts_of

    concepts = [{"instance_dir": "a", "instance_prompt": "sks dog", "num_class_images": None},
                {"dataset": "d", "instance_prompt": "ohwx cat", "repeats": 3}]
    cfg = load_config(None, [f"concepts={json.dumps(concepts)}", "num_class_images=7", "caption_prefix=sks dog,",
                             "split=test"])
    one, two = concepts_of(cfg)
    assert (one.num_class_images, two.num_class_images) == (7, 7) and (one.repeats, two.repeats) == (1, 3)
    assert one.caption_prefix == two.caption_prefix == "sks dog," and two.split == "test" and two.dataset == "d"
    assert one.instance_dir == "a" and two.instance_dir is None and one.source.instance_dir == "a"


def test_resolution_null_means_the_models_native_size():
    from sdtune.training.config import min_image_side

    cfg = load_config(None, [*BASE, "resolution=null", "buckets=auto", "bucket_step=64"])
    assert cfg.resolution is None and min_image_side(cfg) == 0
    assert load_config(None, [*BASE, "resolution=~"]).resolution is None
    assert error_of("resolution=500").startswith("resolution must be a positive multiple of 8")
    assert "divides resolution" in error_of("resolution=512", "bucket_step=48")
    assert "multiple of 8" in error_of("resolution=null", "bucket_step=12")


def test_override_value_that_is_not_yaml_is_one_line():
    message = error_of("validation_prompts=[a, b")
    assert "is not a YAML value" in message
    # prompts and paths stay the text written, whatever YAML would make of them
    assert parse_override("instance_prompt=[sks] dog: {x}") == ("instance_prompt", "[sks] dog: {x}")
    assert parse_override("mixed_precision=no") == ("mixed_precision", "no")
    assert parse_override("instance_prompt=") == ("instance_prompt", "")


def test_yaml_file_siblings(tmp_path):
    assert "must be a mapping of key: value lines, got a str" in error_of(path=write(tmp_path, "just some text\n"))
    assert "must be a mapping" in error_of(path=write(tmp_path, "- instance_dir: a\n"))
    message = error_of(path=write(tmp_path, "instance_dir: a\nmax_steps: 3\ninstance_prompt: b\nmax_steps: 5\n"))
    assert "line 4" in message and "key 'max_steps' is given twice (first on line 2)" in message
    (tmp_path / "train.yaml").write_bytes(b"instance_dir: a\ninstance_prompt: caf\xe9\n")
    assert "is not a text file" in error_of(path=tmp_path / "train.yaml")
    assert "unknown key '3'" in error_of(path=write(tmp_path, "instance_dir: a\n3: b\n"))


def test_format_keys_help_lists_every_key_by_group():
    from sdtune.training.keys_help import format_keys_help

    text = format_keys_help()
    for name in config_mod.FIELD_NAMES:
        assert f"\n  {name} = " in text, name
    heads = [text.index(f"\n{g}:\n") for g in config_mod.GROUPS]
    assert heads == sorted(heads)
    assert "  learning_rate = 0.0001  (a number, > 0)\n" in text
    assert "  method = lora  (one of lora, full)\n" in text
    assert "  resolution = null  (an integer or null, a positive multiple of 8)\n" in text
    assert "  num_class_images = 100  (an integer, >= 1)  [concept]\n" in text
