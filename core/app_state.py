"""The process-wide objects, built once with `st.cache_resource` and shared by every browser session.

This is the only module in `core/` that imports streamlit.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import streamlit as st

from core.config import Settings
from core.gpu.history import HistorySampler, take_sample
from core.gpu.nvml import GpuMonitor, load_nvml
from core.models.manager import ModelManager

if TYPE_CHECKING:  # the ray backend's classes; Ray itself is imported only when DASH_BACKEND=ray
    from core.backends.ray_client import ClusterGpuMonitor, RayManager


@st.cache_resource(show_spinner=False)
def get_settings() -> Settings:
    """Read and checked once per process; raises SettingsError (every bad variable at once) on a bad setting."""
    return Settings.from_env()


@st.cache_resource(show_spinner=False)
def get_manager() -> ModelManager | RayManager:
    """The local manager, or with DASH_BACKEND=ray the one that runs every model on Ray Serve (same methods)."""
    settings = get_settings()
    if settings.backend == "ray":
        from core.backends.ray_client import RayManager  # imported only here: the local backend needs no Ray installed

        return RayManager(settings)
    return ModelManager(settings)


@st.cache_resource(show_spinner=False)
def get_gpu_monitor() -> GpuMonitor | ClusterGpuMonitor:
    """NVML through nvidia-ml-py; on a machine without it the monitor reports why, and no GPUs. With the ray
    backend: every GPU that holds a replica, cluster-wide, as the replicas report them."""
    if get_settings().backend == "ray":
        from core.backends.ray_client import ClusterGpuMonitor

        return ClusterGpuMonitor(get_manager())
    return GpuMonitor(load_nvml())


@st.cache_resource(show_spinner=False)
def get_history() -> HistorySampler:
    """The one history sampler of the process, started when a page first asks for it."""
    sampler = HistorySampler(partial(take_sample, get_gpu_monitor()))
    sampler.start()
    return sampler
