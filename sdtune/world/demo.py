"""The main job, end to end and offline: DreamBooth a subject, generate it in all four modes, score it.

Phases (``run_demo``):

1. models - the embedded family (base, inpaint, depth) when it is built; otherwise tiny RANDOM
   models, announced loudly and recorded as ``"models": "tiny-random"`` (their pictures are noise).
2. before training - the base model draws world prompts at guidance 7.5 and 1.0: the judge's
   ``base_prompt_adherence`` and ``guidance_gain``. The same pipeline draws the class images for
   prior preservation (OUT/class_images, reused by a rerun).
3. training - the DreamBooth recipe (train/dreambooth.py) with configs/demo.yaml: LoRA, prior
   preservation and caption dropout on; the LoRA goes to OUT/lora.
4. generation - ONE ``Engine`` with the LoRA applied serves txt2img (the subject in new contexts),
   img2img (from a world render), inpaint (the subject painted into a world scene) and depth2img
   (a world render's structure), plus class prompts for prior preservation.
5. scoring - the judge reads every image back; OUT/metrics.json and OUT/report.md with image grids.

Every file is written under a temporary name and renamed; each image group is built in a scratch
folder and swapped in whole, so a rerun into the same OUT replaces, never mixes, results.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from sdtune import ROOT
from sdtune.errors import SdtuneError
from sdtune.imageio import save_image_atomic, write_text_atomic
from sdtune.world import scenes
from sdtune.world.subjects import DEFAULT_SUBJECT, Subject, load_subject
from sdtune.world.report import load_table, make_grid, mask_overlay, short

DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
TINY_NOTICE = ("embedded models not built yet: running on tiny RANDOM models; pictures will be noise; "
               "see README")
MODE_GROUPS = ("txt2img", "img2img", "inpaint", "depth2img")
TARGETS = {"base_prompt_adherence": ">= 0.9", "guidance_gain": "> 0.2", "subject_fidelity": ">= 0.9",
           "prompt_fidelity": ">= 0.8", "prior_preservation": ">= 0.9"}


@dataclass(frozen=True)
class Plan:
    """How much the demo generates. The full plan fits 10 minutes on 2 CPU cores with the embedded family."""

    base_prompts: int = 24  # world prompts for base_prompt_adherence (x2: guidance 7.5 and 1.0)
    subject_prompts: int = 16  # txt2img of the subject in new contexts
    per_mode: int = 4  # img2img / inpaint / depth2img examples each
    class_prompts: int = 16  # class-prompt images after training (prior preservation)
    sample_steps: int = 25
    guidance: float = 7.5


FULL = Plan()
QUICK = Plan(base_prompts=2, subject_prompts=2, per_mode=1, class_prompts=2, sample_steps=3)
# Training settings of --quick, applied before the user's key=value overrides.
QUICK_TRAINING = {"max_steps": 3, "num_class_images": 2, "class_generation_steps": 3, "train_batch_size": 1}


# ----------------------------------------------------------------------------- models

@dataclass
class Models:
    base: str
    inpaint: str | None
    depth: str | None
    kind: str  # "embedded" | "tiny-random" | "custom"


def resolve_models(model, inpaint_model, depth_model, out: Path, say: Callable[[str], None]) -> Models:
    """The base/inpaint/depth models to use: given ones, else the embedded family, else tiny random ones."""
    from sdtune.models import embedded

    if model is not None:  # the user's own base; dedicated models only when given (another family may not fit)
        own = embedded.has_embedded("base") and Path(str(model)).resolve() == embedded.embedded_model("base").resolve()
        return Models(str(model), _opt(inpaint_model), _opt(depth_model), "embedded" if own else "custom")
    if embedded.has_embedded("base"):
        def pick(given, kind):
            if given is not None:
                return str(given)
            return str(embedded.embedded_model(kind)) if embedded.has_embedded(kind) else None

        return Models(str(embedded.embedded_model("base")), pick(inpaint_model, "inpaint"),
                      pick(depth_model, "depth"), "embedded")
    say(f"WARNING: {TINY_NOTICE}")
    tiny = tiny_models(out / "_tiny_models")
    return Models(str(tiny["sd1"]), _opt(inpaint_model) or str(tiny["inpaint"]),
                  _opt(depth_model) or str(tiny["depth"]), "tiny-random")


def _opt(value) -> str | None:
    return None if value is None else str(value)


def tiny_models(folder: Path) -> dict[str, Path]:
    """Tiny random base/inpaint/depth models in ``folder``: built aside and renamed in, reused by a rerun."""
    from sdtune.models.fixtures import save_tiny_pipeline

    names = ("sd1", "inpaint", "depth")  # one seed: the three share VAE and text-encoder weights, as a family does
    if not all((folder / n / "model_index.json").is_file() for n in names):
        scratch = Path(tempfile.mkdtemp(prefix=".tiny_models-", suffix=".partial", dir=folder.parent))
        try:
            for name in names:
                save_tiny_pipeline(scratch / name, name, seed=0)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(scratch, folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return {n: folder / n for n in names}


# ----------------------------------------------------------------------------- configuration

def demo_config(subject: Subject, base_model: str, out: Path, resolution: int, quick: bool,
                overrides=()):
    """configs/demo.yaml + what this run fixes (model, subject, folders, resolution) + --quick + overrides."""
    from sdtune.training.config import config_from_dict, parse_override, read_yaml

    if not DEMO_CONFIG.is_file():
        raise SdtuneError(f"the demo config {DEMO_CONFIG} is missing; run sdtune from a source checkout")
    data = read_yaml(DEMO_CONFIG)
    data.pop("demo", None)  # the generation plan (see demo_plan), not a training key
    data.update(model=base_model, instance_dir=str(subject.folder), instance_prompt=subject.instance_prompt,
                class_prompt=subject.class_prompt, class_dir=str(out / "class_images"),
                output_dir=str(out / "lora"), resolution=resolution)
    if quick:
        data.update(QUICK_TRAINING)
    for text in overrides:
        key, value = parse_override(text)
        data[key] = value
    return config_from_dict(data)


def demo_plan(quick: bool) -> Plan:
    """The generation plan: QUICK for --quick, else FULL updated by the ``demo:`` section of configs/demo.yaml."""
    from dataclasses import fields, replace

    from sdtune.training.config import read_yaml

    if quick or not DEMO_CONFIG.is_file():
        return QUICK if quick else FULL
    section = read_yaml(DEMO_CONFIG).get("demo") or {}
    names = {f.name for f in fields(Plan)}
    if not isinstance(section, dict) or set(section) - names:
        raise SdtuneError(f"{DEMO_CONFIG}: the demo section takes only {', '.join(sorted(names))}")
    return replace(FULL, **section)


# ----------------------------------------------------------------------------- prompts and inputs

def base_prompts(n: int, seed: int = 1234) -> list[str]:
    """World prompts stating every attribute, e.g. "a photo of a large red ball on the left, on grass"."""
    rng = np.random.default_rng(seed)
    return [scenes.caption(scenes.sample_scene(rng)) for _ in range(n)]


def new_contexts(subject: Subject, n: int, seed: int = 7) -> list[scenes.Scene]:
    """Scenes of the subject's class in (position, background) pairs its instance images never show."""
    pairs = [(p, b) for b in scenes.BACKGROUNDS for p in scenes.POSITIONS if (p, b) not in subject.contexts]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    return [scenes.Scene(kind=subject.class_noun, colour=scenes.COLOURS[i % len(scenes.COLOURS)], size="large",
                        position=pairs[order[i % len(pairs)]][0], background=pairs[order[i % len(pairs)]][1],
                        seed=seed * 1000 + i) for i in range(n)]


