"""In a real browser: a tab closed mid-run gives up the GPU, and the HF token never reaches a page, the log or a PNG."""
from __future__ import annotations

import re
import secrets

import pytest
from conftest import running_app
from test_browser_generate import WAIT_MS, set_number

from core.tasks import pnginfo
from helpers import wait_for_app_idle

pytestmark = pytest.mark.browser


def small_run(page, steps: int, side_px: int = 128) -> None:
    set_number(page, "Width", side_px)
    set_number(page, "Height", side_px)
    set_number(page, "Steps", steps)
    page.get_by_role("button", name="Generate").click()


def test_a_tab_closed_mid_run_gives_up_the_gpu_and_the_next_session_runs(app_url, browser):
    leaving = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = leaving.new_page()
    tab.goto(f"{app_url}/generate")
    tab.get_by_text("random weights").first.wait_for(timeout=WAIT_MS)
    wait_for_app_idle(tab)
    small_run(tab, steps=150, side_px=256)  # minutes on the stand-in (about 1 s a step at 256 px): long enough to leave in the middle
    tab.get_by_text(re.compile(r"Step \d+ of 150")).wait_for(timeout=WAIT_MS)
    leaving.close()  # the user closes the tab

    staying = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = staying.new_page()
        page.goto(f"{app_url}/generate")
        page.get_by_text("random weights").first.wait_for(timeout=WAIT_MS)
        wait_for_app_idle(page)
        small_run(page, steps=3)
        # Done long before the closed tab's 150 steps could have finished: its run stopped and left the queue.
        page.get_by_text(re.compile(r"1 image in [\d.]+ s · seed \d+")).wait_for(timeout=60_000)
        assert page.locator("[data-testid='stException']").count() == 0
    finally:
        staying.close()


def test_the_token_never_reaches_a_page_the_log_or_a_png(tmp_path, standin_dir, browser):
    token = "hf_" + secrets.token_hex(16)
    log_path = tmp_path / "streamlit.log"
    with running_app(log_path, HF_TOKEN=token, DASH_STANDIN_DIR=str(standin_dir), DASH_STANDIN_FALLBACK="0") as url:
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        seen = []
        for path in ("", "hotdog", "imagenet", "sentiment", "vram", "generate"):
            page.goto(f"{url}/{path}")
            page.locator("[data-testid='stMain']").wait_for(timeout=WAIT_MS)
            wait_for_app_idle(page)
            seen.append(page.content())
        page.get_by_text("could not", exact=False).or_(page.get_by_text("cannot be reached")).first.wait_for(timeout=WAIT_MS)
        page.get_by_role("button", name="Use the stand-in model (random weights)").click()
        page.get_by_text("random weights").first.wait_for(timeout=WAIT_MS)
        wait_for_app_idle(page)
        small_run(page, steps=3)
        page.get_by_text(re.compile(r"1 image in [\d.]+ s · seed \d+")).wait_for(timeout=WAIT_MS)
        wait_for_app_idle(page)
        seen.append(page.content())
        with page.expect_download() as download:
            page.get_by_role("button", name="PNG").first.click()
        png_text = pnginfo.read_parameters(download.value.path().read_bytes())
        context.close()
    assert "Hub" in " ".join(seen)  # the pages did talk about the Hub they could not reach
    for html in seen:
        assert token not in html
    assert token not in png_text and "Model: " in png_text
    assert token not in log_path.read_text()
