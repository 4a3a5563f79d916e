"""Training data: bad folders and files, every image mode/size/EXIF case, dataset pairing, batching, dropout."""
import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.training.data import (TrainingData, caption_dropout_mask, check_output_dir, collate, drop_captions,
                                  find_images, load_pixels)
from sdtune.training.sources import Source, read_examples

R = 32


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path, array_or_image, **kw):
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    img.save(path, **kw)
    return path


def as_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.int32)


@pytest.fixture
def subject(tmp_path):
    """Three instance images of different sizes, and a folder of five class images."""
    inst, cls = tmp_path / "inst", tmp_path / "cls"
    inst.mkdir(), cls.mkdir()
    for i, (h, w) in enumerate([(32, 32), (40, 56), (64, 32)]):
        save(inst / f"img{i}.png", rgb(h, w, seed=i))
    for i in range(5):
        save(cls / f"class_{i:05d}.png", rgb(32, 32, seed=100 + i))
    return find_images(inst), find_images(cls, what="class_dir")


# ---------------------------------------------------------------- find_images: bad folders and files

def test_missing_folder(tmp_path):
    with pytest.raises(SdtuneError, match=r"instance_dir not found: .*nowhere"):
        find_images(tmp_path / "nowhere")


def test_unset_folder():
    with pytest.raises(SdtuneError, match="instance_dir is not set"):
        find_images("")


def test_folder_is_a_file(tmp_path):
    save(tmp_path / "a.png", rgb(8, 8))
    with pytest.raises(SdtuneError, match="is not a folder"):
        find_images(tmp_path / "a.png")


def test_empty_folder(tmp_path):
    with pytest.raises(SdtuneError, match="holds no images .*it is empty"):
        find_images(tmp_path)


def test_only_non_images_means_zero_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.warns(UserWarning, match="skipping 1 non-image"):
        with pytest.raises(SdtuneError, match="holds no images .*found only 1 other file"):
            find_images(tmp_path)


def test_non_image_files_skipped_with_warning(tmp_path):
    save(tmp_path / "b.png", rgb(8, 8))
    save(tmp_path / "a.jpg", rgb(8, 8))
    save(tmp_path / "c.PNG", rgb(8, 8))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")  # hidden OS litter: ignored silently
    with pytest.warns(UserWarning, match=r"skipping 1 non-image file\(s\): notes.txt"):
        found = find_images(tmp_path)
    assert [p.name for p in found] == ["a.jpg", "b.png", "c.PNG"]


