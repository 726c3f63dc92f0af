"""A server whose network holds connections without answering: models fail (or load from the cache) within seconds.

The Hub here is a black hole: a local TCP server that accepts connections and never answers, the worst kind of closed
network (each try waits out its time-out). Before `core.models.reachability`, a hot dog load against it took minutes.
"""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import diffusers  # imported here, where a test does not time it: the loaders import them on first use
import pytest
import torch
import transformers.pipelines  # noqa: F401
from huggingface_hub import constants
from streamlit.testing.v1 import AppTest

from core.errors import ModelUnavailableError
from core.models import loading, model_card, reachability, standins
from core.models.manager import ModelManager
from core.models.registry import MODELS, ModelSpec

LIMIT_S = 5.0  # what the page may take to say that the Hub cannot be reached
CPU = torch.device("cpu")
assert diffusers.DDPMPipeline  # its lazy module imports the pipeline's code now, not in a timed load


class BlackHole:
    """Accepts TCP connections and never answers; counts them."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:  # closed at the end of the test
                return
            with self._lock:
                self._connections.append(connection)

    def close(self) -> None:
        self._server.close()
        with self._lock:
            for connection in self._connections:
                connection.close()


@pytest.fixture()
def hub_black_hole(monkeypatch, tmp_path: Path) -> Iterator[BlackHole]:
    """HF_ENDPOINT at a black hole, offline mode off (conftest sets it), an empty Hub cache, no remembered answers.

    huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE into its constants at import, so those are patched.
    """
    hole = BlackHole()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hole.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hole.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(reachability, "SERVERS", reachability.Reachability())
    yield hole
    hole.close()  # a load still waiting on it (the test failed) gets a reset instead of waiting on


def finishes_within(limit_s: float, work: Callable[[], object]) -> tuple[object, float]:
    """`work`'s result or exception and its seconds; fails the test when it is still running after `limit_s`."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except Exception as exc:  # noqa: BLE001 - handed to the test, which checks its type
            outcome["result"] = exc

    started = time.perf_counter()
    worker = threading.Thread(target=run, daemon=True)  # a hung load must not keep pytest from ending
    worker.start()
    worker.join(limit_s)
    assert not worker.is_alive(), f"still waiting on the Hub after {limit_s} s"
    return outcome["result"], time.perf_counter() - started


@pytest.mark.parametrize("key", ["hotdog", "ddpm-cifar10"])  # transformers' pipeline, diffusers' from_pretrained
def test_an_unreachable_hub_fails_a_model_within_seconds_with_the_remedy(settings, hub_black_hole, key):
    spec = MODELS[key]
    source = loading.resolve_source(spec, settings)
    assert not source.is_local
    error, seconds = finishes_within(LIMIT_S, lambda: loading.load(spec, source, CPU, torch.float32, settings))
    assert isinstance(error, ModelUnavailableError), error
    assert "cannot be reached from this server" in str(error) and "HF_HUB_OFFLINE=1" in error.remedy, (str(error), error.remedy)
    print(f"{key}: failed in {seconds:.1f} s")


def _in_hub_cache(spec: ModelSpec, folder: Path) -> None:
    """`folder`'s files as the Hub cache holds a download of `spec.repo_id` at its revision."""
    commit = "0" * 40
    repo = Path(constants.HF_HUB_CACHE) / f"models--{spec.repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / spec.revision).write_text(commit)


def test_a_cached_model_still_loads_while_the_hub_does_not_answer(settings, hub_black_hole):
    spec = MODELS["sentiment"]
    folder = standins.ensure_built(spec, settings.standin_dir)
    _in_hub_cache(spec, folder)
    source = loading.resolve_source(spec, settings)
    pipe, seconds = finishes_within(LIMIT_S, lambda: loading.load(spec, source, CPU, torch.float32, settings))
    assert not isinstance(pipe, Exception), pipe
    labels = json.loads((folder / "config.json").read_text())["id2label"]
    assert pipe.model.config.id2label == {int(index): label for index, label in labels.items()}
    print(f"cached model loaded in {seconds:.1f} s")


def test_a_model_card_comes_from_the_cache_without_waiting(settings, hub_black_hole, tmp_path: Path):
    spec = MODELS["mr-potato-head"]
    card = tmp_path / "card"
    card.mkdir()
    (card / model_card.CARD_FILE).write_text("---\ninstance_prompt: sks mr potato head\n---\n")
    (card / "model_index.json").write_text("{}")
    _in_hub_cache(spec, card)
    text, _ = finishes_within(LIMIT_S, lambda: model_card.read_card(spec, loading.ModelSource(spec.repo_id, is_local=False), settings))
    assert model_card.trigger_phrase(text) == "sks mr potato head"


def test_a_session_on_the_standin_never_asks_the_hub_again_after_unload_all(settings, hub_black_hole, monkeypatch):
    monkeypatch.setattr(reachability, "SERVERS", reachability.Reachability(remember_s=0))  # every question would probe
    manager = ModelManager(settings)
    spec = MODELS["hotdog"]
    error, _ = finishes_within(LIMIT_S, lambda: manager.get(spec))
    assert isinstance(error, ModelUnavailableError)
    assert hub_black_hole.connections == 1  # the one probe

    model, standin_s = finishes_within(LIMIT_S, lambda: manager.get(spec, allow_standin=True))  # the session accepts it
    assert model.is_standin
    manager.unload_all()
    model, again_s = finishes_within(LIMIT_S, lambda: manager.get(spec, allow_standin=True))
    assert model.is_standin
    assert hub_black_hole.connections == 1, f"the Hub was asked again: stand-in after {standin_s:.1f} s, after unload_all {again_s:.1f} s"
    assert again_s < 1.0


def _hotdog_page() -> None:
    import streamlit as st

    from app_pages.common import require_model
    from core.models.registry import MODELS

    model = require_model(MODELS["hotdog"])
    st.success(f"loaded from {model.source.label}")


def test_the_page_says_the_hub_cannot_be_reached_and_the_standin_then_loads_without_it(app_env, hub_black_hole, monkeypatch, standin_dir):
    from core.app_state import get_backend

    standins.ensure_built(MODELS["hotdog"], standin_dir)  # built once per test run: not what this test times
    monkeypatch.setenv("DASH_STANDIN_FALLBACK", "0")
    monkeypatch.setattr(reachability, "SERVERS", reachability.Reachability(remember_s=0))  # every question would probe
    at = AppTest.from_function(_hotdog_page, default_timeout=60)
    at.run()  # imports and builds the manager: not what this test times
    get_backend().unload_all()
    started = time.perf_counter()
    at.run()
    assert time.perf_counter() - started < LIMIT_S
    assert not at.exception and "cannot be reached from this server" in at.error[0].value
    probes = hub_black_hole.connections

    started = time.perf_counter()
    at.button(key="standin_button:hotdog").click().run()
    get_backend().unload_all()  # the VRAM page's "Unload all"
    at.run()
    assert not at.exception and not at.error and "stand-in (random weights)" in at.success[0].value
    assert hub_black_hole.connections == probes, "accepting the stand-in asked the Hub again"
    assert time.perf_counter() - started < LIMIT_S
