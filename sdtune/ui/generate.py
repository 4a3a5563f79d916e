"""The Generate tab's work, without gradio: one ``Engine`` held and reused, inputs and outputs kept on disk.

``Generator.generate`` is what the page calls. It resolves the picked models through the sandbox, reuses the held
engine when the models are the same (a mode switch or a new prompt loads nothing; another LoRA or scale is swapped
on the held engine, the weights restored from a CPU copy; another inpaint or depth model is loaded alone into the
held engine; another main model loads a new engine in place of the old one),
stores uploaded inputs and painted masks under ``OUTPUTS/ui/inputs`` (content-named,
written atomically) so every PNG it writes can be regenerated with ``sdtune infer --from-png``, and saves the images
with their parameters (``sdtune.generation.metadata``) under ``OUTPUTS/ui/images``.
"""
from __future__ import annotations

import hashlib
import io
import threading
import time
from pathlib import Path

from sdtune.errors import SdtuneError
from sdtune.imageio import save_image_atomic
from sdtune.models.embedded import KINDS, embedded_model, has_embedded
from sdtune.ui.safety import MAX_UPLOAD_PIXELS, Sandbox, check_upload

MODES = ("txt2img", "img2img", "inpaint", "depth2img")
NONE = ""  # the "no LoRA" / "no dedicated model" choice


def embedded_choices() -> dict[str, str]:
    """{'base': path, 'inpaint': path, 'depth': path} for the members that are built."""
    return {k: str(embedded_model(k)) for k in KINDS if has_embedded(k)}


