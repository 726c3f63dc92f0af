"""Issue 19 in Chromium: a weighted prompt past 75 tokens, a mask painted with the mouse, and outpainting, each
generated on the stand-in model (64x64, 2 steps) and shown, with a screenshot."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect
from test_browser_generate import WAIT_MS, set_number

from helpers import screenshot, wait_for_app_idle

pytestmark = pytest.mark.browser
LONG_WEIGHTED = "a (lighthouse:1.3) on a cliff at dawn, [fog], " + ", ".join(["waves"] * 40) + " BREAK watercolour"


def open_small_form(page, prompt: str) -> None:
    page.get_by_text("random weights").first.wait_for(timeout=WAIT_MS)  # the stand-in model is loaded
    wait_for_app_idle(page)
    box = page.get_by_label("Prompt", exact=True)
    box.fill(prompt)
    box.press("Control+Enter")  # Streamlit's shortcut to submit a text area
    wait_for_app_idle(page)
    set_number(page, "Width", 64)
    set_number(page, "Height", 64)
    set_number(page, "Steps", 2)


def generated(page, count: int) -> None:
    page.get_by_role("button", name="Generate").click()
    page.get_by_text(f"This session's images ({count}), newest first").wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0


def test_a_weighted_prompt_past_75_tokens_is_counted_and_generates(app_url, page):
    page.goto(f"{app_url}/generate")
    open_small_form(page, LONG_WEIGHTED)
    expect(page.get_by_text(re.compile(r"Prompt: \d+ tokens, [2-9] chunks · all of it is read"))).to_be_visible()
    generated(page, 1)
    expect(page.get_by_text(re.compile(r"“a \(lighthouse:1\.3\) on a cliff")).first).to_be_visible()  # as typed
    assert page.get_by_text("ignored").count() == 0
    screenshot(page, "generate-long-weighted-prompt")


def upload_input(page, tmp_path, size: tuple[int, int]) -> None:
    from PIL import Image

    path = tmp_path / "input.png"
    Image.radial_gradient("L").resize(size).convert("RGB").save(path)
    page.get_by_text("inpaint", exact=True).click()
    page.get_by_text("Upload", exact=True).first.wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)
    page.locator("[data-testid='stFileUploader']").filter(has_text="Input image (JPEG").locator("input[type=file]").set_input_files(str(path))
    page.get_by_text("Mask: white is repainted").wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)


def test_paint_a_stroke_on_the_inpaint_input_and_generate(app_url, page, tmp_path):
    page.goto(f"{app_url}/generate")
    open_small_form(page, "a red door")
    upload_input(page, tmp_path, (64, 64))
    page.get_by_text("Paint", exact=True).first.click()
    canvas = page.locator("canvas")
    canvas.wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)
    box = canvas.bounding_box()
    mouse = page.mouse
    mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5)
    mouse.down()
    mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.5, steps=12)
    mouse.up()
    wait_for_app_idle(page)
    generated(page, 1)
    expect(page.get_by_text(re.compile(r"inpaint · 2 steps")).first).to_be_visible()
    screenshot(page, "generate-inpaint-painted")


def test_outpaint_extends_the_picture_to_the_right_and_shows_the_wider_result(app_url, page, tmp_path):
    page.goto(f"{app_url}/generate")
    open_small_form(page, "a beach at noon")
    upload_input(page, tmp_path, (64, 64))
    page.get_by_text("Extend the canvas", exact=True).click()
    page.get_by_label("Right (px)", exact=True).wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)
    set_number(page, "Right (px)", 64)
    expect(page.get_by_text("128×64 · red is repainted")).to_be_visible()
    expect(page.get_by_label("Width", exact=True)).to_have_value("128")
    screenshot(page, "generate-outpaint-canvas")
    generated(page, 1)
    expect(page.get_by_text(re.compile(r"inpaint · 2 steps · .* · 128×64")).first).to_be_visible()
    screenshot(page, "generate-outpaint")
