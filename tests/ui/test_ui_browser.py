"""The web UI in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium), in a
1400x1000 window as a person would open it.

Open the page: Generate above the fold, the gallery beside the settings; txt2img and see the image, its caption,
its parameters table and a status with the time; bad values said on their fields with nothing run; the mode
showing its inputs; a non-image input said at once; paint a mask and inpaint; depth2img; a dropped PNG restores the
form. Train: photos with thumbnails, the key fields, a bad one said on its field; a 20-step LoRA with prior
preservation from the form's defaults, watched to the end (rate and time left, labelled samples, the status
following it); Stop and Resume. Runs: the card with its images, the files downloaded, metrics or why not, "Use in
Generate" and another image than without the LoRA. Inspect's tools. With SDTUNE_UI_SCREENSHOTS=DIR the flow is
saved there as PNGs (the docs' figures: SDTUNE_UI_SCREENSHOTS=docs/ui).
"""
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from uihelpers import SUBJECT, needs_embedded

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = os.environ.get("SDTUNE_UI_SCREENSHOTS")


def _requirements():
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.skip("gradio is not installed (pip install -e '.[ui]')")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip("Chromium is not installed (apt-get install -y chromium chromium-driver)")
    needs_embedded()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _requirements()
    import torch

    from sdtune.ui.app import launch, make_state

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the training subprocess inherits it
    state = make_state(tmp_path_factory.mktemp("ui") / "outputs")
    demo, url = launch(state, host="127.0.0.1", port=None, block=False, quiet=True)
    yield state, url
    state.trainer.shutdown()
    demo.close()


@pytest.fixture(scope="module")
def page(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="sdtune-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.get(server[1])
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


# ---------------------------------------------------------------- helpers

def wait_for(check, timeout=60.0, what="condition"):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # an element re-rendered between find and read
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def text_of(driver, elem_id):
    return css(driver, f"#{elem_id} textarea, #{elem_id} input").get_attribute("value")


def type_into(driver, elem_id, text):
    from selenium.webdriver.common.keys import Keys

    box = css(driver, f"#{elem_id} textarea, #{elem_id} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(str(text))


def tab(driver, name):
    from selenium.webdriver.common.by import By

    buttons = [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name]
    buttons[0].click()
    time.sleep(0.5)


def choose(driver, elem_id, label):
    """Pick ``label`` in a Gradio dropdown as a user does: open it, click the option."""
    from selenium.webdriver.common.by import By

    css(driver, f"#{elem_id} input").click()
    option = wait_for(lambda: [li for li in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} li[role=option]")
                               if li.get_attribute("aria-label") == label], 10, f"option {label}")[0]
    option.click()
    time.sleep(0.3)


def radio(driver, elem_id, label):
    from selenium.webdriver.common.by import By

    [lb for lb in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} label") if lb.text.strip() == label][0].click()


def shot(driver, name, height=1000):
    """The page as a person sees it (the window's 1400 px width), ``height`` px tall from the top."""
    if SHOTS:
        out = Path(SHOTS)
        out.mkdir(parents=True, exist_ok=True)
        driver.set_window_size(1400, height)
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.8)
        path = out / f"{name}.png"
        driver.save_screenshot(str(path))
        driver.set_window_size(1400, 1000)
        img = Image.open(path)
        img.convert("P", palette=Image.ADAPTIVE, colors=128).save(path, optimize=True)  # small figures


def rect(driver, selector):
    return driver.execute_script("const r = document.querySelector(arguments[0]).getBoundingClientRect();"
                                 "return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, "
                                 "height: r.height}", selector)


def field_error(driver, elem_id):
    """The validation message gradio shows on a field (empty when there is none)."""
    return driver.execute_script("const e = document.querySelector('#' + arguments[0] + ' .validation-error');"
                                 "return e ? e.textContent.trim() : ''", elem_id)


def shown(driver, elem_id):
    """Whether a component is on the page (gradio leaves a hidden one out of the page altogether)."""
    from selenium.webdriver.common.by import By

    return any(e.is_displayed() for e in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id}"))


def images_in(state):
    return len(list(state.generator.images_dir.glob("*.png"))) if state.generator.images_dir.is_dir() else 0


