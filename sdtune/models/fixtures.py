"""Tiny random Stable Diffusion pipelines in diffusers format, built from code.

No real weights can be downloaded here, so tests and benchmarks run on these: the same
architectures as SD 1.x / 2.x (cross-attention UNet, KL VAE, CLIP text encoder, the real CLIP
tokenizer vocabulary), only a few thousand times smaller. Variants:

* ``sd1``     - epsilon prediction, 4-channel UNet, PNDM scheduler (like SD 1.5)
* ``sd2v``    - v-prediction, linear-projection attention, per-block head dims (like SD 2.1)
* ``inpaint`` - 9-channel UNet (latents + mask + masked-image latents), like sd-inpainting
* ``depth``   - 5-channel UNet (latents + depth) and a tiny DPT depth estimator, like SD 2 depth
"""
from __future__ import annotations

from pathlib import Path

import torch

from sdtune import DATA_DIR

VARIANTS = ("sd1", "sd2v", "inpaint", "depth")
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
