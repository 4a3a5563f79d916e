"""SD 3.x in the one engine: ``SD3Engine``, the four modes around one VAE and one set of text encoders.

``Engine.load`` hands an SD 3.x model (recognised from its own config, ``sdtune.models.sd3``) to this
subclass. Each mode is diffusers' own SD3 pipeline built around the same loaded objects - the MMDiT
transformer, the 16-channel VAE, CLIP-L, CLIP-G and T5 (or no T5, ``no_t5``) with their tokenizers:

* txt2img: ``StableDiffusion3Pipeline``;
* img2img: ``StableDiffusion3Img2ImgPipeline``;
* inpaint: ``StableDiffusion3InpaintPipeline`` on the ordinary 16-channel transformer (the pipeline blends
  the known region back in at every step);
* depth2img: ``StableDiffusion3ControlNetPipeline`` with an SD3 depth ControlNet (``controlnet``); the depth
  is the input image's, from ``depth_estimator`` (a DPT folder) or a given depth map, exactly as SDXL's
  ControlNet depth2img makes it (``Engine.control_image``). diffusers has no SD3 ControlNet img2img
  pipeline, so SD3's depth2img starts from noise at the input image's size: the depth sets the layout,
  the prompt everything else, and ``strength`` is not used (recorded as none). That pipeline encodes the
  control image by sampling the VAE's latent distribution on torch's global generator: the engine seeds it
  from each image's seed, so images regenerate exactly (``SD3Engine._run_batch``).

Prompts are the stock pipeline's ``encode_prompt`` (``sdtune.models.sd3.encode_prompts_sd3``), so every mode
gives the stock pipeline's pixels for the same seed. A LoRA (diffusers' SD3 layout, as
``StableDiffusion3Pipeline.save_lora_weights`` writes it; transformer and CLIP keys) is loaded once by
diffusers' own ``load_lora_weights`` into the shared transformer and text encoders, so it reaches all four modes.
"""
from __future__ import annotations

import logging
from pathlib import Path

from sdtune.errors import ParameterError, SdtuneError
from sdtune.generation.components import EngineSpec, load_controlnet, load_depth_estimator, load_pipeline
from sdtune.generation.engine import Engine, Prepared
from sdtune.generation.requests import DEFAULT_SCHEDULER
from sdtune.models import sd3
from sdtune.models.loading import describe, peek_model, resolve_source

log = logging.getLogger("sdtune")

ADAPTER = "sdtune"  # the LoRA's adapter name in peft


def is_sd3_spec(spec: EngineSpec) -> bool:
    """Whether ``spec.model`` is an SD 3.x model, from its config files (a single file: its ``config`` folder's)."""
    kind, where = resolve_source(spec.model)
    if kind == "file":
        config = Path(str(spec.config)) if spec.config is not None else None
        return config is not None and (config / "model_index.json").is_file() and sd3.is_sd3_folder(config)
    try:
        return peek_model(spec.model).sd3
    except SdtuneError:
        return False  # not readable this way: the ordinary loader says why


def load_sd3_components(spec: EngineSpec, device, dtype) -> dict:
    """Load an SD 3.x model and its depth ControlNet/estimator; the keyword arguments of ``SD3Engine(...)``."""
    for name in ("inpaint_model", "depth_model", "base"):
        if getattr(spec, name) is not None:
            raise ParameterError("{%s} is not used with SD 3.x models: inpaint runs on the model itself and "
                                 "depth2img through an SD3 depth ControlNet ({controlnet})" % name)
    main = load_pipeline(spec.model, device=device, dtype=dtype, config=spec.config, allow_pickle=spec.allow_pickle,
                         drop_t5=bool(spec.no_t5))
    if describe(main).family != "sd3":
        raise SdtuneError(f"{spec.model} is not an SD 3.x model")
    net = estimator = extractor = None
    if spec.controlnet is not None:
        net = load_controlnet(spec.controlnet, device=device, dtype=dtype, config=spec.controlnet_config)
        check_sd3_controlnet(net, main.transformer, spec.controlnet)
        if spec.depth_estimator is not None:
            estimator, extractor = load_depth_estimator(spec.depth_estimator, device=device, dtype=dtype)
    return dict(vae=main.vae, text_encoder=main.text_encoder, tokenizer=main.tokenizer,
                text_encoder_2=main.text_encoder_2, tokenizer_2=main.tokenizer_2,
                text_encoder_3=main.text_encoder_3, tokenizer_3=main.tokenizer_3,
                unets={"base": main.transformer}, schedulers={"base": main.scheduler},
                text_encoders={k: main.text_encoder for k in ("base", "inpaint", "depth")},
                depth_estimator=estimator, feature_extractor=extractor, controlnet=net, device=device, dtype=dtype)


