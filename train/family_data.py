"""What the stages of ``train/build_family.py`` share: the ``BuildData`` half of ``Build``.

Caches (world renders, VAE posteriors, token ids, the training scheduler), computed once and kept under
``<work>/cache``, and the pieces of the diffusion stages (captions, object weights, SD's objective with the
conditional pull and the leak-free top timesteps, latent sampling, loading the finished base).
The stages themselves are in ``family_stages.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from family_loop import DONE, file_digest

from sdtune.imageio import write_text_atomic
from sdtune.training import objectives
from sdtune.world import family, scenes


class BuildData:
    def __init__(self, cfg: dict, out: Path, work: Path):
        self.cfg, self.out, self.work = cfg, out, work
        self.seed = int(cfg["seed"])
        self.size = int(cfg["image_size"])
        self._renders = None
        self._latents = None
        self._scheduler = None
        self._token_cache: dict[str, torch.Tensor] = {}
        self._tokenizer = None

    # --- caches ---------------------------------------------------------------------------------

    def renders(self) -> dict:
        """World renders (pixels, disparity, mask, attributes, subject flag), rendered once and cached."""
        if self._renders is not None:
            return self._renders
        r = self.cfg["renders"]
        meta = {"seed": self.seed, "count": r["count"], "size": self.size, "subject_share": r["subject_share"],
                "subjects": list(scenes.SUBJECTS)}
        path = self.work / "cache" / "renders.npz"
        if path.is_file():
            data = dict(np.load(path))
            if json.loads(str(data.pop("meta"))) != meta:
                data = None
        else:
            data = None
        if data is None:
            print(f"rendering {r['count']} world scenes ...", flush=True)
            t0 = time.time()
            images, disp, masks, attrs, subj = [], [], [], [], []
            for res in scenes.dataset(r["count"], self.seed + 1, size=self.size, subject_share=r["subject_share"]):
                images.append(np.asarray(res.image, np.uint8))
                disp.append(res.disparity.astype(np.float16))
                masks.append(res.mask)
                attrs.append([scenes.CHOICES[a].index(getattr(res.scene, a)) for a in scenes.ATTRIBUTES])
                subj.append(res.subject is not None)
            data = {"images": np.stack(images), "disparity": np.stack(disp), "masks": np.stack(masks),
                    "attrs": np.asarray(attrs, np.int8), "subject": np.asarray(subj)}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(".renders.tmp.npz")
            np.savez(tmp, meta=json.dumps(meta), **data)
            os.replace(tmp, path)
            print(f"rendered in {time.time() - t0:.0f}s", flush=True)
        self._renders = data
        return data

    def pixels(self, idx) -> torch.Tensor:
        """Renders ``idx`` as float [n,3,H,W] in [-1, 1] (the VAE's input range)."""
        img = torch.from_numpy(self.renders()["images"][idx])
        return img.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def load_vae(self):
        from diffusers import AutoencoderKL

        folder = self.work / "vae" / "vae"
        if not (folder / "config.json").is_file():
            raise SystemExit("stage vae has not run yet: run --stage vae first (or --stage all)")
        return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()

    @torch.no_grad()
    def encode_posteriors(self, vae, pixels_of, n: int, what: str, key: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior (mean, std) of ``n`` images, cached per (VAE weights, renders, ``key``) under <work>/cache."""
        weights = file_digest(self.work / "vae" / "vae" / "diffusion_pytorch_model.safetensors")
        renders = json.dumps(self.cfg["renders"], sort_keys=True) + str(self.seed) + str(self.size)
        digest = hashlib.sha256(f"{weights}/{renders}/{key}".encode()).hexdigest()[:16]
        path = self.work / "cache" / f"{what}-{digest}.npz"
        if path.is_file():
            d = np.load(path)
            return torch.from_numpy(d["mean"]).float(), torch.from_numpy(d["std"]).float()
        from tqdm import tqdm

        means, stds = [], []
        for i in tqdm(range(0, n, 64), desc=f"encode {what}", mininterval=10, file=sys.stdout):
            dist = vae.encode(pixels_of(np.arange(i, min(n, i + 64)))).latent_dist
            means.append(dist.mean.half())
            stds.append(dist.std.half())
        mean, std = torch.cat(means).numpy(), torch.cat(stds).numpy()
        tmp = path.with_name(f".{what}.tmp.npz")
        np.savez(tmp, mean=mean, std=std)
        os.replace(tmp, path)
        return torch.from_numpy(mean).float(), torch.from_numpy(std).float()

    def latents(self, vae):
        if self._latents is None:
            self._latents = self.encode_posteriors(vae, self.pixels, len(self.renders()["images"]), "latents")
        return self._latents

    def scheduler(self):
        if self._scheduler is None:
            from diffusers import DDPMScheduler

            self._scheduler = DDPMScheduler.from_config(family.build_scheduler(self.cfg).config)
        return self._scheduler

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            self._tokenizer = family.build_tokenizer()
        missing = [c for c in dict.fromkeys(captions) if c not in self._token_cache]
        if missing:
            ids = self._tokenizer(missing, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
            self._token_cache.update(zip(missing, ids))
        return torch.stack([self._token_cache[c] for c in captions])

    # --- shared pieces of the diffusion stages -----------------------------------------------------

    def captions(self, idx: np.ndarray, gen: torch.Generator, t: dict) -> list[str]:
        """World captions for renders ``idx``: all attributes, a random subset, or "" (caption dropout)."""
        attrs = self.renders()["attrs"][idx]
        u = torch.rand(len(idx), 2 + len(scenes.ATTRIBUTES), generator=gen).numpy()
        out = []
        for row, draw in zip(attrs, u):
            if draw[0] < t["caption_dropout"]:
                out.append("")
                continue
            scene = scenes.Scene(**{a: scenes.CHOICES[a][int(v)] for a, v in zip(scenes.ATTRIBUTES, row)})
            if draw[1] < t["full_caption_share"]:
                stated = None
            else:
                stated = {a for a, d in zip(scenes.ATTRIBUTES, draw[2:]) if d < t["keep"]}
            out.append(scenes.caption(scene, stated=stated))
        return out

    def object_weights(self, idx, weight: float) -> torch.Tensor:
        """Per-latent loss weights 1 + ``weight`` x (the object's cells, with a one-cell margin).

        The object covers a few percent of a render but carries four of its five attributes; weighting its
        latents is what makes kind, colour, size and position worth as much to the loss as the background.
        """
        lat = family.latent_size(self.cfg)
        m = torch.from_numpy(self.renders()["masks"][idx]).float()[:, None]
        m = F.max_pool2d(F.adaptive_avg_pool2d(m, lat), 3, stride=1, padding=1)
        return 1.0 + weight * m

    def diffusion_loss(self, unet, latents, cond, embeddings, gen, t: dict, idx=None, uncond=None) -> torch.Tensor:
        """SD's objective (sdtune.training.objectives): noise, x_t, the model's target, MSE (min-SNR if set),
        object-weighted (``object_weights``) when ``idx`` names the renders.

        ``conditional_pull`` (weight p, with ``uncond``, the empty prompt's embeddings): add p times the same
        weighted distance between the prediction and the model's own unconditional prediction on the same x_t
        (not differentiated). The loss is then least where the conditional prediction is
        uncond + (cond - uncond) / (1 + p): the prompt's effect shrinks by 1 + p, so guidance g draws what g / (1 + p)
        drew before. A model this small learns its world's captions so well that its conditional prediction alone
        follows them (0.83) and its best guidance is about 3; real SD, taught on loose web captions, needs about
        7.5. The pull gives the family SD's operating point instead of a different default guidance.

        ``leak_free_from``: timesteps from there on train on pure noise. Under SD's schedule x_t keeps a trace
        of the image even at t=999 (sqrt(alphas_cumprod) = 0.068), enough for a model to read where the object
        is from x_t itself, so it never learns position words - and at sampling time, where x_T is pure noise,
        it places objects wherever the noise suggests. Trained on pure noise there, with the target that makes
        the sampler's x0 estimate the true x0, the first sampling steps must take the layout from the prompt.
        The schedule itself is untouched: every stock scheduler (PNDM, LMS, Euler ...) samples the model as
        usual. (The zero-terminal-SNR fix of Lin et al. 2024 does this by rescaling the betas, which PNDM and
        LMS cannot sample.)
        """
        sched = self.scheduler()
        noise = objectives.sample_noise(latents, gen)
        total = sched.config.num_train_timesteps
        steps = objectives.sample_timesteps(len(latents), total, gen)
        free_from = t.get("leak_free_from")
        share = t.get("high_noise_share") or 0.0
        if free_from and share:  # that share of the batch from the leak-free top, where the layout is learned
            high = torch.rand(len(latents), generator=gen) < share
            steps = torch.where(high, torch.randint(int(free_from), total, (len(latents),), generator=gen), steps)
        noisy = objectives.add_noise(sched, latents, noise, steps)
        target = objectives.training_target(sched, latents, noise, steps)
        if free_from:
            free = (steps >= free_from).view(-1, 1, 1, 1)
            a = sched.alphas_cumprod[steps].view(-1, 1, 1, 1).float()
            # x_t := noise; the target whose x0 estimate sqrt(a) x_t - sqrt(1-a) v (or (x_t - sqrt(1-a) eps)/sqrt(a)) is x0
            if sched.config.prediction_type == "v_prediction":
                free_target = (a.sqrt() * noise - latents) / (1 - a).sqrt()
            else:
                free_target = (noise - a.sqrt() * latents) / (1 - a).sqrt()
            noisy = torch.where(free, noise, noisy)
            target = torch.where(free, free_target, target)
        inputs = noisy if cond is None else torch.cat([noisy, cond], dim=1)
        pred = unet(inputs, steps, embeddings).sample
        w = self.object_weights(idx, float(t["object_weight"])) if idx is not None and t.get("object_weight") else None

        def distance(a, b):
            if w is None:
                return objectives.per_example_mse(a, b)
            return ((a.float() - b.float()).pow(2) * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * a.shape[1])

        per = distance(pred, target)
        pull = float(t.get("conditional_pull") or 0.0)
        if pull:
            if uncond is None:
                raise ValueError("conditional_pull needs the empty prompt's embeddings (uncond)")
            with torch.no_grad():
                free_pred = unet(inputs, steps, uncond.expand(len(latents), -1, -1)).sample
            per = per + pull * distance(pred, free_pred)
        gamma = t.get("min_snr_gamma")
        if gamma:
            per = per * objectives.min_snr_weights(objectives.snr(sched, steps), gamma, sched.config.prediction_type)
        return per.mean()

    def sample_latents(self, mean, std, idx, gen, sf: float) -> torch.Tensor:
        eps = torch.randn(mean[idx].shape, generator=gen)
        return (mean[idx] + std[idx] * eps) * sf

    def pool(self) -> np.ndarray:
        """Indices of the renders the denoisers learn from: never the subject (DreamBooth's job)."""
        return np.nonzero(~self.renders()["subject"])[0]

    def load_base(self, stage: str = "guidance"):
        """The text encoder and UNet that ``stage`` ended with (the guided base, which inpaint and depth continue)."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        folder = self.work / stage
        if not (folder / DONE).is_file():
            raise SystemExit(f"stage {stage} has not finished: run --stage {stage} first (or --stage all)")
        # float32 whatever the files hold (transformers would otherwise keep an fp16 file's dtype)
        return (CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval(),
                UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval())

    def finish(self, stage: str, record: dict) -> dict:
        record = {"stage": stage, **record}
        write_text_atomic(self.work / stage / DONE, json.dumps(record, indent=2) + "\n")
        print(json.dumps(record), flush=True)
        return record
