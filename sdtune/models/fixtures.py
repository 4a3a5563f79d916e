"""Tiny random Stable Diffusion pipelines in diffusers format, built from code.

No real weights can be downloaded here, so tests and benchmarks run on these: the same
architectures as SD 1.x / 2.x (cross-attention UNet, KL VAE, CLIP text encoder, the real CLIP
tokenizer vocabulary), only a few thousand times smaller. Variants:

* ``sd1``     - epsilon prediction, 4-channel UNet, PNDM scheduler (like SD 1.5)
* ``sd2v``    - v-prediction, linear-projection attention, per-block head dims (like SD 2.1)
* ``inpaint`` - 9-channel UNet (latents + mask + masked-image latents), like sd-inpainting
* ``depth``   - 5-channel UNet (latents + depth) and a tiny DPT depth estimator, like SD 2 depth

SDXL (``tiny_sdxl_pipeline``, ``tiny_sdxl_family``): the SDXL architecture at the same tiny scale -
a UNet with ``addition_embed_type="text_time"`` (pooled text embedding + six size/crop time ids),
two text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, whose hidden states are
concatenated for cross-attention and whose projection is the pooled embedding), SDXL's tokenizer
pair (the second pads with "!"), variants:

* ``sdxl``         - 4-channel base, Euler scheduler, like stable-diffusion-xl-base-1.0
* ``sdxl_inpaint`` - 9-channel inpainting UNet sharing the base's VAE and text encoders
* ``sdxl_refiner`` - a refiner-like model (no first text encoder, aesthetic-score conditioning), to be refused

plus ``tiny_controlnet`` (a depth ControlNet built from a UNet's config, for SD or SDXL) and
``save_tiny_depth_estimator`` (a DPT folder, the depth ControlNet's estimator).
"""
from __future__ import annotations

from pathlib import Path

import torch

from sdtune import DATA_DIR

VARIANTS = ("sd1", "sd2v", "inpaint", "depth")
SDXL_VARIANTS = ("sdxl", "sdxl_inpaint", "sdxl_refiner")
TOKENIZER_DIR = DATA_DIR / "clip_tokenizer"


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
        pad_token="<|endoftext|>", model_max_length=77,
    )


def tiny_text_encoder(hidden: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=hidden,
    )
    return CLIPTextModel(config).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Two blocks -> a downsampling factor of 2 (SD's VAE has four blocks and a factor of 8).
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
    )


def tiny_unet(in_channels: int = 4, cross_dim: int = 32, sd2: bool = False, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=cross_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4) if sd2 else 8, use_linear_projection=sd2,
    )


def tiny_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler, PNDMScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1,
                  prediction_type=prediction_type)
    if prediction_type == "v_prediction":
        return DDIMScheduler(clip_sample=False, **common)
    return PNDMScheduler(skip_prk_steps=True, **common)


def tiny_depth_estimator(seed: int = 0):
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    config = DPTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=37, backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 16, 16, 16], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5],
        head_in_index=-1,
    )
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False,
                                  do_resize=True, do_normalize=True, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3)
    return DPTForDepthEstimation(config).eval(), processor


