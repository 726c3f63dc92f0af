from __future__ import annotations

from pathlib import Path

from conftest import PROJECT_ROOT, running_app

from app_pages.browser_id import STORAGE_KEY
from helpers import screenshot, wait_for_app_idle


def shown_id(tab) -> str:
    tab.wait_for_selector("text=browser id:", timeout=60_000)
    wait_for_app_idle(tab)
    return tab.locator("[data-testid='stMarkdown'] code").inner_text()


def test_the_browser_id_survives_a_reload_and_differs_between_browsers(browser, tmp_path: Path):
    with running_app(tmp_path / "streamlit.log", "tests/browser_id_app.py", PYTHONPATH=str(PROJECT_ROOT)) as url:
        first_browser, second_browser = browser.new_context(), browser.new_context()
        try:
            tab = first_browser.new_page()
            tab.goto(url)
            first_id = shown_id(tab)
            assert len(first_id) == 32 and tab.evaluate(f"localStorage.getItem('{STORAGE_KEY}')") == first_id
            tab.reload()
            assert shown_id(tab) == first_id
            screenshot(tab, "browser-id-after-reload")
            other_tab = second_browser.new_page()
            other_tab.goto(url)
            assert shown_id(other_tab) not in {first_id, ""}
        finally:
            first_browser.close()
            second_browser.close()
