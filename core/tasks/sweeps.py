"""X/Y plot sweeps, as AUTOMATIC1111's X/Y/Z plot script has them: one setting per axis, one image per cell, one grid.

    axis = parse_axis(AxisKind.CFG_SCALE, "5-9 [3]")              # 5, 7, 9
    plan = plan_sweep(base, axis, parse_axis(AxisKind.SEED, "1-2"), loras)  # each cell's settings, checked
    result = run_sweep(plan, generate_one, model_name, is_standin=False)  # cells one at a time, cancel between them

Values are written as in A1111: "1, 2, 5", a range "1-5" (ends included), a range with a step "10-30 (+10)", a range
with a count "5-9 [3]". Prompt S/R's first value is the text searched for; each value (the first too) replaces it in
the prompt and the negative prompt. Nothing here imports torch: the generation function is passed in.
"""
from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import cached_property

from PIL import Image, ImageDraw, ImageFont

from core.checks import check_number, shown
from core.errors import BadInputError
from core.tasks import pnginfo
from core.tasks.images import MAX_PIXELS
from core.tasks.jobs import JobCancelled
from core.tasks.lora import MAX_WEIGHT, LoraChoice
from core.tasks.sd_settings import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, SCHEDULERS, GenerationSettings, available_schedulers

# 16 values an axis and 64 cells in all: 64 SD 1.x images of 512x512 at 25 steps take 13 s on an H100 with CUDA graphs
# and about 90 s eager, as LoRA runs are (0.20 and about 1.4 s an image, docs/PERFORMANCE.md), and 8x8 cells still
# show each image at a useful size on a screen; 16 values leave room for one long axis (16x1, 16x4). The grid must also stay within MAX_PIXELS, the limit the
# app itself reads images at, so a saved grid can be dropped back on the page (checked by plan_sweep).
MAX_VALUES_PER_AXIS = 16
MAX_CELLS = 64
MAX_AXIS_TEXT_CHARS = 10_000  # far more than 16 prompt fragments need; the CSV reader never sees a pasted novel
FLOAT_DIGITS = 4  # values of a float range are rounded so that labels and PNG text show what the run used
MAX_COLUMN_LABEL_LINES = 3  # a longer column label ends in an ellipsis
MISSING_CELL_GREY = (200, 200, 200)  # a cell a cancelled sweep never made


class AxisKind(StrEnum):
    SEED = "Seed"
    STEPS = "Steps"
    CFG_SCALE = "CFG scale"
    SCHEDULER = "Scheduler"
    LORA_WEIGHT = "LoRA weight"
    PROMPT_SR = "Prompt S/R"


# What the page shows as the placeholder of each axis's values.
EXAMPLES = {
    AxisKind.SEED: "1, 2, 3 or 100-103",
    AxisKind.STEPS: "10-40 (+10)",
    AxisKind.CFG_SCALE: "5-9 [3]",
    AxisKind.SCHEDULER: "Euler a, DPM++ 2M Karras, UniPC",
    AxisKind.LORA_WEIGHT: "0-1 [5]",
    AxisKind.PROMPT_SR: "red, blue, green",
}
# (whole numbers only, lowest, highest) of each numeric axis: the limits a single run has.
_NUMBER_LIMITS = {
    AxisKind.SEED: (True, 0, MAX_SEED),
    AxisKind.STEPS: (True, 1, MAX_STEPS),
    AxisKind.CFG_SCALE: (False, 0, MAX_GUIDANCE),
    AxisKind.LORA_WEIGHT: (False, -MAX_WEIGHT, MAX_WEIGHT),
}
_WHOLE = r"[+-]?\d+"
_FLOAT = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"

AxisValue = int | float | str
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass(frozen=True)
class Axis:
    kind: AxisKind
    values: tuple[AxisValue, ...]
    adapter: str = ""  # LoRA weight: the name of the adapter whose weight this axis sets

    @property
    def title(self) -> str:
        return f"{self.kind} ({self.adapter})" if self.adapter else str(self.kind)

    def label(self, value: AxisValue) -> str:
        """A row's or column's label: "CFG scale: 7"; a prompt S/R value is its own label, as in A1111's grids."""
        if self.kind is AxisKind.PROMPT_SR:
            return str(value) or "(removed)"
        return f"{self.title}: {value if isinstance(value, str) else shown(value)}"


