from __future__ import annotations

import io
import re
import zipfile

import pytest
from playwright.sync_api import expect

from core.tasks import pnginfo
from helpers import screenshot, wait_for_app_idle

pytestmark = pytest.mark.browser
WAIT_MS = 120_000


def set_number(page, label: str, value: int) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")  # Streamlit takes a number input's value on Enter or blur
    wait_for_app_idle(page)


def test_type_a_prompt_generate_watch_progress_and_see_the_image(app_url, page):
    page.goto(f"{app_url}/generate")
    page.get_by_text("Image generation").first.wait_for(timeout=WAIT_MS)
    page.get_by_text("random weights").first.wait_for(timeout=WAIT_MS)  # the stand-in model is loaded
    wait_for_app_idle(page)
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("a lighthouse on a cliff at dawn, watercolour")
    prompt.press("Control+Enter")  # Streamlit's shortcut to submit a text area
    set_number(page, "Width", 128)  # the stand-in's attention grows with the square of the latent's pixels: keep it small
    set_number(page, "Height", 128)
    set_number(page, "Steps", 50)  # a few seconds: long enough to watch

    page.get_by_role("button", name="Generate").click()
    progress = page.get_by_text(re.compile(r"Step \d+ of \d+ · [\d.]+ it/s · about \d+ s left"))
    progress.wait_for(timeout=WAIT_MS)
    expect(page.get_by_role("button", name="Cancel")).to_be_visible()
    screenshot(page, "generate-running", settle=False)
    page.get_by_text(re.compile(r"1 image in [\d.]+ s · seed \d+")).wait_for(timeout=WAIT_MS)
    page.get_by_text("This session's images (1), newest first").wait_for(timeout=WAIT_MS)
    expect(page.locator("[data-testid='stImage'] img")).to_have_count(3)  # the result, its gallery entry and its history entry
    wait_for_app_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0
    assert page.get_by_role("button", name="Cancel").count() == 0  # the run is over
    assert page.get_by_text(re.compile(r"^Seed \d+$")).count() == 2
    screenshot(page, "generate")

    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download all (zip)").click()
    with zipfile.ZipFile(io.BytesIO(download_info.value.path().read_bytes())) as archive:
        names = archive.namelist()
        text = pnginfo.read_parameters(archive.read(names[0]))
    assert len(names) == 1 and text.startswith("a lighthouse on a cliff at dawn, watercolour\n")
    assert "Steps: 50" in text and "Size: 128x128" in text


def test_image_to_image_from_the_gallery_then_inpaint_then_ddpm(app_url, page):
    page.goto(f"{app_url}/generate")
    page.get_by_text("random weights").first.wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("a harbour at night")
    prompt.press("Control+Enter")
    set_number(page, "Width", 128)
    set_number(page, "Height", 128)
    set_number(page, "Steps", 4)
    page.get_by_role("button", name="Generate").click()
    page.get_by_text(re.compile(r"1 image in [\d.]+ s · seed \d+")).wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)

    page.get_by_text("image to image", exact=True).click()
    page.get_by_text("From the gallery", exact=True).click()
    wait_for_app_idle(page)
    expect(page.get_by_text("128×128", exact=True)).to_be_visible()  # the chosen gallery image, shown as the input
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("This session's images (2), newest first").wait_for(timeout=WAIT_MS)
    expect(page.get_by_text(re.compile(r"image to image · 4 steps")).first).to_be_visible()
    screenshot(page, "generate-img2img")

    page.get_by_text("inpaint", exact=True).click()
    page.get_by_text("Mask: white is repainted").wait_for(timeout=WAIT_MS)
    page.get_by_text("From the gallery", exact=True).click()
    wait_for_app_idle(page)
    expect(page.get_by_text("128×128 · red is repainted")).to_be_visible()
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("This session's images (3), newest first").wait_for(timeout=WAIT_MS)
    screenshot(page, "generate-inpaint")

    page.get_by_text("unconditional (DDPM)", exact=True).click()
    page.get_by_label("Denoising steps", exact=True).wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)
    set_number(page, "Images", 9)
    set_number(page, "Denoising steps", 20)
    page.get_by_role("button", name="Generate").click()
    page.get_by_text(re.compile(r"9 images in [\d.]+ s · seed \d+")).wait_for(timeout=WAIT_MS)
    page.get_by_text("This session's images (12), newest first").wait_for(timeout=WAIT_MS)
    assert page.locator("[data-testid='stException']").count() == 0
    screenshot(page, "generate-ddpm")
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Grid PNG").click()
    assert "Steps: 20, Seed: " in pnginfo.read_parameters(download_info.value.path().read_bytes())
