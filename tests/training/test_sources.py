"""The data layer: every instance source through `datasets`, captions, and one clear line per bad input."""
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from sdtune.console import SdtuneWarning
from sdtune.errors import SdtuneError
from sdtune.training.sources import Source, read_examples


def img(path, w=40, h=30, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "subject"
    d.mkdir()
    for i in range(3):
        img(d / f"{i}.png", seed=i)
    return d


def read(source, **kw):
    kw.setdefault("default_caption", "a photo of sks dog")
    return read_examples(source, **kw)


def test_plain_folder_trains_on_instance_prompt(folder):
    ex = read(Source(instance_dir=str(folder)))
    assert [e.caption for e in ex] == ["a photo of sks dog"] * 3
    assert [e.size for e in ex] == [(40, 30)] * 3 and len({e.key for e in ex}) == 3


def test_kohya_txt_captions_replace_the_prompt(folder):
    (folder / "1.txt").write_text("sks dog on a beach\n", encoding="utf-8")
    ex = read(Source(instance_dir=str(folder)))
    assert [e.caption for e in ex] == ["a photo of sks dog", "sks dog on a beach", "a photo of sks dog"]


def test_use_captions_false_trains_every_image_on_the_prompt(folder):
    (folder / "1.txt").write_text("sks dog on a beach\n", encoding="utf-8")
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": f"dog {i}"})
                                                     for i in range(3)))
    assert [e.caption for e in read(Source(instance_dir=str(folder)))] == [f"dog {i}" for i in range(3)]
    assert [e.caption for e in read(Source(instance_dir=str(folder)), use_captions=False)] == ["a photo of sks dog"] * 3


def test_a_caption_of_several_lines_holds_its_variants(folder):
    (folder / "0.txt").write_text("sks dog on a beach\n\n  sks dog  \n")
    (folder / "1.txt").write_text("a dog on grass\nsks dog")
    ex = read(Source(instance_dir=str(folder)), identifier="sks", caption_prefix="sks dog,")
    assert ex[0].caption == "sks dog on a beach\nsks dog"  # blank lines dropped, each line stripped
    assert ex[1].caption == "sks dog, a dog on grass\nsks dog"  # the prefix goes where the identifier lacks
    with pytest.warns(SdtuneWarning, match=r"1 caption\(s\) lack the identifier 'sks' \(e\.g\. 1\.png\)"):
        read(Source(instance_dir=str(folder)), identifier="sks")


def test_imagefolder_metadata_jsonl_and_csv(folder, tmp_path):
    rows = [{"file_name": f"{i}.png", "text": f"sks dog number {i}"} for i in range(3)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert [e.caption for e in read(Source(instance_dir=str(folder)))] == [f"sks dog number {i}" for i in range(3)]
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,caption\n" + "".join(f"{i}.png,sks dog csv {i}\n" for i in range(3)))
    assert [e.caption for e in read(Source(instance_dir=str(folder)))] == [f"sks dog csv {i}" for i in range(3)]


def test_saved_dataset_with_named_columns(folder, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"picture": [str(folder / f"{i}.png") for i in range(3)],
                                     "words": ["sks dog a", "sks dog b", "sks dog c"]})
    ds = ds.cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    ex = read(Source(dataset=str(tmp_path / "saved"), image_column="picture", caption_column="words"))
    assert [e.caption for e in ex] == ["sks dog a", "sks dog b", "sks dog c"]
    assert ex[0].key == read(Source(instance_dir=str(folder)))[0].key  # the same bytes, the same latent-cache key
    with pytest.raises(SdtuneError, match=r"has no column 'image' \(its columns: picture, words\); set image_column"):
        read(Source(dataset=str(tmp_path / "saved")))
    with pytest.raises(SdtuneError, match=r"has no column 'caption'"):
        read(Source(dataset=str(tmp_path / "saved"), image_column="picture", caption_column="caption"))


def test_hub_dataset_not_cached_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SdtuneError, match="neither a saved dataset folder nor a dataset that could be loaded"):
        read(Source(dataset="nobody/no-such-dataset-sdtune"))


def test_caption_file_that_is_not_utf8(folder):
    (folder / "0.txt").write_bytes("sks dog caf\xe9".encode("latin-1"))
    with pytest.raises(SdtuneError, match=r"caption file .*0\.txt is not UTF-8 text"):
        read(Source(instance_dir=str(folder)))


