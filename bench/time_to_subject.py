"""Time to subject: how long each recipe trains until the subject is learned without losing the class.

Both recipes train on the same model, subject, class images, batch size and seed and are judged every
``every`` steps on the same 16 subject prompts in new contexts and 16 class prompts (25 PNDM steps, the
demo's guidance after training - ``subject_guidance`` in configs/demo.yaml - the world's judge). "Learned"
means subject fidelity >= 0.9 with prior preservation >= 0.9.

* sdtune: the demo's recipe (configs/demo.yaml), run in stages of ``every`` steps with ``resume: latest``
  (exact: a resumed run ends where an uninterrupted one does); its clock is the recipe's own training-loop
  time (``TrainResult.loop_s``), without loading, latent caching and saving, for each step once (a stage that
  reruns steps since its checkpoint counts the new steps' share).
* stock: diffusers' example loop (bench/stock_dreambooth.py) with the example's defaults - LoRA rank 4 on
  to_q/to_k/to_v/to_out.0, no text encoder, no caption dropout, learning rate 5e-4; its clock is the
  time between its steps, judging excluded. It may run up to ``stock_factor`` times sdtune's steps.

Wall time on a shared CPU varies; the step counts do not, so both are reported.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

FIDELITY, PRIOR = 0.9, 0.9


def judge_images(judge, subj, subject_images, class_images) -> dict:
    from sdtune.world import evaluation as ev
    from sdtune.world.scenes import SUBJECTS

    name = subj.name if subj.name in SUBJECTS else None
    return {"subject_fidelity": ev.subject_fidelity(subject_images, judge, subj.class_noun, subject=name),
            "prior_preservation": ev.prior_preservation(class_images, subj.class_noun, judge)}


def learned(scores: dict) -> bool:
    return scores["subject_fidelity"] >= FIDELITY and scores["prior_preservation"] >= PRIOR


def measure(model: str, subject_dir, work: Path, every: int = 100, max_steps: int = 1500, stock_factor: int = 3,
            prompts: int = 16, sample_steps: int = 25, say=print) -> dict:
    """Train and judge both recipes; return their checkpoints' scores and the time each needed."""
    import torch

    from sdtune.generation.engine import Engine
    from sdtune.training.class_images import ensure_class_images
    from sdtune.training import dreambooth
    from sdtune.world import demo
    from sdtune.world.demo_plan import FIXED_STEPS
    from sdtune.world.judge import Judge

    judge = Judge.load()
    guidance = demo.demo_plan(False).subject_guidance  # both recipes judged as the demo judges its LoRA
    subj = demo.load_subject(subject_dir)
    base = Engine.load(model)
    resolution = base.native_size[0]
    contexts = demo.new_contexts(subj, prompts)
    subject_prompts = [demo.subject_prompt(subj, s) for s in contexts]
    class_prompts = demo.class_prompts(subj, prompts)
    cfg = demo.demo_config(subj, model, work / "sdtune", resolution, False,
                           (*FIXED_STEPS, f"checkpoint_every={every}", "checkpoints_keep=1", "resume=latest"))
    ensure_class_images(cfg, pipeline=base.pipeline("txt2img"))
    del base

    def engine_images(engine, ps, seed0):
        reqs = [dict(prompt=p, seed=seed0 + i) for i, p in enumerate(ps)]
        return [r.image for r in engine.generate_many("txt2img", reqs, steps=sample_steps, guidance=guidance,
                                                      batch_size=16)]

    # --- sdtune, in stages ------------------------------------------------------------------------------
    ours = {"recipe": "sdtune (configs/demo.yaml)", "checks": [], "steps_to_subject": None, "seconds_to_subject": None}
    clock, done = 0.0, 0
    for step in range(every, max_steps + 1, every):
        cfg.max_steps = step
        result = dreambooth.train(cfg)
        # A finished run keeps no checkpoint at its last step (its final weights are saved instead), so each stage
        # resumes from an earlier checkpoint and reruns the steps since: count only the new steps' share of its time.
        clock += result.loop_s * (step - done) / max(len(result.losses), step - done)
        done = step
        engine = Engine.load(model, lora=cfg.output_dir)
        scores = judge_images(judge, subj, engine_images(engine, subject_prompts, 100),
                              engine_images(engine, class_prompts, 500))
        del engine
        ours["checks"].append({"step": step, "train_s": round(clock, 1), **scores})
        say(f"      sdtune step {step}: {scores} ({clock:.0f}s)")
        if learned(scores):
            ours["steps_to_subject"], ours["seconds_to_subject"] = step, round(clock, 1)
            break

    # --- the stock example loop, judged every `every` steps ----------------------------------------------
    from diffusers import StableDiffusionPipeline
    from stock_dreambooth import train_stock

    stock_max = stock_factor * (ours["steps_to_subject"] or max_steps)
    stock = {"recipe": "diffusers' train_dreambooth_lora.py defaults (rank 4, attention only, no text encoder, "
                       "no caption dropout, lr 5e-4)", "checks": [], "steps_to_subject": None,
             "seconds_to_subject": None, "max_steps": stock_max}
    parts = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32, safety_checker=None,
                                                    requires_safety_checker=False)
    timer = {"train": 0.0, "last": None}

    def on_step(step, loss):
        now = time.perf_counter()
        timer["train"] += now - timer["last"]
        timer["last"] = now

    def on_check(step, unet) -> bool:
        pipe = StableDiffusionPipeline(**{**parts.components, "unet": unet})
        pipe.set_progress_bar_config(disable=True)

        def images(ps, seed0):
            out = []
            for i in range(0, len(ps), 16):
                chunk = ps[i:i + 16]
                gens = [torch.Generator().manual_seed(seed0 + i + j) for j in range(len(chunk))]
                out += pipe(chunk, num_inference_steps=sample_steps, guidance_scale=guidance,
                            generator=gens).images
            return out

        with torch.no_grad():
            scores = judge_images(judge, subj, images(subject_prompts, 100), images(class_prompts, 500))
        stock["checks"].append({"step": step, "train_s": round(timer["train"], 1), **scores})
        say(f"      stock step {step}: {scores} ({timer['train']:.0f}s)")
        done = learned(scores)
        if done:
            stock["steps_to_subject"], stock["seconds_to_subject"] = step, round(timer["train"], 1)
        timer["last"] = time.perf_counter()  # judging is not training time
        return done

    # The example script reads every file of its folders as an image: give it the images alone, without the
    # captions a captioned subject (and its class images drawn in context) carry. It trains on the two prompts.
    from sdtune.training.data import list_image_files

    images_only, class_only = work / "stock_instance", work / "stock_class"
    for folder, paths in ((images_only, subj.images), (class_only, list_image_files(cfg.class_dir)[0])):
        folder.mkdir(parents=True, exist_ok=True)
        for path in paths:
            (folder / path.name).write_bytes(path.read_bytes())
    timer["last"] = time.perf_counter()
    train_stock(model, images_only, subj.instance_prompt, class_only, subj.class_prompt, "lora", resolution,
                cfg.train_batch_size, stock_max, 5e-4, seed=cfg.seed, lora_rank=4, check_every=every,
                on_step=on_step, on_check=on_check)
    if ours["seconds_to_subject"] and stock["seconds_to_subject"]:
        verdict = f"{stock['seconds_to_subject'] / ours['seconds_to_subject']:.2f}x sooner"
    elif ours["seconds_to_subject"]:
        verdict = f"the stock recipe never got there within {stock_factor}x sdtune's steps ({stock_max})"
    else:
        verdict = f"sdtune did not get there within {max_steps} steps"
    return {"subject": subj.name, "every": every, "batch_size": cfg.train_batch_size, "guidance": guidance,
            "sdtune": ours, "stock": stock, "verdict": verdict}
