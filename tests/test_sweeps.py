"""core.tasks.sweeps: axis values as AUTOMATIC1111 reads them, each cell's settings, the labelled grid, PNG settings per
cell, the runner with a fake generator and cancel, and one 2x2 sweep on the stand-in SD model."""
from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from core.errors import BadInputError
from core.models.registry import MODELS
from core.tasks import generation, pnginfo, sweeps
from core.tasks.jobs import JobCancelled
from core.tasks.lora import LoraAdapter, LoraChoice
from core.tasks.sd_settings import GenerationSettings
from core.tasks.sweeps import AxisKind, parse_axis, plan_sweep

BASE = GenerationSettings(prompt="a red bicycle", negative_prompt="red blur", width=64, height=64, steps=2, seed=7)
MODEL = "owner/model"
DARK = 128  # a pixel darker than this in a white label band is ink


def cfg(text: str = "5-9 [3]") -> sweeps.Axis:
    return parse_axis(AxisKind.CFG_SCALE, text)


def seed_axis(text: str = "1-2") -> sweeps.Axis:
    return parse_axis(AxisKind.SEED, text, name="Y")


def solid(settings: GenerationSettings, loras=()) -> list[Image.Image]:
    """A fake run: one flat image whose red channel is 20 x the CFG scale and green the seed."""
    return [Image.new("RGB", (settings.width, settings.height), (int(settings.guidance_scale * 20), settings.seed % 256, 0))]


def adapter(name: str) -> LoraAdapter:
    return LoraAdapter(name, f"{name}.safetensors", {})


def ink_columns(band: np.ndarray) -> np.ndarray:
    """The x positions in a label band (an RGB array) where something is drawn."""
    return np.flatnonzero((band.min(axis=2) < DARK).any(axis=0))


# Axis values


@pytest.mark.parametrize(
    ("kind", "text", "values"),
    [
        (AxisKind.SEED, "1, 2, 5", (1, 2, 5)),
        (AxisKind.STEPS, "1-5", (1, 2, 3, 4, 5)),
        (AxisKind.STEPS, "10-40 (+10)", (10, 20, 30, 40)),
        (AxisKind.STEPS, "1-6 (+2)", (1, 3, 5)),  # the end only when a step lands on it
        (AxisKind.STEPS, "5-1", (5, 4, 3, 2, 1)),  # counting down without a step
        (AxisKind.STEPS, "1-10 [4]", (1, 4, 7, 10)),
        (AxisKind.STEPS, "1-10 [3]", (1, 5, 10)),  # int(linspace): 5.5 is cut to 5, as in A1111
        (AxisKind.CFG_SCALE, "5-9 [3]", (5.0, 7.0, 9.0)),
        (AxisKind.CFG_SCALE, "7.5, 3-4 (+0.5)", (7.5, 3.0, 3.5, 4.0)),
        (AxisKind.CFG_SCALE, "1-2 (+0.1)", (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0)),  # no float drift
        (AxisKind.LORA_WEIGHT, "0-1 [4]", (0.0, 0.3333, 0.6667, 1.0)),  # rounded as labels and PNG text show them
        (AxisKind.LORA_WEIGHT, "-1, 0.5,", (-1.0, 0.5)),  # a trailing comma adds nothing
        (AxisKind.SCHEDULER, "euler a, PLMS, DPM++ 2M Karras", ("Euler a", "PNDM", "DPM++ 2M Karras")),  # A1111's names too
        (AxisKind.PROMPT_SR, 'red, "blue, green", ', ("red", "blue, green", "")),  # quoted commas; empty removes
    ],
)
def test_values_are_read_as_automatic1111_reads_them(kind, text, values):
    axis = parse_axis(kind, text, adapter="style")
    assert axis.values == values
    assert parse_axis(kind, sweeps.axis_values_text(axis), adapter="style") == axis  # the grid's PNG text reads back


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        (AxisKind.CFG_SCALE, "5, 40", "`X: CFG scale` has to be between 0 and 30 but is 40."),
        (AxisKind.CFG_SCALE, "5-" + "9" * 400, "`X: CFG scale` has to be between 0 and 30 but is inf."),
        (AxisKind.STEPS, "10, 2.5", "`X values` '2.5' is not a whole number or a range of them."),
        (AxisKind.STEPS, "1-100", "`X values` '1-100' gives 100 or more values; an axis takes at most 16."),
        (AxisKind.SEED, "0-4000000000", "`X values` '0-4000000000' gives 4,000,000,001 or more values"),  # refused before it is listed
        (AxisKind.CFG_SCALE, "1-9 (+0)", "`X values` '1-9 (+0)': a step of 0 never gets from 1 to 9."),
        (AxisKind.STEPS, "1-9 (-2)", "`X values` '1-9 (-2)': a step of -2 never gets from 1 to 9."),
        (AxisKind.CFG_SCALE, "1-9 [0]", "`X values` '1-9 [0]' asks for 0 values."),
        (AxisKind.SEED, "1, 2, 1", "`X values` gives 1 twice."),
        (AxisKind.SEED, " , ", "`X values` ' , ' holds no value."),
        (AxisKind.SCHEDULER, "Euler, Heun", "`X values` 'Heun' is not a scheduler: use PNDM, DDIM, Euler"),
        (AxisKind.PROMPT_SR, ", red", "`X values` starts with an empty value"),
        (AxisKind.LORA_WEIGHT, "0.5, 1", "The X axis sets a LoRA weight but names no adapter."),
        (AxisKind.SEED, "1, " * 6000, "`X values` is 18,000 characters long"),
        (AxisKind.STEPS, "9" * 30 + "x" * 70, f"`X values` '{'9' * 30 + 'x' * 30}…' is not a whole number"),  # a paste is quoted cut
    ],
)
def test_bad_values_are_refused_quoting_the_axis_and_the_value(kind, text, message):
    with pytest.raises(BadInputError) as refused:
        parse_axis(kind, text)
    assert str(refused.value).startswith(message)