def tiny_pipeline(variant: str = "sd1", seed: int = 0):
    """Build a tiny random pipeline of the given variant (in memory)."""
    from diffusers import (
        StableDiffusionDepth2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose from {VARIANTS}")
    common = dict(vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed=seed), tokenizer=tiny_tokenizer())
    if variant == "depth":
        estimator, processor = tiny_depth_estimator(seed)
        return StableDiffusionDepth2ImgPipeline(
            unet=tiny_unet(5, sd2=True, seed=seed), scheduler=tiny_scheduler("v_prediction"),
            depth_estimator=estimator, feature_extractor=processor, **common)
    if variant == "inpaint":
        return StableDiffusionInpaintPipeline(
            unet=tiny_unet(9, seed=seed), scheduler=tiny_scheduler(), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, **common)
    sd2 = variant == "sd2v"
    return StableDiffusionPipeline(
        unet=tiny_unet(4, sd2=sd2, seed=seed), scheduler=tiny_scheduler("v_prediction" if sd2 else "epsilon"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False, **common)


def save_tiny_pipeline(out_dir: str | Path, variant: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny random pipeline as a diffusers folder (safetensors) and return its path."""
    out = Path(out_dir)
    tiny_pipeline(variant, seed).save_pretrained(out, safe_serialization=True)
    return out


def tiny_family(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write a base (sd1), an inpaint and a depth tiny model sharing VAE/text encoder weights."""
    root = Path(root)
    return {v: save_tiny_pipeline(root / v, v, seed) for v in VARIANTS}


# ---------------------------------------------------------------------------- SDXL

SDXL_TIME_DIM = 8  # addition_time_embed_dim; SDXL's is 256
SDXL_POOLED_DIM = 32  # text_encoder_2's projection_dim; SDXL's is 1280


def tiny_sdxl_tokenizer_2():
    """SDXL's second tokenizer: the same CLIP vocabulary, padded with "!" (id 0) instead of <|endoftext|>."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
        pad_token="!", model_max_length=77,
    )


def tiny_text_encoder_2(hidden: int = 48, seed: int = 0):
    """SDXL's second text encoder (OpenCLIP bigG in diffusers' form): CLIPTextModelWithProjection, gelu.

    Wider than the first (48 vs 32, as bigG's 1280 vs ViT-L's 768): diffusers' single-file loader tells the
    two encoders apart by width."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed + 1)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=1, projection_dim=SDXL_POOLED_DIM, hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_sdxl_unet(in_channels: int = 4, cross_dim: int = 80, seed: int = 0, refiner: bool = False):
    """SDXL's UNet layout: no attention at the top level, ``text_time`` added conditioning."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    time_ids = 5 if refiner else 6  # the refiner conditions on an aesthetic score instead of the target size
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=cross_dim,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=time_ids * SDXL_TIME_DIM + SDXL_POOLED_DIM,
    )


def tiny_sdxl_scheduler(prediction_type: str = "epsilon"):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                  prediction_type=prediction_type)


def tiny_sdxl_pipeline(variant: str = "sdxl", seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny random SDXL pipeline (in memory): ``sdxl`` | ``sdxl_inpaint`` | ``sdxl_refiner``."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    if variant not in SDXL_VARIANTS:
        raise ValueError(f"unknown tiny SDXL variant {variant!r}; choose from {SDXL_VARIANTS}")
    vae = tiny_vae(seed)
    te2 = tiny_text_encoder_2(seed=seed)
    if variant == "sdxl_refiner":
        return StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=te2, tokenizer_2=tiny_sdxl_tokenizer_2(),
            unet=tiny_sdxl_unet(4, cross_dim=48, seed=seed, refiner=True), scheduler=tiny_sdxl_scheduler(),
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    common = dict(vae=vae, text_encoder=tiny_text_encoder(seed=seed), tokenizer=tiny_tokenizer(),
                  text_encoder_2=te2, tokenizer_2=tiny_sdxl_tokenizer_2(),
                  scheduler=tiny_sdxl_scheduler(prediction_type))
    if variant == "sdxl_inpaint":
        return StableDiffusionXLInpaintPipeline(unet=tiny_sdxl_unet(9, seed=seed), **common)
    return StableDiffusionXLPipeline(unet=tiny_sdxl_unet(4, seed=seed), **common)


def tiny_controlnet(unet, seed: int = 0):
    """A depth ControlNet for ``unet`` (SD or SDXL): its encoder half, random, with a conditioning embedding that
    downsamples by the tiny VAE's factor 2 (SD's has three stride-2 steps for the VAE's 8)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed + 2)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32), load_weights_from_unet=True)
    with torch.no_grad():  # ControlNet's zero convolutions start at zero: randomise them so it does something
        for p in [*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters(),
                  *net.controlnet_cond_embedding.conv_out.parameters()]:
            p.normal_(std=0.3)
    return net.eval()


def save_tiny_depth_estimator(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny DPT depth estimator and its image processor as one transformers folder."""
    out = Path(out_dir)
    model, processor = tiny_depth_estimator(seed)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def tiny_sdxl_family(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny SDXL models: base, inpaint (same VAE/text encoders), refiner, a depth ControlNet for the
    base, and for SD 1.x a depth ControlNet for the ``sd1`` tiny model; plus the DPT estimator."""
    root = Path(root)
    paths = {}
    for v in SDXL_VARIANTS:
        paths[v] = root / v
        tiny_sdxl_pipeline(v, seed).save_pretrained(paths[v], safe_serialization=True)
    paths["sdxl_controlnet"] = root / "sdxl_controlnet"
    tiny_controlnet(tiny_sdxl_unet(4, seed=seed), seed).save_pretrained(paths["sdxl_controlnet"],
                                                                           safe_serialization=True)
    paths["sd1_controlnet"] = root / "sd1_controlnet"
    tiny_controlnet(tiny_unet(4, seed=seed), seed).save_pretrained(paths["sd1_controlnet"], safe_serialization=True)
    paths["depth_estimator"] = save_tiny_depth_estimator(root / "depth_estimator", seed)
    return paths


# ---------------------------------------------------------------------------- SD 3.5

SD3_CLIP_DIMS = (32, 48)  # CLIP-L's and CLIP-G's widths (768, 1280 in SD3); each projects to its own width
SD3_T5_DIM = 96  # T5's d_model (4096 in SD3): the transformer's joint_attention_dim, >= the CLIP widths together
SD3_VARIANTS = ("sd3", "sd3_controlnet")


def tiny_t5_tokenizer():
    """A T5 tokenizer (Unigram, as T5's sentencepiece model) built offline from the CLIP vocabulary's first pieces:
    whole words get T5's "▁" prefix. Not T5's vocabulary, but the same tokenizer class, special tokens and
    padding/truncation behaviour, which is what the SD3 pipelines rely on."""
    import json

    from transformers import T5Tokenizer

    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text())
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in pieces}
    for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])[:2000]:
        piece = "\u2581" + tok[:-4] if tok.endswith("</w>") else tok
        if tok.startswith("<|") or piece in seen:
            continue
        seen.add(piece)
        pieces.append((piece, -len(pieces) / 100.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_t5_encoder(vocab_size: int, seed: int = 0):
    """SD3's third text encoder: a T5 v1.1 encoder (gated GELU), tiny."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed + 3)
    config = T5Config(vocab_size=vocab_size, d_model=SD3_T5_DIM, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(config).eval()


def tiny_sd3_clip(which: int, seed: int = 0):
    """SD3's CLIP encoders (``which`` 1: CLIP-L, 2: CLIP-G): ``CLIPTextModelWithProjection``, projecting to their own
    width, as in SD3 (768 -> 768, 1280 -> 1280)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    hidden = SD3_CLIP_DIMS[which - 1]
    torch.manual_seed(seed + 10 + which)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=1 if which == 2 else 49407, projection_dim=hidden,
        hidden_act="gelu" if which == 2 else "quick_gelu",
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_vae(seed: int = 0):
    """SD3's VAE layout: 16 latent channels, no quant convs, a shift and a scale factor (SD3's values)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
    )


def tiny_sd3_transformer(seed: int = 0):
    """SD 3.5's MMDiT (``SD3Transformer2DModel``), tiny: patch 2 on 16x16 latents (32 px), 3 joint blocks, the
    first with SD 3.5 Medium's dual attention, RMS qk-norm as in SD 3.5."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=SD3_T5_DIM, caption_projection_dim=32, pooled_projection_dim=sum(SD3_CLIP_DIMS),
        out_channels=16, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()


def tiny_sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def tiny_sd3_controlnet(transformer, seed: int = 0):
    """A depth ControlNet for an SD3 transformer (``SD3ControlNetModel.from_transformer``: its first two blocks),
    with the zero-initialised input embedding and output projections randomised so it does something."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed + 2)
    net = SD3ControlNetModel.from_transformer(transformer, num_layers=2, num_extra_conditioning_channels=0)
    with torch.no_grad():
        for p in [*net.controlnet_blocks.parameters(), *net.pos_embed_input.parameters()]:
            p.normal_(std=0.3)
    return net.eval()


def tiny_sd3_pipeline(seed: int = 0, t5: bool = True):
    """A tiny random SD 3.5 pipeline (in memory): MMDiT, 16-channel VAE, flow-matching Euler, CLIP-L, CLIP-G and T5
    (``t5=False``: no third encoder, as diffusers allows)."""
    from diffusers import StableDiffusion3Pipeline

    tok3 = tiny_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed), scheduler=tiny_sd3_scheduler(), vae=tiny_sd3_vae(seed),
        text_encoder=tiny_sd3_clip(1, seed), tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_sd3_clip(2, seed), tokenizer_2=tiny_sdxl_tokenizer_2(),
        text_encoder_3=tiny_t5_encoder(len(tok3), seed) if t5 else None, tokenizer_3=tok3 if t5 else None)


def tiny_sd3_family(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny SD 3.5 models: ``sd3`` (a diffusers folder), ``sd3_controlnet`` (its depth ControlNet) and
    ``depth_estimator`` (the DPT estimator)."""
    root = Path(root)
    paths = {"sd3": root / "sd3", "sd3_controlnet": root / "sd3_controlnet"}
    pipe = tiny_sd3_pipeline(seed)
    pipe.save_pretrained(paths["sd3"], safe_serialization=True)
    tiny_sd3_controlnet(pipe.transformer, seed).save_pretrained(paths["sd3_controlnet"], safe_serialization=True)
    paths["depth_estimator"] = save_tiny_depth_estimator(root / "depth_estimator", seed)
    return paths
