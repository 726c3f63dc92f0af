"""The two classifier pages in headless Chromium against `streamlit run`: upload, result, screenshots."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import running_app

from core.models.devices import cpu_has_native_bf16
from helpers import screenshot, wait_for_app_idle

pytestmark = pytest.mark.browser
SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"


def settle_and_capture(page, name: str) -> None:
    wait_for_app_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0
    screenshot(page, name)


def test_hotdog_upload_of_two_files_shows_verdicts_bars_and_the_table(app_url, page):
    page.goto(f"{app_url}/hotdog")
    page.get_by_text("Hot Dog? Or Not?").wait_for()
    page.locator("input[type=file]").set_input_files([str(SAMPLES / "hot-dog.png"), str(SAMPLES / "salad.png")])
    page.get_by_text("2 image(s) in").wait_for(timeout=60_000)
    page.get_by_role("button", name="Download results (CSV)").wait_for()
    page.locator("[data-testid='stProgress']").nth(3).wait_for()
    wait_for_app_idle(page)
    assert page.get_by_text("random weights").count() >= 1
    assert page.locator("[data-testid='stProgress']").count() == 4  # two labels for each of two images
    settle_and_capture(page, "hotdog")


def test_imagenet_upload_shows_top_k_grad_cam_and_the_comparison(app_url, page):
    page.goto(f"{app_url}/imagenet")
    page.get_by_text("ImageNet classifier").first.wait_for()
    page.locator("input[type=file]").set_input_files(str(SAMPLES / "salad.png"))
    page.get_by_text("1 image(s) in").wait_for(timeout=60_000)
    page.locator("[data-testid='stProgress']").nth(4).wait_for()
    wait_for_app_idle(page)
    assert page.locator("[data-testid='stProgress']").count() == 5
    settle_and_capture(page, "imagenet")
    page.get_by_role("tab", name="Why? (Grad-CAM)").click()
    page.get_by_text("Grad-CAM on layer4 for").wait_for(timeout=60_000)
    settle_and_capture(page, "imagenet-gradcam")
    page.get_by_role("tab", name="Compare with the hot dog model").click()
    page.locator("[data-testid='stMetric']").nth(1).wait_for(timeout=60_000)
    wait_for_app_idle(page)
    assert page.locator("[data-testid='stMetric']").count() == 2
    settle_and_capture(page, "imagenet-compare")


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")
def test_on_a_bf16_cpu_the_app_as_configured_runs_the_hot_dog_in_bf16_and_says_so(browser, standin_dir, tmp_path):
    with running_app(tmp_path / "streamlit.log", DASH_STANDIN_DIR=str(standin_dir), DASH_STANDIN_FALLBACK="1") as url:  # DASH_CPU_BF16 unset: on
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        try:
            page.goto(f"{url}/hotdog")
            page.get_by_text("Hot Dog? Or Not?").wait_for()
            page.locator("input[type=file]").set_input_files(str(SAMPLES / "hot-dog.png"))
            page.get_by_text("1 image(s) in").wait_for(timeout=60_000)
            assert page.get_by_text("on cpu (bfloat16)").count() == 1
            settle_and_capture(page, "hotdog-cpu-bf16")
        finally:
            context.close()
