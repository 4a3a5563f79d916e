"""Past runs under the outputs folder, for the Runs tab and the Generate tab's pickers (no gradio).

A run is a folder directly under the outputs folder holding a LoRA (``pytorch_lora_weights.safetensors``, or another
adapter's ``adapter_model.safetensors``), a full
fine-tune (``model_index.json``), a demo/eval ``metrics.json`` or a UI config (``ui_config.yaml``, maybe still
training or stopped). One level deeper is looked at too (``outputs/demo/<subject>``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from sdtune.ui.safety import Sandbox

LORA_FILE = "pytorch_lora_weights.safetensors"
# Every adapter kind's file a run folder may hold (a LoHa / LoKr / OFT run: peft's adapter_model.safetensors).
ADAPTER_FILES = (LORA_FILE, "adapter_model.safetensors")
FILE_ROUTE = "/gradio_api/file="  # where gradio serves a file inside the allowed paths (the outputs folder)
_SAMPLE = re.compile(r"^(?:step-(\d+)|final)-(\d+)$")
_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
# Folders of a run that are working state, not results: never offered for download.
NOT_RESULTS = ("logs", "latent_cache", "instance", "samples", "ui")
NO_METRICS = ("no metrics for this run: it has no metrics.json (written by `sdtune demo` and `sdtune eval`) and no "
              "eval.jsonl (training evaluates only with eval_every > 0: set it under Advanced on the Train tab)")


@dataclass
class Run:
    path: Path
    kind: str  # "lora" | "full" | "in progress" | "metrics"

    @property
    def name(self) -> str:
        return str(self.path.name)

    def card(self) -> str:
        """The run's model card as Markdown; its YAML front matter shown as a code block, not as text, and its
        images (samples/final-0.png, eval.svg: relative to the run folder) linked where the page serves them."""
        card = self.path / "README.md"
        if not card.is_file():
            return "(no model card yet: the run has not finished)"
        text = card.read_text(errors="replace")
        if text.startswith("---\n") and "\n---\n" in text[4:]:
            front, body = text[4:].split("\n---\n", 1)
            text = f"```yaml\n{front}\n```\n{body}"
        return _IMAGE_LINK.sub(lambda m: f"![{m.group(1)}]({self.served(m.group(2))})", text)

    def served(self, link: str) -> str:
        """A link of the card as the page can load it: a file of the run, by its URL; anything else unchanged."""
        if "://" in link or link.startswith(("/", "data:")):
            return link
        path = (self.path / link).resolve()
        if not path.is_file() or self.path.resolve() not in path.parents:
            return link
        return FILE_ROUTE + quote(str(path))

    def samples(self) -> list[Path]:
        folder = self.path / "samples"
        return sorted(folder.glob("*.png"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []

    def labelled_samples(self) -> list[tuple[str, str]]:
        """(path, "step 10 · a photo of sks box"): each validation sample with its step and prompt."""
        return [(str(p), sample_label(p, self.validation_prompts())) for p in self.samples()]

    def validation_prompts(self) -> list[str]:
        return validation_prompts(self.path)

    def files(self) -> list[Path]:
        """What a person takes away: the run's files (weights in every format, card, config, metrics, curves) and
        the folders of results (best/, a full fine-tune's unet/ ...), not its working state (checkpoints, logs)."""
        out = []
        from sdtune.training.checkpointing import LOCK_FILE

        for p in sorted(self.path.iterdir()):
            if p.name.startswith((".", "checkpoint-")) or p.name == LOCK_FILE or (p.is_dir() and p.name in NOT_RESULTS):
                continue
            out += [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        return out

    def metrics_view(self) -> tuple[dict | None, str]:
        """(metrics to show, a line about them): metrics.json, else the last evaluation of eval.jsonl, else why
        there are none."""
        metrics = self.metrics()
        if metrics is not None:
            return metrics, "from metrics.json"
        from sdtune.training.selection import EVAL_FILE

        history = self.path / EVAL_FILE
        if history.is_file():
            rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip().startswith("{")]
            if rows:
                return rows[-1], f"the last of {len(rows)} evaluations during training ({EVAL_FILE}, step " \
                                 f"{rows[-1].get('step')})"
        return None, NO_METRICS

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
    if any((folder / name).is_file() for name in ADAPTER_FILES):
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


def sample_label(path: str | Path, prompts: list[str]) -> str:
    """"step 10 · a photo of sks box" for samples/step-000010-0.png (the recipe's names: the step, then the index
    of the validation prompt), "final · ..." for samples/final-0.png."""
    m = _SAMPLE.match(Path(path).stem)
    if not m:
        return Path(path).stem
    when = f"step {int(m.group(1))}" if m.group(1) else "final"
    k = int(m.group(2))
    return f"{when} · {prompts[k % len(prompts)]}" if prompts else when


def validation_prompts(run_dir: str | Path) -> list[str]:
    """The run's validation prompts, from the config the UI wrote (runs started elsewhere: none known)."""
    from sdtune.errors import SdtuneError
    from sdtune.yamlfile import read_yaml

    try:
        prompts = (read_yaml(Path(run_dir) / "ui_config.yaml") or {}).get("validation_prompts") or []
    except SdtuneError:
        return []
    return [str(p) for p in prompts] if isinstance(prompts, list) else []


def lora_choices(sandbox: Sandbox) -> list[tuple[str, str]]:
    """(label, path) of every finished LoRA run."""
    return [(str(r.path.relative_to(sandbox.outputs)), str(r.path)) for r in list_runs(sandbox) if r.kind == "lora"]


def unet_kind(folder: str | Path) -> str:
    """"base", "inpaint" or "depth": what a diffusers model folder's UNet takes (4, 9 or 5 input channels)."""
    try:
        channels = json.loads((Path(folder) / "unet" / "config.json").read_text()).get("in_channels", 4)
    except (OSError, ValueError, AttributeError):
        return "base"
    return {9: "inpaint", 5: "depth"}.get(channels, "base")


def model_choices(sandbox: Sandbox, kind: str = "base") -> list[tuple[str, str]]:
    """(label, path) of the models of one kind ("base": txt2img and img2img; "inpaint"; "depth"): the embedded
    family's member named "(default)", then every full fine-tune under the outputs folder whose UNet is of that
    kind. The inpaint and depth pickers' default is the empty value: the embedded member the base brings."""
    from sdtune.ui.generate import embedded_choices

    family = embedded_choices()
    if kind == "base":
        first = [("embedded base (default)", family["base"])] if "base" in family else []
    else:  # the empty value: the member the embedded base brings (none without it)
        first = [(f"embedded {kind} (default)" if kind in family else f"default (no {kind} model)", "")]
    full = [(str(r.path.relative_to(sandbox.outputs)), str(r.path)) for r in list_runs(sandbox)
            if r.kind == "full" and unet_kind(r.path) == kind]
    return first + full


def find_run(sandbox: Sandbox, label: str) -> Run | None:
    for r in list_runs(sandbox):
        if str(r.path.relative_to(sandbox.outputs)) == label:
            return r
    return None