class Generator:
    """Serves generation requests from one engine; requests are serialised (the page queues them too)."""

    def __init__(self, sandbox: Sandbox, device=None, dtype=None):
        self.sandbox, self.device, self.dtype = sandbox, device, dtype
        self.engine = None
        self.key: tuple | None = None
        self.loads = 0  # how many engines were loaded (tests and the status line read it)
        self.partial_loads = 0  # how many times only a dedicated (inpaint/depth) model was swapped in
        self.last_load_s = 0.0
        self.lora_switches, self.last_lora_s = 0, 0.0  # LoRAs put on the held engine without reloading it
        self._pristine: list | None = None  # CPU copies of the weights a LoRA changes, taken before the first one
        self._lock = threading.Lock()
        self.images_dir = sandbox.outputs / "ui" / "images"
        self.inputs_dir = sandbox.outputs / "ui" / "inputs"

    # ------------------------------------------------------------ models

    def _model_path(self, value, what: str) -> str | None:
        if value is None or str(value).strip() in ("", NONE):
            return None
        return str(self.sandbox.resolve(value, what, kind="any"))

    def models(self, model=None, inpaint_model=None, depth_model=None, lora=None, lora_scale=1.0) -> tuple:
        """The engine key: resolved paths (each checked by the sandbox) and the LoRA scale."""
        family = embedded_choices()
        model = self._model_path(model, "model") or family.get("base")
        if model is None:
            raise SdtuneError("no model: the embedded base model is missing and none was picked")
        inpaint = self._model_path(inpaint_model, "inpaint model")
        depth = self._model_path(depth_model, "depth model")
        if model == family.get("base"):  # the embedded base brings its family's inpaint and depth members
            inpaint, depth = inpaint or family.get("inpaint"), depth or family.get("depth")
        lora = self._model_path(lora, "LoRA")
        try:
            scale = float(lora_scale) if lora else 1.0
        except (TypeError, ValueError):
            raise SdtuneError(f"LoRA scale must be a number, got {lora_scale!r}") from None
        return model, inpaint, depth, lora, scale

    def engine_for(self, key: tuple):
        """The held engine, made to match ``key`` = (model, inpaint, depth, lora, scale) with the least work.

        The same models: the engine is reused. Only the LoRA or its scale differs: the weights are put back from a
        CPU copy taken before the first LoRA and the new LoRA is applied (``Engine._apply_lora``, as ``Engine.load``
        does) - the models are not read again. Only the inpaint or depth model differs: that one alone is loaded into
        the held engine (``Engine.replace_dedicated``). Another main model: a new engine replaces the old one.
        """
        from sdtune.generation.engine import Engine

        if self.engine is not None and self.key == key:
            return self.engine
        model, inpaint_model, depth_model, lora, scale = key
        if self.engine is not None and self.key[0] == model and self.key[1:3] != key[1:3]:
            # Only a dedicated model differs: the LoRA comes off (weights restored), that model alone is loaded.
            self._set_lora(None, 1.0)
            self._pristine = None  # the modules a LoRA reaches change with the UNets
            start = time.perf_counter()
            try:
                for kind, old, new in (("inpaint", self.key[1], inpaint_model), ("depth", self.key[2], depth_model)):
                    if old != new:
                        self.engine.replace_dedicated(kind, new)
            except BaseException:
                self.engine, self.key = None, None  # half swapped: the next request loads a whole new engine
                raise
            self.key = (model, inpaint_model, depth_model, None, 1.0)
            self.last_load_s = time.perf_counter() - start
            self.partial_loads += 1
        if self.engine is None or self.key[:3] != key[:3]:
            self.engine, self.key, self._pristine = None, None, None  # free the old one before loading the next
            start = time.perf_counter()
            engine = Engine.load(model, inpaint_model=inpaint_model, depth_model=depth_model, device=self.device,
                                 dtype=self.dtype)
            self.last_load_s = time.perf_counter() - start
            self.engine, self.key = engine, (model, inpaint_model, depth_model, None, 1.0)
            self.loads += 1
        if self.key[3:] != (lora, scale):
            self._set_lora(lora, scale)
        return self.engine

    def current(self):
        """The held engine as it is (model and LoRA), or the embedded family's when none is held yet."""
        return self.engine if self.engine is not None else self.engine_for(self.models())

    def _lora_targets(self) -> list:
        e = self.engine  # every module Engine._apply_lora may change (SDXL: the second text encoder too)
        modules = [*e.unets.values(), *e._text_encoders.values(), getattr(e, "text_encoder_2", None)]
        return list({id(m): m for m in modules if m is not None}.values())

    def _set_lora(self, lora: str | None, scale: float) -> None:
        """Take the held engine's LoRA off (weights restored exactly) and put ``lora`` at ``scale`` on."""
        from sdtune.generation.components import source_name as _source_name
        from sdtune.models import lora as lora_mod

        e = self.engine
        if lora is not None:
            lora_mod.find_lora_file(lora)  # a missing file fails before the weights are touched
        if self.key[3] is not None:
            from diffusers.utils.peft_utils import recurse_remove_peft_layers

            for module, state in zip(self._lora_targets(), self._pristine):
                if lora_mod._lora_layers(module):  # kept unfused: drop the adapter layers first
                    recurse_remove_peft_layers(module)
                    for attr in ("peft_config",):
                        if hasattr(module, attr):
                            delattr(module, attr)
                    if hasattr(module, "_hf_peft_config_loaded"):
                        module._hf_peft_config_loaded = False
                module.load_state_dict(state)
            e.sources.update(lora=None, lora_scale=None)
            e.lora_fused = None
            self.key = (*self.key[:3], None, 1.0)
        if lora is None:
            return
        if self._pristine is None:
            self._pristine = [{k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}
                              for m in self._lora_targets()]
        start = time.perf_counter()
        e._apply_lora(lora, float(scale), False, "auto")
        e.sources.update(lora=_source_name(lora), lora_scale=float(scale))
        self.key = (*self.key[:3], lora, scale)
        self.lora_switches += 1
        self.last_lora_s = time.perf_counter() - start

    # ------------------------------------------------------------ inputs

    def store_input(self, image, kind: str) -> Path:
        """Save an input image (PIL) as a content-named PNG under OUTPUTS/ui/inputs; the same pixels, the same file."""
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        digest = hashlib.sha256(buf.getvalue()).hexdigest()[:16]
        path = self.inputs_dir / f"{kind}-{digest}.png"
        if not path.is_file():
            save_image_atomic(image, path)
        return path

    def input_image(self, value, what: str = "image"):
        """An input from the page: a PIL image, or the path of an upload (checked as an image, size-limited)."""
        if value is None:
            return None
        if isinstance(value, (str, Path)):
            return check_upload(value, what).convert("RGB")
        if value.width * value.height > MAX_UPLOAD_PIXELS:
            raise SdtuneError(f"{what} is {value.width}x{value.height}; the limit is {MAX_UPLOAD_PIXELS} pixels")
        return value.convert("RGB")

    # ------------------------------------------------------------ generation

    def generate(self, mode: str, *, prompt: str = "", negative_prompt: str = "", steps: int = 30,
                 guidance: float = 7.5, seed: int = 0, width=None, height=None, scheduler=None, num_images: int = 1,
                 image=None, mask=None, strength=None, depth_map=None, model=None, inpaint_model=None,
                 depth_model=None, lora=None, lora_scale: float = 1.0, save: bool = True, on_step=None,
                 guidance_interval=None):
        """Generate and save; returns [(png path or None, image, params)]. Every input is checked before work."""
        from sdtune.generation.requests import check_request_as_flags as check_request  # the CLI's flags
        from sdtune.generation.metadata import save_results

        if mode not in MODES:
            raise SdtuneError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        width, height = (int(width) if width else None), (int(height) if height else None)
        paths = {}
        if mode != "txt2img":
            if image is None:
                raise SdtuneError(f"{mode} needs an input image: upload one")
            paths["image"] = self.store_input(self.input_image(image), "image")
        if mode == "inpaint":
            if mask is None:
                raise SdtuneError("inpaint needs a mask: paint the area to repaint on the image (white = repaint)")
            paths["mask"] = self.store_input(mask.convert("L"), "mask")
        if mode == "depth2img" and depth_map is not None:
            paths["depth_map"] = self.store_input(self.input_image(depth_map, "depth map").convert("L"), "depth")
        gen = dict(steps=int(steps), guidance=float(guidance), seed=int(seed), width=width, height=height,
                   scheduler=scheduler or None, num_images=int(num_images), strength=strength,
                   image=paths.get("image"), mask=paths.get("mask"), depth_map=paths.get("depth_map"),
                   guidance_interval=guidance_interval or None)  # the page's empty box: every step guided
        check_request(mode, **gen)  # the CLI's checks and messages, before any model is loaded
        key = self.models(model, inpaint_model, depth_model, lora, lora_scale)
        with self._lock:
            engine = self.engine_for(key)
            results = engine.generate(mode, prompt=prompt or "", negative_prompt=negative_prompt or "",
                                      on_step=on_step, **gen)
        saved = save_results(results, self.images_dir) if save else [None] * len(results)
        return [(p, r.image, r.params) for p, r in zip(saved, results)]

    def estimate_depth(self, image, key: tuple | None = None):
        """The depth model's own estimate for ``image`` (white = near), as a greyscale image of its size."""
        import numpy as np
        import torch
        from PIL import Image

        with self._lock:
            engine = self.engine_for(key or self.models())
            if engine.depth_estimator is None or engine.feature_extractor is None:
                raise SdtuneError("the depth model has no depth estimator; upload a depth map instead")
            img = self.input_image(image)
            pixels = engine.feature_extractor(images=img, return_tensors="pt").pixel_values
            with torch.inference_mode():
                depth = engine.depth_estimator(pixels.to(engine.device, engine.dtype)).predicted_depth
        arr = depth[0].float().cpu().numpy()
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-8)
        return Image.fromarray((arr * 255).astype(np.uint8), "L").resize(img.size, Image.BICUBIC)