def generate_and_wait(driver, state):
    before = images_in(state)
    old = text_of(driver, "gen-status")
    css(driver, "#generate").click()
    wait_for(lambda: (s := text_of(driver, "gen-status")) and (" done at " in s and images_in(state) > before
                                                               or s.startswith("sdtune") and s != old),
             90, "the generation's status")
    status = text_of(driver, "gen-status")
    assert " done at " in status, status
    # the page shows the image: the gallery's newest <img> has loaded real pixels
    wait_for(lambda: driver.execute_script(
        "const i = document.querySelector('#gallery img'); return i && i.complete && i.naturalWidth > 0"),
        20, "the gallery image")
    newest = max(state.generator.images_dir.glob("*.png"), key=lambda p: p.stat().st_mtime)
    return newest, json.loads(newest.with_suffix(".json").read_text())


# ---------------------------------------------------------------- the tests (in page order: they share one page)

def test_the_page_opens_with_four_tabs(page):
    from selenium.webdriver.common.by import By

    wait_for(lambda: page.title == "sdtune", 30, "the page title")
    wait_for(lambda: len(page.find_elements(By.CSS_SELECTOR, "button[role=tab]")) >= 4, 30, "the tabs")
    names = [b.text.strip() for b in page.find_elements(By.CSS_SELECTOR, "button[role=tab]")]
    assert names[:4] == ["Generate", "Train", "Runs", "Inspect"]
    no_remote = page.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".filter(n => !n.startsWith(location.origin) && !n.startsWith('data:') && !n.startsWith('blob:'))")
    assert no_remote == []  # no web fonts, CDN or analytics requests


def test_generate_sits_at_the_top_and_the_gallery_beside_the_settings(page):
    """In a 1400x1000 window: prompt, negative prompt and Generate at the top; the gallery to the right of the
    settings and in view; no input of an image-less mode shown; no stray horizontal scrollbar."""
    prompt, go = rect(page, "#prompt"), rect(page, "#generate")
    settings, gallery = rect(page, "#settings"), rect(page, "#gallery")
    assert go["bottom"] < 450 and prompt["top"] < 300 and abs(go["top"] - prompt["top"]) < 60
    assert gallery["left"] >= settings["right"] - 1 and gallery["top"] < 1000 - 150
    assert not shown(page, "editor") and not shown(page, "strength")
    assert page.execute_script("return [...document.querySelectorAll('#settings .row, #settings .form')]"
                               ".every(e => e.scrollWidth <= e.clientWidth + 1)")
    assert page.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


def test_txt2img_shows_the_image_its_caption_table_and_the_time(page, server):
    state = server[0]
    type_into(page, "prompt", "a photo of a red ball on grass")
    type_into(page, "seed", 11)
    png, params = generate_and_wait(page, state)
    assert params["mode"] == "txt2img" and params["seed"] == 11 and params["prompt"] == "a photo of a red ball on grass"
    assert params["model"].endswith("data/models/base") and Image.open(png).size == (64, 64)
    status = text_of(page, "gen-status")
    assert status.startswith("txt2img done at ") and "(64x64, seed 11)" in status
    wait_for(lambda: "txt2img · seed 11 · no LoRA" in css(page, "#gallery").text, 10, "the caption")
    # a 64 px image is not blown up into one tile: shown at most at its size, crisp when zoomed
    fit, rendering = page.execute_script("const s = getComputedStyle(document.querySelector('#gallery img'));"
                                         "return [s.objectFit, s.imageRendering]")
    assert fit == "scale-down" and rendering == "pixelated"
    table = css(page, "#params-table").text
    assert "seed 11" in table and "prompt a photo of a red ball on grass" in table and "None" not in table
    assert not shown(page, "params")  # the JSON: one click away, in its accordion
    type_into(page, "seed", 12)
    generate_and_wait(page, state)
    assert text_of(page, "gen-status") != status and "seed 12" in text_of(page, "gen-status")  # visibly new