def parse_axis(kind: AxisKind, text: str, adapter: str = "", name: str = "X") -> Axis:
    """The axis `kind` with the values written in `text`; BadInputError quoting `name`'s values and the bad value.

    `name` is the axis as the page calls it ("X" or "Y"). A LoRA weight axis needs the `adapter`'s name.
    """
    argument = f"{name} values"
    if len(text) > MAX_AXIS_TEXT_CHARS:
        raise BadInputError(f"`{argument}` is {len(text):,} characters long, more than {MAX_AXIS_TEXT_CHARS:,}.", remedy=_remedy(kind))
    if kind is AxisKind.LORA_WEIGHT and not adapter:
        raise BadInputError(f"The {name} axis sets a LoRA weight but names no adapter.", remedy="Choose the LoRA whose weight the axis sets.")
    items = _split(text)
    if kind is not AxisKind.PROMPT_SR:  # an empty prompt S/R value removes the search text; elsewhere it is a stray comma
        items = [item for item in items if item]
    if kind in _NUMBER_LIMITS:
        values: list[AxisValue] = _numbers(kind, items, f"{name}: {kind}", argument)
    elif kind is AxisKind.SCHEDULER:
        values = [_scheduler(item, argument) for item in items]
    else:
        values = list(items)
        if values and not values[0]:
            raise BadInputError(f"`{argument}` starts with an empty value, and the first value of Prompt S/R is the text searched for.", remedy=_remedy(kind))
    if not values:
        raise BadInputError(f"`{argument}` {_quoted(text)} holds no value.", remedy=_remedy(kind))
    _check_count(len(values), argument, text)
    repeated = next((value for i, value in enumerate(values) if value in values[:i]), None)
    if repeated is not None:  # the same settings twice is a cell's run for an identical picture
        raise BadInputError(f"`{argument}` gives {_shown_value(repeated)} twice.", remedy="List each value once.")
    return Axis(kind, tuple(values), adapter)


def _split(text: str) -> list[str]:
    """Comma-separated values, a value with a comma in double quotes, as A1111 reads them (with Python's CSV reader)."""
    return [item.strip() for row in csv.reader(io.StringIO(text), skipinitialspace=True) for item in row]


def _numbers(kind: AxisKind, items: list[str], number_name: str, argument: str) -> list[AxisValue]:
    whole, low, high = _NUMBER_LIMITS[kind]

    def check(value: AxisValue) -> None:
        check_number(number_name, value, low, high, whole=whole)

    values: list[AxisValue] = []
    for item in items:
        values += _expand(item, whole, check, argument, len(values), _remedy(kind))
    return values


def _expand(item: str, whole: bool, check: Callable[[AxisValue], None], argument: str, so_far: int, remedy: str) -> list[AxisValue]:
    """One number, or a range's numbers: "1-5", "10-30 (+10)" (a step), "5-9 [3]" (a count, as numpy's linspace).

    `check` refuses a number outside the axis's limits; a range's ends are checked, so all its numbers are.
    """
    number = _WHOLE if whole else _FLOAT

    def read(text: str) -> AxisValue:
        return _whole_number(text, argument) if whole else float(text)

    if re.fullmatch(number, item):
        value = read(item)
        check(value)
        return [value]
    found = re.fullmatch(rf"({number})\s*-\s*({number})\s*(?:\(\s*({number})\s*\)|\[\s*(\d+)\s*\])?", item)
    if found is None:
        raise BadInputError(f"`{argument}` {_quoted(item)} is not a {'whole ' if whole else ''}number or a range of them.", remedy=remedy)
    start, end = read(found.group(1)), read(found.group(2))
    check(start)
    check(end)
    step_text, count_text = found.group(3, 4)
    if count_text is not None:
        count = _whole_number(count_text, argument)
        _check_count(so_far + count, argument, item)
        if count < 1:
            raise BadInputError(f"`{argument}` {_quoted(item)} asks for {count} values.", remedy=remedy)
        points = [start + (end - start) * i / (count - 1) for i in range(count)] if count > 1 else [start]
    else:
        step = read(step_text) if step_text is not None else (1 if end >= start else -1)
        if step == 0 or (end - start) * step < 0:
            raise BadInputError(f"`{argument}` {_quoted(item)}: a step of {shown(step)} never gets from {shown(start)} to {shown(end)}.", remedy=remedy)
        count = math.floor((end - start) / step + 1e-9) + 1  # the end is included when a step lands on it
        _check_count(so_far + count, argument, item)
        points = [start + step * i for i in range(count)]
    # Whole numbers of a count range are cut as A1111 does (int(linspace)): "1-10 [4]" is 1, 4, 7, 10.
    return [int(point) if whole else round(point, FLOAT_DIGITS) for point in points]