# Plans


def test_cells_go_row_by_row_and_share_one_seed_unless_the_seed_is_an_axis():
    plan = plan_sweep(replace(BASE, seed=None, num_images=4), cfg(), parse_axis(AxisKind.STEPS, "2, 4", name="Y"))
    assert (plan.columns, plan.rows, len(plan.cells)) == (3, 2, 6)
    assert [(c.column, c.row, c.settings.guidance_scale, c.settings.steps) for c in plan.cells] == [
        (0, 0, 5.0, 2), (1, 0, 7.0, 2), (2, 0, 9.0, 2), (0, 1, 5.0, 4), (1, 1, 7.0, 4), (2, 1, 9.0, 4),
    ]
    assert len({c.settings.seed for c in plan.cells}) == 1 and plan.cells[0].settings.seed is not None  # drawn once
    assert all(c.settings.num_images == 1 for c in plan.cells)
    assert plan.cells[4].settings == replace(BASE, guidance_scale=7.0, steps=4, seed=plan.base.seed)
    seeded = plan_sweep(BASE, cfg("7"), seed_axis("3, 9"))
    assert [c.settings.seed for c in seeded.cells] == [3, 9]


def test_prompt_sr_replaces_in_the_prompt_and_the_negative_prompt_as_automatic1111():
    plan = plan_sweep(BASE, parse_axis(AxisKind.PROMPT_SR, "red, blue, "))
    assert [(c.settings.prompt, c.settings.negative_prompt) for c in plan.cells] == [
        ("a red bicycle", "red blur"), ("a blue bicycle", "blue blur"), ("a  bicycle", " blur"),
    ]
    only_negative = plan_sweep(BASE, parse_axis(AxisKind.PROMPT_SR, "blur, haze"))  # found in either prompt is enough
    assert only_negative.cells[1].settings.negative_prompt == "red haze"


def test_prompt_sr_needs_its_search_text_in_a_prompt():
    with pytest.raises(BadInputError, match="`Y values`: the search text 'green' \\(the first value\\) is in neither the prompt nor the negative prompt"):
        plan_sweep(BASE, cfg(), parse_axis(AxisKind.PROMPT_SR, "green, blue", name="Y"))