def mask_from_editor(value):
    """Gradio ImageEditor value -> (background RGB image, mask L image: white where anything was painted)."""
    from PIL import Image, ImageChops

    if not value:
        return None, None
    background = value.get("background") if isinstance(value, dict) else value
    if background is None:
        return None, None
    background = background.convert("RGBA")
    mask = Image.new("L", background.size, 0)
    for layer in (value.get("layers") or []) if isinstance(value, dict) else []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != mask.size:
            alpha = alpha.resize(mask.size, Image.NEAREST)
        mask = ImageChops.lighter(mask, alpha.point(lambda a: 255 if a > 0 else 0))
    flat = Image.new("RGB", background.size, (255, 255, 255))
    flat.paste(background, mask=background.getchannel("A"))
    return flat, (mask if mask.getbbox() else None)


def restore_from_png(path, sandbox: Sandbox) -> dict:
    """The settings stored in an sdtune PNG (the ``--from-png`` data), for the Generate form.

    The file is checked as an upload first; inputs it names are returned only when they lie inside the sandbox.
    """
    from sdtune.generation.metadata import read_params

    check_upload(path, "PNG")
    params = read_params(path)
    out = dict(params)
    for key in ("image", "mask", "depth_map", "model", "inpaint_model", "depth_model", "lora"):
        value = params.get(key)
        if value:
            try:
                out[key] = str(sandbox.resolve(value, key))
            except SdtuneError:
                out[key] = None
    return out


def recommended_for(sandbox, lora) -> dict | None:
    """The settings the LoRA's run recommends (``lora.recommended_settings``), read only inside the sandbox; None
    for no LoRA, a path the sandbox refuses (generating reports that, in words) or a LoRA that carries none."""
    from sdtune.models.lora import recommended_settings

    if lora is None or str(lora).strip() in ("", NONE):
        return None
    try:
        path = sandbox.resolve(lora, "LoRA", kind="any")
    except SdtuneError:
        return None
    return recommended_settings(path)


def recommended_line(rec: dict) -> str:
    """The status line saying the form now holds the LoRA's recommended settings, and that they may be changed."""
    interval = rec.get("guidance_interval")
    extra = f", guidance interval {','.join(f'{x:g}' for x in interval)}" if interval else ""
    return (f"using the LoRA's recommended settings: guidance {rec['guidance']:g}, LoRA scale {rec['lora_scale']:g}"
            f"{extra} (change them to override)")


def check_lora(sandbox, lora) -> Path:
    """A LoRA picked or typed in the page, checked at once: inside the sandbox, existing, a readable safetensors
    file (a folder holding one). Raises the one-line reason; returns the file."""
    from safetensors import safe_open

    from sdtune.models.lora import find_lora_file

    path = sandbox.resolve(lora, "LoRA", kind="any")
    if not path.exists():
        raise SdtuneError(f"LoRA {lora}: not found (looked for {path})")
    file = find_lora_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception:  # safetensors raises its own types for a truncated or foreign file
        raise SdtuneError(f"LoRA {file.name}: not a readable .safetensors file (truncated, or another format)") \
            from None
    return file
