from __future__ import annotations

import threading
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.config import EvictTo, Settings, VramBudget
from core.errors import ModelUnavailableError
from core.models import loading, standins
from core.models.describe import module_bytes
from core.models.manager import ModelManager, ModelState, release_memory
from core.models.memory import DoesNotFitError, MemoryPolicy
from core.models.registry import MODELS

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
    assert manager.device.type == "cpu" and manager.dtype_for(MODELS["hotdog"]) is torch.float32  # CPU bf16 is off in the tests


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


# --- memory policy on (pretend) GPUs: the loader ignores the device, so the planning runs on the CPU ---------------

SIZE_PARAMS = 100  # each test model: 100 parameters' worth, 480 bytes at fp32 (the estimate adds 20 %)


class Sized(torch.nn.Module):
    """A model of a fixed byte size whose `.to()` records the device instead of moving (there is no GPU here)."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__()
        self.register_buffer("weights", torch.zeros(size_bytes, dtype=torch.uint8))
        self.moved_to: list[torch.device] = []

    def to(self, device, *args, **kwargs):  # noqa: D102 (records, see class docstring)
        self.moved_to.append(torch.device(device))
        return self


def sized_spec(key: str, param_count: int = SIZE_PARAMS):
    return replace(HOTDOG, key=key, title=key.upper(), param_count=param_count)


def estimate(spec) -> int:
    return spec.estimate_bytes(4)


class CountingLoader:
    """Builds a `Sized` model (its estimate, or `sizes[key]`), counting loads and the loads in flight."""

    def __init__(self, sizes: dict[str, int] | None = None) -> None:
        self.sizes = sizes or {}
        self.loads: list[tuple[str, torch.device]] = []
        self.lock = threading.Lock()

    def __call__(self, spec, source, device, dtype, cfg):
        with self.lock:
            self.loads.append((spec.key, device))
        return Sized(self.sizes.get(spec.key, estimate(spec)))


def gpu_manager(settings, models_per_gpu: int, gpus: int = 1, evict_to: EvictTo = EvictTo.UNLOAD, loader=None):
    """A manager on `gpus` pretend cards whose budget holds exactly `models_per_gpu` test models."""
    budget_bytes = models_per_gpu * estimate(sized_spec("x"))
    return ModelManager(
        settings,
        loader=loader or CountingLoader(),
        policy=MemoryPolicy(VramBudget(size_bytes=budget_bytes), evict_to),
        gpu_total_bytes=dict.fromkeys(range(gpus), 10 * budget_bytes),
    )


def states(manager) -> dict[str, tuple[str, str | None]]:
    """State and device of each test model (the registry's models are left out)."""
    return {row.key: (row.state.value, row.device) for row in manager.status() if row.key not in MODELS}


def test_least_recently_used_idle_model_is_evicted_first(settings):
    manager = gpu_manager(settings, models_per_gpu=2)
    a, b, c = sized_spec("a"), sized_spec("b"), sized_spec("c")
    manager.get(a)
    manager.get(b)
    manager.get(a)  # a used after b: b is now the least recently used
    manager.get(c)
    assert states(manager) == {"a": ("ready", "cuda:0"), "b": ("not loaded", None), "c": ("ready", "cuda:0")}
    assert [(e.key, e.for_key, e.gpu_index) for e in manager.evictions()] == [("b", "c", 0)]
    assert manager.gpu_budgets()[0].held_bytes == 2 * estimate(a)


def test_a_running_model_is_never_evicted_even_from_another_thread(settings):
    manager = gpu_manager(settings, models_per_gpu=2)
    a, b, c, d = (sized_spec(k) for k in "abcd")
    running, release = threading.Event(), threading.Event()

    def inference():
        with manager.use(a):
            running.set()
            release.wait(10)

    worker = threading.Thread(target=inference)
    worker.start()
    assert running.wait(10)
    manager.get(b)
    manager.get(c)  # a is the least recently used, but running: b goes
    assert states(manager)["a"] == ("ready", "cuda:0") and states(manager)["b"] == ("not loaded", None)
    manager.get(b)  # now c is the only idle one
    assert states(manager)["c"] == ("not loaded", None)
    release.set()
    worker.join(10)
    manager.get(d)  # a finished: it is the least recently used idle model now
    assert states(manager)["a"] == ("not loaded", None)


def test_no_room_while_models_run_is_a_clear_error_and_can_be_retried(settings):
    manager = gpu_manager(settings, models_per_gpu=1)
    a, b = sized_spec("a"), sized_spec("b")
    with manager.use(a):
        with pytest.raises(DoesNotFitError, match=r"models in use or loading hold the rest: A \(480 B on GPU 0\)"):
            manager.get(b)
        row = next(r for r in manager.status([b]) if r.key == "b")
        assert row.state is ModelState.FAILED and "A (480 B" in row.error
    assert manager.get(b).device == torch.device("cuda", 0)  # a finished and was idle: it made room
    assert states(manager)["a"] == ("not loaded", None)


def test_concurrent_loads_never_overcommit_the_budget(settings):
    in_flight, peak = [0], [0]
    loader = CountingLoader()
    manager = gpu_manager(settings, models_per_gpu=2, loader=loader)

    def checked_loader(spec, source, device, dtype, cfg):
        resident = sum(1 for state, _ in states(manager).values() if state == "ready")
        with loader.lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], resident + in_flight[0])
        try:
            return loader(spec, source, device, dtype, cfg)
        finally:
            with loader.lock:
                in_flight[0] -= 1

    manager._loader = checked_loader
    specs = [sized_spec(f"m{i}") for i in range(6)]
    errors: list[BaseException] = []

    def session(spec):
        try:
            for _ in range(3):
                with manager.use(spec):
                    pass
        except DoesNotFitError:
            pass  # two others were running at that moment: a clear refusal, not an overcommit
        except BaseException as exc:  # anything else is a bug
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(spec,)) for spec in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and 0 < peak[0] <= 2
    assert manager.gpu_budgets()[0].held_bytes <= manager.gpu_budgets()[0].budget_bytes