def test_two_axes_set_two_things():
    with pytest.raises(BadInputError, match="The X and Y axes both set CFG scale"):
        plan_sweep(BASE, cfg(), parse_axis(AxisKind.CFG_SCALE, "3", name="Y"))
    both = plan_sweep(BASE, parse_axis(AxisKind.PROMPT_SR, "red, blue"), parse_axis(AxisKind.PROMPT_SR, "bicycle, car", name="Y"))
    assert both.cells[3].settings.prompt == "a blue car"  # X is applied first, then Y


def test_at_most_64_cells():
    assert len(plan_sweep(BASE, parse_axis(AxisKind.SEED, "1-8"), parse_axis(AxisKind.STEPS, "1-8", name="Y")).cells) == 64
    with pytest.raises(BadInputError, match="The sweep has 8 x 9 = 72 cells; a sweep makes at most 64"):
        plan_sweep(BASE, parse_axis(AxisKind.SEED, "1-8"), parse_axis(AxisKind.STEPS, "1-9", name="Y"))


def test_a_grid_this_app_could_not_read_back_is_refused():
    with pytest.raises(BadInputError, match=r"The grid of 8 x 8 images of 1024x1024 is 8960x8336 = 74,690,560 pixels, more than the 40,000,000"):
        plan_sweep(replace(BASE, width=1024, height=1024), parse_axis(AxisKind.SEED, "1-8"), parse_axis(AxisKind.STEPS, "1-8", name="Y"))


def test_an_image_to_image_cell_without_a_step_to_run_is_refused_before_the_sweep():
    with pytest.raises(BadInputError, match="leaves the cell 1, 1 no step to run"):
        plan_sweep(replace(BASE, mode=generation.Mode.IMAGE_TO_IMAGE, strength=0.3), parse_axis(AxisKind.STEPS, "1-4"))


def test_a_lora_weight_axis_sets_the_named_adapter_only():
    style, detail = adapter("style"), adapter("detail")
    plan = plan_sweep(BASE, parse_axis(AxisKind.LORA_WEIGHT, "0, 0.5, 1", adapter="style"), loras=(LoraChoice(style, 0.8), LoraChoice(detail, 0.3)))
    assert [c.loras for c in plan.cells] == [(LoraChoice(style, w), LoraChoice(detail, 0.3)) for w in (0.0, 0.5, 1.0)]
    assert plan.cells[1].settings.loras == (("style", 0.5), ("detail", 0.3))  # what the cell's PNG records
    assert plan.x.label(0.5) == "LoRA weight (style): 0.5"
    with pytest.raises(BadInputError, match="sets the weight of LoRA 'other', which this run does not use \\(it uses: 'style'\\)"):
        plan_sweep(BASE, parse_axis(AxisKind.LORA_WEIGHT, "0, 1", adapter="other"), loras=(LoraChoice(style),))


def test_the_estimate_counts_every_cells_steps():
    plan = plan_sweep(BASE, parse_axis(AxisKind.STEPS, "10, 20, 30"), seed_axis("1-4"))
    assert plan.total_steps == 4 * (10 + 20 + 30)
    assert plan.estimated_seconds(steps_per_s=20.0) == 12.0


# The grid


def test_the_grid_is_the_label_bands_and_the_cells():
    plan = plan_sweep(replace(BASE, width=128, height=96), cfg(), seed_axis())
    layout = sweeps.grid_layout(plan)
    grid = sweeps.grid_image(solid_images(plan), plan)
    assert grid.size == layout.size == (layout.left_band_px + 3 * 128, layout.top_band_px + 2 * 96)
    assert layout.top_band_px > 0 and layout.left_band_px >= 96  # 3/4 of a cell, at least 8 letters' heights
    for cell, image in zip(plan.cells, solid_images(plan), strict=True):
        x0, y0 = layout.cell_origin(cell.column, cell.row)
        assert grid.crop((x0, y0, x0 + 128, y0 + 96)).tobytes() == image.tobytes()  # no text over a cell
    x_only = plan_sweep(BASE, cfg())
    assert sweeps.grid_layout(x_only).left_band_px == 0  # no Y axis, no row band


