"""``sdtune lora`` end to end on a tiny model: each tool's output and message, and every bad input in one line."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtune.commands.cli import main
from sdtune.training import adapters

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny SD model, an sdtune run folder with its two LoRA files (rank 4), a tuned copy of the model with one
    changed layer, and a model of another architecture."""
    from diffusers import StableDiffusionPipeline

    from sdtune.models.fixtures import save_tiny_pipeline, tiny_unet

    root = tmp_path_factory.mktemp("lora_cli")
    model = save_tiny_pipeline(root / "model", "sd1")
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    adapters.add_unet_lora(pipe.unet, 4, 4.0, "attention")
    g = torch.Generator().manual_seed(0)
    for name, p in pipe.unet.named_parameters():
        if ".lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2
    run = root / "run"
    adapters.save_lora_files(run, pipe.unet, rank=4, alpha=4.0,
                             metadata={"sdtune_base_model": str(model), "sdtune_config": json.dumps({"max_steps": 3})})
    tuned = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        w = tuned.unet.get_submodule(Q).weight
        w += torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) * 0.05
    tuned.save_pretrained(root / "tuned")
    tiny_unet(cross_dim=48).save_pretrained(root / "other_unet")
    bad_name = "lora_unet_" + Q.replace(".", "_")
    save_file({f"{bad_name}.lora_down.weight": torch.randn(2, 48), f"{bad_name}.lora_up.weight": torch.randn(32, 2)},
              str(root / "misfit.safetensors"))
    save_file({"some.weight": torch.zeros(2)}, str(root / "not_lora.safetensors"))
    torch.save({"x": torch.zeros(1)}, root / "pickled.bin")
    return {"root": root, "model": model, "run": run, "tuned": root / "tuned", "other_unet": root / "other_unet",
            "misfit": root / "misfit.safetensors", "not_lora": root / "not_lora.safetensors",
            "pickled": root / "pickled.bin", "kohya": run / adapters.KOHYA_FILE}