def check_sd3_controlnet(net, transformer, src) -> None:
    """An SD3 ControlNet fits a transformer of the same patching, width and text width."""
    keys = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
            "pooled_projection_dim")
    if type(net).__name__ != "SD3ControlNetModel":
        raise ParameterError("{controlnet} {src} is a {got}, not an SD3 ControlNet; use one trained for SD 3.x",
                             src=src, got=type(net).__name__)
    got = {k: net.config.get(k) for k in keys}
    want = {k: transformer.config.get(k) for k in keys}
    if got != want:
        diff = ", ".join(f"{k} {got[k]} vs {want[k]}" for k in keys if got[k] != want[k])
        raise ParameterError("{controlnet} {src} does not fit the model's transformer ({diff}); use an SD3 "
                             "ControlNet trained for this model", src=src, diff=diff)


class SD3Engine(Engine):
    """``Engine`` for SD 3.x: the same requests, metadata and batching, diffusers' SD3 pipelines."""

    def __init__(self, *, text_encoder_3=None, tokenizer_3=None, sources: dict, **parts):
        super().__init__(sources=sources, force_zeros_for_empty_prompt=False, **parts)
        self.sdxl = False
        self.sd3 = True
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.transformer = self.unets["base"]

    @classmethod
    def load(cls, model, **options) -> "SD3Engine":
        from dataclasses import replace

        from sdtune.generation.components import device_and_dtype

        spec = replace(model, **options) if isinstance(model, EngineSpec) else EngineSpec(model, **options)
        device, dtype = device_and_dtype(spec)
        spec.check()
        engine = cls(**load_sd3_components(spec, device, dtype), sources=dict(spec.sources(), no_t5=bool(spec.no_t5)))
        if spec.lora is not None:
            engine._apply_lora(spec.lora, float(spec.lora_scale), spec.allow_pickle, spec.fuse_lora)
        engine.set_vae_tiling(spec.vae_tiling)
        if spec.compile:
            engine.compile_unets()
        return engine

    # ------------------------------------------------------------ what differs from SD/SDXL

    def replace_dedicated(self, kind, src, config=None, allow_pickle=False) -> None:
        """SD 3.x has no dedicated inpaint/depth models: none (``src`` None) is what the engine already has."""
        if src is not None:
            raise ParameterError("{%s_model} is not used with SD 3.x models: inpaint runs on the model itself and "
                                 "depth2img through an SD3 depth ControlNet ({controlnet})" % kind)

    def _unet_kind(self, mode: str, strict: bool = True):
        if mode == "depth2img" and self.controlnet is None:
            if strict:
                raise ParameterError("{mode} is not available: SD 3.x depth2img runs through an SD3 depth ControlNet; "
                                     "pass {controlnet}", mode=mode)
            return None
        return super()._unet_kind(mode, strict)

    def _parts(self) -> dict:
        return dict(transformer=self.transformer, vae=self.vae, text_encoder=self.text_encoder,
                    tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                    text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
                    scheduler=self._fresh_scheduler("base", DEFAULT_SCHEDULER))

    def pipeline(self, mode: str):
        """The stock SD3 pipeline for ``mode``, built around the shared components (cached)."""
        if mode in self._pipes:
            return self._pipes[mode]
        from diffusers import (
            StableDiffusion3ControlNetPipeline,
            StableDiffusion3Img2ImgPipeline,
            StableDiffusion3InpaintPipeline,
            StableDiffusion3Pipeline,
        )

        self._unet_kind(mode)
        parts = self._parts()
        if mode == "depth2img":
            pipe = StableDiffusion3ControlNetPipeline(controlnet=self.controlnet, **parts)
        else:
            cls = {"txt2img": StableDiffusion3Pipeline, "img2img": StableDiffusion3Img2ImgPipeline,
                   "inpaint": StableDiffusion3InpaintPipeline}[mode]
            pipe = cls(**parts)
        pipe.set_progress_bar_config(disable=True)
        self._pipes[mode] = pipe
        return pipe

    def _fresh_scheduler(self, kind: str, name: str):
        own = self._schedulers[kind]
        if name not in (None, DEFAULT_SCHEDULER):
            raise ParameterError("{scheduler} {got} does not fit SD 3.x, which samples with its own flow-matching "
                                 "scheduler ({own}); leave {scheduler} out", got=name, own=type(own).__name__)
        return type(own).from_config(own.config)

    @property
    def _multiple(self) -> int:
        """Image sides must be multiples of the VAE's factor x the transformer's patch size (16 for SD3)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) * int(self.transformer.config.patch_size)

    def _inputs(self, mode, req, width, height):
        m = self._multiple
        for name, value in (("width", width), ("height", height)):
            if value and value % m:
                raise ParameterError("{%s} must be a multiple of {m} for this SD 3.x model (the VAE's factor x the "
                                     "transformer's patch size), got {got}" % name, m=m, got=value)
        init, mask, depth, w, h = super()._inputs(mode, req, width, height)
        if init is not None and (w % m or h % m):
            from PIL import Image

            nw, nh = max(m, w // m * m), max(m, h // m * m)
            log.info("image is %dx%d: resized to %dx%d (a multiple of %d for SD 3.x)", w, h, nw, nh, m)
            init = init.resize((nw, nh), Image.LANCZOS)
            if mask is not None:
                mask = mask.resize((nw, nh), Image.NEAREST)
            w, h = nw, nh
        return init, mask, depth, w, h

    def _encode_prompt(self, pipe, te, prompt: str, negative_prompt: str, long_prompt: str):
        return sd3.encode_prompts_sd3(pipe, prompt, negative_prompt, long_prompt=long_prompt, device=self.device)

    def _mode_call(self, mode: str, kind: str, group: list[Prepared], call: dict) -> dict:
        if mode == "depth2img":  # the ControlNet pipeline starts from noise at the input's size (no strength)
            call.pop("image", None)
            call.pop("strength", None)
            call.update(width=group[0].width, height=group[0].height)
        return call

    def _run_batch(self, mode, kind, pipe, group: list[Prepared], *rest):
        """depth2img: diffusers' SD3 ControlNet pipeline encodes the control image with ``latent_dist.sample()`` on
        torch's global generator, so each image runs on its own with that generator seeded from its own seed (the
        caller's random state is restored after): an image regenerates exactly, and is the stock pipeline's after
        ``torch.manual_seed(seed)``."""
        if mode != "depth2img":
            return super()._run_batch(mode, kind, pipe, group, *rest)
        import torch

        results = []
        for item in group:
            with torch.random.fork_rng():
                torch.manual_seed(item.req["seed"])
                results += super()._run_batch(mode, kind, pipe, [item], *rest)
        return results

    def _params(self, mode, prompt, negative_prompt, req, width, height, kind, enc, image, mask, depth_map,
                paste_back=False) -> dict:
        params = super()._params(mode, prompt, negative_prompt, req, width, height, kind, enc, image, mask, depth_map,
                                 paste_back)
        params.update(family="sd3", unet="SD3 transformer + depth ControlNet" if mode == "depth2img"
                      else "SD3 transformer", no_t5=self.text_encoder_3 is None)
        if mode == "depth2img":
            params["strength"] = None
        return params

    def _apply_lora(self, path, scale: float, allow_pickle: bool, fuse) -> None:
        """A diffusers SD3 LoRA, loaded once by diffusers into the shared transformer and CLIP encoders."""
        from sdtune.models.lora import find_lora_file

        file = find_lora_file(path, allow_pickle)
        pipe = self.pipeline("txt2img")
        if ADAPTER in (getattr(self.transformer, "peft_config", None) or {}):  # a LoRA applied before: replaced
            pipe.delete_adapters(ADAPTER)
        try:
            pipe.load_lora_weights(str(file), adapter_name=ADAPTER)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SdtuneError(f"--lora {file} does not fit this SD 3.x model: {first}") from exc
        if not getattr(self.transformer, "peft_config", None):
            raise SdtuneError(f"--lora {file} has no weights for this SD 3.x transformer (a LoRA for another model family?)")
        if fuse is True:
            pipe.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER])
            pipe.unload_lora_weights()
            self.lora_fused = True
        else:
            pipe.set_adapters([ADAPTER], adapter_weights=[scale])
            self.lora_fused = False
