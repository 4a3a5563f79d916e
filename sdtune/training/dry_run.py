"""``sdtune train --dry-run``: what a run would do, without training.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sdtune.models.loading import describe, load_pipeline
from sdtune.training import adapters, identifier
from sdtune.training.buckets import parse_buckets
from sdtune.training.config import TrainConfig, concepts_of, config_to_dict, resolve_model
from sdtune.training.data import TrainingData, class_caption
from sdtune.training.presets import with_native_resolution
from sdtune.training.run_data import read_instances
from sdtune.training.trainables import text_encoder_trains


def dry_run(cfg: TrainConfig) -> dict:
    """What ``train(cfg)`` would do, without training: the resolved config, every image found (size, bucket,
    caption), class images still to generate, steps and epochs, and the trainable parameter count."""
    from sdtune.training.class_images import missing_class_indices

    cfg = with_native_resolution(cfg)
    concepts = concepts_of(cfg)
    buckets = parse_buckets(cfg.buckets, cfg.resolution, cfg.bucket_step, cfg.max_aspect)
    report = {"config": config_to_dict(cfg), "model": resolve_model(cfg), "concepts": []}
    data = None
    for concept, examples in zip(concepts, read_instances(cfg)):
        data = TrainingData(examples, resolution=cfg.resolution, buckets=buckets, center_crop=cfg.center_crop)
        class_todo = (len(missing_class_indices(Path(concept.class_dir).expanduser(), concept.num_class_images))
                      if cfg.with_prior_preservation else 0)
        report["concepts"].append({
            "source": concept.source.name, "instance_prompt": concept.instance_prompt, "repeats": concept.repeats,
            "images": [{"name": e.name, "size": list(e.size), "bucket": list(data.bucket_of(e)), "caption": e.caption,
                        "mask": mask_shown(e) if cfg.masked_loss else None,
                        # what output preservation says of the plain class instead (a caption's first line)
                        "class_caption": class_caption(e.caption.splitlines()[0] if e.caption else
                                                       concept.instance_prompt, concept.instance_prompt,
                                                       concept.class_prompt, concept.identifier)
                        if cfg.output_preservation_weight else None} for e in examples],
            "class_prompt": concept.class_prompt if cfg.with_prior_preservation else None,
            "class_prompts": list(concept.class_prompts or ()) if cfg.with_prior_preservation else [],
            "class_dir": concept.class_dir if cfg.with_prior_preservation else None,
            "class_images_to_generate": class_todo})
    stream = sum(len(c["images"]) * c["repeats"] for c in report["concepts"])
    report["steps"] = {"max_steps": cfg.max_steps, "batch": cfg.train_batch_size,
                       "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                       "instance_examples_per_epoch": stream,
                       "epochs": round(cfg.max_steps * cfg.train_batch_size * cfg.gradient_accumulation_steps / stream, 1)}
    pipe = load_pipeline(report["model"], device="cpu", dtype=torch.float32)
    if describe(pipe).family == "sd3":  # SD 3.x: a LoRA on the transformer, the text encoders frozen
        from sdtune.training.sd3 import add_clip_lora, add_lora, check_sizes, check_supported

        check_supported(cfg)
        check_sizes(cfg, pipe)
        clip = [pipe.text_encoder, pipe.text_encoder_2]
        for module in (pipe.transformer, *clip):
            module.requires_grad_(False)
        add_lora(pipe.transformer, cfg)
        for te in clip if cfg.train_text_encoder else ():
            add_clip_lora(te, cfg)
        count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
        report["trainable_parameters"] = {"unet": count(pipe.transformer), "text_encoder": sum(map(count, clip)),
                                          "denoiser": "SD3 transformer"}
        return report
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if describe(pipe).family == "sdxl" else [])
    if cfg.method == "lora":
        for te in encoders:  # frozen as in training: only adapters (and the identifier's rows) count
            te.requires_grad_(False)
        adapters.add_unet_adapter(pipe.unet, cfg)
        if cfg.train_text_encoder:
            for te in encoders:
                adapters.add_text_encoder_adapter(te, cfg)
        if cfg.train_identifier_embedding and len(encoders) == 1:  # counted with the text encoder's parameters
            identifier.attach(pipe.text_encoder, pipe.tokenizer, [c.identifier for c in concepts])
    else:
        pipe.unet.requires_grad_(True)
        for te in encoders:
            te.requires_grad_(cfg.train_text_encoder)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    report["trainable_parameters"] = {"unet": count(pipe.unet), "text_encoder": sum(
        count(te) for te in encoders) if text_encoder_trains(cfg) else 0}
    return report


def mask_shown(example) -> str | None:
    """Where an instance image's masked_loss mask comes from, for the dry run."""
    if example.mask_data is not None:
        return f"masks/{Path(example.name).stem}.png"
    return "alpha" if example.has_alpha else None


def format_dry_run(report: dict) -> str:
    import yaml

    lines = ["resolved config:"]
    lines += ["  " + ln for ln in yaml.safe_dump(report["config"], sort_keys=True).splitlines()]
    lines.append(f"model: {report['model']}")
    for i, c in enumerate(report["concepts"]):
        lines.append(f"concept {i}: {c['source']} - {len(c['images'])} image(s) x {c['repeats']} repeat(s), "
                     f"prompt '{c['instance_prompt']}'")
        for e in c["images"]:
            mask = f"  mask: {e['mask']}" if e.get("mask") else ""
            kept = f"  output preservation on '{e['class_caption']}'" if e.get("class_caption") else ""
            lines.append(f"  {e['name']}  {e['size'][0]}x{e['size'][1]} -> bucket {e['bucket'][0]}x{e['bucket'][1]}  "
                         f"'{e['caption']}'{mask}{kept}")
        if c["class_prompt"]:
            drawn = (f"drawn from {len(c['class_prompts'])} class prompts ('{c['class_prompts'][0]}', ...)"
                     if c.get("class_prompts") else f"'{c['class_prompt']}'")
            lines.append(f"  class images: {drawn} in {c['class_dir']}, "
                         f"{c['class_images_to_generate']} still to generate")
    s = report["steps"]
    lines.append(f"steps: {s['max_steps']} x batch {s['batch']} x accumulation {s['gradient_accumulation_steps']} = "
                 f"{s['epochs']} epochs of {s['instance_examples_per_epoch']} instance examples")
    tp = report["trainable_parameters"]
    lines.append(f"trainable parameters: {tp.get('denoiser', 'UNet')} {tp['unet']:,}, text encoder {tp['text_encoder']:,}")
    return "\n".join(lines)
