"""The generation page's X/Y plot and "Variation and hires fix" inputs through AppTest, on the stand-in SD pipeline."""
from __future__ import annotations

import io

from PIL import Image
from test_generate_page import WAIT_S, generate, key, open_page, texts

from app_pages.common import literal
from app_pages.generate_sweep import SHOWN_GRID_WIDTH, shown_grid_png
from core.tasks import pnginfo
from core.tasks.sd_settings import HiresUpscaler


def test_a_two_by_two_sweep_shows_its_grid_and_each_cells_png(app_env):
    at = open_page(prompt="a red bicycle", seed=5, steps=2)
    at.selectbox(key=key("sweep_X_kind")).set_value("CFG scale").run()
    at.text_input(key=key("sweep_X_values")).input("1, 9").run()
    at.selectbox(key=key("sweep_Y_kind")).set_value("Seed").run()
    at.text_input(key=key("sweep_Y_values")).input("1-2").run()
    assert "2 × 2 = 4 images, 8 steps" in texts(at)
    at.button(key=key("sweep_start")).click().run()
    assert at.session_state[key("sweep_run")].wait(WAIT_S)
    at.run()
    assert not at.exception and not at.error
    result = at.session_state[key("sweep_outcome")]
    assert len(result.cells) == 4 and not result.cancelled
    assert [(c.cell.settings.guidance_scale, c.cell.settings.seed) for c in result.cells] == [(1, 1), (9, 1), (1, 2), (9, 2)]
    assert pnginfo.parse_parameters(pnginfo.read_parameters(result.cells[3].png)).settings.seed == 2
    labels = [button.proto.label for button in at.get("download_button")]
    assert "Grid PNG" in labels and "Each cell's PNG (zip)" in labels
    assert any("X/Y plot: CFG scale" in str(image.proto) for image in at.get("image"))
    shown = Image.open(io.BytesIO(at.session_state[key("sweep_shown_grid")]))
    assert shown.size == result.grid.size  # narrower than the page: shown as made, encoded once
    wide = Image.new("RGB", (2432, 2120), "white")
    assert Image.open(io.BytesIO(shown_grid_png(wide))).size == (SHOWN_GRID_WIDTH, 2120 * SHOWN_GRID_WIDTH // 2432)


def test_bad_axis_values_are_one_message_and_no_run(app_env):
    at = open_page(prompt="a red bicycle")
    at.selectbox(key=key("sweep_X_kind")).set_value("Steps").run()
    at.text_input(key=key("sweep_X_values")).input("1-9 (-2)").run()
    assert not at.exception and len(at.error) == 1
    assert literal("`X values` '1-9 (-2)': a step of -2 never gets from 1 to 9") in at.error[0].value
    assert at.button(key=key("sweep_start")).disabled


def test_the_hires_inputs_make_a_larger_image_and_a_varied_one(app_env):
    at = open_page(prompt="a red bicycle", seed=5, steps=2)
    at.number_input(key=key("hires_scale")).set_value(2.0)
    at.selectbox(key=key("hires_upscaler")).set_value(HiresUpscaler.IMAGE)
    at.slider(key=key("variation_strength")).set_value(0.5)
    at.toggle(key=key("random_variation_seed")).set_value(False).run()
    at.number_input(key=key("variation_seed")).set_value(77)
    at = generate(at.run())
    assert not at.exception and not at.error
    result = at.session_state[key("gallery")][0].result
    assert result.images[0].image.size == (128, 128)
    assert (result.settings.variation_seed, result.settings.variation_strength, result.settings.hires_upscaler) == (77, 0.5, HiresUpscaler.IMAGE)
    text = pnginfo.read_parameters(at.session_state[key("gallery")][0].pngs[0])
    assert "Variation seed: 77, Variation seed strength: 0.5" in text and "Hires upscale: 2" in text
    caption = next(c.value for c in at.caption if "steps" in c.value and "seed 5" in c.value)
    assert "64×64 → hires fix 128×128" in caption and "variation seed 77 at 0.5" in caption  # the gallery says what was made


def test_hires_inputs_are_off_by_default_and_a_too_large_scale_is_refused(app_env):
    at = open_page(prompt="a red bicycle", seed=5, steps=2)
    assert at.number_input(key=key("hires_scale")).value == 1.0 and at.slider(key=key("variation_strength")).value == 0.0
    at.number_input(key=key("width")).set_value(1536)
    at.number_input(key=key("hires_scale")).set_value(2.0).run()
    at.button(key=key("start")).click().run()
    assert not at.exception and literal("`hires_scale` 2 makes 1536x64 into 3072x128") in at.error[0].value