def test_no_warning_when_all_are_images(tmp_path):
    save(tmp_path / "a.png", rgb(8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(find_images(tmp_path)) == 1


def test_corrupt_image_is_named(tmp_path):
    save(tmp_path / "good.png", rgb(16, 16))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(SdtuneError, match=r"broken\.png could not be read"):
        find_images(tmp_path)


def test_truncated_image_is_named(tmp_path):
    save(tmp_path / "whole.jpg", rgb(64, 64))
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(SdtuneError, match=r"half\.jpg"):
        find_images(tmp_path)


def test_image_far_smaller_than_the_resolution_is_refused_by_name_and_size(tmp_path):
    save(tmp_path / "fine.png", rgb(40, 60))
    save(tmp_path / "dot.png", rgb(1, 1))
    assert len(find_images(tmp_path)) == 2  # no minimum asked for: any size is read
    with pytest.raises(SdtuneError, match=r"dot\.png is 1x1 pixels.*at least 16 px"):
        find_images(tmp_path, min_side=16)
    (tmp_path / "dot.png").unlink()
    assert [p.name for p in find_images(tmp_path, min_side=40)] == ["fine.png"]  # exactly the minimum is fine


def test_min_image_side_is_the_stated_fraction_of_the_resolution():
    from sdtune.training.config import config_from_dict, min_image_side

    cfg = config_from_dict({"instance_dir": "x", "instance_prompt": "a sks dog", "resolution": 512})
    assert cfg.min_image_fraction == 0.25 and min_image_side(cfg) == 128
    with pytest.raises(SdtuneError, match="min_image_fraction must be in"):
        config_from_dict({"instance_dir": "x", "instance_prompt": "a sks dog", "min_image_fraction": 2})


# ---------------------------------------------------------------- check_output_dir

def test_output_dir_created_when_missing(tmp_path):
    out = check_output_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []  # the write probe is cleaned up


def test_output_dir_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SdtuneError, match=r"output_dir .*file/out is not writable"):
        check_output_dir(tmp_path / "file" / "out")
    with pytest.raises(SdtuneError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_output_dir_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(SdtuneError, match="not writable"):
            check_output_dir(ro)
    finally:
        ro.chmod(0o700)


# ---------------------------------------------------------------- load_pixels: sizes, modes, EXIF

@pytest.mark.parametrize("h, w", [(32, 32), (17, 90), (100, 40), (8, 8), (333, 257)])
def test_any_size_becomes_square_in_range(tmp_path, h, w):
    x = load_pixels(save(tmp_path / "x.png", rgb(h, w)), R)
    assert x.shape == (3, R, R) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1


def test_center_crop_keeps_the_middle_without_resampling(tmp_path):
    arr = rgb(32, 64)  # shorter side already R: only the crop acts
    x = load_pixels(save(tmp_path / "x.png", arr), R)
    assert np.array_equal(as_uint8(x), arr[:, 16:48])
    flipped = load_pixels(tmp_path / "x.png", R, flip=True)
    assert np.array_equal(as_uint8(flipped), arr[:, 16:48][:, ::-1])


def test_shorter_side_resized_to_resolution(tmp_path):
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:, :64] = 255  # left half white, right half black
    x = as_uint8(load_pixels(save(tmp_path / "x.png", arr), R))  # -> 32x64, crop columns 16..48
    assert (x[:, :14] > 250).all() and (x[:, 18:] < 5).all()


def test_random_crop_is_a_window_and_reproducible(tmp_path):
    arr = rgb(32, 96)
    path = save(tmp_path / "x.png", arr)
    offsets = set()
    for seed in range(8):
        a = as_uint8(load_pixels(path, R, center_crop=False, generator=torch.Generator().manual_seed(seed)))
        b = as_uint8(load_pixels(path, R, center_crop=False, generator=torch.Generator().manual_seed(seed)))
        assert np.array_equal(a, b)
        matches = [o for o in range(96 - R + 1) if np.array_equal(a, arr[:, o:o + R])]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1


def test_deterministic(tmp_path):
    path = save(tmp_path / "x.jpg", rgb(50, 70))
    assert torch.equal(load_pixels(path, R), load_pixels(path, R))


def test_rgba_flattened_on_white(tmp_path):
    arr = np.zeros((32, 32, 4), np.uint8)  # fully transparent black
    arr[:, :16] = (255, 0, 0, 255)  # opaque red on the left
    x = as_uint8(load_pixels(save(tmp_path / "x.png", Image.fromarray(arr, "RGBA")), R))
    assert (x[:, :16] == (255, 0, 0)).all() and (x[:, 16:] == 255).all()


def test_greyscale_becomes_three_equal_channels(tmp_path):
    x = load_pixels(save(tmp_path / "x.png", Image.new("L", (40, 32), 200)), R)
    assert x.shape == (3, R, R)
    assert torch.allclose(x, torch.full_like(x, 200 / 127.5 - 1))


def test_palette_image(tmp_path):
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    x = as_uint8(load_pixels(save(tmp_path / "x.png", img), R))
    assert (x == (10, 200, 30)).all()


def test_cmyk_converted(tmp_path):
    img = Image.new("CMYK", (32, 48), (0, 0, 0, 0))  # no ink = white
    img.paste((255, 0, 0, 0), (0, 0, 32, 24))  # cyan top half
    x = as_uint8(load_pixels(save(tmp_path / "x.tif", img), R))  # -> 32x48, crop rows 8..40
    assert (x[:8] == (0, 255, 255)).all() and (x[-8:] == 255).all()


def test_16_bit_png(tmp_path):
    arr = np.zeros((32, 32), np.uint16)
    arr[:, 16:] = 65535
    path = save(tmp_path / "x.png", Image.fromarray(arr))
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    x = load_pixels(path, R)
    assert torch.allclose(x[:, :, :16], torch.tensor(-1.0)) and torch.allclose(x[:, :, 16:], torch.tensor(1.0))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_rotation_honoured(tmp_path, fmt):
    # Stored landscape 64x32, red left half, blue right half. EXIF orientation 6 says "rotate 90 degrees
    # clockwise to view": a 32x64 portrait with red on top. Ignoring EXIF would give red left / blue right.
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"rotated.{fmt.lower()}"
    Image.fromarray(arr).save(path, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    x = as_uint8(load_pixels(path, R))  # portrait 32x64 -> center rows 16..48: red top half, blue bottom half
    red, blue = np.array((255, 0, 0)), np.array((0, 0, 255))
    assert np.abs(x[:12].mean(axis=(0, 1)) - red).max() < 12
    assert np.abs(x[-12:].mean(axis=(0, 1)) - blue).max() < 12
    if fmt == "PNG":  # lossless: exactly the pixels of the image rotated by hand
        viewed = save(tmp_path / "viewed.png", Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270))
        assert torch.equal(load_pixels(path, R), load_pixels(viewed, R))


def test_mixed_folder_all_become_the_same_shape(tmp_path):
    save(tmp_path / "a.png", Image.new("RGBA", (50, 20), (1, 2, 3, 128)))
    save(tmp_path / "b.png", Image.new("L", (20, 50), 7))
    save(tmp_path / "c.tif", Image.new("CMYK", (33, 33), (0, 50, 0, 0)))
    save(tmp_path / "d.png", Image.fromarray(np.full((40, 40), 30000, np.uint16)))
    save(tmp_path / "e.jpg", rgb(100, 30))
    paths = find_images(tmp_path)
    assert len(paths) == 5
    data = TrainingData(examples(tmp_path, "instance"), resolution=R)
    (batch,) = collate(data.micro_batch("instance", 0, 5))
    assert batch["pixels"].shape == (5, 3, R, R)
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1


# ---------------------------------------------------------------- TrainingData and collate

def examples(folder, kind, prompt="p"):
    return read_examples(Source(instance_dir=str(folder)), kind=kind, default_caption=prompt)


def draws(data, kind, steps, batch=1):
    """(example name, flip) of every example the first ``steps`` micro-steps draw."""
    out = []
    for g in range(steps):
        out += [(e["name"], e["key"][2]) for e in data.micro_batch(kind, g, batch)]
    return out


def test_square_examples_are_the_shorter_side_resized_and_center_cropped(subject):
    inst, _ = subject
    data = TrainingData(examples(inst[0].parent, "instance", "a photo of sks dog"), resolution=R)
    assert data.bucket_counts() == {(R, R): 3} and not data.with_prior
    got = {e["name"]: e for g in range(3) for e in data.micro_batch("instance", g, 1)}
    assert sorted(got) == sorted(str(p) for p in inst)  # one epoch: every image once
    for path in inst:
        e = got[str(path)]
        assert e["prompt"] == "a photo of sks dog" and e["key"][1:] == ((R, R), False)
        assert torch.allclose(e["pixels"], load_pixels(path, R), atol=2 / 127.5)  # same crop, resampling aside


def test_caption_variants_are_drawn_per_step_evenly_and_reproducibly(tmp_path):
    save(tmp_path / "a.png", rgb(R, R))
    (tmp_path / "a.txt").write_text("sks dog\nsks dog on grass\nsks dog at night")
    prompts = [e["prompt"] for g in range(300) for e in TrainingData(examples(tmp_path, "instance"), resolution=R,
                                                                      seed=3).micro_batch("instance", g, 1)]
    counts = {p: prompts.count(p) for p in set(prompts)}
    assert sorted(counts) == ["sks dog", "sks dog at night", "sks dog on grass"]
    assert min(counts.values()) > 70  # about 100 each
    again = TrainingData(examples(tmp_path, "instance"), resolution=R, seed=3)
    assert [again.micro_batch("instance", g, 1)[0]["prompt"] for g in range(300)] == prompts  # resume draws the same


def test_each_micro_step_draws_b_instance_and_b_class_examples(subject):
    inst, cls = subject
    data = TrainingData(examples(inst[0].parent, "instance", "inst"), examples(cls[0].parent, "class", "class"),
                        resolution=R, random_flip=True)
    seen_class = []
    for g in range(5):
        passes = collate(data.micro_batch("instance", g, 2), data.micro_batch("class", g, 2))
        assert len(passes) == 1  # same shape: one forward pass, instance examples first
        (batch,) = passes
        assert batch["is_class"].tolist() == [False, False, True, True]
        assert batch["prompts"] == ["inst", "inst", "class", "class"]
        seen_class += [k[0] for k in batch["keys"][2:]]
    shas = {e.key for e in examples(cls[0].parent, "class")}
    assert set(seen_class) == shas and all(seen_class.count(s) == 2 for s in shas)  # 10 draws: each twice


def test_draws_are_a_pure_function_of_seed_and_step(subject):
    inst, cls = subject
    def data(seed):
        return TrainingData(examples(inst[0].parent, "instance"), examples(cls[0].parent, "class"), resolution=R,
                            random_flip=True, seed=seed)
    a, b = data(3), data(3)
    assert draws(a, "class", 12) == draws(b, "class", 12)
    fresh = data(3)
    assert fresh.micro_batch("class", 9, 1)[0]["name"] == draws(a, "class", 12)[9][0]  # step 9 alone, as on resume
    flips = {f for _, f in draws(a, "instance", 30)}
    assert flips == {True, False}
    assert draws(data(4), "class", 12) != draws(a, "class", 12)
    plain = TrainingData(examples(inst[0].parent, "instance"), resolution=R, random_flip=False)
    assert not any(f for _, f in draws(plain, "instance", 9))


def test_flipped_example_is_the_mirror(subject):
    inst, _ = subject
    data = TrainingData(examples(inst[0].parent, "instance"), resolution=R, random_flip=True, seed=1)
    plain = TrainingData(examples(inst[0].parent, "instance"), resolution=R)
    ref = {e["name"]: e["pixels"] for g in range(3) for e in plain.micro_batch("instance", g, 1)}
    for g in range(12):
        (e,) = data.micro_batch("instance", g, 1)
        want = ref[e["name"]]
        assert torch.equal(e["pixels"], torch.flip(want, dims=[2]) if e["key"][2] else want)


def test_buckets_keep_each_aspect_ratio_and_batches_share_one(tmp_path):
    from sdtune.training.buckets import bucket_sizes

    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, (w, h) in enumerate([(128, 64), (130, 60), (64, 128), (64, 64), (66, 70)]):
        save(folder / f"{i}.png", rgb(h, w, seed=i))
    data = TrainingData(examples(folder, "instance"), resolution=64, buckets=bucket_sizes(64))
    assert data.bucket_counts() == {(80, 48): 2, (64, 64): 2, (48, 80): 1}
    shapes = set()
    for g in range(20):
        (batch,) = collate(data.micro_batch("instance", g, 2))
        assert len({tuple(p.shape) for p in batch["pixels"]}) == 1
        shapes.add(tuple(batch["pixels"].shape[2:]))
    assert shapes == {(48, 80), (64, 64), (80, 48)}  # (H, W) of every bucket drawn


def test_class_examples_in_another_bucket_are_a_second_pass(tmp_path):
    from sdtune.training.buckets import bucket_sizes

    inst, cls = tmp_path / "inst", tmp_path / "cls"
    inst.mkdir(), cls.mkdir()
    save(inst / "wide.png", rgb(64, 128))
    save(cls / "square.png", rgb(64, 64))
    data = TrainingData(examples(inst, "instance", "i"), examples(cls, "class", "c"), resolution=64,
                        buckets=bucket_sizes(64))
    passes = collate(data.micro_batch("instance", 0, 1), data.micro_batch("class", 0, 1))
    assert [tuple(p["pixels"].shape) for p in passes] == [(1, 3, 48, 80), (1, 3, 64, 64)]
    assert [p["is_class"].tolist() for p in passes] == [[False], [True]]


def test_repeats_weigh_a_concept(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    save(a / "a.png", rgb(32, 32, seed=1))
    save(b / "b.png", rgb(32, 32, seed=2))
    ex = read_examples(Source(instance_dir=str(a)), concept=0, default_caption="sks dog") + \
        read_examples(Source(instance_dir=str(b)), concept=1, default_caption="ohwx cat")
    data = TrainingData(ex, resolution=R, repeats=[3, 1])
    names = [n for n, _ in draws(data, "instance", 40)]
    assert names.count(str(a / "a.png")) == 30 and names.count(str(b / "b.png")) == 10


# ---------------------------------------------------------------- caption dropout

def test_caption_dropout_rate_statistically():
    n, p = 20000, 0.1
    mask = caption_dropout_mask(n, p, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (n,)
    standard_error = math.sqrt(p * (1 - p) / n)
    assert abs(mask.float().mean().item() - p) < 4 * standard_error
    half = caption_dropout_mask(n, 0.5, torch.Generator().manual_seed(1)).float().mean().item()
    assert abs(half - 0.5) < 4 * math.sqrt(0.25 / n)


def test_caption_dropout_on_class_images_only_never_drops_an_instance_caption():
    n = 4000
    prompts = [f"a photo of sks dog {i}" if i % 2 else f"a photo of a dog {i}" for i in range(n)]
    is_class = torch.tensor([i % 2 == 0 for i in range(n)])
    both = drop_captions(prompts, is_class, 0.3, "all", torch.Generator().manual_seed(0))
    only = drop_captions(prompts, is_class, 0.3, "class", torch.Generator().manual_seed(0))
    dropped = lambda out, cls: [o == "" for o, c in zip(out, is_class.tolist()) if c == cls]  # noqa: E731
    assert not any(dropped(only, False))  # no instance caption is ever dropped
    assert dropped(only, True) == dropped(both, True)  # the class images' draw is the same as with "all"
    assert 0.25 < sum(dropped(both, False)) / (n / 2) < 0.35 and 0.25 < sum(dropped(only, True)) / (n / 2) < 0.35
    assert [o for o in only if o] == [q for q, o in zip(prompts, only) if o]  # kept prompts are unchanged


def test_caption_dropout_applies_to_instance_and_class_alike():
    """Drawn per batch row: the instance half and the class half of prior-preservation batches both drop."""
    g = torch.Generator().manual_seed(2)
    masks = torch.stack([caption_dropout_mask(8, 0.1, g) for _ in range(3000)])  # 3000 batches of 4 + 4
    se = math.sqrt(0.1 * 0.9 / masks[:, :4].numel())
    assert abs(masks[:, :4].float().mean().item() - 0.1) < 4 * se
    assert abs(masks[:, 4:].float().mean().item() - 0.1) < 4 * se


def test_caption_dropout_zero_drops_nothing():
    assert not caption_dropout_mask(20000, 0.0, torch.Generator().manual_seed(0)).any()


def test_caption_dropout_seeded():
    a = caption_dropout_mask(1000, 0.3, torch.Generator().manual_seed(7))
    b = caption_dropout_mask(1000, 0.3, torch.Generator().manual_seed(7))
    c = caption_dropout_mask(1000, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_caption_dropout_rejects_bad_probability():
    with pytest.raises(ValueError):
        caption_dropout_mask(10, 1.0, torch.Generator())


def _rgba_with_square(w, h, box):
    """An RGB noise image whose alpha is opaque on ``box`` (x0, y0, x1, y1), where the pixels are pure red."""
    a = np.dstack([rgb(h, w, seed=5), np.zeros((h, w), np.uint8)])
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = (255, 0, 0, 255)
    return Image.fromarray(a, "RGBA")


@pytest.mark.parametrize("center_crop,flip", [(True, False), (True, True), (False, False), (False, True)])
@pytest.mark.parametrize("mask_from", ["alpha", "masks folder"])
def test_masked_loss_gives_each_instance_its_mask_aligned_with_its_pixels(tmp_path, center_crop, flip, mask_from):
    inst = tmp_path / "inst"
    inst.mkdir()
    image = _rgba_with_square(64, 40, (28, 8, 50, 30))  # off centre: crops and flips move it
    if mask_from == "alpha":
        save(inst / "a.png", image)
    else:  # an RGB image, and its mask as masks/a.png
        save(inst / "a.png", image.convert("RGB"))
        (inst / "masks").mkdir()
        save(inst / "masks" / "a.png", image.getchannel("A"))
    assert examples(inst, "instance")[0].has_mask
    data = TrainingData(examples(inst, "instance"), resolution=R, buckets=[(48, 24)] if center_crop else None,
                        center_crop=center_crop, random_flip=flip, masked_loss=True, seed=1)
    seen_flip = set()
    for g in range(8):
        e = data.micro_batch("instance", g, 1)[0]
        seen_flip.add(e["key"][2] if e["key"] else None)
        mask, px = e["mask"][0].numpy(), as_uint8(e["pixels"])
        assert mask.shape == px.shape[:2]
        opaque, clear = mask > 0.99, mask < 0.01
        assert opaque.sum() > 8 and clear.sum() > 200
        # under the mask: the red square; around it: the image's own noise, not flattened on white
        assert (np.abs(px[opaque] - [255, 0, 0]) < 40).all()
        assert px[clear].mean(axis=0).min() < 200
    if flip and center_crop:
        assert seen_flip == {False, True}
    batch = collate(data.micro_batch("instance", 0, 1))[0]
    assert batch["masks"].shape == (1, 1, *batch["pixels"].shape[-2:])


def test_masked_loss_leaves_class_images_and_images_without_alpha_unmasked(subject):
    inst, cls = subject
    data = TrainingData(examples(inst[0].parent, "instance"), examples(cls[0].parent, "class"), resolution=R,
                        masked_loss=True)
    assert collate(data.micro_batch("instance", 0, 2), data.micro_batch("class", 0, 2))[0]["masks"] is None
    plain = TrainingData(examples(inst[0].parent, "instance"), resolution=R)
    assert plain.micro_batch("instance", 0, 1)[0]["mask"] is None


def test_a_mask_file_of_another_size_is_one_line_and_the_masks_folder_is_not_an_image_folder(tmp_path):
    save(tmp_path / "a.png", rgb(40, 40))
    (tmp_path / "masks").mkdir()
    save(tmp_path / "masks" / "a.png", np.zeros((20, 40), np.uint8))
    with pytest.raises(SdtuneError, match=r"mask .*a.png is 40x20 but its image a.png is 40x40; make the mask"):
        examples(tmp_path, "instance")
    save(tmp_path / "masks" / "a.png", np.zeros((40, 40), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping non-image files" for the masks folder
        (ex,) = examples(tmp_path, "instance")
    assert ex.has_mask and ex.image_and_mask()[1].size == (40, 40)


def test_class_caption_says_an_instance_caption_of_the_plain_class():
    from sdtune.training.data import class_caption

    args = ("a photo of sks box", "a photo of a box", "sks")
    assert class_caption("a photo of sks box on the left, on sand", *args) == "a photo of a box on the left, on sand"
    assert class_caption("sks box, teal checkers", *args) == "box, teal checkers"  # kohya-style tags
    assert class_caption("a teal thing", *args) == "a photo of a box"  # neither: the class prompt itself
    assert class_caption("sksy box", *args) == "a photo of a box"  # a word that only starts like the identifier
    # no identifier given: the one word the instance prompt has beyond the class prompt
    assert class_caption("hta ball on snow", "a photo of hta ball", "a photo of a ball") == "ball on snow"


# ---------------------------------------------------------------- one listing, one crop (written once, used twice)

def test_find_images_and_the_folder_source_list_and_warn_alike(tmp_path):
    save(tmp_path / "a.png", rgb(8, 8))
    (tmp_path / "notes.doc").write_text("x")
    with pytest.warns(UserWarning) as by_find:
        find_images(tmp_path)
    with pytest.warns(UserWarning) as by_source:
        read_examples(Source(instance_dir=str(tmp_path)), default_caption="sks dog")
    assert [str(w.message) for w in by_find] == [str(w.message) for w in by_source]
    assert by_find[0].filename == __file__ and by_source[0].filename.endswith("sources.py")  # the caller's line
    (tmp_path / "a.png").unlink()
    for reader in (lambda: find_images(tmp_path), lambda: read_examples(Source(instance_dir=str(tmp_path)))):
        with pytest.warns(UserWarning), pytest.raises(SdtuneError, match="holds no images .*found only 1 other file"):
            reader()


@pytest.mark.parametrize("h, w", [(32, 32), (40, 56), (64, 32), (20, 90)])
def test_load_pixels_is_a_square_bucket_fit(tmp_path, h, w):
    from sdtune.training.buckets import fit
    from sdtune.training.data import to_tensor

    path = save(tmp_path / "x.png", rgb(h, w))
    img = Image.open(path).convert("RGB")
    assert torch.equal(load_pixels(path, R), to_tensor(fit(img, (R, R))))
    for seed in range(3):
        a = load_pixels(path, R, center_crop=False, generator=torch.Generator().manual_seed(seed))
        b = to_tensor(fit(img, (R, R), False, torch.Generator().manual_seed(seed)))
        assert torch.equal(a, b)
    assert torch.equal(load_pixels(path, R, flip=True), load_pixels(path, R).flip(-1))
