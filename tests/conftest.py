"""Shared fixtures: offline Hub, stand-in models built once per run, a fresh manager, a running app."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.app_server import CHROMIUM_FLAGS, running_app  # noqa: F401  (running_app: test modules import it from here)

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Nothing in the tests may wait on a network timeout: the Hub is unreachable here, in CI and on the device.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run with the device tool (see README, GPU tests)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One stand-in folder per test run: each stand-in is built once, on first use."""
    return tmp_path_factory.mktemp("standins")


@pytest.fixture()
def settings(standin_dir: Path):
    from core.config import Settings

    # Compile off: a background compile finishing mid-test would change timings, memory and the path that serves a
    # call; the tests of core.accel.compiled and the GPU soak turn it on. CPU bf16 off: the tests compare results with
    # fp32 references on any CPU; tests/test_devices.py checks bf16 against them.
    return Settings(standin_dir=standin_dir, device="auto", compile=False, cpu_bf16=False)


@pytest.fixture()
def manager(settings):
    from core.backends.local import LocalBackend

    return LocalBackend(settings)


@pytest.fixture()
def app_env(monkeypatch: pytest.MonkeyPatch, standin_dir: Path):
    """Environment for AppTest runs: stand-ins allowed automatically, and a fresh process-wide manager."""
    from core.app_state import get_backend, get_settings

    monkeypatch.setenv("DASH_STANDIN_DIR", str(standin_dir))
    monkeypatch.setenv("DASH_STANDIN_FALLBACK", "1")
    monkeypatch.setenv("DASH_CPU_BF16", "0")  # as the `settings` fixture: pages' results compared with fp32 ones
    get_settings.clear()
    get_backend.clear()
    yield
    get_settings.clear()
    get_backend.clear()


@pytest.fixture(scope="session")
def app_url(tmp_path_factory: pytest.TempPathFactory, standin_dir: Path):
    app_dir = tmp_path_factory.mktemp("app")
    with running_app(app_dir / "streamlit.log", DASH_STANDIN_DIR=str(standin_dir), DASH_STANDIN_FALLBACK="1", DASH_CPU_BF16="0",
                     DASH_HISTORY_DIR=str(app_dir / "history")) as url:  # the generated images' history, not the user's cache
        yield url


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    executable = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    if not Path(executable).exists():
        pytest.fail(f"Chromium not found at {executable}: `make test` installs Debian's chromium package")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield instance
        instance.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    yield tab
    context.close()
