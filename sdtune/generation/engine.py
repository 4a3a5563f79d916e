"""One inference engine for txt2img, img2img, inpaint and depth2img.

The shared parts (VAE, text encoder, tokenizer) are loaded once. Each mode is diffusers' own
pipeline class (StableDiffusionPipeline / Img2Img / Inpaint / Depth2Img) constructed around those
same objects, so switching modes never reloads or copies them; only the UNet differs per mode:

* txt2img, img2img: the model's ordinary 4-channel UNet;
* inpaint: a 9-channel inpainting UNet (the model itself if it is one, or ``inpaint_model``);
  without one, the ordinary UNet (diffusers' inpaint pipeline then blends the known region back
  in at every step);
* depth2img: a 5-channel depth UNet (the model or ``depth_model``) with its depth estimator, or a
  depth map given by the user.

Dedicated inpaint/depth models run with the main model's VAE and text encoder: the public
inpainting and depth models kept SD's frozen VAE and CLIP, so this is what they were trained with,
and a fine-tuned text encoder then reaches every mode. Fine-tuned full weights reach the dedicated
UNets by "add difference" (dedicated + (fine-tuned - base)) when ``base`` names the base model.
A LoRA is loaded into every distinct UNet and once into the shared text encoder.

SDXL (recognised from the model's config) is served the same way with diffusers' SDXL pipelines
(StableDiffusionXL / XLImg2Img / XLInpaint around the shared VAE, both text encoders and tokenizers;
a 9-channel SDXL inpainting UNet as ``inpaint_model``). SDXL has no 5-channel depth model: its
depth2img is a depth ControlNet (``controlnet``) with StableDiffusionXLControlNetImg2ImgPipeline, the
depth coming from ``depth_estimator`` (a DPT folder) or a given depth map. The same ControlNet path
serves SD 1.x/2.x (StableDiffusionControlNetImg2ImgPipeline) beside the 5-channel depth model.
Prompts are encoded by ``sdtune.models.sdxl`` (both encoders, pooled embedding, long prompts chunked).

Reproducibility: each image i of a request is its own pipeline call with its own CPU
``torch.Generator`` seeded ``seed + i``, so image i of a batch equals a single run with seed + i,
and the seed stored in its metadata regenerates it exactly.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from sdtune import __version__
from sdtune.devices import DTYPES, dtype_name, pick_device, pick_dtype
from sdtune.errors import SdtuneError
from sdtune.models.prompts import CHUNK, TRUNCATE, encode_prompts
from sdtune.models.sdxl import encode_prompts_xl
from sdtune.imageio import open_image
from sdtune.generation.guidance import limited_guidance, parse_interval
from sdtune.models.loading import describe, load_controlnet, load_depth_estimator, load_pipeline, resolve_source
from sdtune.models.schedulers import make_scheduler, scheduler_names

log = logging.getLogger("sdtune")

MODES = ("txt2img", "img2img", "inpaint", "depth2img")
DEFAULT_SCHEDULER = "default"  # the model's own scheduler, as saved with it
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0, "depth2img": 0.8}
MAX_SEED = 2**63 - 1
MAX_STEPS = 1000  # the schedulers' num_train_timesteps: more inference steps than that have no timesteps to take
MAX_SIDE = 16384  # pixels per side: 8x SDXL's native size; beyond it tensors outgrow what torch allocates


@dataclass
class Result:
    image: Image.Image
    params: dict = field(default_factory=dict)


def _source_name(source) -> str | None:
    """A local path made absolute (so --from-png works from anywhere); a hub id as given."""
    if source is None:
        return None
    p = Path(str(source)).expanduser()
    return str(p.resolve()) if p.exists() else str(source)


# ---------------------------------------------------------------- full-weight "add difference"

@torch.no_grad()
def add_difference(dedicated: torch.nn.Module, finetuned: torch.nn.Module, base: torch.nn.Module,
                   what: str = "UNet") -> list[str]:
    """In place: ``dedicated += finetuned - base`` for every tensor of the same shape in all three.

    Tensors whose shape differs (an inpaint/depth UNet's wider ``conv_in``) keep the dedicated
    model's values. Returns the names that were kept unchanged. Computed in fp32.
    """
    d_sd, f_sd, b_sd = dedicated.state_dict(), finetuned.state_dict(), base.state_dict()
    comparable = [k for k in f_sd if k in b_sd and f_sd[k].shape == b_sd[k].shape]
    if len(comparable) < 0.9 * len(f_sd):
        raise SdtuneError(f"--base does not match the fine-tuned model's {what} (different architecture); "
                          "pass the model it was fine-tuned from")
    kept = []
    for name, tensor in d_sd.items():
        if name in f_sd and name in b_sd and f_sd[name].shape == b_sd[name].shape == tensor.shape:
            diff = f_sd[name].to(tensor.device).float() - b_sd[name].to(tensor.device).float()
            tensor.copy_((tensor.float() + diff).to(tensor.dtype))
        else:
            kept.append(name)
    return kept


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


# ---------------------------------------------------------------- the engine

class Engine:
    """Loaded once; ``generate(mode, ...)`` serves all four modes from shared components."""

    def __init__(self, *, vae, text_encoder, tokenizer, unets: dict, schedulers: dict, text_encoders: dict,
                 depth_estimator=None, feature_extractor=None, device, dtype, sources: dict,
                 lora_fused: bool | None = None, text_encoder_2=None, tokenizer_2=None, controlnet=None,
                 force_zeros_for_empty_prompt: bool = True):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2  # SDXL's second encoder, else None
        self.sdxl = text_encoder_2 is not None
        self.controlnet = controlnet  # a depth ControlNet for depth2img on the ordinary UNet, or None
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.unets = unets  # kind ("base" | "inpaint" | "depth") -> UNet
        self._schedulers = schedulers  # kind -> the model's own scheduler (config template, never stepped)
        self._text_encoders = text_encoders  # kind -> text encoder (the shared one unless add-difference forced own)
        self.depth_estimator, self.feature_extractor = depth_estimator, feature_extractor
        self.device, self.dtype = device, dtype
        self.sources = sources
        self.lora_fused = lora_fused
        self.compiled = False
        self._pipes: dict = {}

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, model, *, inpaint_model=None, depth_model=None, base=None, lora=None, lora_scale: float = 1.0,
             device=None, dtype=None, config=None, allow_pickle: bool = False, fuse_lora="auto",
             inpaint_config=None, depth_config=None, base_config=None, vae_tiling: bool = False,
             compile: bool = False, controlnet=None, controlnet_config=None, depth_estimator=None) -> "Engine":
        """Load ``model`` (folder | .safetensors | hub id) and the optional dedicated/LoRA/base weights.

        ``config``/``inpaint_config``/``depth_config``/``base_config``: local diffusers folders giving
        the architecture of single-file checkpoints (see ``loading.load_pipeline``). ``controlnet``: a depth
        ControlNet for depth2img (SDXL's way; for SD beside ``depth_model``), ``controlnet_config`` its config
        folder when it is one file; ``depth_estimator``: a transformers depth model folder (DPT) that computes
        its depth from the input image.
        """
        device = device if isinstance(device, torch.device) else pick_device(device)
        if isinstance(dtype, torch.dtype):
            if dtype not in DTYPES.values():
                raise SdtuneError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
        else:
            dtype = pick_dtype(device, dtype)
        if lora_scale is None or not math.isfinite(float(lora_scale)):
            raise SdtuneError("--lora-scale must be a finite number (1.0 = as trained, 0 = off)")
        for name, src in (("--inpaint-model", inpaint_model), ("--depth-model", depth_model), ("--base", base)):
            if src is not None:
                _check_source(src, name)
        if controlnet is not None and depth_model is not None:
            raise SdtuneError("pass either --depth-model (a 5-channel depth model) or --controlnet (a depth "
                              "ControlNet) for depth2img, not both")
        if depth_estimator is not None and controlnet is None:
            raise SdtuneError("--depth-estimator is used by the ControlNet depth2img path; pass --controlnet too")
        if lora is not None:  # fail on a missing LoRA before minutes of model loading
            from sdtune.models.lora import find_lora_file
            find_lora_file(lora, allow_pickle)

        main = load_pipeline(model, device=device, dtype=dtype, config=config, allow_pickle=allow_pickle)
        main_info = describe(main)
        sdxl = main_info.family == "sdxl"
        if sdxl and depth_model is not None:
            raise SdtuneError("SDXL has no 5-channel depth model: SDXL depth2img runs through a depth ControlNet; "
                              "pass --controlnet (and --depth-estimator or --depth-map) instead of --depth-model")
        kind = {9: "inpaint", 5: "depth"}.get(main_info.unet_in_channels, "base")
        unets, schedulers = {kind: main.unet}, {kind: main.scheduler}
        text_encoders = {k: main.text_encoder for k in ("base", "inpaint", "depth")}
        estimator = getattr(main, "depth_estimator", None)
        extractor = getattr(main, "feature_extractor", None) if kind == "depth" else None

        base_pipe = None
        if base is not None and not (kind == "base" and (inpaint_model or depth_model)):
            log.info("--base is only used to carry full fine-tuning over to --inpaint-model/--depth-model; ignored")
        if base is not None and kind == "base" and (inpaint_model or depth_model):
            # Same dtype as the fine-tuned model, so weights it left unchanged subtract to exactly zero;
            # kept on the CPU: it is only read once per dedicated model.
            base_pipe = load_pipeline(base, device="cpu", dtype=dtype, config=base_config,
                                      allow_pickle=allow_pickle)
        for dkind, src, dconfig in (("inpaint", inpaint_model, inpaint_config), ("depth", depth_model, depth_config)):
            if src is None:
                continue
            dedicated = _load_dedicated(dkind, src, dconfig, sdxl=sdxl, text_encoder=main.text_encoder,
                                        text_encoder_2=getattr(main, "text_encoder_2", None), device=device,
                                        dtype=dtype, allow_pickle=allow_pickle)
            if base_pipe is not None and "base" in unets:
                if describe(base_pipe).family != main_info.family:
                    raise SdtuneError(f"--base {base} is not of --model's family ({main_info.family}); pass the model "
                                      "--model was fine-tuned from")
                add_difference(dedicated.unet, unets["base"], base_pipe.unet)
                if sdxl and not (_same_weights(dedicated.text_encoder, base_pipe.text_encoder)
                                 and _same_weights(dedicated.text_encoder_2, base_pipe.text_encoder_2)):
                    raise SdtuneError(f"{src} has text encoders of its own (not --base's); SDXL's modes share one "
                                      "pair, so carry the fine-tuning over only to a dedicated model that kept the "
                                      "base's (as the public SDXL inpainting model did)")
                if not sdxl and not _same_weights(dedicated.text_encoder, base_pipe.text_encoder):
                    # Its text encoder was trained too: it needs its own (dedicated + fine-tuned - base).
                    add_difference(dedicated.text_encoder, main.text_encoder, base_pipe.text_encoder, "text encoder")
                    text_encoders[dkind] = dedicated.text_encoder
                    log.warning("%s has its own text encoder; the %s mode uses it (plus the fine-tuning "
                                "difference) instead of the shared one", src, dkind)
            elif "base" in unets and not _same_weights(dedicated.text_encoder, main.text_encoder):
                log.info("%s runs with the main model's text encoder (pass --base to carry fine-tuning over)", src)
            unets[dkind], schedulers[dkind] = dedicated.unet, dedicated.scheduler
            if dkind == "depth":
                estimator, extractor = dedicated.depth_estimator, dedicated.feature_extractor
            del dedicated
        del base_pipe

        net = None
        if controlnet is not None:
            if "base" not in unets:
                raise SdtuneError("--controlnet drives the ordinary 4-channel UNet; --model is a dedicated model")
            net = load_controlnet(controlnet, device=device, dtype=dtype, config=controlnet_config)
            _check_controlnet(net, unets["base"], controlnet)
            estimator, extractor = None, None
            if depth_estimator is not None:
                estimator, extractor = load_depth_estimator(depth_estimator, device=device, dtype=dtype)

        engine = cls(vae=main.vae, text_encoder=main.text_encoder, tokenizer=main.tokenizer, unets=unets,
                     schedulers=schedulers, text_encoders=text_encoders, depth_estimator=estimator,
                     feature_extractor=extractor, device=device, dtype=dtype,
                     text_encoder_2=getattr(main, "text_encoder_2", None) if sdxl else None,
                     tokenizer_2=getattr(main, "tokenizer_2", None) if sdxl else None, controlnet=net,
                     force_zeros_for_empty_prompt=bool(main.config.get("force_zeros_for_empty_prompt", True)),
                     sources=dict(model=_source_name(model), inpaint_model=_source_name(inpaint_model),
                                  depth_model=_source_name(depth_model), base=_source_name(base),
                                  config=_source_name(config), inpaint_config=_source_name(inpaint_config),
                                  depth_config=_source_name(depth_config), base_config=_source_name(base_config),
                                  lora=_source_name(lora), controlnet=_source_name(controlnet),
                                  controlnet_config=_source_name(controlnet_config),
                                  depth_estimator=_source_name(depth_estimator),
                                  lora_scale=float(lora_scale) if lora is not None else None))
        if lora is not None:
            engine._apply_lora(lora, float(lora_scale), allow_pickle, fuse_lora)
        engine.set_vae_tiling(vae_tiling)
        if compile:
            engine.compile_unets()
        return engine

    def replace_dedicated(self, kind: str, src, config=None, allow_pickle: bool = False) -> None:
        """Swap the dedicated ``kind`` ("inpaint" | "depth") model for ``src`` (None: none, the mode then runs as
        without one), loading only that model: the shared VAE, text encoders and the other UNets stay as they are.

        For an engine with no LoRA on it and no ``base`` (add difference) - what the web UI holds between requests.
        """
        if kind not in ("inpaint", "depth"):
            raise SdtuneError(f"replace_dedicated takes 'inpaint' or 'depth', got {kind!r}")
        if self.sources.get("lora") is not None or self.sources.get("base") is not None:
            raise SdtuneError("take the LoRA (and --base) off before swapping a dedicated model; or load a new engine")
        if "base" not in self.unets:
            raise SdtuneError("the engine's main model is itself a dedicated model; load a new engine")
        if kind == "depth" and self.controlnet is not None and src is not None:
            raise SdtuneError("pass either --depth-model (a 5-channel depth model) or --controlnet, not both")
        if src is not None:
            _check_source(src, f"--{kind}-model")
            dedicated = _load_dedicated(kind, src, config, sdxl=self.sdxl, text_encoder=self.text_encoder,
                                        text_encoder_2=self.text_encoder_2, device=self.device, dtype=self.dtype,
                                        allow_pickle=allow_pickle)
            if self.compiled:
                dedicated.unet.compile()
            self.unets[kind], self._schedulers[kind] = dedicated.unet, dedicated.scheduler
            if kind == "depth":
                self.depth_estimator, self.feature_extractor = dedicated.depth_estimator, dedicated.feature_extractor
        else:
            self.unets.pop(kind, None)
            self._schedulers.pop(kind, None)
            if kind == "depth" and self.controlnet is None:
                self.depth_estimator, self.feature_extractor = None, None
        self._text_encoders[kind] = self.text_encoder
        self.sources.update({f"{kind}_model": _source_name(src), f"{kind}_config": _source_name(config)})
        self._pipes.clear()  # pipelines are built around the UNets: the next request builds them anew

    def set_vae_tiling(self, on: bool) -> None:
        """Encode/decode in overlapping tiles of the VAE's own sample size (diffusers' tiling), for every mode.

        Peak memory then grows with the tile, not the image: for images several times the model's size.
        The tiles are blended across their overlap, so pixels differ slightly from a whole-image decode.
        """
        self.vae.enable_tiling() if on else self.vae.disable_tiling()

    def compile_unets(self) -> None:
        """``torch.compile`` every UNet in place, for inference (inductor; on a CPU with frozen weights).

        Each mode's first image at a new size pays the compilation (tens of seconds on a CPU; inductor
        caches part of it on disk for later processes), every step after it runs faster: worth it for
        many images, not for one. On a CPU the weights are frozen into the compiled code (so oneDNN gets
        them pre-packed instead of re-laid-out every call); a LoRA must therefore be applied before this.
        """
        options = {"freezing": True} if self.device.type == "cpu" else None
        for unet in {id(u): u for u in self.unets.values()}.values():
            unet.compile(options=options)
        self.compiled = True

    def _apply_lora(self, path, scale: float, allow_pickle: bool, fuse) -> None:
        from sdtune.models import lora as lora_mod

        lf = lora_mod.read_lora(path, allow_pickle, unet_config=next(iter(self.unets.values())).config)
        text_encoders = list({id(te): te for te in self._text_encoders.values()}.values())
        lora_mod.check_family(lf, sdxl=self.sdxl)
        # Check every model before touching any, so a misfit leaves the engine unchanged.
        for kind, unet in self.unets.items():
            lora_mod.check_fits(lf, unet=unet, unet_what=f"{kind} UNet")
        for te in text_encoders:
            lora_mod.check_fits(lf, text_encoder=te)
        if self.text_encoder_2 is not None:
            lora_mod.check_fits(lf, text_encoder=self.text_encoder_2, prefix="text_encoder_2")
        identifier = lora_mod.identifier_file_of(path)  # with train_identifier_embedding: the identifier's own rows
        rows = [] if identifier is None else lora_mod.read_identifier_embedding(
            identifier, self.tokenizer, self.text_encoder.get_input_embeddings().weight.shape[1])
        lora_mod.load_into(lf, unets=list(self.unets.values()))
        for te in text_encoders:  # each distinct text encoder once: the shared one is not loaded twice
            lora_mod.load_into(lf, text_encoder=te)
        extra = []
        if self.text_encoder_2 is not None:
            lora_mod.load_into(lf, text_encoder=self.text_encoder_2, prefix="text_encoder_2")
            extra.append(self.text_encoder_2)
        self.lora_fused = lora_mod.scale_and_fuse([*self.unets.values(), *text_encoders, *extra], scale, fuse)
        for te in text_encoders if rows else ():
            lora_mod.load_identifier_embedding(rows, te, scale)

    # ------------------------------------------------------------ modes

    def modes(self) -> list[str]:
        """The modes this engine can serve with what was loaded."""
        return [m for m in MODES if self._unet_kind(m, strict=False)]

    def _unet_kind(self, mode: str, strict: bool = True) -> str | None:
        if mode in ("txt2img", "img2img"):
            kind = "base" if "base" in self.unets else None
            why = ("the model is a dedicated {} model; pass an ordinary model as --model and this one as "
                   "--{}-model").format(*(("inpainting", "inpaint") if "inpaint" in self.unets else ("depth", "depth")))
        elif mode == "inpaint":
            kind = "inpaint" if "inpaint" in self.unets else ("base" if "base" in self.unets else None)
            why = "inpainting needs an ordinary or a 9-channel inpainting model; pass --inpaint-model"
        elif mode == "depth2img":
            kind = "depth" if "depth" in self.unets else (
                "base" if self.controlnet is not None and "base" in self.unets else None)
            why = ("SDXL depth2img runs through a depth ControlNet; pass --controlnet" if self.sdxl else
                   "depth2img needs a 5-channel depth model (e.g. stable-diffusion-2-depth, --depth-model) or a "
                   "depth ControlNet (--controlnet)")
        else:
            raise SdtuneError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        if kind is None and strict:
            raise SdtuneError(f"{mode} is not available: {why}")
        return kind

    def pipeline(self, mode: str):
        """The stock diffusers pipeline for ``mode``, built around the shared components (cached)."""
        if mode in self._pipes:
            return self._pipes[mode]
        from diffusers import (
            StableDiffusionDepth2ImgPipeline,
            StableDiffusionImg2ImgPipeline,
            StableDiffusionInpaintPipeline,
            StableDiffusionPipeline,
        )

        kind = self._unet_kind(mode)
        parts = dict(vae=self.vae, text_encoder=self._text_encoders[kind], tokenizer=self.tokenizer,
                     unet=self.unets[kind], scheduler=self._fresh_scheduler(kind, DEFAULT_SCHEDULER))
        if self.sdxl:
            pipe = self._sdxl_pipeline(mode, parts)
        elif mode == "depth2img" and kind == "base":
            from diffusers import StableDiffusionControlNetImg2ImgPipeline

            pipe = StableDiffusionControlNetImg2ImgPipeline(controlnet=self.controlnet, safety_checker=None,
                                                            feature_extractor=None, requires_safety_checker=False,
                                                            **parts)
        elif mode == "depth2img":
            pipe = StableDiffusionDepth2ImgPipeline(depth_estimator=self.depth_estimator,
                                                    feature_extractor=self.feature_extractor, **parts)
        else:
            cls = {"txt2img": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline,
                   "inpaint": StableDiffusionInpaintPipeline}[mode]
            pipe = cls(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts)
        pipe.set_progress_bar_config(disable=True)
        self._pipes[mode] = pipe
        return pipe

    def _sdxl_pipeline(self, mode: str, parts: dict):
        from diffusers import (
            StableDiffusionXLControlNetImg2ImgPipeline,
            StableDiffusionXLImg2ImgPipeline,
            StableDiffusionXLInpaintPipeline,
            StableDiffusionXLPipeline,
        )

        parts = dict(parts, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                     force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False)
        if mode == "txt2img":
            return StableDiffusionXLPipeline(**parts)
        if mode == "depth2img":
            return StableDiffusionXLControlNetImg2ImgPipeline(controlnet=self.controlnet, **parts)
        cls = StableDiffusionXLImg2ImgPipeline if mode == "img2img" else StableDiffusionXLInpaintPipeline
        return cls(requires_aesthetics_score=False, **parts)

    def _fresh_scheduler(self, kind: str, name: str):
        own = self._schedulers[kind]
        if name == DEFAULT_SCHEDULER:
            return type(own).from_config(own.config)
        return make_scheduler(name, own.config)

    @property
    def native_size(self) -> tuple[int, int]:
        """(width, height) the main UNet was built for: sample_size x the VAE's scale factor."""
        unet = next(iter(self.unets.values()))
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return int(w) * factor, int(h) * factor

    # ------------------------------------------------------------ generation

    def generate(self, mode: str, prompt: str = "", negative_prompt: str = "", steps: int = 30,
                 guidance: float = 7.5, seed: int = 0, width: int | None = None, height: int | None = None,
                 scheduler: str | None = None, image=None, mask=None, strength: float | None = None,
                 depth_map=None, num_images: int = 1, long_prompt: str = CHUNK, paste_back: bool = False,
                 guidance_interval=None, on_step=None) -> list[Result]:
        """Generate ``num_images`` images; image i uses seed + i. Everything is validated before work starts.

        ``strength`` defaults to 0.8 for img2img/depth2img and 1.0 for inpaint. ``paste_back`` (inpaint):
        the input's own pixels outside the mask replace the generated ones, as AUTOMATIC1111 does - the VAE
        round trip otherwise changes the kept region a little. ``guidance_interval`` (lo, hi) or "lo,hi": guide only
        at noise levels lo <= t/T < hi and sample the conditional prediction elsewhere
        (``sdtune.generation.guidance``); None guides every step, as stock pipelines do. ``long_prompt``:
        "chunk" (default) or "truncate" (with a logged warning). ``on_step(n)`` is called after each step, n = the steps
        this image takes (schedulers and strength change it).
        """
        req = _validate(mode, steps=steps, guidance=guidance, seed=seed, width=width, height=height,
                        scheduler=scheduler, image=image, mask=mask, strength=strength, depth_map=depth_map,
                        num_images=num_images, long_prompt=long_prompt, guidance_interval=guidance_interval)
        requests = [dict(prompt=prompt, seed=req["seed"] + i, image=image, mask=mask, depth_map=depth_map)
                    for i in range(req["num_images"])]
        results = self.generate_many(mode, requests, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                     width=width, height=height, scheduler=scheduler, strength=strength,
                                     long_prompt=long_prompt, paste_back=paste_back, batch_size=1,
                                     guidance_interval=guidance_interval, on_step=on_step)
        for i, r in enumerate(results):
            r.params.update(batch_seed=req["seed"], batch_index=i)
        return results

    def generate_many(self, mode: str, requests: list[dict], *, negative_prompt: str = "", steps: int = 30,
                      guidance: float = 7.5, width: int | None = None, height: int | None = None,
                      scheduler: str | None = None, strength: float | None = None, long_prompt: str = CHUNK,
                      paste_back: bool = False, batch_size: int = 8, guidance_interval=None,
                      on_step=None) -> list[Result]:
        """One image per request (``prompt``, ``seed`` and, by mode, ``image``/``mask``/``depth_map``), run through
        the pipeline ``batch_size`` at a time - several times faster per image for small models, where a
        UNet call costs little more for 8 images than for 1. Each image starts from its own seed's noise, so
        it equals ``generate`` of that request up to float rounding (a batch sums in another order);
        ``batch_size=1`` is ``generate`` exactly. Every request is validated before any work starts.
        """
        kind = self._unet_kind(mode)
        if paste_back and mode != "inpaint":
            raise SdtuneError("--paste-back is only used by inpaint")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SdtuneError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        prepared = []
        for r in requests:
            req = _validate(mode, steps=steps, guidance=guidance, seed=r.get("seed", 0), width=width, height=height,
                            scheduler=scheduler, image=r.get("image"), mask=r.get("mask"), strength=strength,
                            depth_map=r.get("depth_map"), num_images=1, long_prompt=long_prompt,
                            guidance_interval=guidance_interval)
            init, mask_img, depth_img, w, h = self._inputs(mode, req, width, height)
            if mode == "depth2img" and depth_img is None and (self.depth_estimator is None or self.feature_extractor is None):
                if kind == "base":
                    raise SdtuneError("the depth ControlNet needs a depth: pass --depth-estimator DIR (a DPT model "
                                      "folder) or --depth-map (greyscale, white = near)")
                raise SdtuneError("the depth model has no depth estimator; pass --depth-map (greyscale, white = near)")
            prepared.append((r, req, init, mask_img, depth_img, w, h))
        pipe = self.pipeline(mode)
        te = self._text_encoders[kind]
        results: list[Result] = []
        with torch.inference_mode():
            encoded = []
            for r, req, *rest in prepared:
                if self.sdxl:
                    enc = encode_prompts_xl([self.tokenizer, self.tokenizer_2], [te, self.text_encoder_2],
                                            r.get("prompt") or "", negative_prompt, long_prompt=req["long_prompt"],
                                            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                                            device=self.device)
                else:
                    enc = encode_prompts(self.tokenizer, te, r.get("prompt") or "", negative_prompt,
                                         long_prompt=req["long_prompt"], device=self.device)
                if enc.windows > 1:
                    log.info("prompt has %d tokens: encoded in %d windows of 75", enc.prompt_tokens, enc.windows)
                encoded.append((r, req, *rest, enc))
            for start in range(0, len(encoded), batch_size):
                for group in _same_shape_runs(encoded[start:start + batch_size]):
                    results += self._run_batch(mode, kind, pipe, group, negative_prompt, paste_back, on_step)
        return results

    def _run_batch(self, mode, kind, pipe, group, negative_prompt, paste_back, on_step) -> list[Result]:
        """One pipeline call for requests of the same size and prompt length."""
        _, req0, _, _, _, width, height, _ = group[0]
        encs = [g[7] for g in group]
        call = dict(prompt_embeds=torch.cat([e.prompt_embeds for e in encs]),
                    negative_prompt_embeds=torch.cat([e.negative_prompt_embeds for e in encs]),
                    num_inference_steps=req0["steps"], guidance_scale=req0["guidance"], output_type="pil")
        if self.sdxl:
            call.update(pooled_prompt_embeds=torch.cat([e.pooled_prompt_embeds for e in encs]),
                        negative_pooled_prompt_embeds=torch.cat([e.negative_pooled_prompt_embeds for e in encs]))
        inits = [g[2] for g in group]
        masks = [g[3] for g in group]
        if mode in ("txt2img", "inpaint"):
            call.update(width=width, height=height)
        if mode != "txt2img":
            call.update(image=inits if len(group) > 1 else inits[0], strength=req0["strength"])
        if mode == "inpaint":
            call.update(mask_image=masks if len(group) > 1 else masks[0])
        if mode == "depth2img" and kind == "base":  # the depth ControlNet: a depth image per request
            controls = [self.control_image(g[2], g[4]) for g in group]
            call.update(control_image=controls if len(group) > 1 else controls[0])
        elif mode == "depth2img" and group[0][4] is not None:
            call.update(depth_map=torch.cat([_depth_tensor(g[4]) for g in group]))
        if on_step is not None:
            def _callback(_pipe, _i, _t, kwargs):
                on_step(_pipe.num_timesteps)  # schedulers differ in steps taken (PNDM: one extra, heun: ~2x)
                return kwargs
            call.update(callback_on_step_end=_callback)
        pipe.scheduler = self._fresh_scheduler(kind, req0["scheduler"])  # schedulers keep state: one per call
        generators = [torch.Generator("cpu").manual_seed(req["seed"]) for _, req, *_ in group]
        # Only a guiding call (scale > 1) stacks the unconditional batch the interval's hook replaces.
        interval = req0["guidance_interval"] if req0["guidance"] > 1 else None
        with limited_guidance(pipe.unet, interval, pipe.scheduler.config.num_train_timesteps,
                              guiding=lambda: getattr(pipe, "do_classifier_free_guidance", True)):
            images = pipe(generator=generators if len(group) > 1 else generators[0], **call).images
        results = []
        for (r, req, init, mask_img, _, w, h, enc), out in zip(group, images):
            if paste_back:  # white = repainted: generated there, the input everywhere else
                out = Image.composite(out, init, mask_img.convert("L"))
            params = self._params(mode, r.get("prompt") or "", negative_prompt, req, w, h, kind, enc, r.get("image"),
                                  r.get("mask"), r.get("depth_map"), paste_back)
            params.update(seed=req["seed"], scheduler_class=type(pipe.scheduler).__name__)
            if len(group) > 1:
                params["generated_in_batch_of"] = len(group)
            results.append(Result(out, params))
        return results

    def control_image(self, init: Image.Image, depth: Image.Image | None) -> Image.Image:
        """The depth ControlNet's conditioning image for ``init``: the given depth map, or the estimator's."""
        from sdtune.generation.control import depth_from_estimator, depth_from_map

        if depth is not None:
            return depth_from_map(depth, init.size)
        return depth_from_estimator(init, self.depth_estimator, self.feature_extractor)

    def _inputs(self, mode, req, width, height):
        if mode == "txt2img":
            nw, nh = self.native_size
            return None, None, None, width or nw, height or nh
        init, mask, depth = _load_inputs(mode, req)
        w = width or (init.width // 8) * 8
        h = height or (init.height // 8) * 8
        if w < 8 or h < 8:
            raise SdtuneError(f"image is {init.width}x{init.height}; it must be at least 8x8 pixels")
        if (w, h) != init.size:
            if not (width and height):
                log.info("image is %dx%d: resized to %dx%d (a multiple of 8)", *init.size, w, h)
            init = init.resize((w, h), Image.LANCZOS)
            if mask is not None:
                mask = mask.resize((w, h), Image.NEAREST)
        return init, mask, depth, w, h

    def _params(self, mode, prompt, negative_prompt, req, width, height, kind, enc, image, mask, depth_map,
                paste_back=False) -> dict:
        params = dict(
            sdtune_version=__version__, mode=mode, prompt=prompt, negative_prompt=negative_prompt,
            steps=req["steps"], guidance=req["guidance"], scheduler=req["scheduler"], width=width, height=height,
            guidance_interval=list(req["guidance_interval"]) if req["guidance_interval"] else None,
            strength=req["strength"] if mode != "txt2img" else None,
            image=_input_name(image) if mode != "txt2img" else None,
            mask=_input_name(mask) if mode == "inpaint" else None,
            depth_map=_input_name(depth_map) if mode == "depth2img" else None,
            depth_source=("depth_map" if depth_map is not None else "estimator") if mode == "depth2img" else None,
            unet=("ordinary 4-channel + depth ControlNet" if mode == "depth2img" and kind == "base" else
                  {"base": "ordinary 4-channel", "inpaint": "inpainting 9-channel", "depth": "depth 5-channel"}[kind]),
            family="sdxl" if self.sdxl else "sd",
            long_prompt=req["long_prompt"], prompt_windows=enc.windows, prompt_truncated=enc.truncated,
            dtype=dtype_name(self.dtype), device=str(self.device), lora_fused=self.lora_fused,
            vae_tiling=bool(getattr(self.vae, "use_tiling", False)),
        )
        if mode == "inpaint":
            params["paste_back"] = paste_back
        params.update(self.sources)
        return params


# ---------------------------------------------------------------- regeneration from metadata

def engine_for_params(params: dict, *, device=None, dtype=None, allow_pickle: bool = False) -> Engine:
    """Load the engine an sdtune PNG was made with (model, dedicated models, base, LoRA + scale, dtype).

    ``allow_pickle`` is never taken from the file: a PNG must not be able to switch pickle loading on.
    """
    if not params.get("model"):
        raise SdtuneError("the image's metadata names no model; it cannot be regenerated")
    scale = params.get("lora_scale")
    return Engine.load(params["model"], inpaint_model=params.get("inpaint_model"),
                       depth_model=params.get("depth_model"), base=params.get("base"), lora=params.get("lora"),
                       lora_scale=1.0 if scale is None else scale, device=device,
                       dtype=dtype or params.get("dtype"), config=params.get("config"),
                       inpaint_config=params.get("inpaint_config"), depth_config=params.get("depth_config"),
                       base_config=params.get("base_config"), allow_pickle=allow_pickle,
                       vae_tiling=bool(params.get("vae_tiling", False)), controlnet=params.get("controlnet"),
                       controlnet_config=params.get("controlnet_config"),
                       depth_estimator=params.get("depth_estimator"))


def regenerate(params: dict, *, device=None, dtype=None, allow_pickle: bool = False, engine: Engine | None = None,
               on_step=None) -> list[Result]:
    """Re-run the generation described by an sdtune PNG's params (one image, its own seed)."""
    request = check_params(params)
    engine = engine or engine_for_params(params, device=device, dtype=dtype, allow_pickle=allow_pickle)
    return engine.generate(params["mode"], prompt=params.get("prompt") or "",
                           negative_prompt=params.get("negative_prompt") or "", on_step=on_step,
                           paste_back=bool(params.get("paste_back")), **request)


def check_params(params: dict) -> dict:
    """Validate stored params (before any model load); return the request to pass to ``generate``."""
    missing = [k for k in ("mode", "model", "seed", "steps", "guidance") if params.get(k) is None]
    if missing:
        raise SdtuneError(f"the image's metadata lacks {', '.join(missing)}; it cannot be regenerated")
    for key in ("prompt", "negative_prompt"):
        if params.get(key) is not None and not isinstance(params[key], str):
            raise SdtuneError(f"the image's metadata has a {key} that is not text ({params[key]!r}); "
                              "it cannot be regenerated")
    for key in ("image", "mask", "depth_map"):
        if params.get(key) == "<in-memory>":
            raise SdtuneError(f"the image was made from an in-memory {key} (API call), which was not saved; "
                              "it cannot be regenerated from the PNG alone")
    request = _request_from_params(params)
    check_request(params["mode"], **request)
    return request


def _request_from_params(params: dict) -> dict:
    return dict(steps=params["steps"], guidance=params["guidance"], seed=params["seed"], width=params.get("width"),
                height=params.get("height"), scheduler=params.get("scheduler"), image=params.get("image"),
                mask=params.get("mask"), strength=params.get("strength"), depth_map=params.get("depth_map"),
                num_images=1, long_prompt=params.get("long_prompt") or CHUNK,
                guidance_interval=params.get("guidance_interval"))


def check_request(mode, **request) -> None:
    """Validate a generation request without a model: parameters, input images readable, mask size.

    The CLI calls it before loading the model so a bad input fails in a second, not after the load.
    """
    if mode not in MODES:
        raise SdtuneError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    request.setdefault("long_prompt", CHUNK)
    req = _validate(mode, **request)
    _load_inputs(mode, req)


# ---------------------------------------------------------------- helpers

def _load_dedicated(dkind: str, src, config, *, sdxl: bool, text_encoder, text_encoder_2, device, dtype,
                    allow_pickle: bool):
    """Load ``src`` as the dedicated ``dkind`` ("inpaint" | "depth") model of an engine whose main model is (or is
    not) SDXL with these text encoders; refuse, in one line, a model of another family, kind or text width."""
    dedicated = load_pipeline(src, device=device, dtype=dtype, config=config, allow_pickle=allow_pickle)
    dinfo = describe(dedicated)
    got = {9: "inpaint", 5: "depth"}.get(dinfo.unet_in_channels, "base")
    if (dinfo.family == "sdxl") != sdxl:
        raise SdtuneError(f"--{dkind}-model {src} is {'an SDXL' if dinfo.family == 'sdxl' else 'an SD 1.x/2.x'}"
                          f" model but --model is {'SDXL' if sdxl else 'SD 1.x/2.x'}; use one family")
    if got != dkind:
        want = {"inpaint": "a 9-channel inpainting", "depth": "a 5-channel depth"}[dkind]
        raise SdtuneError(f"--{dkind}-model {src} is not {want} model (its UNet has "
                          f"{dedicated.unet.config.in_channels} input channels)")
    _check_text_dim(dedicated.unet, text_encoder, src, text_encoder_2)
    return dedicated


def _check_source(src, flag: str) -> None:
    try:
        resolve_source(src)
    except SdtuneError as exc:
        raise SdtuneError(f"{flag}: {exc}") from None


def _check_text_dim(unet, text_encoder, src, text_encoder_2=None) -> None:
    cross = unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    width = int(text_encoder.config.hidden_size) + (int(text_encoder_2.config.hidden_size) if text_encoder_2 else 0)
    if int(cross) != width:
        raise SdtuneError(f"{src} expects {cross}-wide text embeddings but the main model's text encoders give "
                          f"{width} (SD 1.x vs 2.x?); use a model of the same family")


def _check_controlnet(net, unet, src) -> None:
    """A ControlNet fits a UNet when it reads the same text width and, for SDXL, the same added conditioning."""
    want = (unet.config.cross_attention_dim, unet.config.addition_embed_type, unet.config.block_out_channels)
    got = (net.config.cross_attention_dim, net.config.addition_embed_type, net.config.block_out_channels)
    if tuple(map(str, want)) != tuple(map(str, got)):
        kind = "an SDXL" if net.config.addition_embed_type == "text_time" else "an SD 1.x/2.x"
        raise SdtuneError(f"--controlnet {src} does not fit the model's UNet ({kind} ControlNet with text width "
                          f"{net.config.cross_attention_dim} vs the UNet's {unet.config.cross_attention_dim}); "
                          "use a ControlNet trained for this model family")


def _input_name(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return str(Path(value).expanduser().resolve())
    return "<in-memory>"


def _as_image(value, mode: str, what: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert(mode)
    return open_image(value, mode=mode, what=what)


def _load_inputs(mode, req):
    """Open the request's input images (RGB image, L mask, L depth map); refuse a mask of another size."""
    if mode == "txt2img":
        return None, None, None
    init = _as_image(req["image"], "RGB", "image")
    mask = _as_image(req["mask"], "L", "mask") if mode == "inpaint" else None
    depth = _as_image(req["depth_map"], "L", "depth map") if req["depth_map"] is not None else None
    if mask is not None and mask.size != init.size:
        raise SdtuneError(f"mask is {mask.size[0]}x{mask.size[1]} but the image is {init.size[0]}x{init.size[1]};"
                          " give a mask of the same size (white = repaint, black = keep)")
    if depth is not None:
        _depth_tensor(depth)  # refuses a flat map
    return init, mask, depth


def _same_shape_runs(prepared: list) -> list[list]:
    """Split prepared requests into consecutive groups that can share one pipeline call: the same image size
    and the same number of prompt windows."""
    def shape(item):
        return item[5], item[6], item[7].prompt_embeds.shape[1]

    groups: list[list] = []
    for item in prepared:
        if groups and shape(groups[-1][0]) == shape(item):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _depth_tensor(depth: Image.Image) -> torch.Tensor:
    """A greyscale depth map (white = near, as MiDaS/DPT predict) as the (1, H, W) tensor diffusers expects.

    The pipeline rescales it to [-1, 1] by its own min/max, so only relative values matter.
    """
    import numpy as np

    arr = np.asarray(depth, dtype=np.float32) / 255.0
    if float(arr.max() - arr.min()) == 0.0:
        raise SdtuneError("depth map is a single flat value; it carries no depth (white = near, black = far)")
    return torch.from_numpy(arr)[None]


def _validate(mode, *, steps, guidance, seed, width, height, scheduler, image, mask, strength, depth_map,
              num_images, long_prompt, guidance_interval=None) -> dict:
    """Check every parameter up front, one clear SdtuneError per problem; return normalised values."""
    def _int(value, flag):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value:
            raise SdtuneError(f"{flag} must be a whole number, got {value!r}")
        return int(value)

    steps = _int(steps, "--steps")
    if not 1 <= steps <= MAX_STEPS:
        raise SdtuneError(f"--steps must be at least 1 and at most {MAX_STEPS} (the noise schedule's length), "
                          f"got {steps}")
    num_images = _int(num_images, "--num-images")
    if num_images < 1:
        raise SdtuneError(f"--num-images must be at least 1, got {num_images}")
    seed = _int(seed, "--seed")
    if not 0 <= seed <= MAX_SEED - num_images:
        raise SdtuneError(f"--seed must be between 0 and {MAX_SEED - num_images}, got {seed}")
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise SdtuneError(f"--guidance must be a number, got {guidance!r}") from None
    if not math.isfinite(guidance) or guidance < 0:
        raise SdtuneError(f"--guidance must be a finite number >= 0 (1 = no guidance, 7.5 typical), got {guidance}")
    for flag, value in (("--width", width), ("--height", height)):
        if value is not None:
            v = _int(value, flag)
            if v < 8 or v % 8:
                raise SdtuneError(f"{flag} must be a positive multiple of 8 (the VAE works on 8-pixel blocks), "
                                  f"got {v}; try {max(8, round(v / 8) * 8)}")
            if v > MAX_SIDE:
                raise SdtuneError(f"{flag} {v} is larger than sdtune generates ({MAX_SIDE} px at most); generate "
                                  "smaller and upscale")
    scheduler = scheduler or DEFAULT_SCHEDULER
    if not isinstance(scheduler, str):
        raise SdtuneError(f"--scheduler must be a name, got {scheduler!r}; choose one of: "
                          f"{', '.join(scheduler_names())}")
    if scheduler != DEFAULT_SCHEDULER and scheduler.lower() not in scheduler_names():
        raise SdtuneError(f"unknown scheduler {scheduler!r}; choose one of: {', '.join(scheduler_names())}")
    scheduler = scheduler.lower()
    if long_prompt not in (CHUNK, TRUNCATE):
        raise SdtuneError(f"long_prompt must be {CHUNK!r} or {TRUNCATE!r}")
    if mode != "txt2img":
        strength = DEFAULT_STRENGTH[mode] if strength is None else strength
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            raise SdtuneError(f"--strength must be a number in [0, 1], got {strength!r}") from None
        if not 0.0 <= strength <= 1.0:
            raise SdtuneError(f"--strength must be in [0, 1] (0 = keep the image, 1 = repaint fully), got {strength}")
        if int(steps * strength) < 1:
            raise SdtuneError(f"--strength {strength} x --steps {steps} leaves no denoising step; "
                              "raise --strength or --steps")
        if image is None:
            raise SdtuneError(f"{mode} needs an input image: pass --image PATH")
        if mode == "inpaint" and mask is None:
            raise SdtuneError("inpaint needs a mask: pass --mask PATH (white = repaint, black = keep)")
    if image is not None and mode == "txt2img":
        raise SdtuneError("--image is only used by img2img, inpaint and depth2img")
    if mask is not None and mode != "inpaint":
        raise SdtuneError("--mask is only used by inpaint")
    if depth_map is not None and mode != "depth2img":
        raise SdtuneError("--depth-map is only used by depth2img")
    return dict(steps=steps, guidance=guidance, seed=seed, scheduler=scheduler, image=image, mask=mask,
                strength=strength if mode != "txt2img" else None, depth_map=depth_map, num_images=num_images,
                long_prompt=long_prompt, guidance_interval=parse_interval(guidance_interval))
