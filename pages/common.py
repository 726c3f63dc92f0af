"""UI pieces every page shares: loading a model with a clear failure message and the stand-in offer."""
from __future__ import annotations

import streamlit as st

from core.app_state import get_manager
from core.errors import DashboardError, ModelUnavailableError
from core.manager import LoadedModel
from core.registry import ModelSpec

# (file, title, icon, url path): Home.py builds the navigation from this, the Home page its links.
TASK_PAGES = (
    ("pages/hotdog.py", "Hot dog or not", "🌭", "hotdog"),
    ("pages/imagenet.py", "ImageNet classifier", "🖼️", "imagenet"),
    ("pages/sentiment.py", "Sentiment", "💬", "sentiment"),
    ("pages/generate.py", "Image generation", "🎨", "generate"),
    ("pages/vram.py", "VRAM monitor", "📊", "vram"),
)

STANDIN_NOTE = "Stand-in model with random weights: its outputs are meaningless and only show that the page works."


def show_error(error: DashboardError) -> None:
    st.error(f"{error}\n\n**What to do:** {error.remedy}")


def _standin_key(spec: ModelSpec) -> str:
    return f"use_standin:{spec.key}"


def require_model(spec: ModelSpec) -> LoadedModel:
    """The loaded model, or a message (with the stand-in offer when the real one cannot be had) and a stop."""
    allow_standin = st.session_state.get(_standin_key(spec), False)
    try:
        with st.spinner(f"Loading {spec.title}…"):
            model = get_manager().get(spec, allow_standin=allow_standin)
    except DashboardError as error:
        show_error(error)
        if isinstance(error, ModelUnavailableError):
            st.button(
                "Use the stand-in model (random weights)",
                key=f"standin_button:{spec.key}",
                on_click=st.session_state.__setitem__,
                args=(_standin_key(spec), True),
            )
        st.stop()
    if model.is_standin:
        st.warning(STANDIN_NOTE, icon="⚠️")
    return model
