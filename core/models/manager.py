"""One ModelManager per process: loads each model once, shares it between sessions, unloads on request.

Thread-safety: `_lock` guards the table of entries; each entry has its own lock so that two sessions asking
for the same model wait for one load, while different models load side by side.

On GPUs, `core.models.memory` decides before each load which card takes the model and which idle models leave for it.
`_memory_lock` makes that decision and its evictions one step, so two loads never count the same free memory;
the load itself runs outside it, its estimate held as a reservation. An eviction takes a model's lock without
waiting (a model being loaded or moved is never a victim) and checks under `_lock` that nobody is using it.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import torch

from core.accel import EAGER, Acceleration, compiled
from core.config import EvictTo, Settings
from core.errors import DashboardError, ModelUnavailableError
from core.models import loading, standins
from core.models.describe import describe, module_bytes
from core.models.devices import pick_device, pick_dtype
from core.models.info import ModelInfo
from core.models.memory import DoesNotFitError, MemoryPolicy, Placement, Resident, move_model, plan_placement, release_memory
from core.models.registry import MODELS, ModelSpec

log = logging.getLogger(__name__)
CPU = torch.device("cpu")
# How long a real model that could not be had is not asked for again where a stand-in is allowed: a session that chose
# the stand-in gets it at once (after "Unload all" too) instead of waiting on the Hub for the same answer.
UNAVAILABLE_REMEMBERED_S = 300.0


class ModelState(StrEnum):
    NOT_LOADED = "not loaded"
    LOADING = "loading"
    READY = "ready"
    OFFLOADED = "moved to CPU"  # evicted from the GPU with DASH_EVICT_TO=cpu; the next use moves it back
    FAILED = "failed"


@dataclass(frozen=True)
class LoadedModel:
    """A live model: the object only core inference functions touch, and how it was loaded."""

    spec: ModelSpec
    obj: Any  # only core/tasks and the local backend touch it
    device: torch.device
    dtype: torch.dtype
    source: loading.ModelSource
    memory_bytes: int
    load_s: float
    info: ModelInfo  # what pages and pre-run checks read, on every backend
    accel: Acceleration = EAGER  # the GPU speed-ups its calls may use (the local manager's settings)

    @property
    def is_standin(self) -> bool:
        return self.source.is_standin


@dataclass(frozen=True)
class ModelStatus:
    """What Home and the VRAM monitor show for one model."""

    key: str
    title: str
    state: ModelState
    device: str | None
    dtype: str | None
    memory_bytes: int | None
    estimate_bytes: int
    load_s: float | None
    is_standin: bool
    source: str | None
    error: str | None
    busy: int
    last_used: float | None  # time.time() of the last use
    estimate_measured: bool = False  # estimate_bytes is the footprint measured at an earlier load


@dataclass(frozen=True)
class GpuBudget:
    """How much of one GPU's budget the models hold (their measured footprints)."""

    gpu_index: int  # CUDA's index
    total_bytes: int
    budget_bytes: int
    held_bytes: int


@dataclass(frozen=True)
class Eviction:
    """A model that left a GPU to make room for another."""

    key: str
    title: str
    gpu_index: int
    size_bytes: int
    to: EvictTo
    for_key: str  # the model that needed the room
    at: float  # time.time()


