"""The stock SDXL DreamBooth LoRA loop, as diffusers' ``examples/dreambooth/train_dreambooth_lora_sdxl.py`` runs
it with its defaults: the benchmark's SDXL baseline (``bench/run.py``'s GPU section).

From that script (no --cache_latents, text encoders not trained, a fixed instance prompt):

* the prompt embeddings (both encoders, pooled) of the instance and class prompts are computed once before the
  loop ("pre-compute" when the text encoders are frozen and there are no per-image captions);
* the VAE stays in float32 (the script does so unless a fixed fp16 VAE is given: SDXL's overflows in fp16) and
  encodes every batch every step; UNet and text encoders in the mixed-precision dtype, LoRA weights fp32;
* each example's time ids: its original (height, width), the crop's (top, left), the target (resolution, resolution);
* LoRA rank 4 on ``to_k, to_q, to_v, to_out.0`` (gaussian init), AdamW (8-bit with --use_8bit_adam), grad-norm
  clipping at 1.0, prior loss as the mean over the class half.

Kept in ``bench/`` because it exists only to be measured against.
"""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from stock_dreambooth import StockDataset


class StockSDXLDataset(StockDataset):
    def _pixels_and_sizes(self, path):
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        original = (img.height, img.width)
        scale = self.size / min(img.size)
        img = img.resize((max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))),
                         Image.BILINEAR)
        top, left = (img.height - self.size) // 2, (img.width - self.size) // 2  # --center_crop off: still a crop
        img = img.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(img, np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return pixels, original, (top, left)

    def __getitem__(self, i):
        pixels, original, crop = self._pixels_and_sizes(self.instance[i % len(self.instance)])
        example = {"instance_images": pixels, "original_size": original, "crop_top_left": crop}
        if self.klass:
            c_pixels, c_original, c_crop = self._pixels_and_sizes(self.klass[i % len(self.klass)])
            example.update(class_images=c_pixels, class_original_size=c_original, class_crop_top_left=c_crop)
        return example


def _collate(examples, prior: bool):
    pixels = [e["instance_images"] for e in examples]
    sizes = [(e["original_size"], e["crop_top_left"]) for e in examples]
    if prior:
        pixels += [e["class_images"] for e in examples]
        sizes += [(e["class_original_size"], e["class_crop_top_left"]) for e in examples]
    return {"pixel_values": torch.stack(pixels).float(), "sizes": sizes}


def train_stock_sdxl(model: str, instance_dir, instance_prompt: str, class_dir, class_prompt: str,
                     resolution: int, batch_size: int, max_steps: int, learning_rate: float, seed: int = 0,
                     lora_rank: int = 4, mixed_precision: str = "no", gradient_checkpointing: bool = False,
                     use_8bit_adam: bool = False, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    accelerator = Accelerator(mixed_precision=mixed_precision)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    torch.manual_seed(seed)
    random.seed(seed)
    device = accelerator.device
    tok1 = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2")
    te1 = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").to(device, weight_dtype)
    te2 = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2").to(device, weight_dtype)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(device, torch.float32)  # fp32, as the script
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for m in (vae, te1, te2, unet):
        m.requires_grad_(False)
    unet.to(device, weight_dtype)
    unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    @torch.no_grad()
    def encode(prompt):  # the script's encode_prompt: penultimate states of both, pooled from the second
        embeds, pooled = [], None
        for tok, te in ((tok1, te1), (tok2, te2)):
            ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            out = te(ids, output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, dim=-1), pooled

    prior = class_dir is not None
    inst_embeds, inst_pooled = encode(instance_prompt)  # pre-computed once: frozen encoders, one prompt
    if prior:
        cls_embeds, cls_pooled = encode(class_prompt)
    params = [p for p in unet.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW
    if use_8bit_adam:
        import bitsandbytes as bnb

        adamw = bnb.optim.AdamW8bit
    optimizer = adamw(params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    dataset = StockSDXLDataset(instance_dir, instance_prompt, class_dir, class_prompt, tok1, resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0,
                                         collate_fn=lambda ex: _collate(ex, prior))
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    unet.train()

    losses, step = [], 0
    while step < max_steps:
        for batch in loader:
            n = batch["pixel_values"].shape[0]
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(device)).latent_dist.sample()
                latents = (latents * vae.config.scaling_factor).to(weight_dtype)
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), device=device).long()
                noisy = scheduler.add_noise(latents, noise, timesteps)
                time_ids = torch.tensor([[*o, *c, resolution, resolution] for o, c in batch["sizes"]],
                                        device=device, dtype=weight_dtype)
                half = n // 2 if prior else n
                embeds = inst_embeds.repeat(half, 1, 1)
                pooled = inst_pooled.repeat(half, 1)
                if prior:
                    embeds = torch.cat([embeds, cls_embeds.repeat(half, 1, 1)])
                    pooled = torch.cat([pooled, cls_pooled.repeat(half, 1)])
                pred = unet(noisy, timesteps, embeds, added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled},
                            return_dict=False)[0]
                target = noise if scheduler.config.prediction_type == "epsilon" else \
                    scheduler.get_velocity(latents, noise, timesteps)
                if prior:
                    pred, pred_prior = torch.chunk(pred, 2, dim=0)
                    target, target_prior = torch.chunk(target, 2, dim=0)
                    loss = (F.mse_loss(pred.float(), target.float())
                            + F.mse_loss(pred_prior.float(), target_prior.float()))
                else:
                    loss = F.mse_loss(pred.float(), target.float())
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.item())
            step += 1
            if on_step is not None:
                on_step(step, losses[-1])
            if step >= max_steps:
                break
    return losses
