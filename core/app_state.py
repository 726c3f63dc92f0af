"""The process-wide objects, built once with `st.cache_resource` and shared by every browser session.

This is the only module in `core/` that imports streamlit.
"""
from __future__ import annotations

from functools import partial

import streamlit as st

from core import api


@st.cache_resource(show_spinner=False)
def get_settings() -> api.Settings:
    """Read and checked once per process; raises SettingsError (every bad variable at once) on a bad setting."""
    return api.Settings.from_env()


@st.cache_resource(show_spinner=False)
def get_backend() -> api.Backend:
    """Where every model runs: this process, or with DASH_BACKEND=ray Ray Serve (the same `Backend` interface)."""
    return api.open_backend(get_settings())


@st.cache_resource(show_spinner=False)
def get_gpu_monitor() -> api.GpuMonitor:
    """NVML through nvidia-ml-py; on a machine without it the monitor reports why, and no GPUs. With the ray
    backend: every GPU that holds a replica, cluster-wide, as the replicas report them."""
    return api.open_gpu_monitor(get_backend())


@st.cache_resource(show_spinner=False)
def get_history() -> api.HistorySampler:
    """The one history sampler of the process, started when a page first asks for it."""
    sampler = api.HistorySampler(partial(api.take_sample, get_gpu_monitor()))
    sampler.start()
    return sampler


@st.cache_resource(show_spinner=False)
def get_image_history() -> api.ImageHistory:
    """Every generated image with its settings, on disk (DASH_HISTORY_DIR), shared by every session of the process."""
    settings = get_settings()
    return api.ImageHistory(settings.history_dir, settings.history_max_bytes)


@st.cache_resource(show_spinner=False)
def get_job_board() -> api.JobBoard:
    """Every user's generation runs, queued and running, with turns shared between users (core.tasks.job_board)."""
    return api.JobBoard(max_unfinished_per_owner=get_settings().max_queued_runs)
