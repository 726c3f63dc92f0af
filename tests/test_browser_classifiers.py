"""The two classifier pages in headless Chromium against `streamlit run`: upload, result, screenshots."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import screenshot, wait_for_app_idle

pytestmark = pytest.mark.browser
SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"


def settle_and_capture(page, name: str) -> None:
    """Wait for the run and every image to finish, grow the window to the page, then take the screenshot.

    Streamlit scrolls inside its own container, so a full-page screenshot of a short window would cut the page off.
    """
    wait_for_app_idle(page)
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=\"stImage\"] img')].every(img => img.complete && img.naturalWidth > 0)"
    )
    height = page.evaluate("() => Math.max(...[...document.querySelectorAll('[data-testid=\"stMain\"], [data-testid=\"stMainBlockContainer\"]')].map(e => e.scrollHeight))")
    page.set_viewport_size({"width": 1400, "height": min(max(int(height) + 80, 1000), 6000)})
    wait_for_app_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0
    screenshot(page, name)


def test_hotdog_upload_of_two_files_shows_verdicts_bars_and_the_table(app_url, page):
    page.goto(f"{app_url}/hotdog")
    page.get_by_text("Hot Dog? Or Not?").wait_for()
    page.locator("input[type=file]").set_input_files([str(SAMPLES / "hot-dog.png"), str(SAMPLES / "salad.png")])
    page.get_by_text("2 image(s) in").wait_for(timeout=60_000)
    page.get_by_role("button", name="Download results (CSV)").wait_for()
    assert page.get_by_text("random weights").count() >= 1
    assert page.locator("[data-testid='stProgress']").count() == 4  # two labels for each of two images
    settle_and_capture(page, "hotdog")


def test_imagenet_upload_shows_top_k_grad_cam_and_the_comparison(app_url, page):
    page.goto(f"{app_url}/imagenet")
    page.get_by_text("ImageNet classifier").first.wait_for()
    page.locator("input[type=file]").set_input_files(str(SAMPLES / "salad.png"))
    page.get_by_text("1 image(s) in").wait_for(timeout=60_000)
    assert page.locator("[data-testid='stProgress']").count() == 5
    settle_and_capture(page, "imagenet")
    page.get_by_role("tab", name="Why? (Grad-CAM)").click()
    page.get_by_text("Grad-CAM on layer4 for").wait_for(timeout=60_000)
    settle_and_capture(page, "imagenet-gradcam")
    page.get_by_role("tab", name="Compare with the hot dog model").click()
    page.get_by_text("Hot dog or not (ViT-base)").first.wait_for(timeout=60_000)
    assert page.locator("[data-testid='stMetric']").count() == 2
    settle_and_capture(page, "imagenet-compare")
