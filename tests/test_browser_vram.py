from __future__ import annotations

from pathlib import Path

import pytest

from helpers import screenshot, wait_for_app_idle

pytestmark = pytest.mark.browser
SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"


def test_vram_monitor_shows_the_machine_history_and_unloads_after_confirmation(app_url, page):
    # A model to show: the hot dog stand-in, loaded as a user would load it.
    page.goto(f"{app_url}/hotdog")
    page.locator("input[type=file]").set_input_files(str(SAMPLES / "hot-dog.png"))
    page.get_by_text("one batched call").wait_for(timeout=60_000)

    page.set_viewport_size({"width": 1400, "height": 1700})  # the whole page in one screenshot (Streamlit scrolls inside)
    page.goto(f"{app_url}/vram")
    page.get_by_text("VRAM monitor").first.wait_for()
    page.get_by_text("No GPU on this machine").wait_for()  # this machine and CI have none
    page.get_by_text("This app's process").wait_for()
    page.locator("[data-testid='stVegaLiteChart']").first.wait_for(timeout=30_000)  # the fragment's second sample
    wait_for_app_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0
    models = page.locator("[data-testid='stDataFrame']").last
    models.wait_for()

    page.get_by_role("button", name="Unload…").click()
    page.get_by_text("Every session of this app shares the models").wait_for()
    page.get_by_role("button", name="Yes, unload").click()
    page.get_by_text("Unloaded Hot dog or not (ViT-base): the weights held").wait_for()
    page.get_by_role("button", name="Yes, unload").wait_for(state="detached")  # the question is gone with the answer
    wait_for_app_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0
    screenshot(page, "vram")
