from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app_pages.common import literal
from core.app_state import get_backend, get_settings
from core.errors import ModelUnavailableError
from core.models.registry import MODELS

HOME = str(Path(__file__).resolve().parent.parent / "Home.py")


def test_home_renders_machine_and_every_model(app_env):
    at = AppTest.from_file(HOME, default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value.startswith("🧪 Model dashboard")
    assert any(m.label == "Accelerator" for m in at.metric)
    table = at.dataframe[0].value
    assert list(table["Model"]) == [spec.title for spec in MODELS.values()]
    assert set(table["State"]) == {"not loaded"}


def test_home_shows_a_loaded_standin_as_such(app_env):
    get_backend().get(MODELS["sentiment"], allow_standin=True)
    at = AppTest.from_file(HOME, default_timeout=60).run()
    table = at.dataframe[0].value
    row = table[table["Model"] == MODELS["sentiment"].title].iloc[0]
    assert row["State"] == "ready (stand-in, random weights)"
    assert row["Device"] == "cpu" and row["Load time"].endswith(" s")


def test_home_shows_why_a_model_failed(app_env, monkeypatch):
    monkeypatch.setenv("DASH_STANDIN_FALLBACK", "0")
    get_backend.clear()
    with pytest.raises(ModelUnavailableError):
        get_backend().get(MODELS["hotdog"])
    at = AppTest.from_file(HOME, default_timeout=60).run()
    table = at.dataframe[0].value
    row = table[table["Model"] == MODELS["hotdog"].title].iloc[0]
    assert row["State"] == "failed" and "not in the local cache" in row["Note"]


def test_pages_turned_off_by_the_operator_are_not_offered(app_env, monkeypatch):
    monkeypatch.setenv("DASH_PAGES", "hotdog,vram")
    get_settings.clear()
    try:
        at = AppTest.from_file(HOME, default_timeout=60).run()
        assert not at.exception
        links = [link.proto.label for link in at.get("page_link")]
        assert links == ["Hot dog or not", "VRAM monitor"]
    finally:
        get_settings.clear()


def test_invalid_settings_stop_the_app_with_every_error(app_env, monkeypatch):
    monkeypatch.setenv("DASH_DEVICE", "tpu")
    monkeypatch.setenv("DASH_PAGES", "nonsense")
    get_settings.clear()
    try:
        at = AppTest.from_file(HOME, default_timeout=60).run()
        assert not at.exception
        message = at.error[0].value
        assert literal("DASH_DEVICE") in message and literal("DASH_PAGES") in message and "did not start" in message
    finally:
        get_settings.clear()
