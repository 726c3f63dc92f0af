"""The X/Y plot and the hires fix in a real browser, on the stand-in SD pipeline (64x64, 2 steps)."""
from __future__ import annotations

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import expect
from test_browser_generate import WAIT_MS, set_number

from helpers import screenshot, wait_for_app_idle

pytestmark = pytest.mark.browser


def open_small_form(app_url, page) -> None:
    page.goto(f"{app_url}/generate")
    page.get_by_text("random weights").first.wait_for(timeout=WAIT_MS)  # the stand-in model is loaded
    wait_for_app_idle(page)
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("a red bicycle")
    prompt.press("Control+Enter")
    for label, value in (("Width", 64), ("Height", 64), ("Steps", 2)):
        set_number(page, label, value)


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the selectbox labelled `label`. A click that lands while the script reruns leaves the list
    closed (seen in CI on a loaded 2-core machine), so the list is opened again until the option shows."""
    box = page.locator("[data-testid='stSelectbox']").filter(has_text=label)
    for _ in range(3):
        box.click()
        try:
            page.get_by_role("option", name=option).click(timeout=10_000)
            return
        except PlaywrightTimeoutError:
            wait_for_app_idle(page)
    raise AssertionError(f"the {label!r} list never showed {option!r}")


def test_a_two_by_two_sweep_shows_its_labelled_grid(app_url, page):
    open_small_form(app_url, page)
    page.get_by_text("X/Y plot", exact=True).click()
    x_values = page.get_by_label("X values", exact=True)
    x_values.fill("1, 2")
    x_values.press("Enter")
    wait_for_app_idle(page)
    choose(page, "Y type", "CFG scale")
    wait_for_app_idle(page)
    y_values = page.get_by_label("Y values", exact=True)
    y_values.fill("1, 9")
    y_values.press("Enter")
    page.get_by_text("2 × 2 = 4 images, 8 steps").wait_for(timeout=WAIT_MS)
    page.get_by_role("button", name="Run X/Y plot").click()
    grid = page.locator("[data-testid='stImage']").filter(has_text="X/Y plot: Seed × CFG scale")
    grid.wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)
    expect(page.get_by_role("button", name="Grid PNG")).to_be_visible()
    expect(page.get_by_role("button", name="Each cell's PNG (zip)")).to_be_visible()
    assert page.locator("[data-testid='stException']").count() == 0
    grid.scroll_into_view_if_needed()
    screenshot(page, "generate-xy-plot")


def test_a_hires_run_makes_an_image_twice_the_size(app_url, page):
    open_small_form(app_url, page)
    page.get_by_text("Variation and hires fix", exact=False).first.click()
    set_number(page, "Upscale by", 2)
    page.get_by_text("Variation and hires fix (hires ×2)").wait_for(timeout=WAIT_MS)
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("This session's images (1), newest first").wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)
    image = page.locator("[data-testid='stImage'] img").first
    assert image.evaluate("img => img.naturalWidth") == 128
    assert page.locator("[data-testid='stException']").count() == 0
    screenshot(page, "generate-hires")
