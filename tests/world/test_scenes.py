"""The built-in world: determinism, ground truth, caption grammar."""
import colorsys
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.world import scenes

ROOT = Path(__file__).resolve().parents[2]


def _hue(rgb):
    return colorsys.rgb_to_hsv(*(np.asarray(rgb, np.float64) / 255.0))[0]


def _nearest_hue(rgb):
    h = _hue(rgb)
    return min(scenes.ALBEDO, key=lambda c: min(abs(h - _hue(scenes.ALBEDO[c])), 1 - abs(h - _hue(scenes.ALBEDO[c]))))


def _renders(n=60, seed=11, **kw):
    return list(scenes.dataset(n, seed, **kw))


def test_same_seed_same_pixels_different_seed_different():
    a = [r.image.tobytes() for r in scenes.dataset(6, seed=3)]
    b = [r.image.tobytes() for r in scenes.dataset(6, seed=3)]
    c = [r.image.tobytes() for r in scenes.dataset(6, seed=4)]
    assert a == b
    assert all(x != y for x, y in zip(a, c))
    scene = scenes.Scene("star", "blue", "small", "left", "sand", seed=9)
    r1, r2 = scenes.render(scene), scenes.render(scene)
    assert r1.image.tobytes() == r2.image.tobytes()
    assert np.array_equal(r1.depth, r2.depth) and np.array_equal(r1.mask, r2.mask)
    # The nuisance seed changes textures/jitter, not the attributes.
    r3 = scenes.render(scenes.Scene("star", "blue", "small", "left", "sand", seed=10))
    assert r3.image.tobytes() != r1.image.tobytes() and r3.caption == r1.caption


def test_render_shapes_and_types():
    r = scenes.render(scenes.Scene(), size=32)
    assert r.image.size == (32, 32) and r.image.mode == "RGB"
    assert r.depth.shape == (32, 32) and r.depth.dtype == np.float32
    assert r.mask.shape == (32, 32) and r.mask.dtype == np.bool_
    assert np.all(r.disparity > 0)


def test_mask_pixels_have_the_object_colour():
    for r in _renders(60, seed=5):
        pix = np.asarray(r.image, np.float64)[r.mask]
        mean = pix.mean(0)
        # Shading scales brightness and highlights add white; neither moves the hue. Vote by hue.
        votes = [_nearest_hue(p) for p in pix]
        assert max(set(votes), key=votes.count) == r.scene.colour, r.caption
        # And the pixels just outside the mask are not the object's colour (the mask is not too small).
        outside = np.asarray(r.image, np.float64)[~r.mask].mean(0)
        assert np.linalg.norm(outside - mean) > 30


def test_depth_object_nearer_than_background():
    for r in _renders(40, seed=6):
        inside = r.depth[r.mask]
        rows = np.nonzero(r.mask.any(1))[0]
        # The floor behind the object (rows above its contact point) is farther than any object pixel.
        behind = r.depth[: rows.max() + 1][~r.mask[: rows.max() + 1]]
        assert inside.max() < behind.min()
    # The floor recedes: lower rows are nearer.
    r = scenes.render(scenes.Scene(position="top", size="small"))
    col = r.depth[:, 2]
    assert np.all(np.diff(col[20:]) < 0)


def test_position_matches_mask_centroid():
    for r in _renders(80, seed=7):
        assert scenes.nearest_position(*scenes.mask_centroid(r.mask)) == r.scene.position, r.caption


def test_size_matches_mask_area():
    areas = {}
    for r in _renders(150, seed=8):
        areas.setdefault(r.scene.kind, {}).setdefault(r.scene.size, []).append(r.mask.sum())
    for kind, by in areas.items():
        assert max(by["small"]) < min(by["large"]), kind


def test_subject_is_the_class_outline_with_its_own_pattern():
    scene = scenes.Scene("box", "red", "large", "center", "snow", seed=2)
    plain = scenes.render(scene)
    subj = scenes.render(scene, subject="checker_box")
    assert subj.caption == "a photo of a large sks box in the center, on snow"
    # Same outline as the class...
    assert (plain.mask ^ subj.mask).sum() <= 2
    # ...but not its colour: the subject uses two colours outside the palette.
    pix = np.asarray(subj.image, np.float64)[subj.mask]
    assert np.abs(pix.mean(0) - np.asarray(plain.image, np.float64)[plain.mask].mean(0)).max() > 40
    assert pix.std(0).max() > 40  # patterned, not flat
    # A subject asked for on another kind takes its class outline.
    assert scenes.render(scenes.Scene(kind="ball"), subject="checker_box").scene.kind == "box"
    with pytest.raises(SdtuneError):
        scenes.render(scene, subject="nope")