def cli(capsys, *argv):
    code = main(["lora", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_info_text_and_json(env, capsys):
    downs = [k for k in load_file(str(env["kohya"])) if k.endswith(".lora_down.weight")]
    code, out, err = cli(capsys, "info", env["run"])
    assert code == 0, err
    assert "sdtune (diffusers layout" in out and f"rank 4 on {len(downs)} modules" in out
    assert f"unet attention: {len(downs)}" in out and str(env["model"]) in out
    code, out, err = cli(capsys, "info", env["kohya"], "--json")
    data = json.loads(out)
    assert code == 0 and data["format"] == "kohya" and data["modules"] == len(downs)
    assert data["rank_counts"] == {"4": len(downs)} and data["training_config"] == {"max_steps": 3}


def test_pickle_is_read_only_with_allow_pickle(env, capsys, tmp_path):
    torch.save(load_file(str(env["kohya"])), tmp_path / "lora.pt")
    code, out, err = cli(capsys, "info", tmp_path / "lora.pt")
    assert code == 2 and "pickle" in err and out == ""
    code, out, err = cli(capsys, "info", tmp_path / "lora.pt", "--allow-pickle")
    assert code == 0 and "kohya" in out, err


def test_merge_resize_extract_fuse_write_loadable_outputs(env, capsys, tmp_path):
    from sdtune.models.lora_formats import read_lora_set

    merged = tmp_path / "merged.safetensors"
    code, out, err = cli(capsys, "merge", env["run"], env["kohya"], "--weights", "0.7,0.5", "--out", merged, "--quiet")
    assert code == 0, err
    assert "exact" in out and merged.is_file()
    lora, src = read_lora_set(merged), read_lora_set(env["kohya"])
    for key, m in lora.modules.items():
        assert m.rank == 8 and torch.allclose(m.delta(), 1.2 * src.modules[key].delta(), atol=1e-5)
    code, out, err = cli(capsys, "merge", env["run"], env["kohya"], "--out", tmp_path / "m2.safetensors", "--rank", "2")
    assert code == 0 and "energy kept: mean" in out, err
    code, out, err = cli(capsys, "resize", env["run"], "--rank", "2", "--out", tmp_path / "r2.safetensors")
    assert code == 0, err
    assert re.search(r"energy kept: mean \d+\.\d\d%, min \d+\.\d\d% over \d+ modules", out)
    assert {m.rank for m in read_lora_set(tmp_path / "r2.safetensors").modules.values()} == {2}
    code, out, err = cli(capsys, "resize", env["run"], "--rank", "2", "--out", tmp_path / "k.safetensors", "--format",
                         "kohya")
    assert code == 0 and read_lora_set(tmp_path / "k.safetensors").format == "kohya", err
    code, out, err = cli(capsys, "extract", "--base", env["model"], "--tuned", env["tuned"], "--rank", "2",
                         "--out", tmp_path / "x.safetensors", "--device", "cpu")
    assert code == 0, err
    assert "1 layers" in out and "energy kept: mean 100.00%" in out
    assert set(read_lora_set(tmp_path / "x.safetensors").modules) == {("unet", Q)}
    code, out, err = cli(capsys, "fuse", env["run"], "--model", env["model"], "--out", tmp_path / "fused", "--scale",
                         "0.5")
    assert code == 0, err
    assert (tmp_path / "fused" / "model_index.json").is_file()
    code, out, err = cli(capsys, "fuse", tmp_path / "r2.safetensors", "--model", env["model"],
                         "--out", tmp_path / "fused.safetensors")
    assert code == 0 and (tmp_path / "fused.safetensors").is_file(), err


ERRORS = {
    "info-missing": (["info", "{root}/missing.safetensors"], r"LoRA not found"),
    "info-not-lora": (["info", "{not_lora}"], r"not a LoRA file"),
    "info-pickle": (["info", "{pickled}"], r"pickle"),
    "merge-one-file": (["merge", "{run}", "--out", "{out}/m.safetensors"], r"two or more"),
    "merge-weights-count": (["merge", "{run}", "{kohya}", "--weights", "1", "--out", "{out}/m.safetensors"],
                            r"1 weight\(s\) for 2 LoRA files"),
    "merge-weights-text": (["merge", "{run}", "{kohya}", "--weights", "a,b", "--out", "{out}/m.safetensors"],
                           r"must be numbers"),
    "merge-mismatch": (["merge", "{run}", "{misfit}", "--out", "{out}/m.safetensors"], r"do not fit one model"),
    "merge-rank-0": (["merge", "{run}", "{kohya}", "--rank", "0", "--out", "{out}/m.safetensors"], r"above 0"),
    "resize-rank-0": (["resize", "{run}", "--rank", "0", "--out", "{out}/r.safetensors"], r"above 0"),
    "resize-out-suffix": (["resize", "{run}", "--rank", "2", "--out", "{out}/r.bin"], r"must end in .safetensors"),
    "resize-out-is-input": (["resize", "{run}", "--rank", "2", "--out", "{run}/pytorch_lora_weights.safetensors"],
                            r"is an input"),
    "resize-missing": (["resize", "{root}/nothing", "--rank", "2", "--out", "{out}/r.safetensors"], r"not found"),
    "extract-mismatch": (["extract", "--base", "{model}", "--tuned", "{other_unet}", "--rank", "2",
                          "--out", "{out}/x.safetensors"], r"do not match"),
    "extract-rank": (["extract", "--base", "{model}", "--tuned", "{tuned}", "--rank", "-1",
                      "--out", "{out}/x.safetensors"], r"above 0"),
    "extract-missing": (["extract", "--base", "{root}/nothing", "--tuned", "{tuned}", "--rank", "2",
                         "--out", "{out}/x.safetensors"], r"nothing"),
    "fuse-misfit": (["fuse", "{misfit}", "--model", "{model}", "--out", "{out}/f"], r"does not fit"),
    "fuse-missing": (["fuse", "{root}/missing.safetensors", "--model", "{model}", "--out", "{out}/f"],
                     r"LoRA not found"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(case, env, capsys, tmp_path):
    argv, message = ERRORS[case]
    out_dir = tmp_path / "out"
    argv = [a.format(**env, out=out_dir) for a in argv]
    code, out, err = cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[transformers]")]
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("sdtune: error:"), err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_help_lists_every_tool(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["lora", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for tool in ("info", "merge", "resize", "extract", "fuse"):
        assert tool in out
    assert "examples:" in out


def test_damaged_files_are_one_line(env, capsys, tmp_path):
    raw = load_file(str(env["kohya"]))
    down = next(k for k in raw if k.endswith(".lora_down.weight"))
    cases = {
        "nan": ({**raw, down: raw[down] * float("nan")}, "NaN or infinite"),
        "shape": ({**raw, down: torch.randn(3, raw[down].shape[1])}, "do not multiply"),
        "no-up": ({k: v for k, v in raw.items() if k != down.replace("lora_down", "lora_up")}, "only one of"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        code, out, err = cli(capsys, "resize", tmp_path / f"{name}.safetensors", "--rank", "2",
                             "--out", tmp_path / "o.safetensors")
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[transformers]")]
        assert code == 2 and len(lines) == 1 and message in lines[0], (name, err)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    code, out, err = cli(capsys, "info", tmp_path / "garbage.safetensors")
    assert code == 2 and "not a readable safetensors file" in err
    assert not (tmp_path / "o.safetensors").exists()
