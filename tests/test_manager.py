from __future__ import annotations

import threading
import weakref
from pathlib import Path

import pytest
import torch

from core import loading, standins
from core.config import Settings
from core.errors import ModelUnavailableError
from core.manager import ModelManager, ModelState, module_bytes, release_memory
from core.registry import MODELS

HOTDOG = MODELS["hotdog"]


def test_real_model_unavailable_offline_is_failed_with_its_cause(manager):
    with pytest.raises(ModelUnavailableError):
        manager.get(HOTDOG)
    row = next(r for r in manager.status() if r.key == "hotdog")
    assert row.state is ModelState.FAILED
    assert "not in the local cache" in row.error


def test_standin_loads_through_the_same_loader_and_is_labelled(settings):
    calls: list[loading.ModelSource] = []

    def recording_loader(spec, source, device, dtype, cfg):
        calls.append(source)
        return loading.load(spec, source, device, dtype, cfg)

    manager = ModelManager(settings, loader=recording_loader)
    model = manager.get(HOTDOG, allow_standin=True)
    assert [c.is_standin for c in calls] == [False, True]  # the Hub first, then the stand-in folder
    assert model.is_standin and "random weights" in model.source.label
    row = next(r for r in manager.status() if r.key == "hotdog")
    assert row.state is ModelState.READY and row.is_standin and row.memory_bytes == module_bytes(model.obj) > 0


def test_local_folder_in_hub_layout_is_a_real_source(standin_dir: Path, tmp_path: Path):
    root = tmp_path / "models"
    folder = standins.ensure_built(HOTDOG, standin_dir)
    (root / "julien-c").mkdir(parents=True)
    (root / HOTDOG.repo_id).symlink_to(folder, target_is_directory=True)
    model = ModelManager(Settings(models_root=root, standin_dir=standin_dir)).get(HOTDOG)
    assert not model.is_standin and model.source.location == str(root / HOTDOG.repo_id)


def test_concurrent_requests_load_the_model_once(settings):
    sessions = 6
    arrived = threading.Semaphore(0)
    load_calls = []

    def slow_loader(spec, source, device, dtype, cfg):
        load_calls.append(source)
        # Hold the load until every session has asked: without the entry lock each would start its own load.
        for _ in range(sessions - 1):
            arrived.acquire(timeout=10)
        return torch.nn.Linear(4, 4)

    manager = ModelManager(settings, loader=slow_loader)
    results = []

    def session():
        arrived.release()
        results.append(manager.get(HOTDOG))

    threads = [threading.Thread(target=session) for _ in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(load_calls) == 1
    assert len(results) == sessions and all(r is results[0] for r in results)


def test_unload_releases_the_model(settings):
    manager = ModelManager(settings, loader=lambda *args: torch.nn.Linear(256, 256))
    module_ref = weakref.ref(manager.get(HOTDOG).obj)
    freed = manager.unload("hotdog")
    assert freed == (256 * 256 + 256) * 4
    assert module_ref() is None  # nothing in the manager keeps the weights alive
    assert next(r for r in manager.status() if r.key == "hotdog").state is ModelState.NOT_LOADED


def test_failed_load_can_be_retried(settings):
    attempts = []

    def flaky_loader(spec, source, device, dtype, cfg):
        attempts.append(source)
        if len(attempts) == 1:
            raise ModelUnavailableError("first try fails")
        return torch.nn.Linear(2, 2)

    manager = ModelManager(settings, loader=flaky_loader)
    with pytest.raises(ModelUnavailableError):
        manager.get(HOTDOG)
    assert manager.get(HOTDOG) is not None and len(attempts) == 2


def test_use_marks_busy_and_last_used(settings):
    manager = ModelManager(settings, loader=lambda *args: torch.nn.Linear(2, 2))
    with manager.use(HOTDOG):
        row = next(r for r in manager.status() if r.key == "hotdog")
        assert row.busy == 1 and row.last_used is not None
    assert next(r for r in manager.status() if r.key == "hotdog").busy == 0


def test_status_lists_every_registered_model_before_any_load(manager):
    rows = manager.status()
    assert {r.key for r in rows} == set(MODELS)
    assert all(r.state is ModelState.NOT_LOADED and r.estimate_bytes > 0 for r in rows)


def test_cpu_machine_uses_fp32(manager):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert manager.device.type == "cpu" and manager.dtype is torch.float32


@pytest.mark.gpu
def test_unload_gives_gpu_memory_back(settings):
    manager = ModelManager(settings, loader=lambda spec, source, device, dtype, cfg: torch.nn.Linear(4096, 4096).to(device, dtype))
    release_memory()  # garbage left by earlier tests must not be counted as freed by this unload
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    manager.get(HOTDOG)
    loaded = torch.cuda.memory_allocated()
    manager.unload("hotdog")
    after = torch.cuda.memory_allocated()
    assert loaded - before >= 4096 * 4096 * 2
    assert after == before
