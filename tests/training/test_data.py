"""Training data: bad folders and files, every image mode/size/EXIF case, dataset pairing, batching, dropout."""
import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.training.data import (
    DreamBoothDataset,
    caption_dropout_mask,
    check_output_dir,
    collate,
    find_images,
    load_pixels,
)

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
    ds = DreamBoothDataset(paths, "a photo of sks thing", resolution=R)
    batch = collate([ds[i] for i in range(len(ds))], with_prior=False)
    assert batch["pixels"].shape == (5, 3, R, R)
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1


# ---------------------------------------------------------------- dataset and collate

def test_dataset_without_prior(subject):
    inst, _ = subject
    ds = DreamBoothDataset(inst, "a photo of sks dog", resolution=R)
    assert len(ds) == 3
    item = ds[1]
    assert set(item) == {"instance_key", "instance_pixels", "instance_prompt"}
    assert item["instance_key"] == (1, False) and item["instance_prompt"] == "a photo of sks dog"
    assert torch.equal(item["instance_pixels"], load_pixels(inst[1], R))
    with pytest.raises(IndexError):
        ds[3]


def test_dataset_pairs_instance_and_class_by_index(subject):
    inst, cls = subject
    ds = DreamBoothDataset(inst, "a photo of sks dog", cls, "a photo of a dog", resolution=R)
    assert len(ds) == 5  # max(3 instance, 5 class)
    for i in range(5):
        item = ds[i]
        assert item["instance_key"] == (i % 3, False) and item["class_key"] == (i % 5, False)
        assert torch.equal(item["instance_pixels"], load_pixels(inst[i % 3], R))
        assert torch.equal(item["class_pixels"], load_pixels(cls[i % 5], R))
        assert item["class_prompt"] == "a photo of a dog"
    more_instances = DreamBoothDataset(inst, "p", cls[:2], "c", resolution=R)
    assert len(more_instances) == 3 and more_instances[2]["class_key"] == (0, False)


def test_class_images_need_a_class_prompt(subject):
    inst, cls = subject
    with pytest.raises(SdtuneError, match="class_prompt"):
        DreamBoothDataset(inst, "p", cls, None, resolution=R)


def test_random_flip_is_a_mirror_reproducible_and_varies(subject):
    inst, cls = subject
    def flips(ds, epoch):
        ds.set_epoch(epoch)
        return [(ds[i]["instance_key"][1], ds[i]["class_key"][1]) for i in range(len(ds))]

    a = DreamBoothDataset(inst, "p", cls, "c", resolution=R, random_flip=True, seed=3)
    b = DreamBoothDataset(inst, "p", cls, "c", resolution=R, random_flip=True, seed=3)
    assert flips(a, 0) == flips(b, 0) and flips(a, 5) == flips(b, 5)
    over_epochs = [flips(a, e) for e in range(6)]
    values = {f for epoch in over_epochs for pair in epoch for f in pair}
    assert values == {True, False}
    assert len({tuple(e) for e in over_epochs}) > 1  # flips change from epoch to epoch
    other_seed = DreamBoothDataset(inst, "p", cls, "c", resolution=R, random_flip=True, seed=4)
    assert [flips(other_seed, e) for e in range(6)] != over_epochs
    for e in range(6):
        a.set_epoch(e)
        for i in range(len(a)):
            item = a[i]
            index, flip = item["instance_key"]
            plain = load_pixels(inst[index], R)
            assert torch.equal(item["instance_pixels"], torch.flip(plain, dims=[2]) if flip else plain)


def test_without_set_epoch_each_pass_is_the_next_epoch(subject):
    inst, cls = subject
    counted = DreamBoothDataset(inst, "p", cls, "c", resolution=R, random_flip=True, seed=1)
    explicit = DreamBoothDataset(inst, "p", cls, "c", resolution=R, random_flip=True, seed=1)
    for epoch in range(3):
        explicit.set_epoch(epoch)
        for i in range(len(counted)):
            got, want = counted[i], explicit[i]  # one fetch per item per pass, as a DataLoader does
            assert (got["instance_key"], got["class_key"]) == (want["instance_key"], want["class_key"])


def test_no_flip_unless_asked(subject):
    inst, cls = subject
    ds = DreamBoothDataset(inst, "p", cls, "c", resolution=R, random_flip=False)
    for e in range(4):
        ds.set_epoch(e)
        assert not any(ds[i]["instance_key"][1] or ds[i]["class_key"][1] for i in range(len(ds)))


def test_collate_orders_instance_then_class(subject):
    inst, cls = subject
    ds = DreamBoothDataset(inst, "inst prompt", cls, "class prompt", resolution=R)
    batch = collate([ds[0], ds[1], ds[4]], with_prior=True)
    assert batch["pixels"].shape == (6, 3, R, R)
    assert batch["prompts"] == ["inst prompt"] * 3 + ["class prompt"] * 3
    assert batch["is_class"].tolist() == [False] * 3 + [True] * 3
    assert batch["keys"] == [("instance", 0, False), ("instance", 1, False), ("instance", 1, False),
                             ("class", 0, False), ("class", 1, False), ("class", 4, False)]
    assert torch.equal(batch["pixels"][2], load_pixels(inst[1], R))
    assert torch.equal(batch["pixels"][5], load_pixels(cls[4], R))
    plain = collate([ds[0], ds[1]], with_prior=False)
    assert plain["pixels"].shape == (2, 3, R, R) and not plain["is_class"].any()
    assert plain["keys"] == [("instance", 0, False), ("instance", 1, False)]


def test_collate_with_prior_needs_class_examples(subject):
    inst, _ = subject
    ds = DreamBoothDataset(inst, "p", resolution=R)
    with pytest.raises(ValueError, match="class images"):
        collate([ds[0]], with_prior=True)


@pytest.mark.parametrize("batch_size, shuffle", [(1, False), (2, False), (2, True), (4, True)])
def test_each_batch_holds_b_instance_and_b_class_examples(subject, batch_size, shuffle):
    inst, cls = subject
    ds = DreamBoothDataset(inst, "inst", cls, "class", resolution=R, random_flip=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                                         generator=torch.Generator().manual_seed(0),
                                         collate_fn=lambda ex: collate(ex, with_prior=True))
    seen_class = []
    for batch in loader:
        b = len(batch["prompts"]) // 2
        assert 1 <= b <= batch_size
        assert batch["is_class"].tolist() == [False] * b + [True] * b
        assert batch["prompts"] == ["inst"] * b + ["class"] * b
        assert all(k[0] == "instance" for k in batch["keys"][:b]) and all(k[0] == "class" for k in batch["keys"][b:])
        for row, (kind, index, flip) in enumerate(batch["keys"]):
            plain = load_pixels((inst if kind == "instance" else cls)[index], R)
            assert torch.equal(batch["pixels"][row], torch.flip(plain, dims=[2]) if flip else plain)
        seen_class += [k[1] for k in batch["keys"][b:]]
    assert sorted(seen_class) == list(range(5))  # every class image once per epoch


# ---------------------------------------------------------------- caption dropout

def test_caption_dropout_rate_statistically():
    n, p = 20000, 0.1
    mask = caption_dropout_mask(n, p, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (n,)
    standard_error = math.sqrt(p * (1 - p) / n)
    assert abs(mask.float().mean().item() - p) < 4 * standard_error
    half = caption_dropout_mask(n, 0.5, torch.Generator().manual_seed(1)).float().mean().item()
    assert abs(half - 0.5) < 4 * math.sqrt(0.25 / n)


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
