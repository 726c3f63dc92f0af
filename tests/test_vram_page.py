"""AppTest of the VRAM monitor with a fake NVML (none, missing, raising, one and two GPUs) and a fast test manager."""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
import torch
from fake_nvml import FakeGpu, FakeNvml
from streamlit import config as streamlit_config
from streamlit.testing.v1 import AppTest

from core import app_state
from core.config import VramBudget
from core.gpu.history import HistorySampler, take_sample
from core.gpu.nvml import GpuMonitor
from core.models.manager import ModelManager
from core.models.memory import MemoryPolicy
from core.models.registry import MODELS
from tests.oidc_provider import UNREACHED_AUTH_SECRETS

HOME = str(Path(__file__).resolve().parent.parent / "Home.py")
GIB = 2**30


ADMIN, USER = "admin@example.org", "someone@example.org"
ACTION_KEYS = ("vram:unload", "vram:unload_all", "vram:empty_cache", "vram:reset_peak")


@pytest.fixture()
def server_address():
    """Set Streamlit's server.address for the test (the app's bind address, which decides who is admin without
    login); localhost unless the test sets another."""
    def bind(address: str | None) -> None:
        streamlit_config.set_option("server.address", address)

    previous = streamlit_config.get_option("server.address")
    bind("127.0.0.1")
    yield bind
    bind(previous)


@pytest.fixture()
def monitor_page(app_env, monkeypatch, settings, server_address):
    """Open the page with `nvml` behind the monitor and a manager whose models are small Linear layers; bound to
    localhost with login off unless the test says otherwise, so the session is an admin."""
    def open_page(nvml, manager: ModelManager | None = None, samples: int = 2, user: dict | None = None, secrets: dict | None = None) -> AppTest:
        monitor = GpuMonitor(nvml, ttl_s=0)
        sampler = HistorySampler(partial(take_sample, monitor), interval_s=60)  # filled here, never by its thread
        for _ in range(samples):
            sampler.tick()
        chosen = manager or ModelManager(settings, loader=lambda *args: torch.nn.Linear(512, 512))
        monkeypatch.setattr(app_state, "get_gpu_monitor", lambda: monitor)
        monkeypatch.setattr(app_state, "get_history", lambda: sampler)
        monkeypatch.setattr(app_state, "get_backend", lambda: chosen)
        at = AppTest.from_file(HOME, default_timeout=60)
        at.user = user or {}
        at.secrets.update(secrets or {})
        at.run()
        at.switch_page("app_pages/vram.py").run()
        assert not at.exception, at.exception
        assert at.title[0].value == "📊 VRAM monitor"
        return at

    return open_page


def metrics(at: AppTest) -> dict[str, str]:
    return {metric.label: metric.value for metric in at.metric}


def memory_of(manager: ModelManager, key: str) -> int | None:
    return next(row.memory_bytes for row in manager.status() if row.key == key)


def table(at: AppTest, column: str):
    """The first table on the page with `column` (AppTest does not look dataframes up by key)."""
    return next(frame.value for frame in at.dataframe if column in frame.value.columns)


def test_no_gpu_says_so_and_shows_ram_and_this_process(monitor_page):
    at = monitor_page(FakeNvml(init_error="Driver Not Loaded"))
    assert "No GPU on this machine" in at.info[0].value and "Driver Not Loaded" in at.info[0].value
    values = metrics(at)
    assert {"System RAM", "RAM used", "RAM available", "This app's process"} <= set(values)
    assert values["This app's process"].endswith(("MiB", "GiB"))
    assert len(at.get("vega_lite_chart")) == 1  # RAM history, no GPU utilisation chart
    assert "This process's torch allocator" not in [s.value for s in at.subheader]  # nothing to explain without a GPU


def test_nvml_not_installed_is_explained(monitor_page):
    at = monitor_page(None)
    assert "nvidia-ml-py is not installed" in at.info[0].value


def test_nvml_that_raises_for_everything_is_a_machine_without_gpu(monitor_page):
    at = monitor_page(FakeNvml([FakeGpu()], failing=True))
    assert "did not report how many GPUs" in at.info[0].value


def test_a_gpu_whose_queries_start_failing_shows_not_available(monitor_page):
    nvml = FakeNvml([FakeGpu()])
    GpuMonitor(nvml).snapshot()
    at = monitor_page(nvml, samples=0)
    nvml.failing = True  # the page's monitor fetched its handles; from now on every query raises
    at.run()
    assert not at.exception
    assert "GPU 0: GPU 0" in [s.value for s in at.subheader]
    assert metrics(at)["Memory used"] == "n/a" and metrics(at)["Power"] == "n/a"