def test_empty_caption_is_refused_by_name(folder):
    (folder / "2.txt").write_text("   \n")
    with pytest.raises(SdtuneError, match=r"the caption of .*2\.png is empty"):
        read(Source(instance_dir=str(folder)))


def test_captions_without_the_identifier_are_flagged_or_prefixed(folder):
    (folder / "0.txt").write_text("a dog on grass")
    with pytest.warns(SdtuneWarning, match=r"1 caption\(s\) lack the identifier 'sks' \(e\.g\. 0\.png\)"):
        read(Source(instance_dir=str(folder)), identifier="sks")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ex = read(Source(instance_dir=str(folder)), identifier="sks", caption_prefix="sks dog,")
    assert ex[0].caption == "sks dog, a dog on grass" and ex[1].caption == "a photo of sks dog"


def test_duplicates_are_warned(folder):
    (folder / "3.png").write_bytes((folder / "1.png").read_bytes())
    with pytest.warns(SdtuneWarning, match=r"3\.png is the same image as 1\.png"):
        read(Source(instance_dir=str(folder)))


def test_no_caption_and_no_prompt(folder):
    with pytest.raises(SdtuneError, match=r"has no caption and no instance_prompt"):
        read_examples(Source(instance_dir=str(folder)), default_caption="")


def test_too_small_image_named_with_its_size(folder):
    img(folder / "tiny.png", 3, 2)
    with pytest.raises(SdtuneError, match=r"tiny\.png is 3x2 pixels"):
        read(Source(instance_dir=str(folder)), min_side=16)


def test_caption_files_are_not_reported_as_stray_files(folder):
    (folder / "0.txt").write_text("sks dog")
    (folder / "subject.json").write_text("{}")
    (folder / "notes.doc").write_text("x")
    with pytest.warns(SdtuneWarning) as caught:
        read(Source(instance_dir=str(folder)))
    assert [str(w.message) for w in caught][0].endswith("skipping 1 non-image file(s): notes.doc")


def test_config_validates_concepts_and_sources():
    from sdtune.training.config import concepts_of, config_from_dict

    one = config_from_dict({"dataset": "saved", "instance_prompt": "sks dog", "caption_column": "text"})
    (c,) = concepts_of(one)
    assert c.dataset == "saved" and c.instance_dir is None and c.caption_column == "text"
    two = config_from_dict({"concepts": [
        {"instance_dir": "a", "instance_prompt": "a photo of sks box", "class_prompt": "a box", "class_dir": "ca"},
        {"dataset": "b", "instance_prompt": "a photo of ohwx ring", "repeats": 2}]})
    assert [c.repeats for c in concepts_of(two)] == [1, 2] and concepts_of(two)[1].num_class_images == 100
    bad = [
        ({"concepts": [{"instance_dir": "a"}]}, r"concepts\[0\]\.instance_prompt is empty"),
        ({"concepts": [{"instance_dir": "a", "dataset": "b", "instance_prompt": "p"}]}, "exactly one of"),
        ({"concepts": [{"instance_dir": "a", "instance_prompt": "p", "repeat": 2}]}, "did you mean 'repeats'"),
        ({"concepts": [{"instance_dir": "a", "instance_prompt": "p"}], "instance_dir": "x"}, "inside each concept"),
        ({"instance_dir": "a", "dataset": "b", "instance_prompt": "p"}, "either instance_dir or dataset"),
        ({"instance_dir": "a", "instance_prompt": "p", "buckets": [[64, 60]]}, "multiples of 8"),
        ({"instance_dir": "a", "instance_prompt": "p", "buckets": "some"}, "null, auto or a list"),
        ({"concepts": [{"instance_dir": "a", "instance_prompt": "p"}], "with_prior_preservation": True},
         r"concepts\[0\]\.class_prompt"),
    ]
    for data, message in bad:
        with pytest.raises(SdtuneError, match=message):
            config_from_dict(data)


# ---------------------------------------------------------------- metadata files: one line naming the file and line

