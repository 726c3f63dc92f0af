from __future__ import annotations

import pytest

from helpers import screenshot, wait_for_app_idle

pytestmark = pytest.mark.browser


def test_home_renders_in_chromium_with_the_model_table(app_url, page):
    page.goto(app_url)
    wait_for_app_idle(page)
    page.get_by_text("Model dashboard").first.wait_for()
    page.locator("[data-testid='stDataFrame']").first.wait_for()
    assert page.locator("[data-testid='stException']").count() == 0
    for title in ("Hot dog or not", "ImageNet classifier", "Sentiment", "Image generation", "VRAM monitor"):
        assert page.get_by_role("link", name=title).count() >= 1
    path = screenshot(page, "home")
    assert path.stat().st_size > 10_000
