"""Rebuild the embedded model family (base, inpaint, depth) from nothing, reproducibly from a seed.

    python train/build_family.py --stage all --out data/models

Stages, in order (``all`` runs those not done yet; each can also be run alone once its inputs exist):

* ``vae``       AutoencoderKL on world renders (L1 + tiny KL); ``scaling_factor`` = 1 / std of the latents.
* ``base``      CLIP text encoder + cross-attention UNet, jointly from scratch, on world captions with
                10% caption dropout -> ``<out>/base`` (StableDiffusionPipeline).
* ``guidance``  the base continued with the conditional pull (``Build.diffusion_loss``), so that SD's
                guidance 7.5 suits it -> ``<out>/base``, which the next stages continue.
* ``inpaint``   9-channel UNet from the guided base UNet, random masks (object boxes, random boxes, everything)
                -> ``<out>/inpaint`` (StableDiffusionInpaintPipeline).
* ``estimator`` small DPTForDepthEstimation on the ground-truth disparity of the renders.
* ``depth``     5-channel UNet from the guided base UNet, conditioned on normalised disparity
                -> ``<out>/depth`` (StableDiffusionDepth2ImgPipeline).

Renders, latents and masked-image latents are computed once and cached under ``--work``. Every
random draw of a training step comes from a generator seeded by (seed, stage, step) and the
learning rate is a function of the step, so an interrupted stage resumes from its last checkpoint
(``<work>/<stage>/checkpoint-N``, safetensors, no pickle) and ends with the same weights.
Config: ``configs/family.yaml``; override any key with ``--set train.base.steps=300``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdtune import console  # noqa: E402
from sdtune.imageio import write_text_atomic  # noqa: E402
from sdtune.training import objectives  # noqa: E402
from sdtune.world import family, scenes  # noqa: E402

STAGES = ("vae", "base", "guidance", "inpaint", "estimator", "depth")
DONE = "done.json"


# ----------------------------------------------------------------------------------------------
# small utilities


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator of one training step: a pure function of (seed, stage, step), so resume is exact."""
    digest = hashlib.sha256(f"{seed}/{stage}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def stage_seed(seed: int, stage: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{stage}/init".encode()).digest()[:4], "little")


