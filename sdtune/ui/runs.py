"""Past runs under the outputs folder, for the Runs tab and the Generate tab's pickers (no gradio).

A run is a folder directly under the outputs folder holding a LoRA (``pytorch_lora_weights.safetensors``), a full
fine-tune (``model_index.json``), a demo/eval ``metrics.json`` or a UI config (``ui_config.yaml``, maybe still
training or stopped). One level deeper is looked at too (``outputs/demo/<subject>``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdtune.ui.safety import Sandbox

LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class Run:
    path: Path
    kind: str  # "lora" | "full" | "in progress" | "metrics"

    @property
    def name(self) -> str:
        return str(self.path.name)

    def card(self) -> str:
        """The run's model card as Markdown; its YAML front matter shown as a code block, not as text."""
        card = self.path / "README.md"
        if not card.is_file():
            return "(no model card yet: the run has not finished)"
        text = card.read_text(errors="replace")
        if text.startswith("---\n") and "\n---\n" in text[4:]:
            front, body = text[4:].split("\n---\n", 1)
            text = f"```yaml\n{front}\n```\n{body}"
        return text

    def samples(self) -> list[Path]:
        folder = self.path / "samples"
        return sorted(folder.glob("*.png"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []

    def metrics(self) -> dict | None:
        path = self.path / "metrics.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {"error": "metrics.json could not be read"}

    def checkpoints(self) -> list[str]:
        return sorted(p.name for p in self.path.glob("checkpoint-*") if p.is_dir())


def _kind(folder: Path) -> str | None:
    if (folder / LORA_FILE).is_file():
        return "lora"
    if (folder / "model_index.json").is_file() and (folder / "unet").is_dir():
        return "full"
    if (folder / "ui_config.yaml").is_file():
        return "in progress"
    if (folder / "metrics.json").is_file():
        return "metrics"
    return None


def list_runs(sandbox: Sandbox) -> list[Run]:
    """Every run under the outputs folder (and one level below), newest first."""
    runs = []
    for folder in sorted(p for p in sandbox.outputs.iterdir() if p.is_dir() and not p.name.startswith(".")):
        kind = _kind(folder)
        if kind:
            runs.append(Run(folder, kind))
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("checkpoint-", "."))):
            if sub.name not in ("samples", "logs", "instance", "latent_cache", "ui") and (k := _kind(sub)):
                runs.append(Run(sub, k))
    return sorted(runs, key=lambda r: r.path.stat().st_mtime, reverse=True)


def lora_choices(sandbox: Sandbox) -> list[tuple[str, str]]:
    """(label, path) of every finished LoRA run."""
    return [(str(r.path.relative_to(sandbox.outputs)), str(r.path)) for r in list_runs(sandbox) if r.kind == "lora"]


def model_choices(sandbox: Sandbox) -> list[tuple[str, str]]:
    """(label, path): the embedded family's members, then every full fine-tune under the outputs folder."""
    from sdtune.ui.generate import embedded_choices

    family = [(f"embedded {kind}", path) for kind, path in embedded_choices().items()]
    full = [(str(r.path.relative_to(sandbox.outputs)), str(r.path)) for r in list_runs(sandbox) if r.kind == "full"]
    return family + full


def find_run(sandbox: Sandbox, label: str) -> Run | None:
    for r in list_runs(sandbox):
        if str(r.path.relative_to(sandbox.outputs)) == label:
            return r
    return None