def test_one_gpu_shows_memory_power_processes_and_history(monitor_page):
    card = FakeGpu(used_bytes=3 * GIB, processes=((os.getpid(), 700 * 2**20), (4242, None)))
    at = monitor_page(FakeNvml([card]))
    assert "GPU 0: NVIDIA Fake T4" in [s.value for s in at.subheader]
    values = metrics(at)
    assert values["Memory used"] == "3.0 GiB" and values["Free"] == "13.0 GiB"
    assert values["Utilisation"] == "37 %" and values["Temperature"] == "51 °C" and values["Power"] == "42 W"
    processes = table(at, "PID").set_index("PID")
    assert processes.loc[os.getpid(), "GPU memory"] == "700.0 MiB" and processes.loc[os.getpid(), "Process"].endswith("(this app)")
    assert processes.loc[4242, "GPU memory"] == "n/a" and not processes.loc[4242, "Process"].endswith("(this app)")
    assert len(at.get("vega_lite_chart")) == 2  # memory and utilisation
    assert any("NVML **used** is everything on the card" in c.value for c in at.caption)
    if not torch.cuda.is_available():
        assert any("torch has not used a GPU in this process" in c.value for c in at.caption)


def test_two_gpus_are_both_shown(monitor_page):
    at = monitor_page(FakeNvml([FakeGpu(name="Card A"), FakeGpu(name="Card B")]))
    headings = [s.value for s in at.subheader]
    assert "GPU 0: Card A" in headings and "GPU 1: Card B" in headings


def test_first_view_waits_for_a_second_sample(monitor_page):
    at = monitor_page(FakeNvml([FakeGpu()]), samples=1)
    assert any("Collecting samples" in c.value for c in at.caption) and not at.get("vega_lite_chart")


def test_models_table_shows_measured_memory_and_last_use(monitor_page, settings):
    manager = ModelManager(settings, loader=lambda *args: torch.nn.Linear(512, 512))
    manager.get(MODELS["sentiment"])
    at = monitor_page(FakeNvml(), manager)
    models = table(at, "Last used")
    row = models[models["Model"] == MODELS["sentiment"].title].iloc[0]
    assert row["State"] == "ready" and row["Device"] == "cpu" and row["Precision"] == "fp32"
    assert row["Memory"] == "1.0 MiB" and row["Last used"].endswith("s ago") and row["Running now"] == 0
    other = models[models["Model"] == MODELS["hotdog"].title].iloc[0]
    assert other["Memory"].endswith("(estimate)") and other["Last used"] == "never"


def test_unload_asks_first_then_says_what_it_freed(monitor_page, settings):
    manager = ModelManager(settings, loader=lambda *args: torch.nn.Linear(512, 512))
    manager.get(MODELS["sentiment"])
    at = monitor_page(FakeNvml(), manager)
    assert at.selectbox(key="vram:choice").value == "sentiment"
    at.button(key="vram:unload").click().run()
    assert "Every session of this app shares the models" in at.warning[0].value
    assert memory_of(manager, "sentiment") is not None  # nothing happened yet
    at.button(key="vram:cancel").click().run()
    assert not at.warning and memory_of(manager, "sentiment") is not None

    at.button(key="vram:unload").click().run()
    at.button(key="vram:confirm").click().run()
    assert not at.exception
    assert at.success[0].value.startswith("Unloaded Sentiment (DistilBERT SST-2): the weights held 1.0 MiB.")
    assert memory_of(manager, "sentiment") is None
    assert at.button(key="vram:unload").disabled  # nothing left to unload
    models = table(at, "Last used")
    assert models[models["Model"] == MODELS["sentiment"].title].iloc[0]["Memory"] == "~1.0 MiB (measured)"


def test_unload_all_asks_first(monitor_page, settings):
    manager = ModelManager(settings, loader=lambda *args: torch.nn.Linear(512, 512))
    manager.get(MODELS["sentiment"])
    manager.get(MODELS["hotdog"])
    at = monitor_page(FakeNvml(), manager)
    at.button(key="vram:unload_all").click().run()
    assert "Unload every model?" in at.warning[0].value
    at.button(key="vram:confirm").click().run()
    assert "Unloaded every model: the weights held 2.0 MiB." in at.success[0].value
    assert all(row.memory_bytes is None for row in manager.status())


