"""The generation page's history and queue in a real browser: an image survives a reload; queued runs show places."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect
from test_browser_generate import WAIT_MS, set_number

from helpers import screenshot, wait_for_app_idle

pytestmark = pytest.mark.browser


def open_generate_page(app_url, page, width: int, steps: int) -> None:
    page.goto(f"{app_url}/generate")
    page.get_by_text("random weights").first.wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)
    set_number(page, "Width", width)
    set_number(page, "Height", width)
    set_number(page, "Steps", steps)


def test_a_generated_image_is_still_in_the_history_after_a_reload(app_url, page):
    open_generate_page(app_url, page, 64, 2)
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("a lighthouse kept in the history")
    prompt.press("Control+Enter")
    wait_for_app_idle(page)
    page.get_by_role("button", name="Generate").click()
    page.get_by_text(re.compile(r"1 image in [\d.]+ s · seed \d+")).wait_for(timeout=WAIT_MS)

    page.reload()  # a new Streamlit session: the gallery is gone, the history is not
    page.get_by_text("Your 1 kept image").wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)
    assert page.get_by_text("This session's images").count() == 0
    expect(page.get_by_text("“a lighthouse kept in the history”")).to_be_visible()
    expect(page.get_by_role("button", name="Use settings")).to_have_count(1)
    assert page.locator("[data-testid='stException']").count() == 0
    screenshot(page, "generate-history")

    page.get_by_role("button", name="Use settings").click()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a lighthouse kept in the history")


def test_two_queued_runs_show_their_places_and_can_be_cancelled(app_url, page):
    open_generate_page(app_url, page, 256, 10)  # the CPU defaults: several seconds a run, long enough to see the queue
    generate = page.get_by_role("button", name="Generate")
    generate.click()
    page.get_by_text(re.compile(r"^Job \d+ · image generation · on the CPU")).wait_for(timeout=WAIT_MS)
    generate.click()  # still enabled while the first one runs
    page.get_by_text("Your queue (2 runs)").wait_for(timeout=WAIT_MS)
    page.get_by_text(re.compile(r"^Job \d+ · image generation · place 1 in line")).wait_for(timeout=WAIT_MS)
    expect(page.get_by_role("button", name="Cancel")).to_have_count(2)
    page.mouse.move(0, 0)  # no tooltip over the page
    page.get_by_text("Your queue (2 runs)").scroll_into_view_if_needed()
    screenshot(page, "generate-queue", settle=False)

    for _ in range(2):
        page.get_by_role("button", name="Cancel").first.click()
        page.get_by_text(re.compile("^Cancelled")).first.wait_for(timeout=WAIT_MS)
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0, timeout=WAIT_MS)
    assert page.locator("[data-testid='stException']").count() == 0