def subject_prompt(subject: Subject, scene: scenes.Scene) -> str:
    """"a photo of sks box on the left, on snow": the identifier, the class noun and a context."""
    return scenes.caption(scene, identifier=subject.identifier, stated={"kind", "position", "background"})


def class_prompts(subject: Subject, n: int) -> list[str]:
    """The class prompt itself, then the class noun in world contexts ("a photo of a box on snow")."""
    rng = np.random.default_rng(99)
    prompts = [subject.class_prompt]
    while len(prompts) < n:
        scene = scenes.Scene(kind=subject.class_noun, position=scenes.POSITIONS[int(rng.integers(5))],
                            background=scenes.BACKGROUNDS[int(rng.integers(4))])
        prompts.append(scenes.caption(scene, stated={"kind", "position", "background"}))
    return prompts[:n]


def box_mask(position: str, size: int, half: float = 15.0) -> Image.Image:
    """White square (repaint) around a position's anchor, black elsewhere; ``half`` in 64-unit canvas units."""
    cx, cy = scenes.ANCHORS[position]
    s = size / scenes.CANVAS
    a = np.zeros((size, size), np.uint8)
    x0, x1 = int(max(0, (cx - half) * s)), int(min(size, np.ceil((cx + half) * s)))
    y0, y1 = int(max(0, (cy - half) * s)), int(min(size, np.ceil((cy + half) * s)))
    a[y0:y1, x0:x1] = 255
    return Image.fromarray(a, "L")


