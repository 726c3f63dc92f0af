"""VRAM monitor: every GPU, this process's torch allocator, every model, the last minutes, and actions that free memory."""
from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from app_pages.common import literal
from app_pages.identity import session_access
from core.api import Freed, Sample, compiled, gpu, human_bytes, measure_freed, precision_label
from core.app_state import get_backend, get_gpu_monitor, get_history

GIB = 2**30
manager = get_backend()

st.title("📊 VRAM monitor")
st.caption("What the shared GPU holds, for every session of this app. Figures refresh every few seconds.")


def _or_na(value: object, unit: str = "") -> str:
    return "n/a" if value is None else f"{value}{unit}"


def _bytes_or_na(count: int | None) -> str:
    return "n/a" if count is None else human_bytes(count)


def _ago(moment: float | None) -> str:
    if moment is None:
        return "never"
    seconds = max(time.time() - moment, 0)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def show_gpu(card: gpu.GpuSnapshot) -> None:
    st.subheader(f"GPU {card.index}: {card.name}")
    columns = st.columns(5)
    columns[0].metric("Memory used", _bytes_or_na(card.used_bytes), f"of {_bytes_or_na(card.total_bytes)}", delta_color="off")
    columns[1].metric("Free", _bytes_or_na(card.free_bytes))
    columns[2].metric("Utilisation", _or_na(card.utilization_pct, " %"))
    columns[3].metric("Temperature", _or_na(card.temperature_c, " °C"))
    power = "n/a" if card.power_w is None else f"{card.power_w:.0f} W"
    limit = "n/a" if card.power_limit_w is None else f"{card.power_limit_w:.0f} W"
    columns[4].metric("Power", power, f"limit {limit}", delta_color="off")
    if card.used_bytes is not None and card.total_bytes:
        st.progress(min(card.used_bytes / card.total_bytes, 1.0))
    st.caption(
        f"SM clock {_or_na(card.sm_clock_mhz, ' MHz')} (max {_or_na(card.sm_clock_max_mhz, ' MHz')}), "
        f"memory clock {_or_na(card.memory_clock_mhz, ' MHz')}, memory busy {_or_na(card.memory_utilization_pct, ' %')}"
    )
    if card.processes:
        st.dataframe(
            pd.DataFrame([
                {"PID": p.pid, "Process": p.name + (" (this app)" if p.is_this_process else ""), "GPU memory": _bytes_or_na(p.used_bytes)}
                for p in card.processes
            ]),
            hide_index=True, key=f"vram:processes:{card.index}",
        )
    else:
        st.caption("No processes listed (none running, or hidden from this container).")


def show_host() -> None:
    host = gpu.host_memory()
    columns = st.columns(4)
    columns[0].metric("System RAM", human_bytes(host.total_bytes))
    columns[1].metric("RAM used", human_bytes(host.used_bytes))
    columns[2].metric("RAM available", human_bytes(host.available_bytes))
    columns[3].metric("This app's process", human_bytes(host.process_rss_bytes))


