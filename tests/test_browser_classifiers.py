from __future__ import annotations

from pathlib import Path

import pytest

from helpers import screenshot, wait_for_app_idle

pytestmark = pytest.mark.browser
SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"


def test_hotdog_upload_shows_the_verdict(app_url, page):
    page.goto(f"{app_url}/hotdog")
    page.get_by_text("Hot Dog? Or Not?").wait_for()
    page.locator("input[type=file]").set_input_files(str(SAMPLES / "hot-dog.png"))
    page.get_by_text("one batched call").wait_for(timeout=60_000)
    wait_for_app_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0
    assert page.get_by_text("random weights").count() >= 1
    assert page.locator("[data-testid='stProgress']").count() == 2
    screenshot(page, "hotdog")


def test_imagenet_upload_shows_top_k_and_grad_cam(app_url, page):
    page.goto(f"{app_url}/imagenet")
    page.get_by_text("ImageNet classifier").first.wait_for()
    page.locator("input[type=file]").set_input_files(str(SAMPLES / "salad.png"))
    page.get_by_text("image(s) in").wait_for(timeout=60_000)
    wait_for_app_idle(page)
    assert page.locator("[data-testid='stProgress']").count() == 5
    screenshot(page, "imagenet")
    page.get_by_role("tab", name="Why? (Grad-CAM)").click()
    page.get_by_text("Grad-CAM for").wait_for(timeout=60_000)
    assert page.locator("[data-testid='stException']").count() == 0
    screenshot(page, "imagenet-gradcam")
