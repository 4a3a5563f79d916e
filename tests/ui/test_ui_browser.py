"""The web UI in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

Open the page; txt2img with the embedded model and see the image; paint a mask on the image editor's canvas and
inpaint; train a 20-step LoRA from uploads, watch its progress, then generate with it and get another image than
without it; a run's card in Runs; the token tool in Inspect. With SDTUNE_UI_SCREENSHOTS=DIR each tab is saved
there as a PNG (the README's figures: SDTUNE_UI_SCREENSHOTS=docs/ui).
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
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1800"):
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


def shot(driver, name):
    if SHOTS:
        out = Path(SHOTS)
        out.mkdir(parents=True, exist_ok=True)
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        path = out / f"{name}.png"
        driver.save_screenshot(str(path))
        img = Image.open(path)
        img.convert("P", palette=Image.ADAPTIVE, colors=128).save(path, optimize=True)  # small figures


def generate_and_wait(driver, state):
    before = len(list(state.generator.images_dir.glob("*.png"))) if state.generator.images_dir.is_dir() else 0
    css(driver, "#generate").click()
    status = wait_for(lambda: (s := text_of(driver, "gen-status")) and (s.startswith(("done", "sdtune: error")))
                      and len(list(state.generator.images_dir.glob("*.png"))) > before or s.startswith("sdtune")
                      and s, 90, "the generation's status")
    status = text_of(driver, "gen-status")
    assert status.startswith("done"), status
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


def test_txt2img_with_the_embedded_model(page, server):
    state = server[0]
    type_into(page, "prompt", "a photo of a red ball on grass")
    type_into(page, "seed", 11)
    png, params = generate_and_wait(page, state)
    assert params["mode"] == "txt2img" and params["seed"] == 11 and params["prompt"] == "a photo of a red ball on grass"
    assert params["model"].endswith("data/models/base") and Image.open(png).size == (64, 64)


def test_paint_a_mask_and_inpaint(page, server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    state = server[0]
    radio(page, "mode", "inpaint")
    editor = css(page, "#editor")
    editor.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(SUBJECT / "00.png"))
    wait_for(lambda: page.execute_script("return !!document.querySelector('#editor canvas')"), 20, "the canvas")
    time.sleep(1.5)
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
    shot(page, "generate")


def test_a_dropped_png_restores_the_form(page, server):
    state = server[0]
    (path, _, _), = state.generator.generate("txt2img", prompt="a photo of a yellow cone", steps=3, seed=1234,
                                             guidance=4.5)
    css(page, "#restore input[type=file]").send_keys(str(path))
    wait_for(lambda: text_of(page, "prompt") == "a photo of a yellow cone", 20, "the restored prompt")
    assert text_of(page, "seed") == "1234" and "restored the settings" in text_of(page, "gen-status")
    radio(page, "mode", "txt2img")


def test_train_a_lora_watch_it_then_generate_with_it(page, server):
    state = server[0]
    tab(page, "Train")
    type_into(page, "train-name", "ui_box")
    css(page, "#train-images input[type=file]").send_keys("\n".join(str(p) for p in sorted(SUBJECT.glob("*.png"))))
    time.sleep(2.0)  # the uploads finish
    type_into(page, "train-steps", 20)
    css(page, "#train-start").click()
    wait_for(lambda: text_of(page, "train-status").startswith(("started", "sdtune")), 30, "the start")
    assert text_of(page, "train-status").startswith("started"), text_of(page, "train-status")
    seen = set()

    def finished():
        line = text_of(page, "train-progress")
        seen.add(line)
        assert not line.startswith("failed"), line
        return line.startswith("finished")

    wait_for(finished, 120, "the training to finish")
    running = [s for s in seen if s.startswith("running: step")]
    assert running, seen  # progress was shown while it ran
    run = state.sandbox.outputs / "ui_box"
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    wait_for(lambda: page.execute_script(
        "const i = document.querySelector('#train-samples img'); return i && i.naturalWidth > 0"), 20, "samples")
    shot(page, "train")

    tab(page, "Generate")
    radio(page, "mode", "txt2img")
    type_into(page, "prompt", "a photo of sks box on snow")
    type_into(page, "seed", 5)
    choose(page, "lora", "none")
    plain, plain_params = generate_and_wait(page, state)
    choose(page, "lora", "ui_box")
    tuned, tuned_params = generate_and_wait(page, state)
    assert plain_params["lora"] is None and tuned_params["lora"] == str(run.resolve())
    assert (plain_params["seed"], plain_params["prompt"]) == (tuned_params["seed"], tuned_params["prompt"])
    a = np.asarray(Image.open(plain).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(tuned).convert("RGB"), dtype=np.int16)
    assert np.abs(a - b).mean() > 1.0  # the LoRA changed the image


def test_stop_checkpoints_and_resume_finishes(page, server):
    state = server[0]
    tab(page, "Train")
    type_into(page, "train-name", "ui_stop")  # the four uploads are still in the file box
    type_into(page, "train-steps", 40)
    css(page, "#train-start").click()
    wait_for(lambda: text_of(page, "train-progress").startswith("running: step")
             and int(text_of(page, "train-progress").split("step ")[1].split("/")[0]) >= 3, 60, "a few steps")
    css(page, "#train-stop").click()
    wait_for(lambda: text_of(page, "train-progress").startswith("stopped"), 60, "the stop")
    run = state.sandbox.outputs / "ui_stop"
    checkpoints = sorted(run.glob("checkpoint-*"))
    assert checkpoints and not (run / "pytorch_lora_weights.safetensors").exists()
    css(page, "#train-resume").click()
    wait_for(lambda: text_of(page, "train-status").startswith("resuming"), 20, "the resume")
    wait_for(lambda: text_of(page, "train-progress").startswith("finished: step 40/40"), 120, "the resumed run")
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert any(f"resumed from {checkpoints[-1]}" in line for line in state.trainer.job("ui_stop").lines)


def test_runs_shows_the_model_card(page, server):
    tab(page, "Runs")
    choose(page, "run-pick", "ui_box")
    wait_for(lambda: "sks box" in css(page, "#run-card").text, 20, "the model card")
    shot(page, "runs")


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
