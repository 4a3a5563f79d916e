"""The page's forms without a page: every bad value said on its field, the Train tab's key fields made from the
config's declarations with the recipe's defaults, the captions, table and status lines, the pickers' names, the
Runs tab's files, card images, metrics and "Use in Generate", and relative paths found where the README says."""
import json

import pytest
from PIL import Image

from sdtune.errors import SdtuneError

GOOD = dict(prompt="a photo", steps=20, guidance=7.5, seed=0, width=0, height=0, num_images=1, strength=0.8,
            lora="", lora_scale=1.0, guidance_interval="")


@pytest.mark.parametrize("mode, change, field, words", [
    ("txt2img", dict(prompt="  "), "prompt", "prompt is empty"),
    ("txt2img", dict(steps=-5), "steps", "steps -5: a whole number from 1 to 1000"),
    ("txt2img", dict(steps=20.5), "steps", "steps 20.5: a whole number"),
    ("txt2img", dict(steps=None), "steps", "steps (empty)"),
    ("txt2img", dict(guidance=-1), "guidance", "guidance -1: a number >= 0"),
    ("txt2img", dict(seed=-2), "seed", "or -1 for a random one"),
    ("txt2img", dict(width=60), "width", "width 60: 0 (the model's size) or a multiple of 8"),
    ("txt2img", dict(height=4), "height", "a multiple of 8"),
    ("txt2img", dict(num_images=9), "num_images", "images 9: a whole number from 1 to 8"),
    ("img2img", dict(strength=0), "strength", "strength 0: a number in (0, 1]"),
    ("inpaint", dict(strength=1.5), "strength", "strength 1.5"),
    ("img2img", dict(strength=0.02, steps=20), "strength", "leaves no denoising step"),
    ("txt2img", dict(lora="dog", lora_scale=None), "lora_scale", "LoRA scale (empty): a number"),
    ("txt2img", dict(guidance_interval="0.8,0.2"), "guidance_interval", "two noise levels LO,HI"),
])
def test_each_bad_generate_value_is_said_on_its_field(mode, change, field, words):
    from sdtune.ui.checks import generate_problems

    assert generate_problems(mode, **GOOD) == {}
    assert generate_problems("txt2img", **{**GOOD, "strength": 7}) == {}  # txt2img has no strength
    problems = generate_problems(mode, **{**GOOD, **change})
    assert list(problems) == [field] and words in problems[field]
    assert "\n" not in problems[field]


def test_the_handler_refuses_what_the_field_says_and_loads_nothing(sandbox):
    """A caller of the API (no page, no validator) gets the same line, and nothing is generated."""
    from sdtune.ui.app import State, generate_handler

    state = State(sandbox, None, None)  # no generator: it must not be reached
    _, _, status, _, _, _ = generate_handler(state, "txt2img", None, "", "", "", 1.0, "", "", -5, 7.5, 0, 0, 0,
                                             "default", 1, 0.8, None, None, [])
    assert status == "sdtune: error: prompt is empty: describe the image (an empty prompt makes an " \
                     "unconditional image, not yours)"


def test_the_mode_decides_which_inputs_show():
    from sdtune.ui.app import mode_view

    shown = {m: {k for k, v in mode_view(m).items() if v["visible"]}
             for m in ("txt2img", "img2img", "inpaint", "depth2img")}
    assert shown["txt2img"] == set()
    assert shown["img2img"] == {"strength", "input_file", "input_note", "editor"}
    assert shown["inpaint"] == shown["img2img"] | {"inpaint_model"}
    assert shown["depth2img"] == shown["img2img"] | {"depth_model", "depth_upload", "depth_view"}
    assert "paint" in mode_view("inpaint")["editor"]["label"] and "paint" not in mode_view("img2img")["editor"]["label"]


def test_a_dropped_input_that_is_not_an_image_is_said_at_once(tmp_path):
    from sdtune.ui.app import UNCHANGED, input_image_handler

    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    assert input_image_handler(str(fake)) == (UNCHANGED, "sdtune: error: input image notes.png is not an image "
                                                         "(it could not be decoded)", None)
    good = tmp_path / "ok.png"
    Image.new("RGB", (64, 48)).save(good)
    value, note, box = input_image_handler(str(good))
    assert value["background"] == str(good) and note == "input image ok.png: 64x48" and box is None


def test_a_dropped_depth_map_that_is_not_an_image_is_said_at_once(tmp_path):
    from sdtune.ui.generate_tab import UNCHANGED, depth_map_handler

    fake = tmp_path / "depth.png"
    fake.write_bytes(b"%PDF-1.4")
    assert depth_map_handler(str(fake)) == (None, "sdtune: error: depth map depth.png is not an image (it could not "
                                                  "be decoded)")
    Image.new("L", (32, 32)).save(fake)
    assert depth_map_handler(str(fake)) == (UNCHANGED, "depth map depth.png: 32x32")