def solid_images(plan: sweeps.SweepPlan) -> list[Image.Image]:
    return [solid(cell.settings)[0] for cell in plan.cells]


def test_every_row_and_column_has_its_label_drawn_at_a_readable_size():
    plan = plan_sweep(replace(BASE, width=512, height=512), cfg(), seed_axis())
    layout = sweeps.grid_layout(plan)
    pixels = np.asarray(sweeps.grid_image(solid_images(plan), plan))
    assert layout.font_px == 32  # 1/16 of a 512 px cell
    assert [lines for lines in layout.column_lines] == [("CFG scale: 5",), ("CFG scale: 7",), ("CFG scale: 9",)]
    for column in range(3):
        x0, _ = layout.cell_origin(column, 0)
        assert ink_columns(pixels[: layout.top_band_px, x0 : x0 + 512]).size > 0
    for row in range(2):
        _, y0 = layout.cell_origin(0, row)
        assert ink_columns(pixels[y0 : y0 + 512, : layout.left_band_px]).size > 0


def test_a_long_label_wraps_and_ends_in_an_ellipsis_inside_its_own_column():
    long_value = ", ".join(["an extremely long replacement with many words that could never fit on one line"] * 3)
    plan = plan_sweep(replace(BASE, width=256, height=256), parse_axis(AxisKind.PROMPT_SR, f'red, "{long_value}", b'),
                      parse_axis(AxisKind.PROMPT_SR, "bicycle, supercalifragilisticexpialidociouslylongunbreakablewordforacar", name="Y"))
    layout = sweeps.grid_layout(plan)
    pixels = np.asarray(sweeps.grid_image(solid_images(plan), plan))
    column_labels = layout.column_lines[1]
    assert len(column_labels) == sweeps.MAX_COLUMN_LABEL_LINES and column_labels[-1].endswith("…")
    assert len(layout.row_lines[1]) > 1  # the long word is broken to fit the band
    for column in range(plan.columns):  # ink in each column's band stays within the column
        x0, _ = layout.cell_origin(column, 0)
        inked = ink_columns(pixels[: layout.top_band_px, x0 : x0 + 256])
        assert inked.min() > 0 and inked.max() < 255
    assert ink_columns(pixels[layout.top_band_px :, : layout.left_band_px]).max() < layout.left_band_px - 1
    for cell, image in zip(plan.cells, solid_images(plan), strict=True):
        x0, y0 = layout.cell_origin(cell.column, cell.row)
        assert np.array_equal(pixels[y0 : y0 + 256, x0 : x0 + 256], np.asarray(image))


# PNG settings


def test_each_cells_png_reads_back_as_that_cells_settings():
    style = adapter("style")
    plan = plan_sweep(BASE, parse_axis(AxisKind.SCHEDULER, "Euler a, PNDM"), parse_axis(AxisKind.LORA_WEIGHT, "0.5, 1", adapter="style", name="Y"),
                      loras=(LoraChoice(style),))
    for cell in plan.cells:
        text = pnginfo.read_parameters(sweeps.cell_png(solid(cell.settings)[0], cell, MODEL, is_standin=False))
        parsed = pnginfo.parse_parameters(text)
        assert parsed.model == MODEL
        assert parsed.settings == replace(cell.settings, loras=())  # the reader leaves LoRAs to the user (named only)
        assert f"LoRA: \"style:{cell.settings.loras[0][1]:g}\"" in text


def test_the_grid_png_names_its_axes_and_reads_back_as_its_first_cell():
    plan = plan_sweep(BASE, cfg(), parse_axis(AxisKind.PROMPT_SR, "red, blue, green", name="Y"))
    text = pnginfo.read_parameters(sweeps.run_sweep(plan, solid, MODEL, is_standin=False).grid_png)
    assert text.endswith('Script: X/Y plot, X Type: CFG scale, X Values: "5, 7, 9", Y Type: Prompt S/R, Y Values: "red, blue, green"')
    assert pnginfo.parse_parameters(text).settings == plan.cells[0].settings


