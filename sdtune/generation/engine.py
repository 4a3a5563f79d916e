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

SD 3.x (an MMDiT transformer in place of the UNet, three text encoders) is served by ``SD3Engine``
(``sdtune.generation.sd3``), a subclass that ``Engine.load`` picks from the model's own config.

Reproducibility: each image i of a request is its own pipeline call with its own CPU
``torch.Generator`` seeded ``seed + i``, so image i of a batch equals a single run with seed + i,
and the seed stored in its metadata regenerates it exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from sdtune import __version__
from sdtune.devices import dtype_name
from sdtune.errors import SdtuneError
from sdtune.generation.components import (
    EngineSpec,
    check_source,
    device_and_dtype,
    load_components,
    load_dedicated,
    source_name,
)
from sdtune.guidance_interval import limited_guidance
from sdtune.generation.regenerate import check_params, engine_for_params, regenerate
from sdtune.generation.requests import (
    DEFAULT_SCHEDULER,
    DEFAULT_STRENGTH,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MODES,
    ParameterError,
    check_request,
    depth_tensor,
    input_name,
    load_inputs,
    validate,
)
from sdtune.generation.weights import add_difference
from sdtune.models.prompts import CHUNK, encode_prompts
from sdtune.models.schedulers import make_scheduler
from sdtune.models.sdxl import encode_prompts_xl

log = logging.getLogger("sdtune")

# Names this module has always offered, now kept beside it (requests, components, weights, regenerate).
__all__ = [
    "DEFAULT_SCHEDULER", "DEFAULT_STRENGTH", "MAX_SEED", "MAX_SIDE", "MAX_STEPS", "MODES", "Engine", "EngineSpec",
    "ParameterError", "Prepared", "Result", "add_difference", "check_params", "check_request", "engine_for_params",
    "regenerate",
]


