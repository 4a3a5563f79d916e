"""The stages of ``train/build_family.py`` (vae, base, guidance, inpaint, estimator, depth) as methods of ``Build``,
on top of the caches and diffusion pieces of ``BuildData`` (``family_data.py``)."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from family_data import BuildData
from family_loop import DONE, save_component, stage_seed, train_loop

from sdtune.world import family


class Build(BuildData):
    """One build: ``cfg`` (configs/family.yaml with overrides), pipelines into ``out``, caches and checkpoints in ``work``.
    ``stage_<name>()`` runs one stage and returns its record (also written to ``<work>/<name>/done.json``)."""

    # --- stages ------------------------------------------------------------------------------------

    def stage_vae(self) -> dict:
        t = self.cfg["train"]["vae"]
        data = self.renders()
        torch.manual_seed(stage_seed(self.seed, "vae"))
        vae = family.build_vae(self.cfg)
        n = len(data["images"])
        held = np.arange(n - min(128, n // 4), n)  # the last renders are held out for PSNR and the latent std
        train_n = n - len(held)

        # The objects cover a few percent of the pixels but carry every attribute but the background:
        # weighting their pixels (and a 2-px rim, for edges and shadow) keeps colours and shapes
        # through the 4x downsampling that a plain L1 spends on sky and grass.
        masks = torch.from_numpy(data["masks"]).float()[:, None]
        near_object = torch.nn.functional.max_pool2d(masks, 5, stride=1, padding=2)
        weight_of = 1.0 + float(t.get("object_weight", 0.0)) * near_object

        def loss_fn(step, gen):
            idx = torch.randint(0, train_n, (t["batch_size"],), generator=gen).numpy()
            x = self.pixels(idx)
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=gen)).sample
            w = weight_of[idx]
            return ((rec - x).abs() * w).sum() / (w.sum() * 3) + t["kl_weight"] * post.kl().mean()

        stats = train_loop(self, "vae", {"vae": vae}, [{"params": list(vae.parameters()), "lr": t["lr"]}],
                           t["steps"], loss_fn)
        with torch.no_grad():
            x = self.pixels(held)
            mean = vae.encode(x).latent_dist.mean
            rec = vae.decode(mean).sample.clamp(-1, 1)
        mse = ((rec - x) / 2).pow(2).mean().item()
        obj = masks[held].expand_as(x) > 0
        object_mse = ((rec - x) / 2).pow(2)[obj].mean().item()
        # SD's convention: scale latents to unit variance for the denoiser (SD 1.x measured 0.18215).
        vae.register_to_config(scaling_factor=round(1.0 / mean.std().item(), 5))
        save_component(vae, self.work / "vae" / "vae")
        return self.finish("vae", {**stats, "psnr_db": round(10 * math.log10(1 / max(mse, 1e-10)), 2),
                                   "object_psnr_db": round(10 * math.log10(1 / max(object_mse, 1e-10)), 2),
                                   "scaling_factor": vae.config.scaling_factor,
                                   "params": family.param_count(vae)})

    def train_text_to_image(self, stage: str, text_encoder, unet, t: dict, text_lr: float) -> dict:
        """Text encoder + UNet jointly on world captions (``diffusion_loss``, with the conditional pull when ``t``
        sets one), saved under <work>/<stage> and as ``<out>/base``."""
        vae = self.load_vae()
        mean, std = self.latents(vae)
        sf = float(vae.config.scaling_factor)
        pool = self.pool()
        pull = bool(t.get("conditional_pull"))

        def loss_fn(step, gen):
            idx = pool[torch.randint(0, len(pool), (t["batch_size"],), generator=gen).numpy()]
            latents = self.sample_latents(mean, std, idx, gen, sf)
            emb = text_encoder(self.token_ids(self.captions(idx, gen, t)), return_dict=False)[0]
            free = None
            if pull:  # the empty prompt through the text encoder as it is now: the model's own unconditional
                with torch.no_grad():
                    free = text_encoder(self.token_ids([""]), return_dict=False)[0]
            return self.diffusion_loss(unet, latents, None, emb, gen, t, idx, uncond=free)

        groups = [{"params": list(unet.parameters()), "lr": t["lr"]},
                  {"params": list(text_encoder.parameters()), "lr": text_lr}]
        stats = train_loop(self, stage, {"unet": unet, "text_encoder": text_encoder}, groups, t["steps"], loss_fn)
        save_component(text_encoder, self.work / stage / "text_encoder")
        save_component(unet, self.work / stage / "unet")
        family.save_pipeline(family.assemble("base", vae, text_encoder, unet, cfg=self.cfg), self.out / "base")
        return stats

    def stage_base(self) -> dict:
        t = self.cfg["train"]["base"]
        torch.manual_seed(stage_seed(self.seed, "base"))
        text_encoder = family.build_text_encoder(self.cfg)
        unet = family.build_unet(self.cfg)
        stats = self.train_text_to_image("base", text_encoder, unet, t, t["text_lr"])
        return self.finish("base", {**stats, "unet_params": family.param_count(unet),
                                    "text_encoder_params": family.param_count(text_encoder)})

    def stage_guidance(self) -> dict:
        """The base, continued with the conditional pull (``diffusion_loss``) once the prompt has an effect to shrink:
        on the base's captions and timesteps, with its own steps and learning rate -> ``<out>/base``."""
        t = {**self.cfg["train"]["base"], **self.cfg["train"]["guidance"]}
        text_encoder, unet = self.load_base("base")
        stats = self.train_text_to_image("guidance", text_encoder, unet, t, t["lr"])
        return self.finish("guidance", {**stats, "conditional_pull": t["conditional_pull"]})

    def inpaint_masks(self) -> np.ndarray:
        """One mask per render (True = repaint), like SD-inpainting's: everything, the object's box, a random box."""
        t = self.cfg["train"]["inpaint"]
        data = self.renders()
        rng = np.random.default_rng(stage_seed(self.seed, "inpaint-masks"))
        n, s = data["masks"].shape[:2]
        masks = np.zeros((n, s, s), bool)
        for i in range(n):
            u = rng.random()
            if u < t["full_mask_share"]:
                masks[i] = True
                continue
            if u < t["full_mask_share"] + t["object_mask_share"]:
                ys, xs = np.nonzero(data["masks"][i])
                margin = rng.integers(1, s // 8 + 1, size=4)
                y0, y1 = ys.min() - margin[0], ys.max() + 1 + margin[1]
                x0, x1 = xs.min() - margin[2], xs.max() + 1 + margin[3]
            else:
                h, w = rng.integers(s // 4, 3 * s // 4 + 1, size=2)
                y0, x0 = rng.integers(0, s - h + 1), rng.integers(0, s - w + 1)
                y1, x1 = y0 + h, x0 + w
            masks[i, max(0, y0):y1, max(0, x0):x1] = True
        return masks

    def stage_inpaint(self) -> dict:
        t = self.cfg["train"]["inpaint"]
        vae = self.load_vae()
        text_encoder, base_unet = self.load_base()
        mean, std = self.latents(vae)
        masks = torch.from_numpy(self.inpaint_masks()).float()[:, None]  # [n,1,H,W], 1 = repaint
        # The pipeline's masked image: the kept pixels, zero (mid-grey) where the mask is white.
        mmean, mstd = self.encode_posteriors(vae, lambda idx: self.pixels(idx) * (1 - masks[idx]),
                                             len(masks), "masked-latents",
                                             key=hashlib.sha256(masks.numpy().tobytes()).hexdigest())
        lat = family.latent_size(self.cfg)
        small_masks = F.interpolate(masks, size=(lat, lat))  # nearest, as the pipeline does
        sf = float(vae.config.scaling_factor)
        pool = self.pool()
        unet = family.widen_unet(base_unet, 9)
        from sdtune.training.caching import PromptEncoder

        prompts = PromptEncoder(family.build_tokenizer(), text_encoder, "cpu", cache=True)  # frozen, shared

        def loss_fn(step, gen):
            idx = pool[torch.randint(0, len(pool), (t["batch_size"],), generator=gen).numpy()]
            latents = self.sample_latents(mean, std, idx, gen, sf)
            masked = self.sample_latents(mmean, mstd, idx, gen, sf)
            cond = torch.cat([small_masks[idx], masked], dim=1)  # the inpaint pipeline's channel order
            return self.diffusion_loss(unet, latents, cond, prompts(self.captions(idx, gen, t)), gen, t, idx,
                                       uncond=prompts([""]))

        stats = train_loop(self, "inpaint", {"unet": unet}, [{"params": list(unet.parameters()), "lr": t["lr"]}],
                           t["steps"], loss_fn)
        save_component(unet, self.work / "inpaint" / "unet")
        family.save_pipeline(family.assemble("inpaint", vae, text_encoder, unet, cfg=self.cfg), self.out / "inpaint",
                             share_with=self.out / "base")
        return self.finish("inpaint", {**stats, "unet_params": family.param_count(unet)})

    def stage_estimator(self) -> dict:
        t = self.cfg["train"]["estimator"]
        data = self.renders()
        torch.manual_seed(stage_seed(self.seed, "estimator"))
        model, processor = family.build_depth_estimator(self.cfg)
        n = len(data["images"])
        held = np.arange(n - min(128, n // 4), n)
        disparity = data["disparity"]

        def predict(idx):
            # The processor maps pixels to [-1, 1] (mean 0.5, std 0.5): the same as self.pixels.
            # DPT's head upsamples past the input size; compare at the ground truth's resolution.
            pred = model(pixel_values=self.pixels(idx)).predicted_depth[:, None]
            return F.interpolate(pred, size=(self.size, self.size), mode="bilinear", align_corners=False)[:, 0]

        def loss_fn(step, gen):
            idx = torch.randint(0, n - len(held), (t["batch_size"],), generator=gen).numpy()
            return (predict(idx) - torch.from_numpy(disparity[idx]).float()).abs().mean()

        stats = train_loop(self, "estimator", {"depth_estimator": model},
                           [{"params": list(model.parameters()), "lr": t["lr"]}], t["steps"], loss_fn)
        with torch.no_grad():
            pred = predict(held)
        truth = torch.from_numpy(disparity[held]).float()
        rel = ((pred - truth).abs() / truth.clamp_min(1e-3)).mean().item()
        save_component(model, self.work / "estimator" / "depth_estimator")
        save_component(processor, self.work / "estimator" / "feature_extractor")
        return self.finish("estimator", {**stats, "held_out_abs_rel": round(rel, 4),
                                         "params": family.param_count(model)})

    def depth_condition(self, idx) -> torch.Tensor:
        """Ground-truth disparity prepared exactly as the depth2img pipeline prepares the estimator's."""
        d = torch.from_numpy(self.renders()["disparity"][idx]).float()[:, None]
        lat = family.latent_size(self.cfg)
        d = F.interpolate(d, size=(lat, lat), mode="bicubic", align_corners=False)
        lo = d.amin(dim=(1, 2, 3), keepdim=True)
        hi = d.amax(dim=(1, 2, 3), keepdim=True)
        return 2.0 * (d - lo) / (hi - lo) - 1.0

    def stage_depth(self) -> dict:
        from transformers import DPTForDepthEstimation, DPTImageProcessor

        t = self.cfg["train"]["depth"]
        if not (self.work / "estimator" / DONE).is_file():
            raise SystemExit("stage estimator has not finished: run --stage estimator first (or --stage all)")
        vae = self.load_vae()
        text_encoder, base_unet = self.load_base()
        mean, std = self.latents(vae)
        sf = float(vae.config.scaling_factor)
        pool = self.pool()
        unet = family.widen_unet(base_unet, 5)
        from sdtune.training.caching import PromptEncoder

        prompts = PromptEncoder(family.build_tokenizer(), text_encoder, "cpu", cache=True)

        def loss_fn(step, gen):
            idx = pool[torch.randint(0, len(pool), (t["batch_size"],), generator=gen).numpy()]
            latents = self.sample_latents(mean, std, idx, gen, sf)
            return self.diffusion_loss(unet, latents, self.depth_condition(idx),
                                       prompts(self.captions(idx, gen, t)), gen, t, idx, uncond=prompts([""]))

        stats = train_loop(self, "depth", {"unet": unet}, [{"params": list(unet.parameters()), "lr": t["lr"]}],
                           t["steps"], loss_fn)
        save_component(unet, self.work / "depth" / "unet")
        est = DPTForDepthEstimation.from_pretrained(self.work / "estimator" / "depth_estimator").eval()
        proc = DPTImageProcessor.from_pretrained(self.work / "estimator" / "feature_extractor")
        family.save_pipeline(family.assemble("depth", vae, text_encoder, unet, est, proc, cfg=self.cfg), self.out / "depth",
                             share_with=self.out / "base")
        return self.finish("depth", {**stats, "unet_params": family.param_count(unet)})