def test_captions_table_and_status_say_what_an_image_is():
    from sdtune.ui.views import caption, params_table

    params = {"mode": "txt2img", "seed": 5, "lora": "/o/ui_box", "lora_scale": 0.75, "prompt": "a | b",
              "steps": 20, "guidance": 7.5, "image": None, "scheduler": "pndm"}
    assert caption(params) == "txt2img · seed 5 · LoRA ui_box ×0.75"
    assert caption({**params, "lora": None}) == "txt2img · seed 5 · no LoRA"
    table = params_table(params)
    rows = table.splitlines()
    assert rows[:3] == ["| parameter | value |", "|---|---|", "| mode | txt2img |"]
    assert "| prompt | a \\| b |" in rows and "image" not in table  # nulls left out: the JSON has them


def test_the_pickers_name_what_they_hold(sandbox):
    from sdtune.ui.runs import model_choices

    for kind, channels in (("inpaint", 9), ("depth", 5), ("base", 4)):
        (sandbox.outputs / f"full_{kind}" / "unet").mkdir(parents=True)
        (sandbox.outputs / f"full_{kind}" / "model_index.json").write_text("{}")
        (sandbox.outputs / f"full_{kind}" / "unet" / "config.json").write_text(json.dumps({"in_channels": channels}))
    base, inpaint, depth = (model_choices(sandbox, k) for k in ("base", "inpaint", "depth"))
    assert [label for label, _ in base][-1:] == ["full_base"] and "embedded" not in " ".join(l for l, _ in base[1:])
    assert inpaint[0][1] == "" and inpaint[0][0] in ("embedded inpaint (default)", "default (no inpaint model)")
    assert [label for label, _ in inpaint[1:]] == ["full_inpaint"] and [label for label, _ in depth[1:]] == \
        ["full_depth"]


# ---------------------------------------------------------------- the Train tab's fields

def test_the_key_fields_come_from_the_declarations_with_the_recipes_defaults():
    from sdtune.training.config import FIELDS as DECLARED
    from sdtune.ui.train_form import BASE_CONFIG, FIELDS
    from sdtune.yamlfile import read_yaml

    recipe = read_yaml(BASE_CONFIG)
    keys = [f.key for f in FIELDS]
    assert {"max_steps", "learning_rate", "lora_rank", "lora_alpha", "resolution", "train_batch_size",
            "with_prior_preservation", "num_class_images", "caption_dropout"} <= set(keys)
    for f in FIELDS:
        assert f.default == recipe[f.key] and DECLARED[f.key].metadata["help"] in f.info  # the help: its tooltip
    assert {f.key: f.default for f in FIELDS}["with_prior_preservation"] is True  # DreamBooth's own default


@pytest.mark.parametrize("key, value, words", [
    ("max_steps", -5, "max train steps -5: a whole number, >= 1"),
    ("learning_rate", 0, "learning rate 0: a number, > 0"),
    ("lora_rank", 2.5, "network rank (dimension) 2.5: a whole number"),
    ("lora_alpha", -1, "network alpha (0 = the rank) -1: a number, > 0, or 0 for the rank (scale 1)"),
    ("resolution", 60, "resolution (0 = the model's) 60: a whole number, a positive multiple of 8, or 0 for the "
                       "model's own size"),
    ("train_batch_size", "", "train batch size (empty)"),
    ("caption_dropout", 1, "caption dropout rate 1: a number, in [0, 1)"),
    ("num_class_images", 0, "class images 0: a whole number, >= 1"),
    ("method", "dora", "method dora: one of lora, full"),
])
def test_each_bad_key_field_is_said_in_the_keys_own_terms(key, value, words):
    from sdtune.ui.checks import train_problems
    from sdtune.ui.train_form import FIELDS

    defaults = {f.key: f.default for f in FIELDS}
    assert train_problems(defaults) == {}
    problems = train_problems({**defaults, key: value})
    assert list(problems) == [key] and problems[key].startswith(words.split(":")[0]) and words in problems[key]