def _whole_number(text: str, argument: str) -> int:
    try:
        return int(text)
    except ValueError:  # more digits than Python converts
        raise BadInputError(f"`{argument}` {text[:20]!r}… is too long a number.") from None


def _check_count(count: int, argument: str, text: str) -> None:
    if count > MAX_VALUES_PER_AXIS:
        raise BadInputError(
            f"`{argument}` {_quoted(text)} gives {count:,} or more values; an axis takes at most {MAX_VALUES_PER_AXIS}.",
            remedy="Use fewer values, or a larger step or a smaller count in the range.",
        )


def _scheduler(text: str, argument: str) -> str:
    """The scheduler named `text`, by this app's name or A1111's sampler name, in any case."""
    for name, choice in SCHEDULERS.items():
        if text.casefold() in (name.casefold(), choice.a1111_name.casefold()):
            if name not in available_schedulers():
                raise BadInputError(f"`{argument}` {_quoted(text)} needs the Python package {choice.needs}, which is not installed.",
                                    remedy="Choose another scheduler, or ask the operator to install it.")
            return name
    raise BadInputError(f"`{argument}` {_quoted(text)} is not a scheduler: use {', '.join(available_schedulers())}.")


def _quoted(text: str) -> str:
    """A value as a message quotes it, cut short when a paste made it long."""
    return repr(text if len(text) <= 60 else text[:60] + "…")


def _remedy(kind: AxisKind) -> str:
    return f"Write values separated by commas, for example {EXAMPLES[kind]}."


def _shown_value(value: AxisValue) -> str:
    return repr(value) if isinstance(value, str) else shown(value)


@dataclass(frozen=True)
class SweepCell:
    column: int
    row: int
    settings: GenerationSettings  # one image, its own seed, LoRA weights as recorded in PNG metadata
    loras: tuple[LoraChoice, ...]  # the adapters the cell runs with

    def label(self, plan: SweepPlan) -> str:
        """What sets this cell apart, for progress messages: "CFG scale: 7, Seed: 2"."""
        labels = [plan.x.label(plan.x.values[self.column])]
        if plan.y is not None:
            labels.append(plan.y.label(plan.y.values[self.row]))
        return ", ".join(labels)


@dataclass(frozen=True)
class SweepPlan:
    base: GenerationSettings  # the user's settings with the seed fixed, one image
    x: Axis
    y: Axis | None
    cells: tuple[SweepCell, ...]  # row by row

    @property
    def columns(self) -> int:
        return len(self.x.values)

    @property
    def rows(self) -> int:
        return len(self.y.values) if self.y is not None else 1

    @property
    def total_steps(self) -> int:
        return sum(cell.settings.total_denoising_steps for cell in self.cells)  # a hires pass's steps too

    def estimated_seconds(self, steps_per_s: float) -> float:
        """The sweep's time at the rate of a run of the same size (GenerationResult.steps_per_s, decoding included)."""
        return self.total_steps / steps_per_s


def plan_sweep(base: GenerationSettings, x: Axis, y: Axis | None = None, loras: tuple[LoraChoice, ...] = ()) -> SweepPlan:
    """Each cell's settings and LoRA choices, X varying along a row, checked before any run.

    Every cell makes one image. Unless the seed is an axis, all cells share one seed: the base's, or one drawn now,
    so that cells differ only by their axes. `loras` are the run's adapters; a LoRA weight axis sets one of them.
    """
    # 1. Check the axes against each other and against the base settings
    if y is not None and _target(x) == _target(y):
        raise BadInputError(f"The X and Y axes both set {x.title}.", remedy="Choose another setting for one of them.")
    for axis, name in ((x, "X"), (y, "Y")):
        if axis is not None:
            _check_axis_fits(axis, name, base, loras)
    rows = y.values if y is not None else (None,)
    if len(x.values) * len(rows) > MAX_CELLS:
        raise BadInputError(
            f"The sweep has {len(x.values)} x {len(rows)} = {len(x.values) * len(rows)} cells; a sweep makes at most {MAX_CELLS}.",
            remedy="Use fewer values on an axis.",
        )
    # 2. One cell per pair of values, X set first as in A1111 (it matters when both axes are prompt S/R)
    base = replace(base.with_seed(), num_images=1, loras=_recorded(loras))
    cells = []
    for row, y_value in enumerate(rows):
        for column, x_value in enumerate(x.values):
            settings, choices = _apply(x, x_value, base, loras)
            if y is not None:
                settings, choices = _apply(y, y_value, settings, choices)
            if settings.denoising_steps < 1:
                raise BadInputError(f"`strength` {settings.strength:g} of {settings.steps} steps leaves the cell {column + 1}, {row + 1} no step to run.",
                                    remedy="Use more steps or a higher strength.")
            cells.append(SweepCell(column, row, settings, choices))
    plan = SweepPlan(base, x, y, tuple(cells))
    # 3. The grid must stay readable by this app
    width, height = grid_layout(plan).size
    if width * height > MAX_PIXELS:
        raise BadInputError(
            f"The grid of {plan.columns} x {plan.rows} images of {base.width}x{base.height} is {width}x{height} = {width * height:,} pixels, "
            f"more than the {MAX_PIXELS:,} this app reads back.", remedy="Use fewer values or a smaller image size.",
        )
    return plan