@dataclass
class Result:
    image: Image.Image
    params: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """One request of a ``generate_many`` call, checked and ready: the caller's request (``prompt``, ``seed`` and, by
    mode, ``image``/``mask``/``depth_map``), its validated parameters, its opened inputs, the size it is drawn at and,
    once encoded, its prompt embeddings."""

    request: dict
    req: dict  # ``requests.validate``'s normalised parameters
    init: Image.Image | None
    mask: Image.Image | None
    depth: Image.Image | None
    width: int
    height: int
    enc: object = None  # the encoded prompt (``encode_prompts``/``encode_prompts_xl``)


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
    def load(cls, model, **options) -> "Engine":
        """Load an engine: ``model`` (folder | .safetensors | hub id) with ``options``, the fields of ``EngineSpec``
        (dedicated inpaint/depth models, ``base``, a LoRA and its scale, device, dtype, configs of single-file
        checkpoints, a depth ControlNet ...); or an ``EngineSpec`` itself, which ``options`` then amend.

        Every option is checked (sources found, no conflicting ones, the LoRA file there) before any model loads.
        """
        spec = replace(model, **options) if isinstance(model, EngineSpec) else EngineSpec(model, **options)
        device, dtype = device_and_dtype(spec)
        spec.check()
        if cls is Engine:
            from sdtune.generation.sd3 import SD3Engine, is_sd3_spec

            if is_sd3_spec(spec):  # SD 3.x: its own engine, from the model's own config
                return SD3Engine.load(spec)
        engine = cls(**cls._load_components(spec, device, dtype), sources=spec.sources())
        if spec.lora is not None:
            engine._apply_lora(spec.lora, float(spec.lora_scale), spec.allow_pickle, spec.fuse_lora)
        engine.set_vae_tiling(spec.vae_tiling)
        if spec.compile:
            engine.compile_unets()
        return engine

    @classmethod
    def _load_components(cls, spec: EngineSpec, device, dtype) -> dict:
        return load_components(spec, device, dtype)

    def replace_dedicated(self, kind: str, src, config=None, allow_pickle: bool = False) -> None:
        """Swap the dedicated ``kind`` ("inpaint" | "depth") model for ``src`` (None: none, the mode then runs as
        without one), loading only that model: the shared VAE, text encoders and the other UNets stay as they are.

        For an engine with no LoRA on it and no ``base`` (add difference) - what the web UI holds between requests.
        """
        if kind not in ("inpaint", "depth"):
            raise SdtuneError(f"replace_dedicated takes 'inpaint' or 'depth', got {kind!r}")
        if self.sources.get("lora") is not None or self.sources.get("base") is not None:
            raise ParameterError("take the LoRA (and {base}) off before swapping a dedicated model; or load a new engine")
        if "base" not in self.unets:
            raise SdtuneError("the engine's main model is itself a dedicated model; load a new engine")
        if kind == "depth" and self.controlnet is not None and src is not None:
            raise ParameterError("pass either {depth_model} (a 5-channel depth model) or {controlnet}, not both")
        if src is not None:
            check_source(src, f"{kind}_model")
            dedicated = load_dedicated(kind, src, config, sdxl=self.sdxl, text_encoder=self.text_encoder,
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
        self.sources.update({f"{kind}_model": source_name(src), f"{kind}_config": source_name(config)})
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
            why = ("the model is a dedicated %s model; pass an ordinary model as {model} and this one as "
                   "{%s_model}") % (("inpainting", "inpaint") if "inpaint" in self.unets else ("depth", "depth"))
        elif mode == "inpaint":
            kind = "inpaint" if "inpaint" in self.unets else ("base" if "base" in self.unets else None)
            why = "inpainting needs an ordinary or a 9-channel inpainting model; pass {inpaint_model}"
        elif mode == "depth2img":
            kind = "depth" if "depth" in self.unets else (
                "base" if self.controlnet is not None and "base" in self.unets else None)
            why = ("SDXL depth2img runs through a depth ControlNet; pass {controlnet}" if self.sdxl else
                   "depth2img needs a 5-channel depth model (e.g. stable-diffusion-2-depth, {depth_model}) or a "
                   "depth ControlNet ({controlnet})")
        else:
            raise SdtuneError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        if kind is None and strict:
            raise ParameterError("{mode} is not available: " + why, mode=mode)
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
        (``sdtune.guidance_interval``); None guides every step, as stock pipelines do. ``long_prompt``:
        "chunk" (default) or "truncate" (with a logged warning). ``on_step(n)`` is called after each step, n = the steps
        this image takes (schedulers and strength change it).
        """
        req = validate(mode, steps=steps, guidance=guidance, seed=seed, width=width, height=height,
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
            raise ParameterError("{paste_back} is only used by inpaint")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ParameterError("{batch_size} must be a whole number >= 1, got {got!r}", got=batch_size)
        prepared = []
        for r in requests:
            req = validate(mode, steps=steps, guidance=guidance, seed=r.get("seed", 0), width=width, height=height,
                           scheduler=scheduler, image=r.get("image"), mask=r.get("mask"), strength=strength,
                           depth_map=r.get("depth_map"), num_images=1, long_prompt=long_prompt,
                           guidance_interval=guidance_interval)
            init, mask_img, depth_img, w, h = self._inputs(mode, req, width, height)
            if mode == "depth2img" and depth_img is None and (self.depth_estimator is None or self.feature_extractor is None):
                if kind == "base":
                    raise ParameterError("the depth ControlNet needs a depth: pass {depth_estimator} DIR (a DPT "
                                         "model folder) or {depth_map} (greyscale, white = near)")
                raise ParameterError("the depth model has no depth estimator; pass {depth_map} (greyscale, white = "
                                     "near)")
            prepared.append(Prepared(r, req, init, mask_img, depth_img, w, h))
        pipe = self.pipeline(mode)
        te = self._text_encoders[kind]
        results: list[Result] = []
        with torch.inference_mode():
            for item in prepared:
                r, req = item.request, item.req
                enc = self._encode_prompt(pipe, te, r.get("prompt") or "", negative_prompt, req["long_prompt"])
                if enc.windows > 1:
                    log.info("prompt has %d tokens: encoded in %d windows of 75", enc.prompt_tokens, enc.windows)
                item.enc = enc
            for start in range(0, len(prepared), batch_size):
                for group in _same_shape_runs(prepared[start:start + batch_size]):
                    results += self._run_batch(mode, kind, pipe, group, negative_prompt, paste_back, on_step)
        return results

    def _encode_prompt(self, pipe, te, prompt: str, negative_prompt: str, long_prompt: str):
        if self.sdxl:
            return encode_prompts_xl([self.tokenizer, self.tokenizer_2], [te, self.text_encoder_2], prompt,
                                     negative_prompt, long_prompt=long_prompt,
                                     force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                                     device=self.device)
        return encode_prompts(self.tokenizer, te, prompt, negative_prompt, long_prompt=long_prompt,
                              device=self.device)

    def _mode_call(self, mode: str, kind: str, group: list[Prepared], call: dict) -> dict:
        """The pipeline call's arguments, last look (``SD3Engine`` changes its ControlNet's)."""
        return call

    def _run_batch(self, mode, kind, pipe, group: list[Prepared], negative_prompt, paste_back,
                   on_step) -> list[Result]:
        """One pipeline call for requests of the same size and prompt length."""
        req0, width, height = group[0].req, group[0].width, group[0].height
        encs = [g.enc for g in group]
        call = dict(prompt_embeds=torch.cat([e.prompt_embeds for e in encs]),
                    negative_prompt_embeds=torch.cat([e.negative_prompt_embeds for e in encs]),
                    num_inference_steps=req0["steps"], guidance_scale=req0["guidance"], output_type="pil")
        if getattr(encs[0], "pooled_prompt_embeds", None) is not None:  # SDXL, SD3
            call.update(pooled_prompt_embeds=torch.cat([e.pooled_prompt_embeds for e in encs]),
                        negative_pooled_prompt_embeds=torch.cat([e.negative_pooled_prompt_embeds for e in encs]))
        inits = [g.init for g in group]
        masks = [g.mask for g in group]
        if mode in ("txt2img", "inpaint"):
            call.update(width=width, height=height)
        if mode != "txt2img":
            call.update(image=inits if len(group) > 1 else inits[0], strength=req0["strength"])
        if mode == "inpaint":
            call.update(mask_image=masks if len(group) > 1 else masks[0])
        if mode == "depth2img" and kind == "base":  # the depth ControlNet: a depth image per request
            controls = [self.control_image(g.init, g.depth) for g in group]
            call.update(control_image=controls if len(group) > 1 else controls[0])
        elif mode == "depth2img" and group[0].depth is not None:
            call.update(depth_map=torch.cat([depth_tensor(g.depth) for g in group]))
        if on_step is not None:
            def _callback(_pipe, _i, _t, kwargs):
                on_step(_pipe.num_timesteps)  # schedulers differ in steps taken (PNDM: one extra, heun: ~2x)
                return kwargs
            call.update(callback_on_step_end=_callback)
        call = self._mode_call(mode, kind, group, call)
        pipe.scheduler = self._fresh_scheduler(kind, req0["scheduler"])  # schedulers keep state: one per call
        generators = [torch.Generator("cpu").manual_seed(g.req["seed"]) for g in group]
        # Only a guiding call (scale > 1) stacks the unconditional batch the interval's hook replaces.
        interval = req0["guidance_interval"] if req0["guidance"] > 1 else None
        denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet  # SD3: an MMDiT
        with limited_guidance(denoiser, interval, pipe.scheduler.config.num_train_timesteps,
                              guiding=lambda: getattr(pipe, "do_classifier_free_guidance", True)):
            images = pipe(generator=generators if len(group) > 1 else generators[0], **call).images
        results = []
        for g, out in zip(group, images):
            r = g.request
            if paste_back:  # white = repainted: generated there, the input everywhere else
                out = Image.composite(out, g.init, g.mask.convert("L"))
            params = self._params(mode, r.get("prompt") or "", negative_prompt, g.req, g.width, g.height, kind, g.enc,
                                  r.get("image"), r.get("mask"), r.get("depth_map"), paste_back)
            params.update(seed=g.req["seed"], scheduler_class=type(pipe.scheduler).__name__)
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
        init, mask, depth = load_inputs(mode, req)
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
            image=input_name(image) if mode != "txt2img" else None,
            mask=input_name(mask) if mode == "inpaint" else None,
            depth_map=input_name(depth_map) if mode == "depth2img" else None,
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



def _same_shape_runs(prepared: list[Prepared]) -> list[list[Prepared]]:
    """Split prepared requests into consecutive groups that can share one pipeline call: the same image size
    and the same number of prompt windows."""
    def shape(item: Prepared):
        return item.width, item.height, item.enc.prompt_embeds.shape[1]

    groups: list[list[Prepared]] = []
    for item in prepared:
        if groups and shape(groups[-1][0]) == shape(item):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups
