"""Prior-preservation class images: only the missing ones are generated, deterministically, resumably, split."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.training import class_images as ci
from sdtune.training.class_images import class_image_name, ensure_class_images, missing_class_indices
from sdtune.training.config import load_config

R = 32
NUM = 5


class FakeAccelerator:
    """What ensure_class_images needs of an accelerate.Accelerator, for one simulated rank."""

    def __init__(self, process_index=0, num_processes=1):
        self.process_index, self.num_processes = process_index, num_processes
        self.is_main_process = process_index == 0
        self.device = torch.device("cpu")
        self.barriers = 0

    def wait_for_everyone(self):
        self.barriers += 1


def make_cfg(class_dir, model=None, num=NUM, batch_size=2, **extra):
    overrides = ["instance_dir=unused", "instance_prompt=a photo of sks dog", "with_prior_preservation=true",
                 "class_prompt=a photo of a dog", f"class_dir={class_dir}", f"num_class_images={num}",
                 f"resolution={R}", "class_generation_steps=2", "class_generation_guidance=5.0",
                 f"class_generation_batch_size={batch_size}", "seed=11"]
    if model is not None:
        overrides.append(f"model={model}")
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def assert_same_images(dir_a, dir_b, indices):
    for i in indices:
        a, b = pixels(dir_a / class_image_name(i)), pixels(dir_b / class_image_name(i))
        # Batched CPU matmuls may round differently in the last float bit; that must not show in 8-bit pixels.
        assert np.abs(a - b).max() <= 1, f"class image {i} differs"


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from sdtune.models.loading import load_pipeline

    return load_pipeline(tiny_models["sd1"])


@pytest.fixture
def spy(monkeypatch):
    """Record the indices each generate_class_images call renders."""
    calls = []
    real = ci.generate_class_images

    def recording(pipe, prompt, indices, class_dir, **kw):
        calls.append(list(indices))
        return real(pipe, prompt, indices, class_dir, **kw)

    monkeypatch.setattr(ci, "generate_class_images", recording)
    return calls


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pipe):
    """NUM class images generated in one batch by one process: what every other route must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    paths = ensure_class_images(make_cfg(folder, batch_size=NUM), FakeAccelerator(), pipeline=pipe)
    assert [p.name for p in paths] == [class_image_name(i) for i in range(NUM)]
    return folder


# ---------------------------------------------------------------- the plan (no model needed)

def test_missing_indices_count_user_images(tmp_path):
    assert missing_class_indices(tmp_path / "absent", 4) == [0, 1, 2, 3]
    Image.new("RGB", (8, 8)).save(tmp_path / "my_dog.png")
    assert missing_class_indices(tmp_path, 4) == [0, 1, 2]
    Image.new("RGB", (8, 8)).save(tmp_path / class_image_name(1))
    assert missing_class_indices(tmp_path, 4) == [0, 2]
    (tmp_path / f".{class_image_name(0)}.abc.partial").write_bytes(b"half a png")  # crash leftover: not an image
    (tmp_path / "notes.txt").write_text("x")
    assert missing_class_indices(tmp_path, 4) == [0, 2]
    assert missing_class_indices(tmp_path, 2) == []


def test_plan_is_stable_while_other_processes_write(tmp_path):
    """Rank 1 planning before or after rank 0 wrote its files must pick the same indices for itself."""
    Image.new("RGB", (8, 8)).save(tmp_path / "user.png")
    before = [i for i in missing_class_indices(tmp_path, 9) if i % 2 == 1]
    for i in missing_class_indices(tmp_path, 9)[::2][:2]:  # rank 0 has written some of its share
        Image.new("RGB", (8, 8)).save(tmp_path / class_image_name(i))
    after = [i for i in missing_class_indices(tmp_path, 9) if i % 2 == 1]
    assert before == after == [1, 3, 5, 7]


# ---------------------------------------------------------------- generation

def test_without_prior_preservation_nothing_happens(tmp_path):
    cfg = load_config(None, ["instance_dir=x", "instance_prompt=p", f"class_dir={tmp_path / 'cls'}"])
    acc = FakeAccelerator()
    assert ensure_class_images(cfg, acc) == []
    assert not (tmp_path / "cls").exists() and acc.barriers == 0


def test_generates_only_the_missing_count_and_keeps_existing(tmp_path, tiny_models, spy, reference):
    folder = tmp_path / "cls"
    folder.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "my_dog_1.png")
    Image.new("RGB", (40, 40), (10, 200, 10)).save(folder / "my_dog_2.jpg")
    old = 1_000_000_000
    for p in folder.iterdir():
        os.utime(p, (old, old))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    acc = FakeAccelerator()
    paths = ensure_class_images(make_cfg(folder, model=tiny_models["sd1"]), acc)  # loads the model itself

    assert spy == [[0, 1, 2]]  # 2 user images count towards the 5
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [class_image_name(i) for i in range(3)] + ["my_dog_1.png", "my_dog_2.jpg"])
    for name, data in before.items():
        assert (folder / name).read_bytes() == data and (folder / name).stat().st_mtime == old
    assert [p.name for p in paths] == sorted(p.name for p in folder.iterdir()) and len(paths) == NUM
    assert acc.barriers == 1
    assert_same_images(folder, reference, range(3))
    for i in range(3):
        assert Image.open(folder / class_image_name(i)).size == (R, R)

    spy.clear()
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = ensure_class_images(make_cfg(folder, model="/no/such/model"), acc)  # enough images: no model load
    assert spy == [] and again == paths
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_resumes_after_an_interrupted_generation(tmp_path, pipe, spy, reference):
    folder = tmp_path / "cls"
    folder.mkdir()
    for i in (1, 3):  # what an interrupted run (any batching, any process) had finished
        shutil.copy(reference / class_image_name(i), folder / class_image_name(i))
    (folder / f".{class_image_name(0)}.x1y2.partial").write_bytes(b"\x89PNG half written")
    kept = {i: (folder / class_image_name(i)).stat().st_mtime_ns for i in (1, 3)}

    paths = ensure_class_images(make_cfg(folder, batch_size=4), FakeAccelerator(), pipeline=pipe)

    assert spy == [[0, 2, 4]]
    assert [p.name for p in paths] == [class_image_name(i) for i in range(NUM)]
    assert {i: (folder / class_image_name(i)).stat().st_mtime_ns for i in (1, 3)} == kept
    assert_same_images(folder, reference, range(NUM))