def _target(axis: Axis) -> tuple[AxisKind, str | AxisValue]:
    """What an axis sets: two axes may both be prompt S/R (other search texts) or LoRA weights (other adapters)."""
    if axis.kind is AxisKind.PROMPT_SR:
        return axis.kind, axis.values[0]
    return axis.kind, axis.adapter


def _check_axis_fits(axis: Axis, name: str, base: GenerationSettings, loras: tuple[LoraChoice, ...]) -> None:
    if axis.kind is AxisKind.PROMPT_SR:
        search = str(axis.values[0])
        if search not in base.prompt and search not in base.negative_prompt:
            raise BadInputError(
                f"`{name} values`: the search text {_quoted(search)} (the first value) is in neither the prompt nor the negative prompt.",
                remedy="Prompt S/R's first value is the text to look for; each value, the first too, replaces it in turn.",
            )
    if axis.kind is AxisKind.LORA_WEIGHT and axis.adapter not in (choice.adapter.name for choice in loras):
        chosen = ", ".join(repr(choice.adapter.name) for choice in loras) or "none"
        raise BadInputError(f"The {name} axis sets the weight of LoRA {axis.adapter!r}, which this run does not use (it uses: {chosen}).",
                            remedy="Add that LoRA to the run, or choose one of its LoRAs for the axis.")


def _apply(axis: Axis, value: AxisValue, settings: GenerationSettings, loras: tuple[LoraChoice, ...]) -> tuple[GenerationSettings, tuple[LoraChoice, ...]]:
    """The settings and LoRA choices with the axis's setting at `value`."""
    if axis.kind is AxisKind.SEED:
        return replace(settings, seed=value), loras
    if axis.kind is AxisKind.STEPS:
        return replace(settings, steps=value), loras
    if axis.kind is AxisKind.CFG_SCALE:
        return replace(settings, guidance_scale=value), loras
    if axis.kind is AxisKind.SCHEDULER:
        return replace(settings, scheduler=value), loras
    if axis.kind is AxisKind.LORA_WEIGHT:
        loras = tuple(LoraChoice(c.adapter, value) if c.adapter.name == axis.adapter else c for c in loras)
        return replace(settings, loras=_recorded(loras)), loras
    search = str(axis.values[0])  # prompt S/R: in both prompts, as A1111's apply_prompt
    return replace(settings, prompt=settings.prompt.replace(search, str(value)),
                   negative_prompt=settings.negative_prompt.replace(search, str(value))), loras


def _recorded(loras: tuple[LoraChoice, ...]) -> tuple[tuple[str, float], ...]:
    """The choices as GenerationSettings.loras records them (what core.tasks.generation.generate sets too)."""
    return tuple((choice.adapter.name, choice.weight) for choice in loras)


@dataclass(frozen=True)
class GridLayout:
    """Where the grid's parts go: a band of column labels on top, a band of row labels on the left (with a Y axis)."""

    cell_width: int
    cell_height: int
    columns: int
    rows: int
    font_px: int
    line_px: int
    top_band_px: int
    left_band_px: int
    column_lines: tuple[tuple[str, ...], ...]  # each column's label, wrapped to its width
    row_lines: tuple[tuple[str, ...], ...]

    @property
    def size(self) -> tuple[int, int]:
        return self.left_band_px + self.columns * self.cell_width, self.top_band_px + self.rows * self.cell_height

    def cell_origin(self, column: int, row: int) -> tuple[int, int]:
        return self.left_band_px + column * self.cell_width, self.top_band_px + row * self.cell_height