def test_measured_footprint_replaces_the_estimate(settings):
    a, b = sized_spec("a"), sized_spec("b")
    manager = gpu_manager(settings, models_per_gpu=3, loader=CountingLoader({"a": 2 * estimate(a)}))
    before = next(r for r in manager.status([a]) if r.key == "a")
    assert before.estimate_bytes == estimate(a) and not before.estimate_measured
    manager.get(a)
    manager.get(b)
    manager.unload("a")
    after = next(r for r in manager.status([a]) if r.key == "a")
    assert after.estimate_bytes == 2 * estimate(a) and after.estimate_measured
    manager.get(sized_spec("c"))  # 3 of 3 used with b and c: a (measured 2) no longer fits without evicting
    manager.get(a)
    assert states(manager)["b"] == ("not loaded", None)


def test_a_model_larger_than_its_estimate_makes_idle_models_leave_after_loading(settings):
    big = sized_spec("big")
    manager = gpu_manager(settings, models_per_gpu=2, loader=CountingLoader({"big": 2 * estimate(big)}))
    manager.get(sized_spec("a"))
    manager.get(big)  # estimated at 1 (fits beside a), measured at 2: a leaves after the load
    assert states(manager) == {"a": ("not loaded", None), "big": ("ready", "cuda:0")}


def test_two_gpus_spread_models_and_a_gpu_can_be_chosen(settings):
    manager = gpu_manager(settings, models_per_gpu=2, gpus=2)
    a, b, c = sized_spec("a"), sized_spec("b"), sized_spec("c")
    assert manager.get(a).device == torch.device("cuda", 0)
    assert manager.get(b).device == torch.device("cuda", 1)  # more headroom there
    assert manager.get(c, gpu=1).device == torch.device("cuda", 1)
    moved = manager.get(a, gpu=1)  # moved, not loaded again; b (least recently used on 1) makes room
    assert moved.device == torch.device("cuda", 1) and moved.obj.moved_to == [torch.device("cuda", 1)]
    assert [key for key, _ in manager._loader.loads] == ["a", "b", "c"]
    assert states(manager)["b"] == ("not loaded", None)


def test_evict_to_cpu_parks_the_model_and_the_next_use_brings_it_back(settings):
    manager = gpu_manager(settings, models_per_gpu=1, evict_to=EvictTo.CPU)
    a, b = sized_spec("a"), sized_spec("b")
    model_a = manager.get(a).obj
    manager.get(b)
    assert states(manager)["a"] == ("moved to CPU", "cpu") and model_a.moved_to == [torch.device("cpu")]
    assert manager.get(a).obj is model_a  # brought back, not loaded again
    assert model_a.moved_to[-1] == torch.device("cuda", 0) and states(manager)["b"] == ("moved to CPU", "cpu")
    assert [key for key, _ in manager._loader.loads] == ["a", "b"]