@pytest.mark.parametrize("elem_id, value, words", [
    ("prompt", "", "prompt is empty"),
    ("steps", -5, "steps -5: a whole number from 1 to 1000"),
    ("guidance", -1, "guidance -1: a number >= 0"),
    ("width", 60, "width 60: 0 (the model's size) or a multiple of 8"),
])
def test_a_bad_value_is_said_on_its_field_and_nothing_runs(page, server, elem_id, value, words):
    state = server[0]
    good = {"prompt": "a photo of a red ball on grass", "steps": 20, "guidance": 7.5, "width": 0}[elem_id]
    before, status = images_in(state), text_of(page, "gen-status")
    type_into(page, elem_id, value)
    css(page, "#generate").click()
    wait_for(lambda: words in field_error(page, elem_id), 15, f"the message on {elem_id}")
    time.sleep(1.0)
    assert images_in(state) == before and text_of(page, "gen-status") == status  # nothing ran, nothing clamped
    assert text_of(page, elem_id) == str(value)
    shot(page, f"generate-error-{elem_id}") if elem_id == "steps" else None
    type_into(page, elem_id, good)


def test_the_mode_shows_its_inputs_and_a_non_image_is_said_at_once(page, tmp_path):
    radio(page, "mode", "img2img")
    wait_for(lambda: shown(page, "editor") and shown(page, "strength"), 10, "img2img")
    assert not shown(page, "depth-upload") and not shown(page, "inpaint-model")
    radio(page, "mode", "depth2img")
    wait_for(lambda: shown(page, "depth-upload") and shown(page, "depth-model"), 10,
             "depth2img")
    assert "embedded depth (default)" in text_of(page, "depth-model")
    radio(page, "mode", "inpaint")
    wait_for(lambda: shown(page, "inpaint-model") and not shown(page, "depth-upload"),
             10, "inpaint")
    assert text_of(page, "inpaint-model") == "embedded inpaint (default)"
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    css(page, "#input-file input[type=file]").send_keys(str(fake))
    wait_for(lambda: "input image notes.png is not an image" in css(page, "#input-note").text, 20, "the note")


