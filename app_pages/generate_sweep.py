"""The generation form's "X/Y plot" (core.tasks.sweeps): one or two axes over seed, CFG, steps, scheduler, LoRA weight
or prompt S/R, run as one background job, one image per cell, shown as a labelled grid; each cell's PNG carries its
own settings."""
from __future__ import annotations

import io
import zipfile
from collections.abc import Callable

import streamlit as st
from PIL import Image

from app_pages import generate_history
from app_pages.common import STANDIN_FILE_SUFFIX, literal, show_error
from core.api import BadInputError, GenerationSettings, Job, JobState, LoraChoice, ModelSpec, sweeps
from core.app_state import get_backend

SWEEP_RUN_KEY, SWEEP_OUTCOME_KEY, SWEEP_RATE_KEY = "generate:sweep_run", "generate:sweep_outcome", "generate:sweep_steps_per_s"
SWEEP_SHOWN_GRID_KEY = "generate:sweep_shown_grid"
# The grid is shown at most this wide, as a PNG made once: Streamlit scales a wider image down to its content width
# (1460 px) and encodes it again at every rerun, half a second for a 4x4 plot at 512x512.
SHOWN_GRID_WIDTH = 1400
NO_AXIS = "none"
MANY_CELLS = 16  # from here a sweep is a long wait on a CPU, and minutes on a GPU: say so in a warning


def axis_inputs(name: str, kinds: list[str], loras: tuple[LoraChoice, ...]) -> sweeps.Axis | None:
    """One axis's type, values and (for a LoRA weight) adapter; None when it is off or its values are still empty."""
    kind_column, values_column = st.columns([1, 2])
    kind = kind_column.selectbox(f"{name} type", kinds, key=f"generate:sweep_{name}_kind")
    if kind == NO_AXIS:
        return None
    kind = sweeps.AxisKind(kind)
    text = values_column.text_input(f"{name} values", key=f"generate:sweep_{name}_values", placeholder=sweeps.EXAMPLES[kind])
    adapter = ""
    if kind is sweeps.AxisKind.LORA_WEIGHT:
        names = [choice.adapter.name for choice in loras]
        adapter = st.selectbox(f"{name}: LoRA whose weight changes", names, key=f"generate:sweep_{name}_adapter",
                               placeholder="Add a LoRA adapter above first", index=0 if names else None) or ""
    return sweeps.parse_axis(kind, text, adapter, name) if text.strip() else None


def sweep_section(spec: ModelSpec, allow_standin: bool, base: GenerationSettings, loras: tuple[LoraChoice, ...],
                  abandoned: Callable[[], bool], history_owner: str | None) -> None:
    """The "X/Y plot" expander: axes, the plan's size and time, the Run button, and the sweep's progress or result."""
    sweep_run: Job[sweeps.SweepResult] | None = st.session_state.get(SWEEP_RUN_KEY)
    if sweep_run is not None and sweep_run.finished:
        finish_sweep(sweep_run, history_owner)
        sweep_run = None
    with st.expander("X/Y plot", expanded=sweep_run is not None or st.session_state.get(SWEEP_OUTCOME_KEY) is not None):
        st.caption("One image per cell, every cell with this form's settings and seed except what its axes change. "
                   "Values as in AUTOMATIC1111: `1, 2, 5`, a range `1-5`, with a step `10-40 (+10)`, with a count `5-9 [3]`.")
        plan = None
        try:
            x = axis_inputs("X", list(sweeps.AxisKind), loras)
            y = axis_inputs("Y", [NO_AXIS, *sweeps.AxisKind], loras)
            if x is not None:
                plan = sweeps.plan_sweep(base, x, y, loras)
        except BadInputError as error:
            show_error(error)
        if plan is None:
            st.caption("Type the X values to plan a sweep.")
        else:
            plan_caption(plan)
        st.button("Run X/Y plot", key="generate:sweep_start", icon="🔬", disabled=plan is None or sweep_run is not None,
                  on_click=start_sweep, args=(spec, allow_standin, plan, abandoned))
        if sweep_run is not None:
            sweep_progress()
        show_sweep_outcome()


def plan_caption(plan: sweeps.SweepPlan) -> None:
    steps_per_s = st.session_state.get(SWEEP_RATE_KEY)
    cells = len(plan.cells)
    text = f"{plan.columns} × {plan.rows} = {cells} image{'s' if cells > 1 else ''}, {plan.total_steps} steps" + (
        f", about {plan.estimated_seconds(steps_per_s):.0f} s at the last sweep's {steps_per_s:.2f} it/s" if steps_per_s else " (a time estimate after the first sweep)")
    if cells >= MANY_CELLS:
        st.warning(f"{text}. A long run: the GPU goes to other users' runs between cells, and Cancel stops between cells.", icon="⏳")
    else:
        st.caption(text)


