"""``sdtune config list | show | cp``, ``sdtune train --help-keys`` and ``sdtune --version``."""
import pytest
import yaml

from sdtune import CONFIGS_DIR, __version__
from sdtune.commands.cli import main
from sdtune.training.config import FIELDS


def test_list_names_every_shipped_config_with_what_it_is_for(capsys):
    assert main(["config", "list"]) == 0
    out = capsys.readouterr().out
    for path in CONFIGS_DIR.glob("*.yaml"):
        assert path.stem in out
    assert "Stable Diffusion XL" in out  # sdxl_lora's first comment line


def test_show_prints_the_file_and_cp_copies_it_without_overwriting(capsys, tmp_path):
    assert main(["config", "show", "sd15_lora"]) == 0
    assert capsys.readouterr().out == (CONFIGS_DIR / "sd15_lora.yaml").read_text()
    target = tmp_path / "my.yaml"
    assert main(["config", "cp", "sdxl_lora", str(target)]) == 0
    assert yaml.safe_load(target.read_text()) == yaml.safe_load((CONFIGS_DIR / "sdxl_lora.yaml").read_text())
    target.write_text("mine")
    assert main(["config", "cp", "sdxl_lora", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err and target.read_text() == "mine"
    assert main(["config", "show", "nope"]) == 2


def test_help_keys_lists_every_key(capsys):
    assert main(["train", "--help-keys"]) == 0
    out = capsys.readouterr().out
    for name in FIELDS:
        assert f"\n  {name} = " in out, name


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"sdtune {__version__}"