def one_line_error(folder, match):
    with pytest.raises(SdtuneError, match=match) as info:
        read(Source(instance_dir=str(folder)))
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("text, match", [
    ('{"file_name": "0.png", "text": "a"}\n{"file_name": "1.png" "text": "b"}\n',
     r"metadata\.jsonl line 2 is not valid JSON \(Expecting ',' delimiter at column 23\); each line must be one JSON "
     r"object such "
     r"as \{\"file_name\": \"a\.png\""),
    ('{"file_name": "0.png", "text": "a"}\n\n[1, 2]\n', r"metadata\.jsonl line 3 is a list, not a JSON object"),
    ('"0.png"\n', r"metadata\.jsonl line 1 is a string, not a JSON object"),
    ('{"text": "a"}\n', r"metadata\.jsonl line 1 has no file_name"),
    ('{"file_name": 3, "text": "a"}\n', r"metadata\.jsonl line 1 has no file_name"),
    ('{"file_name": "9.png", "text": "a"}\n', r"metadata\.jsonl line 1: file_name '9\.png' not found in"),
    ('{"file_name": "0.png", "text": "a"}\n{"file_name": "1.png", "text": 5}\n',
     r"metadata\.jsonl line 2: text is a number, but a string on line 1"),
    ("\n  \n", r"metadata\.jsonl holds no rows"),
])
def test_bad_metadata_jsonl_is_one_line_naming_the_line(folder, text, match):
    (folder / "metadata.jsonl").write_text(text)
    assert str(folder / "metadata.jsonl") in one_line_error(folder, match)


def test_metadata_jsonl_that_is_not_utf8(folder):
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "0.png", "text": "a"}\n{"file_name": "1.png", "text": "caf\xe9"}\n')
    one_line_error(folder, r"metadata\.jsonl is not UTF-8 text \(line 2\)")


@pytest.mark.parametrize("text, match", [
    ("", r"metadata\.csv is empty"),
    ("name,text\n0.png,a\n", r"metadata\.csv line 1 names no file_name column \(it names name, text\)"),
    ("file_name,text,text\n0.png,a,b\n", r"metadata\.csv line 1 names a column twice"),
    ("file_name,text\n0.png,a\n1.png,a, b\n", r"metadata\.csv line 3 has 3 field\(s\) but the header names 2"),
    ("file_name,text\n", r"metadata\.csv holds no rows"),
    ("file_name,text\nnope.png,a\n", r"metadata\.csv line 2: file_name 'nope\.png' not found"),
])
def test_bad_metadata_csv_is_one_line_naming_the_line(folder, text, match):
    (folder / "metadata.csv").write_text(text)
    one_line_error(folder, match)


def test_both_metadata_files_and_images_left_out(folder):
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "sks a"}\n')
    with pytest.warns(SdtuneWarning, match=r"2 image\(s\) not in metadata\.jsonl, not trained on: 1\.png, 2\.png"):
        assert [e.caption for e in read(Source(instance_dir=str(folder)))] == ["sks a"]
    (folder / "metadata.csv").write_text("file_name,text\n0.png,a\n")
    one_line_error(folder, r"has both metadata\.jsonl and metadata\.csv; keep one")


def test_caption_file_siblings(folder):
    (folder / "0.txt").write_bytes(b"sks dog\nline two caf\xe9")
    one_line_error(folder, r"caption file .*0\.txt is not UTF-8 text \(line 2\)")
    (folder / "0.txt").write_bytes(b"sks\x00dog")
    one_line_error(folder, r"caption file .*0\.txt holds NUL bytes \(line 1\)")
    (folder / "0.txt").write_text("")  # an empty caption file is refused, not trained on as ""
    one_line_error(folder, r"the caption of .*0\.png is empty")


def test_damaged_saved_dataset_is_one_line(folder, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"image": [str(folder / "0.png")]}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "saved" / "dataset_info.json").write_text("{not json")
    with pytest.raises(SdtuneError, match=r"is a saved dataset that cannot be read") as info:
        read(Source(dataset=str(tmp_path / "saved")))
    assert "\n" not in str(info.value)


def test_a_mask_that_is_not_an_image(folder):
    (folder / "masks").mkdir()
    (folder / "masks" / "0.png").write_bytes(b"not a png")
    with pytest.raises(SdtuneError, match=r"0\.png") as info:
        read(Source(instance_dir=str(folder)))
    assert "\n" not in str(info.value)