def test_the_forms_defaults_are_the_recipes_run(sandbox, subject_images):
    """Started with the form untouched, the run is the recipe's: prior preservation on, its rank, learning rate,
    batch and caption dropout; the class prompts follow the class noun; the model card says prior preservation."""
    from sdtune.training.model_card import render_model_card
    from sdtune.ui.train_form import FIELDS, recipe
    from sdtune.ui.training import Trainer

    defaults = {f.key: f.default for f in FIELDS}
    data, run_dir = Trainer(sandbox).build_config(name="dog", images=subject_images, identifier="sks",
                                                  class_noun="dog", keys=defaults)
    for key in ("with_prior_preservation", "num_class_images", "lora_rank", "lora_alpha", "learning_rate",
                "train_batch_size", "caption_dropout", "resolution", "max_steps"):
        assert data[key] == recipe()[key], key
    assert data["class_prompt"] == "a photo of a dog" and data["class_prompts"] is None  # not the box's contexts
    assert data["class_dir"] == str(sandbox.outputs / "class_images" / "dog")
    card = render_model_card(data, base_model="base", method="lora", steps=1, family="sd", prediction_type="epsilon",
                             files=[], samples=[])
    assert "with prior preservation" in card and "without prior preservation" not in card
    boxes, _ = Trainer(sandbox).build_config(name="box", folder="data/subjects/checker_box", identifier="sks",
                                             class_noun="box", keys=defaults)
    assert boxes["class_prompts"] == recipe()["class_prompts"]  # the recipe's own photos: its own class prompts
    with pytest.raises(SdtuneError, match="max train steps 0: a whole number, >= 1"):
        Trainer(sandbox).build_config(name="dog", images=subject_images, class_noun="dog",
                                      keys={**defaults, "max_steps": 0})


def test_uploaded_photos_show_as_thumbnails_and_a_bad_one_is_named(tmp_path, subject_images):
    from sdtune.ui.app import photos_handler

    thumbs, note = photos_handler(subject_images)
    assert [p for p, _ in thumbs] == subject_images and note.startswith(f"{len(subject_images)} photo(s)")
    fake = tmp_path / "x.jpg"
    fake.write_text("no")
    thumbs, note = photos_handler([*subject_images, str(fake)])
    assert len(thumbs) == len(subject_images) and note == "sdtune: error: training image x.jpg is not an image " \
                                                           "(it could not be decoded)"


def test_the_time_estimate_is_the_last_runs_measured_rate(sandbox):
    from sdtune.ui.training import RATE_FILE, Trainer, duration

    trainer = Trainer(sandbox)
    assert "none yet" in trainer.estimate(100)
    (sandbox.outputs / "ui").mkdir()
    (sandbox.outputs / "ui" / RATE_FILE).write_text(json.dumps({"steps_per_s": 2.5, "run": "box",
                                                                "train_batch_size": 2, "resolution": 64}))
    assert trainer.estimate(1500).startswith("estimated 10 min 00 s for 1500 steps at 2.50 steps/s, measured on run "
                                             "box (batch size 2, resolution 64)")
    assert (duration(12.4), duration(200), duration(3700)) == ("12 s", "3 min 20 s", "1 h 01 min")


# ---------------------------------------------------------------- the Runs tab

@pytest.fixture
def lora_run(sandbox):
    from safetensors.torch import save_file
    import torch

    run = sandbox.outputs / "dog"
    (run / "samples").mkdir(parents=True)
    (run / "checkpoint-10").mkdir()
    (run / "logs").mkdir()
    save_file({"x": torch.zeros(1)}, str(run / "pytorch_lora_weights.safetensors"),
              metadata={"sdtune_recommended": json.dumps({"guidance": 4.5, "lora_scale": 0.75,
                                                          "guidance_interval": None})})
    (run / "README.md").write_text("# DreamBooth LoRA\n\n## Samples\n\n![final-0](samples/final-0.png)\n"
                                   "![elsewhere](/etc/passwd)\n")
    (run / "ui_config.yaml").write_text("validation_prompts: [a photo of sks dog]\n")
    for name in ("step-000010-0.png", "final-0.png"):
        Image.new("RGB", (8, 8)).save(run / "samples" / name)
    return run


def test_a_runs_card_images_are_served_and_its_files_listed(sandbox, lora_run):
    from sdtune.ui.app import State, runs_handler
    from sdtune.ui.runs import FILE_ROUTE

    card, samples, metrics, about, info, files = runs_handler(State(sandbox, None, None), "dog")
    assert f"![final-0]({FILE_ROUTE}{lora_run / 'samples' / 'final-0.png'})" in card
    assert "![elsewhere](/etc/passwd)" in card  # not a file of the run: left as written
    assert {label for _, label in samples} == {"step 10 · a photo of sks dog", "final · a photo of sks dog"}
    assert [p.rsplit("/", 1)[1] for p in files] == ["README.md", "pytorch_lora_weights.safetensors", "ui_config.yaml"]
    assert metrics is None and about.startswith("no metrics for this run") and "eval_every" in about
    (lora_run / "eval.jsonl").write_text(json.dumps({"step": 0, "likeness": 0.1}) + "\n" +
                                         json.dumps({"step": 20, "likeness": 0.6}) + "\n")
    _, _, metrics, about, _, _ = runs_handler(State(sandbox, None, None), "dog")
    assert metrics == {"step": 20, "likeness": 0.6} and "the last of 2 evaluations" in about


