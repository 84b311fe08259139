"""End-to-end: ``dynasyn ui`` driven in a real headless browser (Debian's chromium + Playwright).

Starts the server on a free port, uploads the star_ball example with its masks, sets the
classes, augments two items, trains 2 + 2 steps, generates and checks that gallery images
appear; a mask of the wrong size shows its message inline; a brush stroke becomes a mask. Skipped (with the reason) without
gradio, playwright or a chromium binary. Screenshots of the flow go to the test's temporary
folder, or to ``$DYNASYN_UI_SCREENSHOTS`` when set (docs/ui/ holds the ones the docs show:
``DYNASYN_UI_SCREENSHOTS=docs/ui pytest tests/test_ui_browser.py``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "star_ball"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 30_000
LONG_MS = 300_000  # augmentation, training


def chromium() -> str | None:
    """The chromium binary: $DYNASYN_CHROMIUM, or Debian's package."""
    for c in (os.environ.get("DYNASYN_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if c and Path(c).is_file():
            return c
    return None


def _missing() -> str | None:
    for mod, how in (("gradio", 'pip install -e ".[ui]"'), ("playwright", "pip install playwright")):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed ({how})"
    if chromium() is None:
        return "no chromium binary (apt-get install chromium, or set DYNASYN_CHROMIUM)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "dynasyn.cli", "ui", "--runs-dir", "runs",
                             "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    pytest.fail("dynasyn ui did not start:\n" + (tmp_path / "server.log").read_text())
                time.sleep(0.5)
        yield url, tmp_path / "runs"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _fill_numbers(page, values: dict[str, str]) -> None:
    """Type into Gradio Numbers (selector -> value). A freshly shown tab may re-render its
    inputs (seen on a loaded CPU) and lose what was typed, even a moment after it showed; so
    type all of them, wait a second, and type again until every value has held through the
    wait. Gradio takes a Number's value when it loses focus (Tab)."""
    from playwright.sync_api import expect

    for _ in range(10):
        for selector, value in values.items():
            box = page.locator(selector)
            if box.input_value() != value:
                box.fill(value)
                box.press("Tab")
        page.wait_for_timeout(1000)
        if all(page.locator(s).input_value() == v for s, v in values.items()):
            break
    for selector, value in values.items():
        expect(page.locator(selector)).to_have_value(value)


def _shot(page, folder: Path, name: str) -> None:
    """A small screenshot: the whole page, halved and palette-quantized."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / f".{name}.raw.png"
    page.screenshot(path=str(raw), full_page=True)
    im = Image.open(raw).convert("RGB")
    im = im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS)
    im.quantize(colors=128, dither=Image.Dither.NONE).save(folder / f"{name}.png", optimize=True)
    raw.unlink()


def test_browser_flow(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, runs = server
    shots = Path(os.environ.get("DYNASYN_UI_SCREENSHOTS") or tmp_path / "shots")
    small = tmp_path / "small_mask.png"
    Image.fromarray(np.full((32, 32), 255, np.uint8), "L").save(small)
    run = "star-ball-e2e"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        page.goto(url)
        page.locator("#run input").fill(run)
        page.locator("#run input").press("Enter")
        page.locator("#photo input[type=file]").set_input_files(str(EXAMPLE / "img.png"))
        expect(page.locator("#photo")).to_contain_text("img")

        # a bad upload: a 32x32 mask for a 64x64 photo -> the scene's message, inline
        page.locator("#masks input[type=file]").set_input_files([str(EXAMPLE / "mask0.png"),
                                                                  str(small)])
        expect(page.locator("#masks")).to_contain_text("small_mask")
        page.locator("#classes textarea").fill("star ball")
        page.locator("#save-scene").click()
        msg = page.locator("#scene-msg")
        expect(msg).to_contain_text("small_mask.png is 32x32 but img.png is 64x64")
        expect(msg).to_contain_text("resize the mask to the image size")
        _shot(page, shots, "ui_bad_upload")

        # the example's own masks: the scene is saved and previewed
        page.locator("#masks button[aria-label='Clear']").first.click()
        page.locator("#masks input[type=file]").set_input_files([str(EXAMPLE / "mask0.png"),
                                                                  str(EXAMPLE / "mask1.png")])
        expect(page.locator("#masks")).to_contain_text("mask1")
        expect(page.locator("#masks")).not_to_contain_text("small_mask")
        page.locator("#phrases textarea").fill("red striped star, blue dotted ball")
        page.locator("#save-scene").click()
        expect(msg).to_contain_text("scene saved")
        expect(msg).to_contain_text("<asset1> = ball")
        expect(page.locator("#overlay img")).to_be_visible()
        assert (runs / run / "masks" / "scene.json").is_file()
        _shot(page, shots, "ui_scene")

        # augmentation: two items, their contact sheets
        page.get_by_role("tab", name="2. Augment").click()
        _fill_numbers(page, {"#augment-items input": "2"})
        page.locator("#augment").click()
        expect(page.locator("#augment-msg")).to_contain_text("2 augmented items",
                                                             timeout=LONG_MS)
        expect(page.locator("#sheets img").first).to_be_visible()
        _shot(page, shots, "ui_augment")

        # training: 2 + 2 steps, a sample and a checkpoint every 2, live loss plot
        page.get_by_role("tab", name="3. Train").click()
        _fill_numbers(page, {"#phase1 input": "2", "#phase2 input": "2", "#every input": "2"})
        page.locator("#train").click()
        expect(page.locator("#train-msg")).to_contain_text("trained: step 4 / 4",
                                                           timeout=LONG_MS)
        expect(page.locator("#sample img")).to_be_visible()
        assert (runs / run / "run.json").is_file()
        _shot(page, shots, "ui_train")

        # generation: the gallery fills
        page.get_by_role("tab", name="4. Generate").click()
        _fill_numbers(page, {"#gen-steps input[type=number]": "10"})
        page.locator("#generate").click()
        expect(page.locator("#generate-msg")).to_contain_text("2 images", timeout=LONG_MS)
        expect(page.locator("#gallery img").first).to_be_visible()
        assert len(list((runs / run / "generated").glob("*_0.png"))) == 1
        _shot(page, shots, "ui_generate")

        # masks painted with the brush: the photo is already in the editor
        page.get_by_role("tab", name="1. Scene").click()
        page.locator("#run input").fill("brushed")
        page.locator("#run input").press("Enter")
        page.get_by_text("Paint the masks").click()
        expect(page.locator("#editor canvas").first).to_be_visible()
        page.wait_for_timeout(1500)  # the editor lays the photo out
        page.locator('#editor button[aria-label="Brush"]').click()
        page.wait_for_timeout(500)
        page.locator("#editor canvas").first.scroll_into_view_if_needed()
        box = page.locator("#editor canvas").first.bounding_box()  # (viewport coordinates)
        x, y = box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.75
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + 20, y + 5, steps=10)
        page.mouse.up()
        page.wait_for_timeout(1000)  # the layer reaches the component's value
        page.locator("#classes textarea").fill("star")
        page.locator("#save-brush").click()
        expect(msg).to_contain_text("scene saved (brush layers): 1 subjects")
        painted = np.asarray(Image.open(runs / "brushed" / "masks" / "mask0.png")) >= 128
        assert 0 < painted.sum() < painted.size and not painted[:8].any()  # a stroke, low down
        browser.close()
