"""Helpers for browser tests (imported by test modules; fixtures live in conftest.py)."""
from __future__ import annotations

from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def screenshot(tab, name: str, settle: bool = True) -> Path:
    """Full-page screenshot under artifacts/screenshots/, for people to look at.

    With `settle`, waits for the run and every image and grows the window to the page first: Streamlit scrolls inside
    its own container, so a full-page screenshot of a short window would cut the page off. Without it, the page is
    taken as it is now (a run in progress).
    """
    if settle:
        _settle(tab)
    path = ARTIFACTS / "screenshots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(path), full_page=True)
    return path


def _settle(tab) -> None:
    wait_for_app_idle(tab)
    tab.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=\"stImage\"] img')].every(img => img.complete && img.naturalWidth > 0)"
    )
    height = tab.evaluate(
        "() => Math.max(...[...document.querySelectorAll('[data-testid=\"stMain\"], [data-testid=\"stMainBlockContainer\"]')]"
        ".map(e => e.scrollHeight))"
    )
    tab.set_viewport_size({"width": 1400, "height": min(max(int(height) + 80, 1000), 6000)})
    wait_for_app_idle(tab)


def wait_for_app_idle(tab, timeout_ms: int = 60_000) -> None:
    """Streamlit shows its status widget ("Running…", with a Stop button) while a script runs; wait until it is gone."""
    tab.wait_for_selector("[data-testid='stApp']", timeout=timeout_ms)
    tab.wait_for_function(
        """() => {
            const status = document.querySelector('[data-testid="stStatusWidget"]');
            return !status || !/Running|Stop/.test(status.innerText);
        }""",
        timeout=timeout_ms,
    )