def grid_layout(plan: SweepPlan) -> GridLayout:
    """The layout of the plan's grid. Labels are 1/16 of a cell's width high (32 px at 512 px, as readable as A1111's)
    and never under 14 px; a row band is 3/4 of a cell wide, and never under 8 labels' heights."""
    cell_width, cell_height = plan.base.width, plan.base.height
    font_px = max(14, cell_width // 16)
    font = _font(font_px)
    padding, line_px = font_px // 2, font_px * 5 // 4
    column_lines = tuple(_wrap(plan.x.label(value), font, cell_width - 2 * padding, MAX_COLUMN_LABEL_LINES) for value in plan.x.values)
    top_band_px = 2 * padding + line_px * max(len(lines) for lines in column_lines)
    row_lines: tuple[tuple[str, ...], ...] = ()
    left_band_px = 0
    if plan.y is not None:
        left_band_px = max(cell_width * 3 // 4, 8 * font_px)
        max_lines = max(1, (cell_height - 2 * padding) // line_px)
        row_lines = tuple(_wrap(plan.y.label(value), font, left_band_px - 2 * padding, max_lines) for value in plan.y.values)
    return GridLayout(cell_width, cell_height, plan.columns, plan.rows, font_px, line_px, top_band_px, left_band_px, column_lines, row_lines)


def _font(size_px: int) -> Font:
    """Pillow's own font (Aileron, bundled since Pillow 10.1, no file or network needed) at `size_px`."""
    return ImageFont.load_default(size=size_px)


def _wrap(text: str, font: Font, width_px: int, max_lines: int) -> tuple[str, ...]:
    """`text` in lines of at most `width_px`, broken at spaces (inside a word too long for a line), at most
    `max_lines` of them, the last ending in an ellipsis when text is left over."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width_px:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = word
        while font.getlength(line) > width_px and len(line) > 1 and len(lines) <= max_lines:
            cut = _fitting_prefix(line, font, width_px)
            lines.append(line[:cut])
            line = line[cut:]
        if len(lines) > max_lines:  # the rest is never shown
            break
    lines.append(line)
    if len(lines) <= max_lines:
        return tuple(lines)
    last = lines[max_lines - 1]
    while last and font.getlength(last + "…") > width_px:
        last = last[:-1]
    return (*lines[: max_lines - 1], last.rstrip() + "…")


def _fitting_prefix(text: str, font: Font, width_px: int) -> int:
    """The length of the longest start of `text` (at least one character) within `width_px`, by bisection."""
    low, high = 1, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if font.getlength(text[:middle]) <= width_px:
            low = middle
        else:
            high = middle - 1
    return low


def grid_image(images: Sequence[Image.Image], plan: SweepPlan) -> Image.Image:
    """The plan's grid: the images in cell order (fewer when a sweep was cancelled: the rest stay grey), labelled."""
    layout = grid_layout(plan)
    grid = Image.new("RGB", layout.size, "white")
    for cell, image in zip(plan.cells, images, strict=False):
        cell_size = (layout.cell_width, layout.cell_height)
        grid.paste(image.convert("RGB") if image.size == cell_size else image.convert("RGB").resize(cell_size), layout.cell_origin(cell.column, cell.row))
    for cell in plan.cells[len(images):]:
        x0, y0 = layout.cell_origin(cell.column, cell.row)
        grid.paste(MISSING_CELL_GREY, (x0, y0, x0 + layout.cell_width, y0 + layout.cell_height))
    draw = ImageDraw.Draw(grid)
    font = _font(layout.font_px)
    for column, lines in enumerate(layout.column_lines):
        x0, _ = layout.cell_origin(column, 0)
        _draw_lines(draw, font, lines, layout, (x0, 0, x0 + layout.cell_width, layout.top_band_px))
    for row, lines in enumerate(layout.row_lines):
        _, y0 = layout.cell_origin(0, row)
        _draw_lines(draw, font, lines, layout, (0, y0, layout.left_band_px, y0 + layout.cell_height))
    return grid


def _draw_lines(draw: ImageDraw.ImageDraw, font: Font, lines: tuple[str, ...], layout: GridLayout, box: tuple[int, int, int, int]) -> None:
    """`lines` centred in `box`, one under the other."""
    left, top, right, bottom = box
    y = (top + bottom - layout.line_px * len(lines)) // 2
    for line in lines:
        draw.text(((left + right) // 2, y + layout.line_px // 2), line, fill="black", font=font, anchor="mm")
        y += layout.line_px


def grid_parameters_text(plan: SweepPlan, model_name: str, *, is_standin: bool) -> str:
    """The grid PNG's `parameters`: the first cell's settings (a run that can be made again), and the axes with A1111's
    keys ("Script: X/Y plot, X Type: CFG scale, X Values: "5, 7, 9"), which core.tasks.pnginfo's reader ignores."""
    pairs = {"Script": "X/Y plot"}
    for name, axis in (("X", plan.x), ("Y", plan.y)):
        if axis is not None:
            pairs[f"{name} Type"] = axis.title
            pairs[f"{name} Values"] = axis_values_text(axis)
    extra = ", ".join(f"{key}: {pnginfo._quote(value)}" for key, value in pairs.items())  # pnginfo's own quoting rule
    return f"{pnginfo.parameters_text(plan.cells[0].settings, model_name, is_standin=is_standin)}, {extra}"


def axis_values_text(axis: Axis) -> str:
    """The axis's values as parse_axis reads them back: "5, 7, 9"; a value with a comma or quote in double quotes."""
    def field(value: AxisValue) -> str:
        text = value if isinstance(value, str) else shown(value)
        return '"' + text.replace('"', '""') + '"' if re.search(r'[,"\n]', text) or text != text.strip() else text

    return ", ".join(field(value) for value in axis.values)


def cell_png(image: Image.Image, cell: SweepCell, model_name: str, *, is_standin: bool) -> bytes:
    """A cell's image as a PNG carrying that cell's own settings: dropped back on the page, it makes the cell again.
    `is_standin` when a stand-in model (random weights) made it: the PNG then says so."""
    return pnginfo.png_bytes(image, cell.settings, model_name, is_standin=is_standin)


@dataclass(frozen=True)
class SweepCellResult:
    cell: SweepCell
    image: Image.Image
    # Its PNG with the cell's own settings, encoded on another thread while the next cell runs: a 4x4 plot's 16 PNGs
    # at 512x512 cost over a second of CPU, a quarter of the plot's time on an H100 when the GPU waited for them.
    encoded: Future[bytes]

    @property
    def png(self) -> bytes:
        return self.encoded.result()


@dataclass(frozen=True)
class SweepResult:
    plan: SweepPlan
    cells: tuple[SweepCellResult, ...]  # in plan order; fewer than the plan's when cancelled
    grid: Image.Image
    cancelled: bool
    is_standin: bool  # a stand-in model (random weights) made the cells
    model_name: str

    @cached_property
    def grid_png(self) -> bytes:
        """The grid as a PNG with the axes and the first cell's settings, encoded when first asked for (the page's
        download): a 4x4 plot's grid at 512x512 is 2432x2120 pixels, about half a second of PNG encoding."""
        return pnginfo.png_with_parameters(self.grid, grid_parameters_text(self.plan, self.model_name, is_standin=self.is_standin))


GenerateOne = Callable[[GenerationSettings, tuple[LoraChoice, ...]], Sequence[Image.Image]]


def run_sweep(
    plan: SweepPlan,
    generate_one: GenerateOne,
    model_name: str,
    *,
    is_standin: bool,
    on_cell_done: Callable[[int, int, SweepCellResult], None] = lambda done, total, result: None,
    cancelled: Callable[[], bool] = lambda: False,
) -> SweepResult:
    """Make the plan's cells one by one with `generate_one(settings, loras)` (its first image is the cell's), calling
    `on_cell_done(done, total, result)` after each.

    Stops between cells once `cancelled()` is true, or when `generate_one` raises JobCancelled inside a cell: the
    result then holds the cells made so far, and the grid shows the others grey. Each cell is its own run, so other
    sessions' runs take the GPU between cells of a long sweep.
    """
    results: list[SweepCellResult] = []
    stopped = False
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sweep-png") as encoder:  # every PNG done when it closes
        for cell in plan.cells:
            if cancelled():
                stopped = True
                break
            try:
                image = generate_one(cell.settings, cell.loras)[0]
            except JobCancelled:
                stopped = True
                break
            results.append(SweepCellResult(cell, image, encoder.submit(cell_png, image, cell, model_name, is_standin=is_standin)))
            on_cell_done(len(results), len(plan.cells), results[-1])
        grid = grid_image([result.image for result in results], plan)  # beside the last cell's PNG
    return SweepResult(plan, tuple(results), grid, stopped, is_standin, model_name)
