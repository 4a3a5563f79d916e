"""Image (and text) features for measuring likeness: a CLIP model (CLIP-I, CLIP-T) and a self-supervised ViT (DINO).

The DreamBooth paper's metrics embed images with these and compare cosines. Both scorers take a local model folder
(saved with ``save_pretrained``) or a hub id already in the local cache (``HF_HUB_OFFLINE=1`` never downloads).
Preprocessing is done here (resize the shorter side, centre crop, normalise) from the folder's
``preprocessor_config.json``, so no torchvision-backed image processor is needed.

Each scorer has ``name``, ``image_embeds(images)`` (unit vectors, one row per image) and, for CLIP,
``text_embeds(texts)``: what ``sdtune.world.evaluation`` and the training run's in-loop evaluation read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from sdtune.errors import SdtuneError

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _preprocessing(config: dict, default_size: int, mean, std) -> dict:
    """Size/crop/mean/std from a preprocessor config (``preprocessor_config.json``), else the given defaults."""
    def side(value, key):
        if isinstance(value, dict):
            return int(value.get(key) or value.get("height") or default_size)
        return int(value) if value else default_size

    size = side(config.get("size"), "shortest_edge")
    crop = side(config.get("crop_size"), "height") if config.get("do_center_crop", True) else size
    return {"size": size, "crop": min(crop, size), "mean": config.get("image_mean", mean),
            "std": config.get("image_std", std)}


def _pixels(images: Sequence[Image.Image], prep: dict):
    """Resize the shorter side, centre-crop, scale to [0,1], normalise -> float tensor [N,3,H,W]."""
    import torch

    out = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        s = prep["size"] / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        w, h = img.size
        c = prep["crop"]
        left, top = (w - c) // 2, (h - c) // 2
        img = img.crop((left, top, left + c, top + c))
        a = (np.asarray(img, np.float32) / 255.0 - np.asarray(prep["mean"], np.float32)) / np.asarray(prep["std"],
                                                                                                   np.float32)
        out.append(a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def _source(path, what: str) -> tuple[str, dict]:
    """(what from_pretrained reads, the preprocessor config): a local folder with config.json, or a hub id."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SdtuneError(f"{what} {p} is not a model folder (no config.json); pass a folder saved with "
                              "save_pretrained, or a hub id")
        pp = p / "preprocessor_config.json"
        return str(p), (json.loads(pp.read_text()) if pp.is_file() else {})
    text = str(path)
    if p.suffix or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise SdtuneError(f"{what} {text} is neither a model folder nor a hub id (owner/name); pass one of them")
    try:  # a hub id: its preprocessor config from the cache (or the hub, when online)
        from huggingface_hub import hf_hub_download

        return text, json.loads(Path(hf_hub_download(text, "preprocessor_config.json")).read_text())
    except Exception:  # no preprocessor config: the model's own defaults
        return text, {}


def _load(cls, source: str, what: str, **kwargs):
    try:
        return cls.from_pretrained(source, **kwargs).eval()
    except (OSError, ValueError) as exc:
        raise SdtuneError(f"could not load a {what} from {source}: {str(exc).splitlines()[0]} (offline, a hub id "
                          "must already be in the cache)") from exc


class ClipScorer:
    """A CLIP model (``CLIPModel`` + its tokenizer) for CLIP-T and CLIP-I."""

    name = "clip"

    def __init__(self, path):
        from transformers import AutoTokenizer, CLIPModel

        source, prep = _source(path, "CLIP model")
        self.model = _load(CLIPModel, source, "CLIP model")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError) as exc:
            raise SdtuneError(f"CLIP model {source} has no tokenizer files (vocab.json, merges.txt)") from exc
        self.prep = _preprocessing(prep, self.model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD)

    def image_embeds(self, images):
        import torch

        with torch.no_grad():
            pooled = self.model.vision_model(pixel_values=_pixels(images, self.prep)).pooler_output
            return torch.nn.functional.normalize(self.model.visual_projection(pooled), dim=-1)

    def text_embeds(self, texts):
        import torch

        max_len = self.model.config.text_config.max_position_embeddings
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                             return_tensors="pt")
        with torch.no_grad():
            pooled = self.model.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
            return torch.nn.functional.normalize(self.model.text_projection(pooled), dim=-1)


class DinoScorer:
    """A self-supervised ViT (``ViTModel``, e.g. facebook/dino-vits16): its CLS token embeds images."""

    name = "dino"
    text_embeds = None  # images only

    def __init__(self, path):
        from transformers import ViTModel

        source, prep = _source(path, "DINO model")
        self.model = _load(ViTModel, source, "ViT (DINO) model", add_pooling_layer=False)
        self.prep = _preprocessing(prep, self.model.config.image_size, IMAGENET_MEAN, IMAGENET_STD)

    def image_embeds(self, images):
        import torch

        with torch.no_grad():
            cls = self.model(pixel_values=_pixels(images, self.prep)).last_hidden_state[:, 0]
            return torch.nn.functional.normalize(cls, dim=-1)


def as_scorer(model, cls):
    """``model`` if it already is a scorer, else ``cls(model)`` (a folder or hub id)."""
    return model if isinstance(model, cls) else cls(model)