def lr_factor(step: int, steps: int, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_component(model, folder: Path) -> None:
    """``save_pretrained`` (safetensors) into a temporary sibling folder, then swap it in whole."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# checkpoints: module weights + AdamW moments as safetensors, the step in JSON


def save_checkpoint(folder: Path, step: int, modules: dict, opt: torch.optim.Optimizer, keep: int = 2) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=folder))
    for name, module in modules.items():
        save_file({k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
    moments = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            moments[f"{i}.{key}"] = torch.as_tensor(value).detach().contiguous().clone()
    save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")
    os.replace(tmp, folder / f"checkpoint-{step}")
    for old in sorted(checkpoints(folder))[:-keep]:
        shutil.rmtree(folder / f"checkpoint-{old}", ignore_errors=True)


def checkpoints(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return [int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if (p / "state.json").is_file()]


def load_checkpoint(folder: Path, modules: dict, opt: torch.optim.Optimizer) -> int:
    """Restore the newest checkpoint under ``folder``; return its step (0 when there is none)."""
    from safetensors.torch import load_file

    found = checkpoints(folder)
    if not found:
        return 0
    ck = folder / f"checkpoint-{max(found)}"
    for name, module in modules.items():
        module.load_state_dict(load_file(str(ck / f"{name}.safetensors")))
    moments = load_file(str(ck / "optimizer.safetensors"))
    params = [p for g in opt.param_groups for p in g["params"]]
    for key, value in moments.items():
        i, name = key.split(".", 1)
        # A fresh copy: tensors read from the file may sit at unaligned addresses, where CPU kernels take
        # a different (non-FMA) path and the resumed run would drift from the uninterrupted one by ~1e-8.
        opt.state[params[int(i)]][name] = value.clone()
    return int(json.loads((ck / "state.json").read_text())["step"])


def train_loop(build: "Build", stage: str, modules: dict, groups: list[dict], steps: int, loss_fn) -> dict:
    """AdamW over ``groups`` for ``steps`` steps of ``loss_fn(step, generator)``; checkpointed, resumable."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    ckdir = build.work / stage
    start = load_checkpoint(ckdir, modules, opt)
    every = int(build.cfg["train"]["checkpoint_every"])
    params = [p for g in opt.param_groups for p in g["params"]]
    for m in modules.values():
        m.train()
    losses, t0, c0 = [], time.time(), time.process_time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=stage, mininterval=10, file=sys.stdout)
    for step in bar:
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * lr_factor(step, steps)
        loss = loss_fn(step, step_generator(build.seed, stage, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if len(losses) % 25 == 0:
            # CPU seconds per step (all threads): on shared cores, wall time says more about the neighbours.
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", cpu=f"{(time.process_time() - c0) / len(losses):.2f}s")
        if (step + 1) % every == 0 and step + 1 < steps:
            save_checkpoint(ckdir, step + 1, modules, opt)
    seconds, cpu = time.time() - t0, time.process_time() - c0
    for m in modules.values():
        m.eval()
    ran = steps - start
    return {"steps": steps, "resumed_from": start, "seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / ran, 3) if ran else None,
            "cpu_seconds_per_step": round(cpu / ran, 3) if ran else None,
            "loss_first_50": round(float(np.mean(losses[:50])), 5) if losses else None,
            "loss_last_50": round(float(np.mean(losses[-50:])), 5) if losses else None}


# ----------------------------------------------------------------------------------------------
# the build


class Build:
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


# ----------------------------------------------------------------------------------------------


GRID_PROMPTS = ("a photo of a large red ball in the center, on grass", "a photo of a small blue box on the left, on snow",
                "a photo of a large yellow star at the top, at night", "a photo of a large green cone on the right, on sand",
                "a photo of a purple ring at the bottom, on grass", "a photo of a orange box", "")


def sample_grids(out: Path, folder: Path, seed: int = 0, steps: int = 25, guidance: float = 7.5) -> list[Path]:
    """PNG grids to look at after a build: base samples (a row per prompt, the last one unconditional),
    inpainting (scene | mask | 3 repaints) and depth2img (scene | 3 restyles keeping its layout)."""
    from diffusers import (
        StableDiffusionDepth2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )
    from PIL import Image

    def save(rows, name):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([np.concatenate([np.asarray(im.convert("RGB")) for im in r], 1) for r in rows])).save(path)
        return path

    kw = dict(num_inference_steps=steps, guidance_scale=guidance)
    written = []
    if (out / "base").is_dir():
        pipe = StableDiffusionPipeline.from_pretrained(out / "base", dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        rows = [pipe([p] * 4, height=64, width=64, generator=torch.Generator().manual_seed(seed + i), **kw).images
                for i, p in enumerate(GRID_PROMPTS)]
        written.append(save(rows, "base.png"))
    grid_scenes = [scenes.Scene("ball", "red", "large", "left", "grass", seed=1), scenes.Scene("cone", "blue", "small", "right", "snow", seed=2)]
    renders = [scenes.render(sc) for sc in grid_scenes]
    if (out / "inpaint").is_dir():
        pipe = StableDiffusionInpaintPipeline.from_pretrained(out / "inpaint", dtype=torch.float32, safety_checker=None,
                                                              requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 34:62] = 255  # repaint the right half: the new object must appear there
        mask_img = Image.fromarray(mask)
        rows = []
        for r, prompt in zip(renders, ("a photo of a large yellow star on the right, on grass",
                                       "a photo of a large purple box on the right, on snow")):
            out_imgs = pipe([prompt] * 3, image=r.image, mask_image=mask_img, height=64, width=64,
                            generator=torch.Generator().manual_seed(seed), **kw).images
            rows.append([r.image, mask_img, *out_imgs])
        written.append(save(rows, "inpaint.png"))
    if (out / "depth").is_dir():
        pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(out / "depth", dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        rows = []
        for r, prompt in zip(renders, ("a photo of a large green ball on the left, on sand",
                                       "a photo of a small orange cone on the right, at night")):
            out_imgs = pipe([prompt] * 3, image=[r.image] * 3, strength=1.0, generator=torch.Generator().manual_seed(seed),
                            **kw).images
            rows.append([r.image, *out_imgs])
        written.append(save(rows, "depth.png"))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="all", choices=("all",) + STAGES)
    ap.add_argument("--out", default=str(ROOT / "data" / "models"), help="where the pipeline folders go")
    ap.add_argument("--work", default=None, help="caches and checkpoints (default: build/family-work)")
    ap.add_argument("--config", default=None, help="family config (default: configs/family.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--force", action="store_true", help="rerun stages that are already done")
    ap.add_argument("--samples", default=None, help="after the build, write base/inpaint/depth sample grids (PNG) here")
    ap.add_argument("--verbose", action="store_true", help="also show the libraries' notices and warnings")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console.setup(verbose=args.verbose)  # the build's own lines and bars; diffusers' dtype notices only with --verbose
    cfg = family.load_config(args.config, args.set)
    torch.set_num_threads(int(cfg.get("threads", 2)))
    out = Path(args.out)
    work = Path(args.work) if args.work else ROOT / "build" / "family-work"
    build = Build(cfg, out, work)
    todo = STAGES if args.stage == "all" else (args.stage,)
    records, t0 = {}, time.time()
    for stage in todo:
        done = work / stage / DONE
        if done.is_file() and not args.force:
            print(f"stage {stage}: already done ({done}); --force reruns it", flush=True)
            records[stage] = json.loads(done.read_text())
            continue
        if args.force:
            shutil.rmtree(work / stage, ignore_errors=True)
        start = time.time()
        records[stage] = getattr(build, f"stage_{stage}")()
        records[stage]["stage_seconds"] = round(time.time() - start, 1)
        write_text_atomic(done, json.dumps(records[stage], indent=2) + "\n")
    if all((work / s / DONE).is_file() for s in STAGES):
        info = {"seed": cfg["seed"], "config": cfg, "stages": {s: json.loads((work / s / DONE).read_text()) for s in STAGES},
                "sizes_bytes": {k: family.folder_size(out / k) for k in family.PIPELINES if (out / k).is_dir()},
                "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
        write_text_atomic(out / "build_info.json", json.dumps(info, indent=2) + "\n")
    print(f"build: {', '.join(todo)} in {time.time() - t0:.0f}s -> {out}", flush=True)
    if args.samples:
        for path in sample_grids(out, Path(args.samples)):
            print("samples:", path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