def test_paint_a_mask_and_inpaint(page, server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    state = server[0]
    radio(page, "mode", "inpaint")
    css(page, "#input-file input[type=file]").send_keys(str(SUBJECT / "00.png"))
    wait_for(lambda: "input image 00.png: 64x64" in css(page, "#input-note").text, 20, "the input's note")
    wait_for(lambda: page.execute_script("return !!document.querySelector('#editor canvas')"), 20, "the canvas")
    time.sleep(1.5)
    editor = css(page, "#editor")
    editor.find_element(By.CSS_SELECTOR, "button[aria-label=Brush]").click()
    time.sleep(0.3)
    canvas = editor.find_elements(By.CSS_SELECTOR, "canvas")[-1]
    # a stroke across the middle of the image: real pointer events on the editor's canvas
    ActionChains(page).move_to_element_with_offset(canvas, -40, -10).click_and_hold() \
        .move_by_offset(20, 0).move_by_offset(20, 5).move_by_offset(20, 5).move_by_offset(20, 0).release().perform()
    time.sleep(0.5)
    type_into(page, "prompt", "a photo of a red ball on grass")
    png, params = generate_and_wait(page, state)
    assert params["mode"] == "inpaint" and params["unet"] == "inpainting 9-channel"
    mask = np.asarray(Image.open(params["mask"]).convert("L"))
    painted = (mask > 127).mean()
    assert 0.005 < painted < 0.6, painted  # a stroke, not nothing and not everything


def test_depth2img_shows_the_estimated_depth(page, server):
    radio(page, "mode", "depth2img")
    png, params = generate_and_wait(page, server[0])
    assert params["mode"] == "depth2img" and params["depth_source"] == "estimator"
    wait_for(lambda: page.execute_script(
        "const i = document.querySelector('#depth-view img'); return i && i.complete && i.naturalWidth > 0"),
        20, "the estimated depth map")


def test_a_dropped_png_restores_the_form(page, server):
    from selenium.webdriver.common.by import By

    state = server[0]
    (path, _, _), = state.generator.generate("txt2img", prompt="a photo of a yellow cone", steps=3, seed=1234,
                                             guidance=4.5)
    [b for b in page.find_elements(By.CSS_SELECTOR, "button") if "restore the settings" in b.text][0].click()
    time.sleep(0.5)
    css(page, "#restore input[type=file]").send_keys(str(path))
    wait_for(lambda: text_of(page, "prompt") == "a photo of a yellow cone", 20, "the restored prompt")
    assert text_of(page, "seed") == "1234" and "restored the settings" in text_of(page, "gen-status")
    radio(page, "mode", "txt2img")
    type_into(page, "steps", 20)
    type_into(page, "guidance", 7.5)


def test_train_a_lora_from_the_forms_defaults_and_watch_it_to_the_end(page, server):
    """The key fields as kohya_ss shows them, the recipe's defaults (prior preservation on); thumbnails of the
    photos; a bad field said on it; the run watched to its end; the model card says prior preservation."""
    state = server[0]
    tab(page, "Train")
    assert css(page, "#train-with-prior-preservation input").is_selected()  # the recipe's default
    assert text_of(page, "train-lora-rank") == "32" and text_of(page, "train-learning-rate") == "0.0005"
    assert "optimiser steps" in css(page, "#train-max-steps").text  # the key's help, shown with the field
    lines = page.execute_script("const r = document.createRange(); r.selectNodeContents(document.querySelector("
                                "'#train-stop')); return new Set([...r.getClientRects()].map(x => x.top)).size")
    assert rect(page, "#train-start")["bottom"] < 300 and lines == 1  # Start in view; Stop's label on one line
    type_into(page, "train-name", "ui_box")
    type_into(page, "train-folder", "data/subjects/no_such_subject")  # relative: said where it was looked for
    css(page, "#train-start").click()
    wait_for(lambda: "data/subjects/no_such_subject does not exist (looked for " in text_of(page, "train-status"), 15,
             "the folder's message")
    assert str(state.sandbox.outputs / "data" / "subjects" / "no_such_subject") in text_of(page, "train-status")
    type_into(page, "train-folder", "")
    css(page, "#train-images input[type=file]").send_keys("\n".join(str(p) for p in sorted(SUBJECT.glob("*.png"))))
    wait_for(lambda: page.execute_script(
        "return [...document.querySelectorAll('#train-thumbs img')].filter(i => i.naturalWidth > 0).length") == 4,
        30, "the photos' thumbnails")
    type_into(page, "train-max-steps", -5)
    css(page, "#train-start").click()
    wait_for(lambda: "max train steps -5: a whole number, >= 1" in field_error(page, "train-max-steps"), 15,
             "the message on steps")
    assert not (state.sandbox.outputs / "ui_box").exists()
    type_into(page, "train-max-steps", 20)
    type_into(page, "train-num-class-images", 4)  # prior preservation stays on: 4 class images, drawn once
    type_into(page, "train-lora-rank", 4)  # a lighter run than the recipe's, for two CPU cores
    type_into(page, "train-lora-alpha", 4)
    type_into(page, "train-train-batch-size", 1)
    shot(page, "train-form", 1400)
    css(page, "#train-start").click()
    wait_for(lambda: text_of(page, "train-status").startswith(("started ui_box", "ui_box", "sdtune")), 30, "the start")
    assert not text_of(page, "train-status").startswith("sdtune"), text_of(page, "train-status")
    seen = set()

    def finished():
        line = text_of(page, "train-progress")
        seen.add(line)
        assert not line.startswith("failed"), line
        return line.startswith("finished")

    wait_for(finished, 180, "the training to finish")
    assert any(s.startswith("running: step") and " steps/s, about " in s and " left" in s for s in seen), seen
    wait_for(lambda: text_of(page, "train-status").startswith("ui_box finished at "), 10, "the status's end")
    run = state.sandbox.outputs / "ui_box"
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert "with prior preservation" in (run / "README.md").read_text()
    wait_for(lambda: page.execute_script(
        "const i = document.querySelector('#train-samples img'); return i && i.naturalWidth > 0"), 20, "samples")
    wait_for(lambda: "step 10 · a photo of sks box" in css(page, "#train-samples").text, 10, "the samples' labels")
    type_into(page, "train-max-steps", 1500)
    wait_for(lambda: "for 1500 steps at" in css(page, "#train-estimate").text, 10, "the time estimate")
    shot(page, "train", 1300)


def test_stop_checkpoints_and_resume_finishes(page, server):
    state = server[0]
    tab(page, "Train")
    type_into(page, "train-name", "ui_stop")  # the four uploads are still in the file box
    type_into(page, "train-max-steps", 40)
    css(page, "#train-start").click()
    wait_for(lambda: text_of(page, "train-progress").startswith("running: step")
             and int(text_of(page, "train-progress").split("step ")[1].split("/")[0]) >= 3, 60, "a few steps")
    css(page, "#train-stop").click()
    wait_for(lambda: text_of(page, "train-progress").startswith("stopped"), 60, "the stop")
    wait_for(lambda: text_of(page, "train-status").startswith("ui_stop stopped at "), 10, "the stopped status")
    run = state.sandbox.outputs / "ui_stop"
    checkpoints = sorted(run.glob("checkpoint-*"))
    assert checkpoints and not (run / "pytorch_lora_weights.safetensors").exists()
    css(page, "#train-resume").click()
    wait_for(lambda: text_of(page, "train-status").startswith(("resuming", "ui_stop is training")), 20, "the resume")
    wait_for(lambda: text_of(page, "train-progress").startswith("finished: step 40/40"), 120, "the resumed run")
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert any(f"resumed from {checkpoints[-1]}" in line for line in state.trainer.job("ui_stop").lines)


def test_runs_card_files_and_metrics_then_use_in_generate(page, server):
    """The card's images render, each file downloads, metrics say why there are none; "Use in Generate" puts the
    LoRA in the Generate tab, whose image then differs from the one without it."""
    from selenium.webdriver.common.by import By

    state = server[0]
    run = state.sandbox.outputs / "ui_box"
    tab(page, "Runs")
    choose(page, "run-pick", "ui_box")
    wait_for(lambda: "sks box" in css(page, "#run-card").text, 20, "the model card")
    wait_for(lambda: page.execute_script(
        "const i = [...document.querySelectorAll('#run-card img')]; return i.length > 0 && "
        "i.every(x => x.complete && x.naturalWidth > 0)"), 20, "the card's images")
    assert "with prior preservation" in css(page, "#run-card").text
    assert "no metrics for this run" in css(page, "#run-metrics-note").text
    links = wait_for(lambda: {a.get_attribute("href").rsplit("/", 1)[1]: a.get_attribute("href")
                              for a in page.find_elements(By.CSS_SELECTOR, "#run-files a[download]")},
                     20, "the files' links")
    assert {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md"} <= set(links), links
    size = page.execute_script("const r = await fetch(arguments[0]); return (await r.arrayBuffer()).byteLength",
                               links["pytorch_lora_weights.safetensors"])
    assert size == (run / "pytorch_lora_weights.safetensors").stat().st_size  # the download is the file
    shot(page, "runs", 1200)

    css(page, "#run-use").click()
    wait_for(lambda: shown(page, "prompt"), 10, "the Generate tab")
    wait_for(lambda: text_of(page, "lora") == "ui_box", 10, "the LoRA picked")
    assert text_of(page, "gen-status").startswith("using the LoRA ui_box")
    type_into(page, "prompt", "a photo of sks box on snow")
    type_into(page, "seed", 5)
    tuned, tuned_params = generate_and_wait(page, state)
    wait_for(lambda: "txt2img · seed 5 · LoRA ui_box ×1" in css(page, "#gallery").text, 10, "the LoRA's caption")
    shot(page, "generate", 1300)
    choose(page, "lora", "none")
    plain, plain_params = generate_and_wait(page, state)
    assert plain_params["lora"] is None and tuned_params["lora"] == str(run.resolve())
    assert (plain_params["seed"], plain_params["prompt"]) == (tuned_params["seed"], tuned_params["prompt"])
    a = np.asarray(Image.open(plain).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(tuned).convert("RGB"), dtype=np.int16)
    assert np.abs(a - b).mean() > 1.0  # the LoRA changed the image


def test_inspect_tokens(page, server):
    tab(page, "Inspect")
    type_into(page, "tok-text", "A painting of a flooble")
    css(page, "#tok-go").click()
    out = wait_for(lambda: text_of(page, "tok-out"), 30, "the tokens")
    assert "49406" in out and "painting" in out
    css(page, "#sched-go").click()
    wait_for(lambda: page.execute_script(
        "const i = document.querySelector('#sched-img img'); return i && i.naturalWidth > 0"), 30, "the schedule plot")
    css(page, "#grid-go").click()
    wait_for(lambda: page.execute_script(
        "const i = document.querySelector('#grid-img img'); return i && i.naturalWidth > 0"), 60, "the guidance grid")
    shot(page, "inspect")