def test_caption_grammar_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = scenes.sample_scene(rng)
        stated = scenes.sample_stated(rng, keep=0.5)
        text = scenes.caption(scene, stated=stated)
        want = {k: v for k, v in scene.attrs().items() if k in stated}
        assert scenes.parse(text) == want, text
        subj = scenes.caption(scene, identifier="sks", stated=stated)
        want_s = {k: v for k, v in want.items() if k != "colour"}
        want_s.update(kind=scene.kind, subject="checker_box")  # "sks" is the checker box's identifier
        assert scenes.parse(subj) == want_s, subj
        other = scenes.caption(scene, identifier="zwq", stated=stated)  # an identifier of the user's own
        assert scenes.parse(other, identifier="zwq") == {**want_s, "subject": True}, other
    for name, spec in scenes.SUBJECTS.items():  # each subject's own identifier names it
        assert scenes.parse(f"a photo of {spec['identifier']} {spec['class_noun']}")["subject"] == name
    assert scenes.caption(scenes.Scene("ball", "red", "large", "left", "grass")) == (
        "a photo of a large red ball on the left, on grass"
    )
    assert scenes.caption(scenes.Scene(kind="box", background="snow"), identifier="sks", stated={"background"}) == (
        "a photo of sks box on snow"
    )
    assert scenes.caption(scenes.Scene(colour="blue"), stated={"colour"}) == "a photo of a blue object"
    assert scenes.parse("a red blue ball") == {"kind": "ball"}
    with pytest.raises(SdtuneError):
        scenes.Scene(colour="mauve")


def test_every_grammar_word_is_one_clip_token():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(ROOT / "data/clip_tokenizer/vocab.json"), str(ROOT / "data/clip_tokenizer/merges.txt"))
    words = [w for ws in scenes.CHOICES.values() for w in ws] + [scenes.GENERIC_NOUN, scenes.IDENTIFIER]
    for w in words:
        assert len(tok(w).input_ids) == 3, w  # <start> word <end>


def test_shipped_subject_images_are_reproducible_renders():
    from sdtune.imageio import open_image

    folder = ROOT / "data/subjects/checker_box"
    meta = json.loads((folder / "subject.json").read_text())
    assert meta["class_noun"] == "box" and meta["identifier"] == "sks"
    assert meta["instance_prompt"] == "a photo of sks box" and meta["class_prompt"] == "a photo of a box"
    assert 3 <= len(meta["renders"]) <= 5
    for item in meta["renders"]:
        scene = scenes.Scene("box", "red", item["size"], item["position"], item["background"], seed=item["seed"])
        rendered = scenes.render(scene, subject=meta["name"]).image
        assert open_image(folder / item["file"]).tobytes() == rendered.tobytes(), item["file"]


def test_every_shipped_subject_has_its_renderers_exact_masks(tmp_path):
    """masks/NN.png (for masked_loss) are the subject's own pixels: write_subject's, and what the recipe reads."""
    from sdtune.training.sources import Source, read_examples
    from sdtune.world.subjects import subject_folders, write_subject

    for folder in subject_folders():
        fresh = write_subject(folder.name, tmp_path / folder.name)
        shipped = read_examples(Source(instance_dir=str(folder)), default_caption="p")
        assert len(shipped) == len(list((folder / "masks").glob("*.png"))) >= 3
        for ex in shipped:
            image, mask = ex.image_and_mask()
            mask = np.asarray(mask) > 127
            assert (mask == (np.asarray(Image.open(fresh / "masks" / Path(ex.name).name)) > 127)).all()
            assert 0.01 < mask.mean() < 0.3  # the object, not the scene
            # inside the mask the subject's colours, outside the background: the two differ
            px = np.asarray(image, dtype=float)
            assert np.abs(px[mask].mean(axis=0) - px[~mask].mean(axis=0)).max() > 20


def test_captioned_subjects_name_each_renders_context(tmp_path):
    """write_subject(captions=True): NN.txt, two variants - the identifier and class noun with the position and
    background subject.json records, in the words the judge parses, and the instance prompt alone - which the
    recipe trains on. The shipped folders have them exactly where scenes.SUBJECTS says (measured per subject)."""
    from sdtune.training.sources import Source, read_examples
    from sdtune.world.subjects import subject_folders, write_subject

    shipped = {}
    for folder in subject_folders():
        meta = json.loads((folder / "subject.json").read_text())
        shipped[folder.name] = sorted(p.name for p in folder.glob("*.txt"))
        as_shipped = write_subject(folder.name, tmp_path / "as_shipped" / folder.name)
        assert sorted(p.name for p in as_shipped.glob("*.txt")) == shipped[folder.name]
        for name in shipped[folder.name]:  # reproducible, as the images are
            assert (folder / name).read_text() == (as_shipped / name).read_text()
        fresh = write_subject(folder.name, tmp_path / folder.name, captions=True)
        captions = {Path(ex.name).name: ex.caption for ex in read_examples(
            Source(instance_dir=str(fresh)), default_caption="unused", identifier=meta["identifier"])}
        for item in meta["renders"]:
            caption, plain = captions[item["file"]].splitlines()
            assert plain == meta["instance_prompt"]
            said = scenes.parse(caption, meta["identifier"])
            assert said["subject"] and said["kind"] == meta["class_noun"]
            assert (said["position"], said["background"]) == (item["position"], item["background"])
        write_subject(folder.name, fresh, captions=False)  # rewritten without captions: none stay behind
        assert not list(fresh.glob("*.txt"))
    assert all(shipped[name] == [f"{i:02d}.txt" for i in range(4)] for name in ("checker_box", "crescent", "twotone_ball"))