# ----------------------------------------------------------------------------- grids and files

def save_group(results, folder: Path) -> list[Path]:
    """Save results (PNG + JSON each) as a whole folder: built aside, then swapped in for the old one."""
    from sdtune.generation.metadata import save_results

    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", suffix=".partial", dir=folder.parent))
    try:
        names = [p.name for p in save_results(results, scratch)]
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}-old-{os.getpid()}"
            os.replace(folder, old)
        os.replace(scratch, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [folder / n for n in names]


# ----------------------------------------------------------------------------- the demo

@dataclass
class Group:
    """One kind of generation: its images, prompts and the extra cells (inputs) its grid shows."""

    name: str
    title: str
    results: list = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    inputs: list[list[tuple[Image.Image, str]]] = field(default_factory=list)  # per example, shown before it


def run_demo(out: str | os.PathLike = "outputs/demo", subject: str | os.PathLike | None = None, model=None,
             inpaint_model=None, depth_model=None, quick: bool = False, overrides=(), plan: Plan | None = None,
             say: Callable[[str], None] = print) -> dict:
    """Run the main job into ``out``; return the metrics (also in out/metrics.json, with out/report.md)."""
    from sdtune.training.data import check_output_dir

    t_start = time.perf_counter()
    plan = plan or demo_plan(quick)
    subj = load_subject(subject or DEFAULT_SUBJECT)  # user errors first, before anything heavy
    out = check_output_dir(out, what="--out")
    demo_config(subj, "<model>", out, 64, quick, overrides)  # bad key=value overrides fail now, not after loading
    timings: dict[str, float] = {}

    def phase(n: int, text: str) -> None:
        say(f"[{n}/5] {text}  (t={time.perf_counter() - t_start:.0f}s)")

    # --- 1. models -----------------------------------------------------------------------------
    phase(1, "models")
    t = time.perf_counter()
    models = resolve_models(model, inpaint_model, depth_model, out, say)
    import torch

    from sdtune.generation.engine import Engine
    from sdtune.world.judge import Judge

    base_engine = Engine.load(models.base)
    resolution = base_engine.native_size[0]
    cfg = demo_config(subj, models.base, out, resolution, quick, overrides)  # validated before any work
    judge = Judge.load()
    say(f"      base {models.base} ({models.kind}), {resolution} px; inpaint {models.inpaint or '-'}; "
        f"depth {models.depth or '-'}")
    timings["models_s"] = time.perf_counter() - t

    # --- 2. before training: base-model adherence, guidance gain, class images ----------------------
    phase(2, f"base model before training: {plan.base_prompts} world prompts at guidance 7.5 and 1.0")
    t = time.perf_counter()
    prompts = base_prompts(plan.base_prompts)
    base_hi = Group("base_guidance_7.5", "Base model, guidance 7.5 (before training)", prompts=prompts)
    base_lo = Group("base_guidance_1.0", "Base model, guidance 1.0 (before training)", prompts=prompts)
    from tqdm.auto import tqdm

    with tqdm(total=2 * len(prompts), desc="base images", unit="img") as bar:
        for i, p in enumerate(prompts):
            for grp, guidance in ((base_hi, 7.5), (base_lo, 1.0)):
                grp.results += base_engine.generate("txt2img", prompt=p, steps=plan.sample_steps, guidance=guidance,
                                                    seed=i)
                bar.update(1)
    timings["base_generate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    from sdtune.training.class_images import ensure_class_images

    say(f"      class images: {cfg.num_class_images} of '{cfg.class_prompt}' in {cfg.class_dir} (kept on rerun)")
    ensure_class_images(cfg, pipeline=base_engine.pipeline("txt2img"))
    timings["class_images_s"] = time.perf_counter() - t
    del base_engine

    # --- 3. training -----------------------------------------------------------------------------
    phase(3, f"DreamBooth {cfg.method} on {subj.name}: {cfg.max_steps} steps, prior preservation "
             f"{'on' if cfg.with_prior_preservation else 'OFF'}, caption dropout {cfg.caption_dropout}")
    t = time.perf_counter()
    from sdtune.training.recipe import load_recipe

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*non-image file")  # subject.json beside the images
        result = load_recipe().train(cfg)
    timings["train_s"] = time.perf_counter() - t
    lora_dir = Path(cfg.output_dir)
    if cfg.method != "lora":
        raise SdtuneError("the demo applies a LoRA; keep method=lora (use `sdtune train` for full fine-tuning)")

    # --- 4. generation with one engine, LoRA applied -----------------------------------------------
    phase(4, "generating with the LoRA: txt2img, img2img, inpaint, depth2img, class prompts")
    t = time.perf_counter()
    engine = Engine.load(models.base, inpaint_model=models.inpaint, depth_model=models.depth, lora=lora_dir)
    with tqdm(total=plan.subject_prompts + 3 * plan.per_mode + plan.class_prompts, desc="images", unit="img") as bar:
        groups = _generate(engine, subj, plan, resolution, say, bar.update)
    timings["generate_s"] = time.perf_counter() - t + timings["base_generate_s"]
    del engine

    # --- 5. scoring and report -----------------------------------------------------------------
    phase(5, "scoring with the judge, writing metrics.json and report.md")
    t = time.perf_counter()
    all_groups = [base_hi, base_lo, *groups]
    for g in all_groups:
        save_group(g.results, out / "images" / g.name)
    metrics = _score(judge, subj, base_hi, base_lo, groups)
    metrics.update(
        models=models.kind, model=models.base, inpaint_model=models.inpaint, depth_model=models.depth,
        subject=subj.name, instance_prompt=subj.instance_prompt, class_prompt=subj.class_prompt, quick=quick,
        resolution=resolution, steps=result.global_step, sample_steps=plan.sample_steps,
        counts={g.name: len(g.results) for g in all_groups} | {"class_images": cfg.num_class_images,
                                                              "instance_images": len(subj.images)},
        training={"method": cfg.method, "lora_rank": cfg.lora_rank, "learning_rate": cfg.learning_rate,
                  "with_prior_preservation": cfg.with_prior_preservation, "caption_dropout": cfg.caption_dropout,
                  "train_batch_size": cfg.train_batch_size, "first_loss": _round(result.losses[0]),
                  "last_loss": _round(result.losses[-1])},
        targets=TARGETS, torch_threads=torch.get_num_threads(), out=str(out))
    grids = _write_grids(out, all_groups)
    timings["score_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    metrics["timings"] = {k: round(v, 1) for k, v in timings.items()}
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(out / "report.md", _report(metrics, grids, subj))
    say(f"done in {timings['total_s']:.0f}s: {out / 'report.md'}, {out / 'metrics.json'}"
        + (f" - WARNING: {TINY_NOTICE}" if models.kind == "tiny-random" else ""))
    return metrics


def _round(x):
    return None if x is None else round(float(x), 4)


def _generate(engine, subj: Subject, plan: Plan, size: int, say, tick: Callable[[int], object]) -> list[Group]:
    steps, g = plan.sample_steps, plan.guidance
    groups = []

    def gen(mode: str, **kw):
        results = engine.generate(mode, steps=steps, guidance=g, **kw)
        tick(1)
        return results

    txt = Group("txt2img", "txt2img: the subject in new contexts")
    for i, scene in enumerate(new_contexts(subj, plan.subject_prompts)):
        p = subject_prompt(subj, scene)
        txt.prompts.append(p)
        txt.results += gen("txt2img", prompt=p, seed=100 + i)
        txt.inputs.append([])
    groups.append(txt)

    # Image modes start from world renders at the model's native size (a generic box, or another object).
    contexts = new_contexts(subj, plan.per_mode, seed=11)
    modes = [m for m in ("img2img", "inpaint", "depth2img") if m in engine.modes()]
    for m in ("img2img", "inpaint", "depth2img"):
        if m not in modes:
            say(f"      {m}: skipped - no model for it was given")
    if "img2img" in modes:
        grp = Group("img2img", "img2img: a world render of a generic box, repainted as the subject (strength 0.75)")
        for i, scene in enumerate(contexts):
            init = scenes.render(scene, size=size).image
            p = subject_prompt(subj, scene)
            grp.prompts.append(p)
            grp.inputs.append([(init, "input: " + short(scenes.caption(scene)))])
            grp.results += gen("img2img", prompt=p, image=init, strength=0.75, seed=200 + i)
        groups.append(grp)
    if "inpaint" in modes:
        grp = Group("inpaint", "inpaint: a world scene's object (a ball) replaced by the subject (white = repaint)")
        for i, scene in enumerate(contexts):
            ball = scenes.Scene(**{**scene.attrs(), "kind": "ball"}, seed=scene.seed)
            init = scenes.render(ball, size=size).image
            mask = box_mask(scene.position, size)
            p = subject_prompt(subj, scene)
            grp.prompts.append(p)
            grp.inputs.append([(mask_overlay(init, mask), "input + mask: " + short(scenes.caption(ball)))])
            grp.results += gen("inpaint", prompt=p, image=init, mask=mask, seed=300 + i)
        groups.append(grp)
    if "depth2img" in modes:
        grp = Group("depth2img", "depth2img: a world render's structure (depth from the model's estimator)")
        for i, scene in enumerate(contexts):
            render = scenes.render(scene, size=size)
            disparity = render.disparity
            d = (disparity - disparity.min()) / max(float(np.ptp(disparity)), 1e-6)
            p = subject_prompt(subj, scene)
            grp.prompts.append(p)
            grp.inputs.append([(render.image, "input: " + short(render.caption)),
                               (Image.fromarray((d * 255).astype(np.uint8), "L"), "true depth (white = near)")])
            grp.results += gen("depth2img", prompt=p, image=render.image, strength=0.9, seed=400 + i)
        groups.append(grp)

    cls = Group("class_prompts", "Class prompts after training (prior preservation: the class, not the subject)")
    for i, p in enumerate(class_prompts(subj, plan.class_prompts)):
        cls.prompts.append(p)
        cls.results += gen("txt2img", prompt=p, seed=500 + i)
        cls.inputs.append([])
    groups.append(cls)
    return groups


def _score(judge, subj: Subject, base_hi: Group, base_lo: Group, groups: list[Group]) -> dict:
    from sdtune.world import evaluation as ev

    imgs = lambda grp: [r.image for r in grp.results]  # noqa: E731
    by_name = {g.name: g for g in groups}
    hi = ev.prompt_adherence(imgs(base_hi), base_hi.prompts, judge)
    lo = ev.prompt_adherence(imgs(base_lo), base_lo.prompts, judge)
    txt = by_name["txt2img"]
    metrics = {
        "base_prompt_adherence": hi,
        "base_prompt_adherence_guidance_1": lo,
        "guidance_gain": hi - lo,
        "base_attribute_accuracy": ev.attribute_accuracy(imgs(base_hi), base_hi.prompts, judge),
        "base_attribute_accuracy_guidance_1": ev.attribute_accuracy(imgs(base_lo), base_lo.prompts, judge),
        "subject_fidelity": ev.subject_fidelity(imgs(txt), judge, subj.class_noun),
        "prompt_fidelity": ev.prompt_fidelity(imgs(txt), txt.prompts, judge, subj.identifier),
        "prior_preservation": ev.prior_preservation(imgs(by_name["class_prompts"]), subj.class_noun, judge),
    }
    # Per mode: is it the subject, and is the stated context honoured.
    metrics["subject_fidelity_by_mode"] = {
        m: ev.subject_fidelity(imgs(by_name[m]), judge, subj.class_noun) for m in MODE_GROUPS if m in by_name}
    metrics["prompt_fidelity_by_mode"] = {
        m: ev.prompt_fidelity(imgs(by_name[m]), by_name[m].prompts, judge, subj.identifier)
        for m in MODE_GROUPS if m in by_name}
    # The judge's own check: the real instance images should be judged the subject.
    from sdtune.imageio import open_image

    metrics["judge_on_instance_images"] = ev.subject_fidelity([open_image(p) for p in subj.images], judge,
                                                              subj.class_noun)
    metrics["modes"] = [m for m in MODE_GROUPS if m in by_name]
    return _rounded(metrics)


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _write_grids(out: Path, groups: list[Group]) -> dict[str, str]:
    grids = {}
    for g in groups:
        cells = []
        for i, r in enumerate(g.results):
            cells += g.inputs[i] if i < len(g.inputs) else []
            cells.append((r.image, short(g.prompts[i]) if i < len(g.prompts) else ""))
        per_example = 1 + (len(g.inputs[0]) if g.inputs else 0)
        cols = per_example * max(1, 8 // per_example) if per_example > 1 else 8
        cols = min(cols, len(cells))
        rel = f"grids/{g.name}.png"
        save_image_atomic(make_grid(cells, cols), out / rel)
        grids[g.name] = rel
    return grids


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _report(m: dict, grids: dict[str, str], subj: Subject) -> str:
    tiny = m["models"] == "tiny-random"
    lines = ["# sdtune demo: DreamBooth on a subject, all four modes, judged", ""]
    if tiny:
        lines += [f"> **WARNING: {TINY_NOTICE}.** The models below are tiny and untrained: every picture is "
                  "noise and every metric is meaningless (chance level). This run only proves that the pipeline "
                  "runs end to end.", ""]
    elif m["models"] == "custom":
        lines += [f"> Models: your own ({m['model']}). The judge knows only the built-in world, so its metrics "
                  "mean something only for models trained on that world.", ""]
    t = m["training"]
    lines += [
        f"- models: **{m['models']}** (base `{m['model']}`, inpaint `{m['inpaint_model']}`, depth "
        f"`{m['depth_model']}`), {m['resolution']} px",
        f"- subject: **{subj.name}** ({len(subj.images)} images), instance prompt `{m['instance_prompt']}`, "
        f"class prompt `{m['class_prompt']}`",
        f"- training: {t['method']} rank {t['lora_rank']}, {m['steps']} steps, lr {t['learning_rate']}, batch "
        f"{t['train_batch_size']}, prior preservation {'on' if t['with_prior_preservation'] else 'off'} "
        f"({m['counts']['class_images']} class images), caption dropout {t['caption_dropout']}; loss "
        f"{t['first_loss']} -> {t['last_loss']}",
        f"- sampling: {m['sample_steps']} steps, guidance 7.5" + (" (--quick)" if m["quick"] else ""),
        f"- time: {m['timings']['total_s']} s in all (train {m['timings']['train_s']} s, generate "
        f"{m['timings']['generate_s']} s, class images {m['timings']['class_images_s']} s) on "
        f"{m['torch_threads']} threads",
        "", "## Metrics (the judge)", "",
        "| metric | value | target | what it measures |", "|---|---|---|---|",
    ]
    what = {
        "base_prompt_adherence": "base model, guidance 7.5: share of world prompts whose every attribute is found",
        "guidance_gain": "adherence at guidance 7.5 minus at 1.0 (classifier-free guidance works)",
        "subject_fidelity": "after training, txt2img: share of subject prompts judged the subject",
        "prompt_fidelity": "after training, txt2img: share of subject prompts whose context is honoured",
        "prior_preservation": "after training: share of class-prompt images that are the class and not the subject",
    }
    for k, desc in what.items():
        lines.append(f"| {k} | {_fmt(m[k])} | {TARGETS[k]} | {desc} |")
    acc, acc1 = m.get("base_attribute_accuracy"), m.get("base_attribute_accuracy_guidance_1")
    if acc:
        lines += ["", "Base model, per attribute (judge finds it, guidance 7.5 / 1.0): " + ", ".join(
            f"{a} {_fmt(acc[a])} / {_fmt(acc1.get(a))}" for a in acc) + "."]
    lines += ["", "Per mode (subject fidelity / prompt fidelity): " + ", ".join(
        f"{mode} {_fmt(m['subject_fidelity_by_mode'][mode])} / {_fmt(m['prompt_fidelity_by_mode'][mode])}"
        for mode in m["modes"]) + ".",
        f"The judge on the real instance images: {_fmt(m['judge_on_instance_images'])} judged the subject.", ""]
    if tiny:
        lines += ["(Tiny random models: these numbers are chance, not results.)", ""]
    table = load_table(m["out"]) if m.get("out") else None
    lines += ["## Ablations", ""]
    lines += [table, "", "(From `sdtune demo --ablations` into this folder: see ablations.md for its images.)", ""] \
        if table else ["Not run into this folder: `sdtune demo --ablations --out THIS_FOLDER` trains and scores "
                       "prior preservation off, caption dropout off and full fine-tuning.", ""]
    lines += ["## Images", ""]
    titles = {"base_guidance_7.5": "Base model, guidance 7.5 (before training)",
              "base_guidance_1.0": "Base model, guidance 1.0 (before training)",
              "txt2img": "txt2img: the subject in new contexts",
              "img2img": "img2img: a world render repainted as the subject",
              "inpaint": "inpaint: the subject painted into a world scene (red = repainted region)",
              "depth2img": "depth2img: a world render's structure, the subject's looks",
              "class_prompts": "Class prompts after training (prior preservation)"}
    for name, rel in grids.items():
        lines += [f"### {titles.get(name, name)}", "", f"![{name}]({rel})", "",
                  f"Images with their parameters (PNG + JSON): `images/{name}/`", ""]
    return "\n".join(lines)
