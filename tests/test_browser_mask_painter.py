"""The mask painter in Chromium: strokes drawn with the mouse arrive in Python as the mask, at the picture's resolution;
erase, undo and clear change it as they say."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import PROJECT_ROOT, running_app
from PIL import Image

from app_pages.mask_painter import BRUSH_SIZES_PX
from helpers import screenshot, wait_for_app_idle

STATS = "[data-testid='stMarkdown']:has-text('mask stats:')"
BRUSH_PX = BRUSH_SIZES_PX[2]  # the painter's first brush, in displayed pixels
EDGE_PX = 2  # antialiased stroke edges are cut at half coverage: a pixel either side of the exact edge may go either way


def distance_to_segment(shape: tuple[int, int], start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Each pixel centre's distance to the segment from `start` to `end` (x, y in pixels; a point when they are equal)."""
    rows, columns = np.indices(shape)
    points = np.stack([columns + 0.5, rows + 0.5], axis=-1)
    length_squared = np.dot(end - start, end - start)
    along = np.clip(((points - start) @ (end - start)) / length_squared, 0, 1) if length_squared else np.zeros(shape)
    return np.linalg.norm(points - (start + along[..., None] * (end - start)), axis=-1)


class Painter:
    def __init__(self, tab, mask_path: Path) -> None:
        self.tab, self.mask_path = tab, mask_path
        tab.wait_for_selector(STATS, timeout=60_000)
        tab.wait_for_function("() => [...document.querySelectorAll('*')].some(e => e.shadowRoot?.querySelector('.stage img')?.naturalWidth > 0)")
        wait_for_app_idle(tab)
        self.stats = tab.locator(STATS).inner_text()

    @property
    def box(self) -> dict[str, float]:
        """Where the canvas is now (a screenshot widens the window, which moves it)."""
        return self.tab.locator("canvas").bounding_box()

    def mask_pixels(self, point: tuple[float, float]) -> np.ndarray:
        """A point given in displayed pixels from the canvas's corner, in the mask's pixels."""
        (width, height), box = Image.open(self.mask_path).size, self.box
        return np.array([point[0] * width / box["width"], point[1] * height / box["height"]])

    def after(self, action) -> np.ndarray:
        """Do `action`, wait for the rerun it causes, and return the mask Python received (0 or 255 per pixel)."""
        action()
        self.tab.wait_for_function(
            "([selector, before]) => document.querySelector(selector)?.innerText !== before",
            arg=[STATS.replace(":has-text('mask stats:')", ""), self.stats],
        )
        wait_for_app_idle(self.tab)
        self.stats = self.tab.locator(STATS).inner_text()
        return np.asarray(Image.open(self.mask_path))

    def stroke(self, start: tuple[float, float], end: tuple[float, float]) -> np.ndarray:
        def drag() -> None:
            mouse, box = self.tab.mouse, self.box
            left, top = box["x"], box["y"]
            mouse.move(left + start[0], top + start[1])
            mouse.down()
            mouse.move(left + end[0], top + end[1], steps=12)
            mouse.up()

        return self.after(drag)

    def click(self, selector: str) -> np.ndarray:
        return self.after(lambda: self.tab.locator(selector).click())


def test_strokes_reach_python_as_the_mask_and_erase_undo_clear_change_it(browser, tmp_path: Path):
    mask_path = tmp_path / "mask.png"
    with running_app(tmp_path / "streamlit.log", "tests/mask_painter_app.py", PYTHONPATH=str(PROJECT_ROOT), MASK_PAINTER_OUT=str(mask_path)) as url:
        context = browser.new_context(viewport={"width": 1000, "height": 1100})
        try:
            tab = context.new_page()
            tab.goto(url)
            painter = Painter(tab, mask_path)
            assert painter.stats == "mask stats: none"
            assert (painter.box["width"], painter.box["height"]) == (512, 384)  # the 640x480 picture, shown at most 512 wide

            painted = painter.stroke((100, 100), (300, 100))
            assert painted.shape == (480, 640)  # the picture's own resolution, not the display's
            radius = BRUSH_PX * 640 / 512 / 2
            from_paint = distance_to_segment(painted.shape, painter.mask_pixels((100, 100)), painter.mask_pixels((300, 100)))
            assert (painted[from_paint <= radius - EDGE_PX] == 255).all()
            assert (painted[from_paint >= radius + EDGE_PX] == 0).all()
            assert f"{np.count_nonzero(painted)} white pixels, bounding box {Image.fromarray(painted).getbbox()}" in painter.stats
            screenshot(tab, "mask-painter-stroke")

            tab.locator("[data-tool=erase]").click()
            erased = painter.stroke((180, 100), (220, 100))
            from_erase = distance_to_segment(erased.shape, painter.mask_pixels((180, 100)), painter.mask_pixels((220, 100)))
            assert (erased[from_erase <= radius - EDGE_PX] == 0).all()
            assert (erased[(from_paint <= radius - EDGE_PX) & (from_erase >= radius + EDGE_PX)] == 255).all()
            assert np.count_nonzero(erased) < np.count_nonzero(painted)
            screenshot(tab, "mask-painter-erased")

            assert np.array_equal(painter.click("[data-action=undo]"), painted)
            assert np.array_equal(painter.stroke((180, 100), (220, 100)), erased)  # the erase tool is still on

            cleared = painter.click("[data-action=clear]")
            assert painter.stats == "mask stats: none" and not cleared.any()
            screenshot(tab, "mask-painter-cleared")
            assert np.array_equal(painter.click("[data-action=undo]"), erased)  # a clear can be undone

            tab.locator("[data-tool=paint]").click()
            tab.locator("input[name=brush]").fill("48")
            dotted = painter.stroke((400, 300), (400, 300))  # a click paints a dot of the brush's size
            big_radius = 48 * 640 / 512 / 2
            from_dot = distance_to_segment(dotted.shape, painter.mask_pixels((400, 300)), painter.mask_pixels((400, 300)))
            assert (dotted[from_dot <= big_radius - EDGE_PX] == 255).all()
            assert (dotted[(from_dot >= big_radius + EDGE_PX) & (erased == 0)] == 0).all()
        finally:
            context.close()