def test_cpu_machine_has_no_budget_and_never_evicts(settings):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    manager = ModelManager(settings, loader=CountingLoader())
    for key in "abcdef":
        manager.get(sized_spec(key, param_count=10**6))
    assert manager.gpu_budgets() == () and manager.evictions() == ()
    assert all(state == "ready" for state, _ in states(manager).values())


# --- on the device: real sizes -------------------------------------------------------------------------------------

SD15_PARAMS = 1_066_000_000  # the whole SD 1.5 pipeline (UNet 860 M, text encoder 123 M, VAE 84 M)
RESNET50_PARAMS = 25_557_032
MIB = 2**20


class Blob(torch.nn.Module):
    """Random weights of a given byte size, in chunks of 64 Mi elements (as a model's layers are)."""

    def __init__(self, size_bytes: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        chunk, count = 64 * 2**20, size_bytes // (torch.finfo(dtype).bits // 8)
        sizes = [chunk] * (count // chunk) + ([count % chunk] if count % chunk else [])
        self.chunks = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(n, device=device, dtype=dtype), requires_grad=False) for n in sizes)


def blob_loader(spec, source, device, dtype, cfg):
    """A model exactly as large as the registry's estimate, so the planner's figures are the real ones."""
    return Blob(spec.estimate_bytes(torch.finfo(dtype).bits // 8), device, dtype)


def sd15_and_resnet50():
    return replace(MODELS["sd15"], param_count=SD15_PARAMS), replace(MODELS["resnet50"], param_count=RESNET50_PARAMS)


@pytest.mark.gpu
def test_sd15_and_resnet50_sizes_under_a_budget_for_one_evict_each_other(settings):
    sd15, resnet = sd15_and_resnet50()
    sd15_bytes, resnet_bytes = sd15.estimate_bytes(2), resnet.estimate_bytes(2)
    policy = MemoryPolicy(VramBudget(size_bytes=sd15_bytes + resnet_bytes // 2))  # room for one of them
    manager = ModelManager(settings, loader=blob_loader, policy=policy)
    release_memory()
    start = torch.cuda.memory_allocated()

    def held_bytes() -> int:
        return torch.cuda.memory_allocated() - start

    manager.get(sd15)
    assert abs(held_bytes() - sd15_bytes) < MIB
    manager.get(resnet)  # SD 1.5 is idle: it leaves
    assert [e.key for e in manager.evictions()] == ["sd15"] and abs(held_bytes() - resnet_bytes) < MIB
    with manager.use(resnet), pytest.raises(DoesNotFitError):
        manager.get(sd15)  # ResNet50 is running: it stays, and SD 1.5 is refused
    assert abs(held_bytes() - resnet_bytes) < MIB
    manager.get(sd15)  # ResNet50 finished: now it leaves
    assert [e.key for e in manager.evictions()] == ["sd15", "resnet50"] and abs(held_bytes() - sd15_bytes) < MIB
    print(f"budget {policy.budget_bytes(torch.cuda.get_device_properties(0).total_memory) / MIB:.0f} MiB; "
          f"SD 1.5 {sd15_bytes / MIB:.0f} MiB, ResNet50 {resnet_bytes / MIB:.0f} MiB; evictions {[e.key for e in manager.evictions()]}")


@pytest.mark.gpu
def test_twenty_load_unload_cycles_return_to_the_start_within_64_mib(settings):
    from core.gpu.nvml import GpuMonitor, load_nvml

    manager = ModelManager(settings, loader=blob_loader)
    sd15, resnet = sd15_and_resnet50()
    monitor = GpuMonitor(load_nvml(), ttl_s=0)
    torch.ones(1, device="cuda")  # the context exists before the baseline
    release_memory()
    torch.cuda.synchronize()
    start_allocated, start_nvml = torch.cuda.memory_allocated(), monitor.snapshot().gpus[0].used_bytes
    for _ in range(20):
        manager.get(sd15)
        manager.get(resnet)
        assert abs(manager.unload_all() - (sd15.estimate_bytes(2) + resnet.estimate_bytes(2))) <= 2  # whole fp16 elements
    torch.cuda.synchronize()
    end_allocated, end_nvml = torch.cuda.memory_allocated(), monitor.snapshot().gpus[0].used_bytes
    print(f"allocated {start_allocated} -> {end_allocated} B; NVML used {start_nvml / MIB:.0f} -> {end_nvml / MIB:.0f} MiB")
    assert end_allocated == start_allocated
    assert abs(end_nvml - start_nvml) <= 64 * MIB