def history_frames(samples: tuple[Sample, ...], with_gpus: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Memory in GiB, and GPU utilisation in % (empty without GPUs), indexed by seconds before now."""
    memory_rows, utilization_rows = [], []
    now = time.time()
    for sample in samples:
        ago = {"seconds": round(sample.taken_at - now)}
        if with_gpus:
            memory_rows.append(ago | {f"GPU {p.gpu_index} used": None if p.used_bytes is None else p.used_bytes / GIB for p in sample.gpus})
            utilization_rows.append(ago | {f"GPU {p.gpu_index}": p.utilization_pct for p in sample.gpus})
        else:
            memory_rows.append(ago | {"System RAM used": sample.host_used_bytes / GIB, "This app's process": sample.process_rss_bytes / GIB})
    return tuple(pd.DataFrame(rows).set_index("seconds") if rows else pd.DataFrame() for rows in (memory_rows, utilization_rows))


@st.fragment(run_every=get_history().interval_s)
def live_panel() -> None:
    """Cards, host and history: refreshed on their own, without rerunning the page."""
    report = get_gpu_monitor().snapshot()
    if report.gpus:
        st.caption(f"NVIDIA driver {report.driver_version or 'n/a'}; {len(report.gpus)} GPU(s), as NVML reports them.")
        for card in report.gpus:
            show_gpu(card)
        st.subheader("Host")
    else:
        st.info(
            f"**No GPU on this machine** ({report.unavailable_reason or 'NVML found no NVIDIA GPU'}). "
            "Models run on the CPU (the table below gives each loaded model's precision) and live in system RAM; here is the RAM and this app's own memory."
        )
    show_host()
    st.subheader("Last minutes")
    samples = get_history().samples()
    memory, utilization = history_frames(samples, with_gpus=bool(report.gpus))
    if len(memory) < 2:
        st.caption("Collecting samples: the chart appears after the second one (every few seconds).")
        return
    memory_column, utilization_column = st.columns(2) if report.gpus else (st.container(), None)
    memory_column.line_chart(memory, x_label="seconds (0 is now)", y_label="memory used (GiB)")
    if utilization_column is not None:
        utilization_column.line_chart(utilization, x_label="seconds (0 is now)", y_label="GPU utilisation (%)")


live_panel()

# --- torch's allocator in this process (only where there is a GPU to explain) --------------------------------
allocator = gpu.allocator_stats()
cards = get_gpu_monitor().snapshot().gpus
if cards or allocator:
    st.subheader("This process's torch allocator")
    st.caption(
        "NVML **used** is everything on the card: every process, each CUDA context and torch's pool. "
        "torch **reserved** is this process's pool; **allocated** is the live tensors inside it. "
        "NVML for this process minus reserved is the CUDA context and other libraries' memory; reserved minus allocated is cached, reusable blocks."
    )
if allocator:
    nvml_by_uuid = {card.uuid: card.this_process_bytes for card in cards}
    rows = []
    for stats in allocator:
        nvml_bytes = nvml_by_uuid.get(stats.uuid)
        rows.append({
            "CUDA device": stats.device_index,
            "Allocated": human_bytes(stats.allocated_bytes),
            "Reserved": human_bytes(stats.reserved_bytes),
            "Peak allocated": human_bytes(stats.peak_allocated_bytes),
            "Cached, free": human_bytes(stats.cached_free_bytes),
            "NVML, this process": _bytes_or_na(nvml_bytes),
            "Context and other": _bytes_or_na(None if nvml_bytes is None else nvml_bytes - stats.reserved_bytes),
        })
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="vram:allocator")
elif cards:
    st.caption("torch has not used a GPU in this process: no model is on a GPU, so nothing is allocated or cached.")

for budget in manager.gpu_budgets():
    st.progress(
        min(budget.held_bytes / budget.budget_bytes, 1.0) if budget.budget_bytes else 1.0,
        text=f"GPU {budget.gpu_index} (CUDA): models hold {human_bytes(budget.held_bytes)} of the {human_bytes(budget.budget_bytes)} "
        f"budget ({human_bytes(budget.total_bytes)} card); least recently used idle models leave when a new one needs room",
    )

# --- models ------------------------------------------------------------------------------------------------------
st.subheader("Models")
status = manager.status()
st.dataframe(
    pd.DataFrame([
        {
            "Model": row.title,
            "State": row.state.value + (" (stand-in)" if row.is_standin else ""),
            "Device": row.device or "—",
            "Precision": precision_label(row.dtype) if row.dtype else "—",
            "Memory": human_bytes(row.memory_bytes) if row.memory_bytes is not None
            else f"~{human_bytes(row.estimate_bytes)} ({'measured' if row.estimate_measured else 'estimate'})",
            "Last used": _ago(row.last_used),
            "Running now": row.busy,
        }
        for row in status
    ]),
    hide_index=True, width="stretch", key="vram:models",
)
evictions = manager.evictions()
if evictions:
    st.caption("Recent evictions: " + "; ".join(
        f"{literal(e.title)} ({human_bytes(e.size_bytes)}, GPU {e.gpu_index} → {e.to.value}) for {literal(e.for_key)}, {_ago(e.at)}" for e in evictions[-5:]
    ))

compiles = compiled.records()
if compiles:
    st.caption("Background compiles (torch.compile; a shape is served without it until it is ready): " + "; ".join(
        f"{c.model} {c.shape}: {c.state.value}" + (f" in {c.seconds:.0f} s" if c.seconds is not None else "") for c in compiles
    ))

# --- actions -------------------------------------------------------------------------------------------------------
st.subheader("Actions")
access = session_access()
if not access.is_admin:
    # Every action below changes what every session has (or sees): they are not drawn, so they cannot be clicked.
    st.caption(f"Only admins can unload models, empty torch's cache or reset its peak statistics, since these change them for every session: {access.remedy}.")
    st.stop()
PENDING, RESULT = "vram:pending", "vram:result"
titles = {row.key: row.title for row in status}


def _change(freed_bytes: int) -> str:
    """A decrease as −N, and an increase (another session allocated meanwhile) as +N."""
    return f"−{human_bytes(freed_bytes)}" if freed_bytes >= 0 else f"+{human_bytes(-freed_bytes)}"


def describe_freed(what: str, freed: Freed) -> str:
    parts = [f"{what}: the weights held {human_bytes(freed.model_bytes)}."]
    if gpu.allocator_stats():
        parts.append(f"torch allocated {_change(freed.allocated_bytes)}, reserved {_change(freed.reserved_bytes)} (given back to the driver).")
    parts.append(f"This process's RAM {_change(freed.process_rss_bytes)} (the C allocator may keep freed pages for reuse).")
    return " ".join(parts)


def confirm_and_run() -> None:
    action, key = st.session_state.pop(PENDING)
    if action == "unload":
        st.session_state[RESULT] = describe_freed(f"Unloaded {literal(titles[key])}", measure_freed(lambda: manager.unload(key)))
    else:
        st.session_state[RESULT] = describe_freed("Unloaded every model", measure_freed(manager.unload_all))


def empty_cache() -> None:
    st.session_state.pop(PENDING, None)
    if not gpu.allocator_stats():
        st.session_state[RESULT] = "Nothing to empty: torch has no GPU memory pool in this process."
        return
    st.session_state[RESULT] = f"Emptied torch's cache: {human_bytes(gpu.empty_cache())} of reserved memory given back to the driver."


def reset_peak() -> None:
    st.session_state.pop(PENDING, None)
    if not gpu.allocator_stats():
        st.session_state[RESULT] = "Nothing to reset: torch has not used a GPU in this process."
        return
    st.session_state[RESULT] = f"Peak statistics reset (the peak allocated was {human_bytes(gpu.reset_peak_stats())})."


loaded = [row.key for row in status if row.memory_bytes is not None]
choice_column, unload_column, all_column, cache_column, peak_column = st.columns([3, 1, 1, 1, 1], vertical_alignment="bottom")
choice = choice_column.selectbox(
    "Loaded model", loaded, format_func=titles.get, key="vram:choice", placeholder="no model is loaded", disabled=not loaded
)
# Unloading changes what every session has: ask first. Emptying the cache and resetting peaks only touch statistics
# and cached free blocks, so they run at once.
unload_column.button("Unload…", key="vram:unload", disabled=choice is None, on_click=st.session_state.__setitem__, args=(PENDING, ("unload", choice)))
all_column.button("Unload all…", key="vram:unload_all", disabled=not loaded, on_click=st.session_state.__setitem__, args=(PENDING, ("unload_all", None)))
cache_column.button("Empty cache", key="vram:empty_cache", on_click=empty_cache)
peak_column.button("Reset peak", key="vram:reset_peak", on_click=reset_peak)

pending = st.session_state.get(PENDING)
if pending:
    action, key = pending
    target = literal(titles[key]) if action == "unload" else "every model"
    st.warning(
        f"Unload {target}? Every session of this app shares the models: whoever uses one next waits for it to load again, "
        "and a run in progress keeps its model until it finishes."
    )
    yes_column, no_column, _ = st.columns([1, 1, 6])
    yes_column.button("Yes, unload", key="vram:confirm", type="primary", on_click=confirm_and_run)
    no_column.button("Cancel", key="vram:cancel", on_click=st.session_state.pop, args=(PENDING, None))
if RESULT in st.session_state:
    st.success(st.session_state.pop(RESULT))