# Running


def test_cell_pngs_are_encoded_beside_the_next_cells_run_and_the_grids_only_when_asked_for(monkeypatch):
    encoded = []
    real_png_with_parameters = pnginfo.png_with_parameters
    monkeypatch.setattr(pnginfo, "png_with_parameters",
                        lambda image, text: encoded.append((image.size, threading.current_thread().name)) or real_png_with_parameters(image, text))
    plan = plan_sweep(BASE, cfg(), seed_axis())
    result = sweeps.run_sweep(plan, solid, MODEL, is_standin=False)
    cell_size = (BASE.width, BASE.height)
    assert len(encoded) == len(plan.cells) and all(size == cell_size and name.startswith("sweep-png") for size, name in encoded)
    first = result.cells[0].png
    assert pnginfo.parse_parameters(pnginfo.read_parameters(first)).settings == plan.cells[0].settings
    grid = result.grid_png
    assert result.grid_png is grid and encoded[-1] == (result.grid.size, threading.current_thread().name) and len(encoded) == len(plan.cells) + 1


def test_run_sweep_makes_every_cell_in_order_and_reports_each():
    plan = plan_sweep(BASE, cfg(), seed_axis())
    reported = []
    result = sweeps.run_sweep(plan, solid, MODEL, is_standin=False, on_cell_done=lambda done, total, cell: reported.append((done, total, cell.cell.settings.guidance_scale)))
    assert reported == [(1, 6, 5.0), (2, 6, 7.0), (3, 6, 9.0), (4, 6, 5.0), (5, 6, 7.0), (6, 6, 9.0)]
    assert not result.cancelled and [r.cell for r in result.cells] == list(plan.cells)
    layout = sweeps.grid_layout(plan)
    for cell in plan.cells:  # each cell's colour where its CFG and seed put it
        x0, y0 = layout.cell_origin(cell.column, cell.row)
        assert result.grid.getpixel((x0 + 5, y0 + 5)) == (int(cell.settings.guidance_scale * 20), cell.settings.seed, 0)
    assert pnginfo.parse_parameters(pnginfo.read_parameters(result.cells[4].png)).settings == plan.cells[4].settings


@pytest.mark.parametrize("how", ["between cells", "inside a cell"])
def test_a_cancelled_sweep_keeps_the_cells_made_and_greys_the_rest(how):
    plan = plan_sweep(BASE, cfg(), seed_axis())
    calls = []

    def generate_one(settings, loras):
        calls.append(settings)
        if how == "inside a cell" and len(calls) == 4:
            raise JobCancelled
        return solid(settings)

    result = sweeps.run_sweep(plan, generate_one, MODEL, is_standin=False, cancelled=lambda: len(calls) == 3 and how == "between cells")
    assert result.cancelled and len(result.cells) == 3
    assert len(calls) == (3 if how == "between cells" else 4)  # no cell starts after the stop
    layout = sweeps.grid_layout(plan)
    x0, y0 = layout.cell_origin(0, 1)
    assert result.grid.getpixel((x0 + 5, y0 + 5)) == sweeps.MISSING_CELL_GREY
    assert result.grid.size == layout.size


def test_a_two_by_two_sweep_on_the_standin_model(manager):
    sd = manager.get(MODELS["sd15"], allow_standin=True)
    plan = plan_sweep(BASE, cfg("1, 9"), seed_axis("1, 2"))

    def generate_one(settings, loras):
        return [image.image for image in generation.generate(sd, settings, loras=loras).images]

    result = sweeps.run_sweep(plan, generate_one, sd.spec.repo_id, is_standin=sd.is_standin)
    pixels = [np.asarray(cell.image) for cell in result.cells]
    assert all(image.shape == (64, 64, 3) for image in pixels)
    assert not np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])  # CFG and seed both tell
    assert result.grid.size == sweeps.grid_layout(plan).size
    again = pnginfo.parse_parameters(pnginfo.read_parameters(result.cells[3].png)).settings
    np.testing.assert_array_equal(np.asarray(generate_one(again, ())[0]), pixels[3])  # a cell's PNG makes it again
