"""The stock DreamBooth training loop, as diffusers' example scripts run it: the benchmark's baseline.

Written from what ``examples/dreambooth/train_dreambooth{,_lora}.py`` do with their default flags
(no --pre_compute_text_embeddings, no --cache_latents because they have none, dataloader workers 0):

* the dataset opens, resizes, crops and normalises every image on every access and tokenizes its prompt;
* with prior preservation the collate function stacks instance and class examples into one batch;
* every step runs the VAE encoder on that batch (``latent_dist.sample()``) and the text encoder on its ids;
* LoRA: ``unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", to_k/q/v/out.0))``;
  full: the whole UNet trains;
* ``torch.optim.AdamW`` with its defaults (weight decay 1e-2), grad-norm clipping at 1.0, loss split
  into instance and prior halves.

It is kept here, not in ``sdtune/``, because it exists only to be measured against.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps


class StockDataset(torch.utils.data.Dataset):
    def __init__(self, instance_dir, instance_prompt, class_dir, class_prompt, tokenizer, size, center_crop=True):
        self.instance = sorted(p for p in Path(instance_dir).iterdir() if p.is_file())
        self.klass = sorted(p for p in Path(class_dir).iterdir() if p.is_file()) if class_dir else []
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt
        self.tokenizer, self.size, self.center_crop = tokenizer, size, center_crop
        self.length = max(len(self.instance), len(self.klass))

    def __len__(self):
        return self.length

    def _pixels(self, path) -> torch.Tensor:  # Resize(size) -> Center/RandomCrop(size) -> ToTensor -> Normalize(0.5)
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        scale = self.size / min(img.size)
        img = img.resize((max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))),
                         Image.BILINEAR)
        if self.center_crop:
            left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
        else:
            left, top = random.randint(0, img.width - self.size), random.randint(0, img.height - self.size)
        img = img.crop((left, top, left + self.size, top + self.size))
        return torch.from_numpy(np.asarray(img, np.float32) / 127.5 - 1.0).permute(2, 0, 1)

    def _ids(self, prompt) -> torch.Tensor:
        return self.tokenizer(prompt, truncation=True, padding="max_length",
                              max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids[0]

    def __getitem__(self, i):
        example = {"instance_images": self._pixels(self.instance[i % len(self.instance)]),
                   "instance_prompt_ids": self._ids(self.instance_prompt)}
        if self.klass:
            example["class_images"] = self._pixels(self.klass[i % len(self.klass)])
            example["class_prompt_ids"] = self._ids(self.class_prompt)
        return example


def collate(examples, with_prior_preservation: bool) -> dict:
    ids = [e["instance_prompt_ids"] for e in examples]
    pixels = [e["instance_images"] for e in examples]
    if with_prior_preservation:  # one forward pass for instance and class examples
        ids += [e["class_prompt_ids"] for e in examples]
        pixels += [e["class_images"] for e in examples]
    return {"input_ids": torch.stack(ids), "pixel_values": torch.stack(pixels).float()}


def train_stock(model: str, instance_dir, instance_prompt: str, class_dir, class_prompt: str, method: str,
                resolution: int, batch_size: int, max_steps: int, learning_rate: float, seed: int = 0,
                prior_loss_weight: float = 1.0, lora_rank: int = 4, mixed_precision: str = "no",
                gradient_checkpointing: bool = False, use_8bit_adam: bool = False,
                on_step: Callable[[int, float], None] | None = None, check_every: int = 0,
                on_check: Callable[[int, torch.nn.Module], bool] | None = None) -> list[float]:
    """Train like the stock script; return the per-step losses. ``on_step(step, loss)`` is the timing hook;
    ``on_check(step, unet)`` runs every ``check_every`` steps (the time-to-subject bench judges the LoRA
    there) and ends training when it returns True."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    accelerator = Accelerator(mixed_precision=mixed_precision)
    # As the scripts do: frozen models in the half dtype, trained weights in fp32 under autocast.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    if method == "lora":
        unet.requires_grad_(False)
        unet.to(dtype=weight_dtype)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if gradient_checkpointing:  # --gradient_checkpointing
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW
    if use_8bit_adam:  # --use_8bit_adam
        import bitsandbytes as bnb

        adamw = bnb.optim.AdamW8bit
    optimizer = adamw(params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    prior = class_dir is not None
    dataset = StockDataset(instance_dir, instance_prompt, class_dir, class_prompt, tokenizer, resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0,
                                         collate_fn=lambda ex: collate(ex, prior))
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.train()

    losses, step = [], 0
    while step < max_steps:
        for batch in loader:
            pixels = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=latents.device).long()
            noisy = scheduler.add_noise(latents, noise, timesteps)
            hidden = text_encoder(batch["input_ids"].to(accelerator.device))[0]
            pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
            target = noise if scheduler.config.prediction_type == "epsilon" else \
                scheduler.get_velocity(latents, noise, timesteps)
            if prior:
                pred, pred_prior = torch.chunk(pred, 2, dim=0)
                target, target_prior = torch.chunk(target, 2, dim=0)
                loss = F.mse_loss(pred.float(), target.float()) + \
                    prior_loss_weight * F.mse_loss(pred_prior.float(), target_prior.float())
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
            if on_check is not None and check_every and step % check_every == 0:
                unet.eval()
                done = on_check(step, accelerator.unwrap_model(unet))
                unet.train()
                if done:
                    return losses
            if step >= max_steps:
                break
    return losses