def test_use_in_generate_brings_the_loras_recommended_settings(sandbox, lora_run):
    from sdtune.ui.app import State, use_in_generate

    state = State(sandbox, None, None)
    out = use_in_generate(state, "dog")
    assert out["lora"] == str(lora_run) and (out["guidance"], out["lora_scale"], out["guidance_interval"]) == \
        (4.5, 0.75, "")
    assert out["status"].startswith("using the LoRA dog with its recommended settings: guidance 4.5")
    assert use_in_generate(state, "") == {"status": "sdtune: error: pick a run first"}


# ---------------------------------------------------------------- relative paths

def test_the_shipped_data_is_found_as_the_readme_writes_it(sandbox):
    from sdtune import DATA_DIR

    assert sandbox.resolve("data/subjects/checker_box", "image folder", kind="dir") == \
        (DATA_DIR / "subjects" / "checker_box").resolve()
    with pytest.raises(SdtuneError) as exc:
        sandbox.resolve("data/subjects/no_such", "image folder", kind="dir")
    assert str(exc.value) == (f"image folder: data/subjects/no_such does not exist (looked for "
                              f"{sandbox.outputs / 'data/subjects/no_such'} or {DATA_DIR / 'subjects/no_such'})")
    with pytest.raises(SdtuneError, match=f"looked for {sandbox.outputs / 'photos'}"):
        sandbox.resolve("photos", "image folder", kind="dir")


def test_the_pages_tabs_hold_nothing_but_tabs(tmp_path):
    """A component directly in the Tabs (a Timer made outside its tab) makes the browser show one tab's name in
    place of another's once it is opened."""
    pytest.importorskip("gradio")
    import gradio as gr

    from sdtune.ui.app import build, make_state

    demo = build(make_state(tmp_path / "outputs"))
    (tabs,) = [b for b in demo.blocks.values() if isinstance(b, gr.Tabs)]
    assert [(type(c).__name__, c.label) for c in tabs.children] == \
        [("Tab", "Generate"), ("Tab", "Train"), ("Tab", "Runs"), ("Tab", "Inspect")]


def test_the_train_poll_stops_while_another_tab_is_shown(tmp_path):
    """A ticking timer clears the messages on the fields: opening Generate, Runs or Inspect stops the Train tab's
    poll; opening Train polls once and goes on only while a run is being watched."""
    pytest.importorskip("gradio")
    import gradio as gr

    from sdtune.ui.app import build, make_state

    demo = build(make_state(tmp_path / "outputs"))
    (timer,) = [b for b in demo.blocks.values() if isinstance(b, gr.Timer)]
    tabs = {b.label: b for b in demo.blocks.values() if isinstance(b, gr.Tab)}
    for label in ("Generate", "Runs", "Inspect", "Train"):
        selects = [f for f in demo.fns.values() if (tabs[label]._id, "select") in f.targets and timer in f.outputs]
        assert len(selects) == 1, label
    assert not timer.active  # an idle page does not poll


def test_a_bad_field_is_said_in_the_status_line_too(sandbox, subject_images):
    """Without the page's validator (an API caller, or while a run trains), Start says the field's line."""
    from sdtune.ui.app import State, train_start_handler
    from sdtune.ui.train_form import FIELDS
    from sdtune.ui.training import Trainer

    keys = {f.key: f.default for f in FIELDS} | {"max_steps": -5}
    state = State(sandbox, None, Trainer(sandbox))
    status = train_start_handler(state, "run1", subject_images, "", "sks", "box", None, "",
                                 *(keys[f.key] for f in FIELDS))
    assert status == "sdtune: error: max train steps -5: a whole number, >= 1"
    assert not state.trainer.running() and not (sandbox.outputs / "run1").exists()


def test_use_in_generate_takes_a_full_fine_tune_as_the_model(sandbox):
    from sdtune.ui.app import State, use_in_generate

    full = sandbox.outputs / "cat_full"
    (full / "unet").mkdir(parents=True)
    (full / "model_index.json").write_text("{}")
    (sandbox.outputs / "half").mkdir()
    (sandbox.outputs / "half" / "ui_config.yaml").write_text("max_steps: 10\n")  # started, no weights yet
    state = State(sandbox, None, None)
    assert use_in_generate(state, "cat_full") == {"model": str(full), "lora": "",
                                                  "status": "using the model cat_full (no LoRA)"}
    assert use_in_generate(state, "half") == {"status": "sdtune: error: run half has no weights yet (in progress)"}