def start_sweep(spec: ModelSpec, allow_standin: bool, plan: sweeps.SweepPlan, abandoned: Callable[[], bool]) -> None:
    def work(context):
        with get_backend().use(spec, allow_standin=allow_standin) as model:
            def generate_one(settings, cell_loras):
                stop = lambda: context.cancelled or abandoned()  # noqa: E731 - a cancel ends the cell in progress too
                return [image.image for image in get_backend().generate(model, settings, abandoned=stop, loras=cell_loras).images]

            def cell_done(done, total, result):
                context.report(done, total, f"cell {done} of {total} done: {result.cell.label(plan)}", result.image)

            context.report(0, len(plan.cells), f"cell 1 of {len(plan.cells)}")
            return sweeps.run_sweep(plan, generate_one, model.spec.repo_id, is_standin=model.is_standin, on_cell_done=cell_done,
                                    cancelled=lambda: context.cancelled)

    st.session_state[SWEEP_OUTCOME_KEY] = None
    st.session_state[SWEEP_RUN_KEY] = Job(work, "X/Y plot")


def finish_sweep(sweep_run: Job[sweeps.SweepResult], history_owner: str | None) -> None:
    snapshot = sweep_run.snapshot()
    del st.session_state[SWEEP_RUN_KEY]
    if snapshot.state is JobState.DONE and sweep_run.result is not None:
        result = sweep_run.result
        st.session_state[SWEEP_OUTCOME_KEY] = result
        st.session_state[SWEEP_SHOWN_GRID_KEY] = shown_grid_png(result.grid)
        generate_history.keep_sweep(history_owner, result)  # every image made, as AUTOMATIC1111 saves a plot's cells
        steps = sum(cell.cell.settings.total_denoising_steps for cell in result.cells)
        if steps and not result.cancelled:
            st.session_state[SWEEP_RATE_KEY] = steps / snapshot.elapsed_s
    elif snapshot.state is JobState.FAILED:
        st.session_state[SWEEP_OUTCOME_KEY] = snapshot.error


@st.fragment(run_every=0.5)
def sweep_progress() -> None:
    sweep_run: Job[sweeps.SweepResult] | None = st.session_state.get(SWEEP_RUN_KEY)
    if sweep_run is None:
        return
    if sweep_run.finished:
        st.rerun()
    snapshot = sweep_run.snapshot()
    st.progress(snapshot.fraction, text=literal(snapshot.detail))
    if snapshot.preview is not None:
        st.image(snapshot.preview, caption="The last cell made", width=128)
    st.button("Cancel the X/Y plot", key="generate:sweep_cancel", on_click=sweep_run.cancel, icon="⏹️")


def show_sweep_outcome() -> None:
    outcome = st.session_state.get(SWEEP_OUTCOME_KEY)
    if outcome is None:
        return
    if not isinstance(outcome, sweeps.SweepResult):
        show_error(outcome)
        return
    made, total = len(outcome.cells), len(outcome.plan.cells)
    if outcome.cancelled:
        st.info(f"Stopped after {made} of {total} cells: the others are grey.", icon="⏹️")
    st.image(st.session_state[SWEEP_SHOWN_GRID_KEY], caption=literal(f"X/Y plot: {outcome.plan.x.title}" + (f" × {outcome.plan.y.title}" if outcome.plan.y else "")), output_format="PNG")
    suffix = STANDIN_FILE_SUFFIX if outcome.is_standin else ""
    grid_column, cells_column = st.columns(2)
    grid_column.download_button("Grid PNG", lambda: outcome.grid_png, file_name=f"xy-plot{suffix}.png", mime="image/png", key="generate:sweep_grid_png",
                                icon="⬇️", on_click="ignore")
    cells_column.download_button("Each cell's PNG (zip)", cells_zip(outcome, suffix), file_name=f"xy-plot-cells{suffix}.zip", mime="application/zip",
                                 key="generate:sweep_cells_zip", icon="🗂️", on_click="ignore", disabled=not outcome.cells)


def shown_grid_png(grid: Image.Image) -> bytes:
    shown = grid.copy()
    shown.thumbnail((SHOWN_GRID_WIDTH, grid.height))
    buffer = io.BytesIO()
    shown.save(buffer, format="PNG")
    return buffer.getvalue()


def cells_zip(outcome: sweeps.SweepResult, suffix: str) -> Callable[[], bytes]:
    def build() -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
            for result in outcome.cells:
                archive.writestr(f"cell-x{result.cell.column + 1}-y{result.cell.row + 1}{suffix}.png", result.png)
        return buffer.getvalue()

    return build
