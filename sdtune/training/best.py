"""The kept step (``keep_best``): its weights exported to OUTPUT_DIR/best in every format the run writes, while
training goes on; loaded back into the model after the last step, for the settings sweep; and the recommended
settings written into the kept weights' files.

OUTPUT_DIR/best is built in a scratch folder and swapped in whole, so it always holds one complete step. Beside it,
``.best_trainables.safetensors`` holds the kept step's trainable tensors by parameter name (LoRA runs; a full
fine-tune is read back from best/ itself), so a resumed run can load the kept weights too.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from sdtune.training import identifier
from sdtune.training.export import export_weights, run_metadata
from sdtune.training.settings_sweep import METADATA_KEY, metadata_value

BEST_DIR = "best"
TRAINABLES = ".best_trainables.safetensors"


def clear_previous(output_dir: Path) -> None:
    """A fresh run (not resumed) in a used folder: an earlier run's kept step and evaluations are not this run's."""
    from sdtune.training.selection import EVAL_FILE

    shutil.rmtree(output_dir / BEST_DIR, ignore_errors=True)
    for name in (TRAINABLES, EVAL_FILE, "eval.svg"):
        (output_dir / name).unlink(missing_ok=True)


def _modules(run):
    acc = run.accelerator
    return acc.unwrap_model(run.trained[0]), acc.unwrap_model(run.final_text_encoder())


def _trainable_state(run) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the run by name (``unet.``/``text_encoder.`` + parameter name); the identifier's
    rows under ``identifier.<token id>``."""
    unet, te = _modules(run)
    state = {f"unet.{n}": p.detach().float().cpu().contiguous() for n, p in unet.named_parameters() if p.requires_grad}
    rows = identifier.rows_of(te)
    state.update({f"text_encoder.{n}": p.detach().float().cpu().contiguous() for n, p in te.named_parameters()
                  if p.requires_grad and (rows is None or not n.endswith("identifier_rows"))})
    if rows is not None:
        for k, token in enumerate(rows.token_ids):
            state[f"identifier.{token}"] = rows.identifier_rows[k].detach().float().cpu().contiguous()
    return state


def save_best(run, step: int) -> None:
    """Export the weights the run holds now as OUTPUT_DIR/best (main process, during training)."""
    from safetensors.torch import save_file

    from sdtune.imageio import atomic_path

    cfg, out = run.cfg, run.output_dir
    unet, te = _modules(run)
    rows = identifier.current_rows(te) if cfg.train_identifier_embedding else {}
    scratch = Path(tempfile.mkdtemp(prefix=".best-", suffix=".partial", dir=out))
    try:
        export_weights(scratch, cfg, run.pipe, run.sdxl, unet, te, rows, run_metadata(cfg, step))
        old = out / BEST_DIR
        if old.exists():
            trash = Path(tempfile.mkdtemp(prefix=".best-old-", suffix=".partial", dir=out))
            os.replace(old, trash / BEST_DIR)
            os.replace(scratch, old)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(scratch, old)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if cfg.method == "lora":
        with atomic_path(out / TRAINABLES) as tmp:
            save_file(_trainable_state(run), str(tmp), metadata={"step": str(step)})


def load_best(run, step: int) -> None:
    """Put the kept step's weights back into the modules the run holds (after the last step's export)."""
    from safetensors.torch import load_file

    unet, te = _modules(run)
    if run.cfg.method == "lora":
        state = load_file(str(run.output_dir / TRAINABLES))
    else:
        folder = run.output_dir / BEST_DIR
        state = {f"unet.{k}": v for k, v in load_file(str(folder / "unet/diffusion_pytorch_model.safetensors")).items()}
        te_file = folder / "text_encoder/model.safetensors"
        if run.cfg.train_text_encoder and te_file.is_file():
            state.update({f"text_encoder.{k}": v for k, v in load_file(str(te_file)).items()})
    params = {f"unet.{n}": p for n, p in unet.named_parameters()}
    params.update({f"text_encoder.{n}": p for n, p in te.named_parameters()})
    table = te.get_input_embeddings()
    with torch.no_grad():
        for name, value in state.items():
            if name.startswith("identifier."):  # the identifier's rows are back in the table after the last export
                table.weight[int(name.split(".", 1)[1])] = value.to(table.weight.dtype)
            elif name in params:
                params[name].copy_(value.to(params[name].dtype))


def record_settings(run, evaluation: dict) -> None:
    """The recommended settings into the kept weights' LoRA files' metadata (``sdtune_recommended``)."""
    settings = evaluation.get("settings")
    if not settings or run.cfg.method != "lora":
        return
    folders = [run.output_dir / BEST_DIR] if run.cfg.keep_best and evaluation.get("best") is not None else []
    if evaluation.get("kept_step") == evaluation.get("last_step"):
        folders.append(run.output_dir)
    for f in folders:
        for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "adapter_model.safetensors",
                     "lycoris.safetensors"):  # every adapter kind's files (sdtune.training.adapters)
            if (f / name).is_file():
                add_metadata(f / name, {METADATA_KEY: metadata_value(settings)})


def add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with ``extra`` added to its metadata (atomically)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sdtune.imageio import atomic_path

    with safe_open(str(path), framework="pt") as f:
        meta = {**(f.metadata() or {}), **extra}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def summary_lines(evaluation: dict, output_dir: Path) -> list[str]:
    """What the run says at its end: the kept step and why, the settings to use it with."""
    lines = [f"eval: {evaluation['verdict']}"]
    if evaluation.get("best") is not None and (output_dir / BEST_DIR).is_dir():
        lines.append(f"eval: the kept weights (step {evaluation['kept_step']}) are in {output_dir / BEST_DIR}")
    s = evaluation.get("settings")
    if s:
        interval = f", guidance interval {s['guidance_interval']}" if s.get("guidance_interval") else ""
        lines.append(f"eval: recommended settings: guidance {s['guidance']:g}, LoRA scale {s['lora_scale']:g}"
                     f"{interval} (likeness {s.get('likeness', float('nan')):.3f}"
                     f"{'' if s['within_bounds'] else ', no setting kept the bounds'})")
    lines.append(f"eval: {len(evaluation['history'])} evaluations took {evaluation['eval_seconds']} s "
                 f"(curves: eval.jsonl, eval.svg, TensorBoard)")
    return lines
