"""The judge: a small CNN that reads a 64 px world image back into its attributes.

It was trained (``train/judge.py``) on renders of the built-in world, so it can score generations:
does an image show what its prompt stated, is it a subject or just its class. Heads: kind,
colour, size, position, background and subject (``none`` or one of the world's subjects). Shipped in ``data/judge/`` as
``judge.safetensors`` + ``config.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from torch import nn

from sdtune import DATA_DIR
from sdtune.errors import SdtuneError
from sdtune.world import scenes

DEFAULT_DIR = DATA_DIR / "judge"
WEIGHTS = "judge.safetensors"
CONFIG = "config.json"
HEADS = {
    "kind": list(scenes.KINDS),
    "colour": list(scenes.COLOURS),
    "size": list(scenes.SIZES),
    "position": list(scenes.POSITIONS),
    "background": list(scenes.BACKGROUNDS),
    "subject": ["none", *scenes.SUBJECTS],
}


def default_config() -> dict:
    return {"image_size": 64, "stem": 16, "widths": [32, 48, 64], "hidden": 128, "heads": HEADS}


class JudgeNet(nn.Module):
    """A strided 5x5 stem (64 -> 32 px), three conv+pool stages (-> 4 px), one shared hidden layer,
    one linear head per attribute.

    Lean on purpose: it trains in minutes on 2 shared CPU cores. The spatial map is flattened
    rather than pooled, so position stays readable.
    """

    def __init__(self, config: dict):
        super().__init__()
        stem = config["stem"]
        layers: list[nn.Module] = [nn.Conv2d(3, stem, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)]
        cin = stem
        for cout in config["widths"]:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        side = config["image_size"] // 2 // 2 ** len(config["widths"])
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, config["hidden"]), nn.ReLU(inplace=True), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({name: nn.Linear(config["hidden"], len(labels)) for name, labels in config["heads"].items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.hidden(self.features(x))
        return {name: head(h) for name, head in self.heads.items()}


def to_tensor(images: Iterable[Image.Image], size: int = 64) -> torch.Tensor:
    """PIL images -> float tensor [N,3,size,size] in [-1, 1] (resized with a box filter if needed)."""
    arrays = []
    for img in images:
        if not isinstance(img, Image.Image):
            raise SdtuneError(f"the judge takes PIL images, got {type(img).__name__}")
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BOX if img.size[0] > size else Image.BILINEAR)
        arrays.append(np.asarray(img, np.float32))
    if not arrays:
        return torch.zeros(0, 3, size, size)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


class Judge:
    """A loaded judge: ``predict`` images into attribute dicts, ``agrees`` with stated attributes."""

    def __init__(self, net: JudgeNet, config: dict):
        self.net = net.eval()
        self.config = config
        self.labels = config["heads"]

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Judge":
        """Load from a folder holding ``judge.safetensors`` + ``config.json`` (default: the shipped one)."""
        from safetensors.torch import load_file

        folder = Path(path) if path is not None else DEFAULT_DIR
        if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
            raise SdtuneError(
                f"no judge in {folder} (needs {WEIGHTS} and {CONFIG}); rebuild it with `python train/judge.py`"
            )
        config = json.loads((folder / CONFIG).read_text())
        net = JudgeNet(config)
        state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()}
        net.load_state_dict(state)
        return cls(net, config)

    @torch.no_grad()
    def logits(self, images: list[Image.Image], batch_size: int = 256) -> dict[str, torch.Tensor]:
        outs: dict[str, list[torch.Tensor]] = {name: [] for name in self.labels}
        for i in range(0, len(images), batch_size):
            x = to_tensor(images[i : i + batch_size], self.config["image_size"])
            for name, out in self.net(x).items():
                outs[name].append(out)
        return {name: torch.cat(v) if v else torch.zeros(0, len(self.labels[name])) for name, v in outs.items()}

    def predict(self, images: list[Image.Image]) -> list[dict]:
        """One dict per image: {kind, colour, size, position, background: label; subject: its name or None}."""
        logits = self.logits(list(images))
        idx = {name: out.argmax(1).tolist() for name, out in logits.items()}
        preds = []
        for i in range(len(images)):
            p = {name: self.labels[name][idx[name][i]] for name in self.labels}
            p["subject"] = None if p["subject"] == "none" else p["subject"]
            preds.append(p)
        return preds

    @staticmethod
    def matches(prediction: dict, stated: dict) -> bool:
        """True when every stated attribute equals the prediction. ``subject`` may be a name (that subject),
        True (any subject) or False/None (no subject)."""
        for name, value in stated.items():
            if name == "subject":
                found = prediction["subject"]
                if (found != value) if isinstance(value, str) else (bool(value) != (found is not None)):
                    return False
            elif name in prediction and prediction[name] != value:
                return False
        return True

    def agrees(self, image: Image.Image, scene_attrs: dict) -> bool:
        """True when the judge finds every attribute ``scene_attrs`` states (unstated ones are free)."""
        return self.matches(self.predict([image])[0], scene_attrs)
