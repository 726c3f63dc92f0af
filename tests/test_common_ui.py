"""The shared loading guard every page uses: failure message, stand-in offer, stand-in label."""
from __future__ import annotations

from streamlit.testing.v1 import AppTest


def _guarded_page() -> None:
    import streamlit as st

    from app_pages.common import require_model
    from core.models.registry import MODELS

    model = require_model(MODELS["sentiment"])
    st.success(f"loaded from {model.source.label}")


def test_unavailable_model_shows_why_and_offers_the_standin(app_env, monkeypatch):
    monkeypatch.setenv("DASH_STANDIN_FALLBACK", "0")
    at = AppTest.from_function(_guarded_page, default_timeout=60).run()
    assert not at.exception
    assert "not in the local cache" in at.error[0].value and "What to do" in at.error[0].value
    assert not at.success  # the page stopped: nothing ran on a model it does not have

    at.button(key="standin_button:sentiment").click().run()
    assert not at.exception and not at.error
    assert "random weights" in at.warning[0].value
    assert "stand-in (random weights)" in at.success[0].value