class ModelEntry:
    """One model's row in a manager's table (this one's and the ray backend's): its state, live model and users."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.load_lock = threading.Lock()
        self.state = ModelState.NOT_LOADED
        self.model: LoadedModel | None = None
        self.error: DashboardError | None = None
        self.busy = 0
        self.last_used: float | None = None
        self.use_seq = 0  # orders uses for least-recently-used eviction; wall-clock ties cannot happen here

    def forget(self, release: Callable[[LoadedModel], None] = lambda model: None) -> int:
        """Back to "not loaded", `release` called on the live model first; the bytes its tensors held."""
        with self.load_lock:
            model = self.model
            if model is not None:
                release(model)
            self.model, self.error, self.state = None, None, ModelState.NOT_LOADED
        return model.memory_bytes if model is not None else 0


Loader = Callable[[ModelSpec, loading.ModelSource, torch.device, torch.dtype, Settings], Any]


class CountsUses:
    """`use()` for both managers (this one and core.backends.ray_client's RayManager): each has `_lock`, `_entry()` and `get()`."""

    _lock: threading.Lock

    def _entry(self, spec: ModelSpec) -> ModelEntry:
        raise NotImplementedError

    def get(self, spec: ModelSpec, *, allow_standin: bool = False, gpu: int | None = None) -> LoadedModel:
        raise NotImplementedError

    @contextmanager
    def use(self, spec: ModelSpec, *, allow_standin: bool = False, gpu: int | None = None) -> Iterator[LoadedModel]:
        """The model for one inference: counted as busy (never evicted, shown as running) while it runs."""
        entry = self._entry(spec)
        with self._lock:
            entry.busy += 1  # before the load, so no eviction slips in between loading and running
        try:
            yield self.get(spec, allow_standin=allow_standin, gpu=gpu)
        finally:
            with self._lock:
                entry.busy -= 1


class ModelManager(CountsUses):
    def __init__(
        self,
        settings: Settings,
        loader: Loader = loading.load,
        *,
        policy: MemoryPolicy | None = None,
        gpu_total_bytes: Mapping[int, int] | None = None,
    ) -> None:
        """`gpu_total_bytes` (CUDA index -> card bytes) stands in for the cards torch finds: tests plan without a GPU."""
        self.settings = settings
        compiled.use_cache_dir(settings.compile_cache_dir)  # inductor's, for the process
        self.device = pick_device(settings)
        # Shared batches check a cancel between steps: on a GPU steps are milliseconds, on a CPU a large one takes
        # minutes, where a solo run's checks inside the UNet stop it within a second.
        self.accel = Acceleration(
            cuda_graphs=settings.cuda_graphs, compile=settings.compile, shared_batches=settings.shared_batches and self.device.type == "cuda",
            batch_sessions=settings.batch_sessions, batch_window_ms=settings.batch_window_ms,
        )
        self.policy = policy or MemoryPolicy.from_settings(settings)
        self._loader = loader
        self._lock = threading.Lock()
        self._memory_lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        self._gpu_total_bytes = dict(gpu_total_bytes) if gpu_total_bytes is not None else None
        self._measured_bytes: dict[str, int] = {}  # footprints of earlier loads: they replace the estimates
        self._pending: dict[str, Resident] = {}  # loads in progress, held at their estimate
        self._use_counter = itertools.count(1)
        self._evictions: deque[Eviction] = deque(maxlen=50)
        self._unavailable_at: dict[str, float] = {}  # key -> time.monotonic() its real model last failed to load

    def _entry(self, spec: ModelSpec) -> ModelEntry:
        with self._lock:
            entry = self._entries.get(spec.key)
            if entry is None:
                entry = self._entries[spec.key] = ModelEntry(spec)
            return entry

    def _budgets_bytes(self) -> dict[int, int]:
        """Budget per GPU (CUDA index); {} on the CPU. Cards are read on first need: building a manager touches no CUDA."""
        if self._gpu_total_bytes is None:
            count = torch.cuda.device_count() if self.device.type == "cuda" else 0
            self._gpu_total_bytes = {i: torch.cuda.get_device_properties(i).total_memory for i in range(count)}
        return {index: self.policy.budget_bytes(total) for index, total in self._gpu_total_bytes.items()}

    def get(self, spec: ModelSpec, *, allow_standin: bool = False, gpu: int | None = None) -> LoadedModel:
        """The loaded model, loading it first if needed. A stand-in is used only when allowed and the real one fails.

        On GPUs the memory policy picks the card, or `gpu` (CUDA index) does; a model parked on the CPU, or on
        another card than `gpu`, is moved rather than loaded again. Raises core.models.memory.DoesNotFitError when
        the model does not fit even after every idle model has left.
        """
        entry = self._entry(spec)
        with entry.load_lock:
            if entry.model is None or not self._is_placed(entry.model, gpu):
                entry.state, entry.error = ModelState.LOADING, None
                try:
                    self._place(entry, allow_standin or self.settings.standin_fallback, gpu)
                except DashboardError as exc:
                    entry.state, entry.error = self._resting_state(entry, ModelState.FAILED), exc
                    raise
                except BaseException:
                    entry.state = self._resting_state(entry, ModelState.NOT_LOADED)
                    raise
                entry.state = ModelState.READY
            self._touch(entry)
            return entry.model

    def _is_placed(self, model: LoadedModel, gpu: int | None) -> bool:
        if not self._budgets_bytes():
            return True  # no GPU: a model stays wherever it loaded
        return model.device.type == "cuda" and gpu in (None, model.device.index)

    @staticmethod
    def _resting_state(entry: ModelEntry, unloaded: ModelState) -> ModelState:
        # A parked model that could not come back is still parked, and still usable from there.
        return ModelState.OFFLOADED if entry.model is not None else unloaded

    def _touch(self, entry: ModelEntry) -> None:
        with self._lock:
            entry.last_used = time.time()
            entry.use_seq = next(self._use_counter)

    def _place(self, entry: ModelEntry, allow_standin: bool, gpu: int | None) -> None:
        """Load the model, or bring it back from the CPU or another card, where the memory policy says; sets entry.model."""
        spec = entry.spec
        if not self._budgets_bytes():
            model = self._load_real_or_standin(spec, allow_standin, self.device)
            with self._lock:
                entry.model = model
                self._measured_bytes[spec.key] = model.memory_bytes
            return
        need_bytes = self._footprint_bytes(spec)
        with self._memory_lock:
            placement = self._evict_until_fits(spec, need_bytes, gpu)
            with self._lock:
                self._pending[spec.key] = Resident(spec.key, spec.title, placement.gpu_index, need_bytes, 0, busy=True)
        device = torch.device("cuda", placement.gpu_index)
        try:
            if entry.model is not None:
                move_model(entry.model.obj, device)
                model = replace(entry.model, device=device)
            else:
                model = self._load_real_or_standin(spec, allow_standin, device)
        except BaseException:
            with self._lock:
                self._pending.pop(spec.key, None)
            raise
        with self._lock:  # resident from here on, so the reservation goes in the same step
            entry.model = model
            self._measured_bytes[spec.key] = model.memory_bytes
            self._pending.pop(spec.key, None)
        if model.memory_bytes > need_bytes:
            self._settle(spec, placement.gpu_index)

    def _settle(self, spec: ModelSpec, gpu: int) -> None:
        """A model that came out larger than its estimate: idle models on its card leave until the budget holds."""
        with self._memory_lock:
            try:
                self._evict_until_fits(spec, 0, gpu)
            except DoesNotFitError:
                log.warning("GPU %d is over its VRAM budget after loading %s, and every other model there is busy", gpu, spec.title)

    def _footprint_bytes(self, spec: ModelSpec) -> int:
        with self._lock:
            measured = self._measured_bytes.get(spec.key)
        return measured if measured is not None else spec.estimate_bytes(torch.finfo(self.dtype_for(spec)).bits // 8)

    def _evict_until_fits(self, spec: ModelSpec, need_bytes: int, gpu: int | None) -> Placement:
        """Plan, evict, plan again until nothing more has to leave (the caller holds `_memory_lock`).

        A victim that became busy or started moving since the plan is skipped and counted as busy from then on,
        so the loop ends: each round evicts a model or marks one.
        """
        skipped: set[str] = set()
        while True:
            placement = plan_placement(spec.title, need_bytes, self._budgets_bytes(), self._residents(skipped), gpu)
            if not placement.evict:
                return placement
            for victim in placement.evict:
                if not self._evict(victim, for_key=spec.key):
                    skipped.add(victim.key)

    def _residents(self, skipped: set[str]) -> list[Resident]:
        with self._lock:
            residents = list(self._pending.values())
            for key, entry in self._entries.items():
                model = entry.model
                if model is None or model.device.type != "cuda":
                    continue
                busy = entry.busy > 0 or entry.load_lock.locked() or key in skipped
                residents.append(Resident(key, entry.spec.title, model.device.index or 0, model.memory_bytes, entry.use_seq, busy))
        return residents

    def _evict(self, victim: Resident, for_key: str) -> bool:
        """Take an idle model off its GPU (unload, or park on the CPU). False when it is busy or being loaded."""
        with self._lock:
            entry = self._entries.get(victim.key)
        if entry is None or not entry.load_lock.acquire(blocking=False):
            return False
        try:
            with self._lock:  # `use` counts a session in under this lock: checked and taken in one step
                model = entry.model
                if entry.busy or model is None or model.device.type != "cuda":
                    return False
                if self.policy.evict_to is EvictTo.UNLOAD:
                    entry.model, entry.state = None, ModelState.NOT_LOADED
            if self.policy.evict_to is EvictTo.CPU:
                move_model(model.obj, CPU)  # slow for big models; a session wanting it waits on the load lock
                with self._lock:
                    entry.model, entry.state = replace(model, device=CPU), ModelState.OFFLOADED
            with self._lock:
                self._evictions.append(Eviction(
                    victim.key, victim.title, victim.gpu_index, model.memory_bytes, self.policy.evict_to, for_key, time.time()
                ))
            log.info("evicted %s (%d bytes) from GPU %d for %s", victim.key, model.memory_bytes, victim.gpu_index, for_key)
        finally:
            entry.load_lock.release()
        del model
        release_memory()
        return True

    def _load_real_or_standin(self, spec: ModelSpec, allow_standin: bool, device: torch.device) -> LoadedModel:
        if not (allow_standin and self._unavailable_lately(spec)):
            try:
                model = self._load_from(spec, loading.resolve_source(spec, self.settings), device)
            except ModelUnavailableError:
                with self._lock:
                    self._unavailable_at[spec.key] = time.monotonic()
                if not allow_standin:
                    raise
            else:
                with self._lock:
                    self._unavailable_at.pop(spec.key, None)
                return model
        folder = standins.ensure_built(spec, self.settings.standin_dir)
        return self._load_from(spec, loading.ModelSource(str(folder), is_local=True, is_standin=True), device)

    def _unavailable_lately(self, spec: ModelSpec) -> bool:
        with self._lock:
            failed_at = self._unavailable_at.get(spec.key)
        return failed_at is not None and time.monotonic() - failed_at < UNAVAILABLE_REMEMBERED_S

    def _load_from(self, spec: ModelSpec, source: loading.ModelSource, device: torch.device) -> LoadedModel:
        started = time.perf_counter()
        dtype = self.dtype_for(spec)
        obj = self._loader(spec, source, device, dtype, self.settings)
        load_s = time.perf_counter() - started
        return LoadedModel(spec, obj, device, dtype, source, module_bytes(obj), load_s, describe(obj, dtype), self.accel)

    def dtype_for(self, spec: ModelSpec) -> torch.dtype:
        """The dtype `spec` loads in on this manager's device (core.models.devices.pick_dtype)."""
        return pick_dtype(self.device, spec.family, self.settings.cpu_bf16)

    def unload(self, key: str) -> int:
        """Drop a model and give its memory back. Returns the bytes its tensors held (0 if it was not loaded)."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return 0
        freed = entry.forget()
        release_memory()
        return freed

    def unload_all(self) -> int:
        with self._lock:
            keys = list(self._entries)
        return sum(self.unload(key) for key in keys)

    def status(self, specs: list[ModelSpec] | None = None) -> list[ModelStatus]:
        """One row per registered model, plus any custom model that was asked for."""
        with self._lock:
            wanted = {spec.key: spec for spec in (specs or MODELS.values())}
            wanted.update({key: entry.spec for key, entry in self._entries.items()})
            entries = {key: self._entries.get(key) for key in wanted}
            measured = dict(self._measured_bytes)
        return [self._status_row(spec, entries[key], measured.get(key)) for key, spec in wanted.items()]

    def gpu_budgets(self) -> tuple[GpuBudget, ...]:
        """Each GPU's budget and what the models on it hold; () on the CPU."""
        budgets = self._budgets_bytes()
        held: dict[int, int] = dict.fromkeys(budgets, 0)
        with self._lock:
            for entry in self._entries.values():
                model = entry.model
                if model is not None and model.device.type == "cuda":
                    held[model.device.index or 0] += model.memory_bytes
        totals = self._gpu_total_bytes or {}
        return tuple(GpuBudget(index, totals[index], budget, held[index]) for index, budget in budgets.items())

    def evictions(self) -> tuple[Eviction, ...]:
        """The latest evictions (up to 50), oldest first."""
        with self._lock:
            return tuple(self._evictions)

    def _status_row(self, spec: ModelSpec, entry: ModelEntry | None, measured_bytes: int | None) -> ModelStatus:
        model = entry.model if entry else None
        return ModelStatus(
            key=spec.key,
            title=spec.title,
            state=entry.state if entry else ModelState.NOT_LOADED,
            device=str(model.device) if model else None,
            dtype=str(model.dtype).removeprefix("torch.") if model else None,
            memory_bytes=model.memory_bytes if model else None,
            estimate_bytes=measured_bytes if measured_bytes is not None else spec.estimate_bytes(torch.finfo(self.dtype_for(spec)).bits // 8),
            load_s=model.load_s if model else None,
            is_standin=model.is_standin if model else False,
            source=model.source.label if model else None,
            error=str(entry.error) if entry and entry.error else None,
            busy=entry.busy if entry else 0,
            last_used=entry.last_used if entry else None,
            estimate_measured=measured_bytes is not None,
        )