def test_same_images_regardless_of_batch_size(tmp_path, pipe, reference):
    folder = tmp_path / "cls"
    ensure_class_images(make_cfg(folder, num=2, batch_size=1), FakeAccelerator(), pipeline=pipe)
    assert_same_images(folder, reference, range(2))  # reference was one batch of NUM


def test_split_across_two_processes(tmp_path, pipe, monkeypatch, reference):
    folder = tmp_path / "cls"
    by_rank = {}
    real = ci.generate_class_images

    def recording(p, prompt, indices, class_dir, **kw):
        by_rank.setdefault(current[0], []).extend(indices)
        return real(p, prompt, indices, class_dir, **kw)

    monkeypatch.setattr(ci, "generate_class_images", recording)
    ranks = [FakeAccelerator(r, 2) for r in range(2)]
    current = [None]
    results = []
    for acc in ranks:  # run one after the other: rank 1 sees rank 0's files, as a slow rank would
        current[0] = acc.process_index
        results.append(ensure_class_images(make_cfg(folder, batch_size=2), acc, pipeline=pipe))

    assert by_rank == {0: [0, 2, 4], 1: [1, 3]}
    assert not set(by_rank[0]) & set(by_rank[1])
    assert sorted(by_rank[0] + by_rank[1]) == list(range(NUM))
    assert all(acc.barriers == 1 for acc in ranks)
    assert results[1] == [folder / class_image_name(i) for i in range(NUM)]
    assert_same_images(folder, reference, range(NUM))


def test_inpainting_model_cannot_make_class_images(tmp_path, tiny_models):
    with pytest.raises(SdtuneError, match="text-to-image model.*inpaint"):
        ensure_class_images(make_cfg(tmp_path / "cls", model=tiny_models["inpaint"], num=1), FakeAccelerator())


def test_unwritable_class_dir_fails_before_loading_the_model(tmp_path, spy):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SdtuneError, match="class_dir .* is not writable"):
        ensure_class_images(make_cfg(tmp_path / "file" / "cls", model="/no/such/model"), FakeAccelerator())
    assert spy == []


# ---------------------------------------------------------------- varied class prompts

class RecordingPipe:
    """The tiny pipeline, recording the prompts of each call."""

    def __init__(self, pipe):
        self.pipe, self.prompts = pipe, []

    def __call__(self, prompt, **kw):
        self.prompts.append(list(prompt))
        return self.pipe(prompt=prompt, **kw)

    def __getattr__(self, name):  # components and config, for the checks before generating
        return getattr(self.pipe, name)


def test_class_prompts_cycle_and_each_image_keeps_its_prompt_as_caption(tmp_path, pipe, reference):
    from sdtune.training.sources import Source, read_examples

    prompts = ["a photo of a dog", "a photo of a dog on snow"]
    folder, rec = tmp_path / "cls", RecordingPipe(pipe)
    ensure_class_images(make_cfg(folder, batch_size=2, class_prompts=f"[{', '.join(prompts)}]"), FakeAccelerator(),
                        pipeline=rec)
    want = [prompts[i % 2] for i in range(NUM)]
    assert [p for call in rec.prompts for p in call] == want
    captions = [(folder / class_image_name(i)).with_suffix(".txt").read_text() for i in range(NUM)]
    assert captions == [p + "\n" for p in want]
    # Image i is seeded as before: the ones drawn from class_prompt itself equal the single-prompt reference...
    assert_same_images(folder, reference, [0, 2, 4])
    # ...and the others follow their own prompt.
    assert all(np.abs(pixels(folder / class_image_name(i)) - pixels(reference / class_image_name(i))).max() > 1
               for i in (1, 3))
    # The data layer trains each on its caption; class_prompt stays the fallback.
    examples = read_examples(Source(instance_dir=str(folder)), kind="class", default_caption="fallback")
    assert [e.caption for e in examples] == want


def test_class_prompts_warn_about_images_drawn_without_them(tmp_path, pipe, reference):
    from sdtune.console import SdtuneWarning

    folder = tmp_path / "cls"
    folder.mkdir()
    shutil.copy(reference / class_image_name(0), folder / class_image_name(0))  # from class_prompt, no caption
    with pytest.warns(SdtuneWarning, match=r"1 generated image\(s\) have no caption \(e\.g\. class_00000\.png\).*"
                                           r"delete them"):
        ensure_class_images(make_cfg(folder, class_prompts="[a photo of a dog at night]"), FakeAccelerator(),
                            pipeline=pipe)
    assert not (folder / "class_00000.txt").exists()  # a file, once written, is final
    assert (folder / "class_00001.txt").read_text() == "a photo of a dog at night\n"
