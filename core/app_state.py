"""The process-wide objects, built once with `st.cache_resource` and shared by every browser session.

This is the only module in `core/` that imports streamlit.
"""
from __future__ import annotations

import streamlit as st

from core.config import Settings
from core.manager import ModelManager


@st.cache_resource(show_spinner=False)
def get_settings() -> Settings:
    """Read and checked once per process; raises SettingsError (every bad variable at once) on a bad setting."""
    return Settings.from_env()


@st.cache_resource(show_spinner=False)
def get_manager() -> ModelManager:
    return ModelManager(get_settings())
