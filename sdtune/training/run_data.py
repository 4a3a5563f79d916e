"""The run's training data: every concept's instance examples read and checked before any model is loaded,
then bucketed with the class examples into ``TrainingData``.
"""
from __future__ import annotations

from pathlib import Path

from sdtune.training.buckets import parse_buckets
from sdtune.training.config import TrainConfig, concepts_of, min_image_side
from sdtune.training.data import TrainingData
from sdtune.training.sources import Source, read_examples


def read_instances(cfg: TrainConfig) -> list[list]:
    """Every concept's instance examples, checked (captions, sizes, masks): one list per concept."""
    side = min_image_side(cfg)
    out = []
    for c, concept in enumerate(concepts_of(cfg)):
        what = f"concepts[{c}]" if cfg.concepts else ("instance_dir" if concept.instance_dir else "dataset")
        out.append(read_examples(concept.source, kind="instance", concept=c, default_caption=concept.instance_prompt,
                                 identifier=concept.identifier, caption_prefix=concept.caption_prefix, min_side=side,
                                 what=what, use_captions=cfg.use_captions))
    return out


def read_data(cfg: TrainConfig, instances: list[list], class_images: list[list[Path]]) -> TrainingData:
    """``read_instances``' examples and every concept's class examples, bucketed."""
    side = min_image_side(cfg)
    concepts = concepts_of(cfg)
    instance, klass = [ex for examples in instances for ex in examples], []
    for c, concept in enumerate(concepts):
        if class_images[c]:
            klass += read_examples(Source(instance_dir=concept.class_dir), kind="class", concept=c,
                                   default_caption=concept.class_prompt, min_side=side, what="class_dir",
                                   use_captions=cfg.use_captions)[
                :concept.num_class_images]
    return TrainingData(instance, klass, resolution=cfg.resolution,
                        buckets=parse_buckets(cfg.buckets, cfg.resolution, cfg.bucket_step, cfg.max_aspect),
                        center_crop=cfg.center_crop, random_flip=cfg.random_flip, seed=cfg.seed,
                        repeats=[c.repeats for c in concepts], masked_loss=cfg.masked_loss)