def test_cache_and_peak_actions_say_there_is_nothing_without_cuda(monitor_page):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    at = monitor_page(FakeNvml())
    at.button(key="vram:empty_cache").click().run()
    assert "Nothing to empty" in at.success[0].value
    at.button(key="vram:reset_peak").click().run()
    assert "Nothing to reset" in at.success[0].value


def test_budget_per_gpu_is_shown_when_the_manager_has_gpus(monitor_page, settings):
    manager = ModelManager(
        settings, loader=lambda *args: torch.nn.Linear(512, 512),
        policy=MemoryPolicy(VramBudget(size_bytes=8 * GIB)), gpu_total_bytes={0: 16 * GIB, 1: 16 * GIB},
    )
    manager.get(MODELS["sentiment"])
    at = monitor_page(FakeNvml([FakeGpu(), FakeGpu()]), manager)
    texts = [bar.proto.text for bar in at.get("progress")]
    assert any("GPU 0 (CUDA): models hold 1.0 MiB of the 8.0 GiB budget (16.0 GiB card)" in t for t in texts)
    assert any("GPU 1 (CUDA): models hold 0 B" in t for t in texts)


def test_background_compiles_are_listed_with_their_state(monitor_page, monkeypatch):
    from core.accel import compiled
    from core.accel.compiled import CompileRecord, CompileState

    monkeypatch.setattr(compiled, "records", lambda: [
        CompileRecord("UNet2DConditionModel", "2×4×64×64 + scalar + 2×77×768", CompileState.READY, 71.4),
        CompileRecord("ResNet", "64×3×224×224", CompileState.COMPILING, None),
    ])
    at = monitor_page(FakeNvml(init_error="Driver Not Loaded"))
    caption = next(c.value for c in at.caption if c.value.startswith("Background compiles"))
    assert "UNet2DConditionModel 2×4×64×64 + scalar + 2×77×768: ready in 71 s" in caption
    assert "ResNet 64×3×224×224: compiling" in caption


def action_buttons(at: AppTest) -> list[str]:
    return [key for key in ACTION_KEYS if any(button.key == key for button in at.button)]


def admin_caption(at: AppTest) -> str:
    return next((c.value for c in at.caption if c.value.startswith("Only admins can")), "")


def test_on_localhost_without_login_the_actions_are_there(monitor_page):
    at = monitor_page(FakeNvml())
    assert action_buttons(at) == list(ACTION_KEYS) and not admin_caption(at)


def test_listening_on_every_interface_without_login_nobody_gets_the_actions(monitor_page, server_address):
    server_address("0.0.0.0")
    at = monitor_page(FakeNvml())
    assert action_buttons(at) == []
    assert "listens on 0.0.0.0 without login, so nobody is an admin" in admin_caption(at)
    assert "DASH_ADMINS" in admin_caption(at) and "bind it to 127.0.0.1" in admin_caption(at)


def test_with_login_an_admin_gets_the_actions_and_unloads(monitor_page, monkeypatch, settings, server_address):
    server_address("0.0.0.0")
    monkeypatch.setenv("DASH_ADMINS", "Admin@Example.org")
    manager = ModelManager(settings, loader=lambda *args: torch.nn.Linear(512, 512))
    manager.get(MODELS["sentiment"])
    at = monitor_page(FakeNvml(), manager, user={"is_logged_in": True, "email": ADMIN, "email_verified": True}, secrets=UNREACHED_AUTH_SECRETS)
    assert action_buttons(at) == list(ACTION_KEYS)
    at.button(key="vram:unload").click().run()
    at.button(key="vram:confirm").click().run()
    assert memory_of(manager, "sentiment") is None


@pytest.mark.parametrize(("user", "remedy"), [
    ({"is_logged_in": False}, "log in (sidebar) with an address listed in DASH_ADMINS"),
    ({"is_logged_in": True, "email": USER}, f"you are logged in as {USER}, which is not in DASH_ADMINS"),
    ({"is_logged_in": True, "email": ADMIN, "email_verified": False}, f"your provider has not verified {ADMIN}"),
    ({"is_logged_in": True, "name": "hf-user"}, "your login carries no e-mail address"),
])
def test_with_login_everyone_else_sees_why_the_actions_are_missing(monitor_page, monkeypatch, server_address, user, remedy):
    server_address("127.0.0.1")  # localhost makes nobody admin once login is on
    monkeypatch.setenv("DASH_ADMINS", ADMIN)
    at = monitor_page(FakeNvml(), user=user, secrets=UNREACHED_AUTH_SECRETS)
    assert action_buttons(at) == []
    assert remedy in admin_caption(at)
