"""What the GPUs and this process hold: NVML per card, torch's caching allocator, system RAM.

Every NVML call goes through `GpuMonitor._query`, which answers None ("not available") instead of raising, so a
card that does not report its power, a lost GPU or a machine without NVML never breaks a page. Handles are fetched
once; a snapshot is cached for about a second, so many sessions and the history sampler share one set of calls.
Values are bytes, percent, degrees, watts and MHz in typed dataclasses; `core.formatting` makes them human.

The NVML library is passed in: `pynvml` (nvidia-ml-py) in the app, `tests/fake_nvml.FakeNvml` (same functions) in tests.
Nothing here creates a CUDA context: torch figures are read only once this process has initialised CUDA.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import psutil
import torch

SNAPSHOT_TTL_S = 1.0  # NVML calls cost ~1 ms each per card; a second is fresh enough for a person watching


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str  # "?" when the process is not visible from here (another container)
    used_bytes: int | None
    is_this_process: bool


@dataclass(frozen=True)
class GpuSnapshot:
    """One card as NVML reports it; None wherever the card or driver does not say."""

    index: int  # NVML's index (CUDA_VISIBLE_DEVICES does not renumber it)
    name: str
    uuid: str | None
    total_bytes: int | None
    used_bytes: int | None
    free_bytes: int | None
    utilization_pct: int | None
    memory_utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None
    sm_clock_mhz: int | None
    sm_clock_max_mhz: int | None
    memory_clock_mhz: int | None
    processes: tuple[GpuProcess, ...]

    @property
    def this_process_bytes(self) -> int | None:
        """What NVML counts for this process on the card (context included); None if NVML does not list it."""
        mine = [p.used_bytes for p in self.processes if p.is_this_process and p.used_bytes is not None]
        return sum(mine) if mine else None


@dataclass(frozen=True)
class GpuReport:
    """Every GPU NVML sees, or why there are none."""

    gpus: tuple[GpuSnapshot, ...]
    driver_version: str | None
    unavailable_reason: str | None  # set when NVML could not be used at all
    taken_at: float  # time.time()


def load_nvml() -> ModuleType | None:
    """pynvml (from nvidia-ml-py), or None when the package is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


class GpuMonitor:
    """Reads NVML through one helper; thread-safe; one per process (see `core.app_state.get_gpu_monitor`)."""

    def __init__(self, nvml: Any | None, *, ttl_s: float = SNAPSHOT_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._nvml = nvml
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._handles: tuple[Any, ...] | None = None  # fetched once, on the first snapshot
        self._driver_version: str | None = None
        self._unavailable_reason: str | None = None
        self._cached: tuple[float, GpuReport] | None = None

    def snapshot(self) -> GpuReport:
        """Every GPU's figures, at most `ttl_s` old. Never raises."""
        with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached[0] < self._ttl_s:
                return self._cached[1]
            self._ensure_handles()
            report = GpuReport(
                gpus=tuple(self._read_gpu(index, handle) for index, handle in enumerate(self._handles or ())),
                driver_version=self._driver_version,
                unavailable_reason=self._unavailable_reason,
                taken_at=time.time(),
            )
            self._cached = (now, report)
            return report

    def _ensure_handles(self) -> None:
        if self._handles is not None:
            return
        self._handles = ()
        if self._nvml is None:
            self._unavailable_reason = "nvidia-ml-py is not installed"
            return
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as error:  # no driver, no library, no permission: the machine has no usable GPU
            self._unavailable_reason = f"NVML could not start: {error}"
            return
        self._driver_version = _text(self._query("nvmlSystemGetDriverVersion"))
        count = self._query("nvmlDeviceGetCount")
        if count is None:
            self._unavailable_reason = "NVML started but did not report how many GPUs there are"
            return
        self._handles = tuple(self._query("nvmlDeviceGetHandleByIndex", index) for index in range(count))

    def _query(self, function: str, *args: Any, **kwargs: Any) -> Any | None:
        """nvml.<function>(*args), or None when it fails or this version of the bindings lacks it."""
        call = getattr(self._nvml, function, None)
        if call is None:
            return None
        try:
            return call(*args, **kwargs)
        except self._nvml.NVMLError:
            return None

    def _read_gpu(self, index: int, handle: Any) -> GpuSnapshot:
        nvml = self._nvml
        if handle is None:  # the handle itself could not be had: report the card, with nothing known
            return GpuSnapshot(
                index, f"GPU {index} (not readable)", uuid=None, total_bytes=None, used_bytes=None, free_bytes=None,
                utilization_pct=None, memory_utilization_pct=None, temperature_c=None, power_w=None, power_limit_w=None,
                sm_clock_mhz=None, sm_clock_max_mhz=None, memory_clock_mhz=None, processes=(),
            )
        # Memory v2 leaves the driver's reserved memory out of "used", as nvidia-smi does; old drivers know only v1.
        memory = self._query("nvmlDeviceGetMemoryInfo", handle, version=getattr(nvml, "nvmlMemory_v2", None))
        if memory is None:
            memory = self._query("nvmlDeviceGetMemoryInfo", handle)
        utilization = self._query("nvmlDeviceGetUtilizationRates", handle)
        return GpuSnapshot(
            index=index,
            name=_text(self._query("nvmlDeviceGetName", handle)) or f"GPU {index}",
            uuid=_text(self._query("nvmlDeviceGetUUID", handle)),
            total_bytes=memory.total if memory else None,
            used_bytes=memory.used if memory else None,
            free_bytes=memory.free if memory else None,
            utilization_pct=utilization.gpu if utilization else None,
            memory_utilization_pct=utilization.memory if utilization else None,
            temperature_c=self._query("nvmlDeviceGetTemperature", handle, nvml.NVML_TEMPERATURE_GPU),
            power_w=_milli(self._query("nvmlDeviceGetPowerUsage", handle)),
            power_limit_w=_milli(self._query("nvmlDeviceGetEnforcedPowerLimit", handle)),
            sm_clock_mhz=self._query("nvmlDeviceGetClockInfo", handle, nvml.NVML_CLOCK_SM),
            sm_clock_max_mhz=self._query("nvmlDeviceGetMaxClockInfo", handle, nvml.NVML_CLOCK_SM),
            memory_clock_mhz=self._query("nvmlDeviceGetClockInfo", handle, nvml.NVML_CLOCK_MEM),
            processes=self._read_processes(handle),
        )

    def _read_processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        by_pid: dict[int, Any] = {}
        for function in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            for process in self._query(function, handle) or ():
                by_pid.setdefault(process.pid, process)  # a process using both APIs is listed twice
        me = os.getpid()
        return tuple(
            GpuProcess(pid, _process_name(pid), process.usedGpuMemory, pid == me) for pid, process in sorted(by_pid.items())
        )


def _text(value: Any) -> str | None:
    # Old nvidia-ml-py returns bytes, new returns str.
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _milli(value: int | None) -> float | None:
    return value / 1000 if value is not None else None


def _process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):  # host pids are invisible in a container
        return "?"


# --- torch's caching allocator, in this process ---------------------------------------------------------------


@dataclass(frozen=True)
class AllocatorStats:
    """torch's view of one CUDA device in this process."""

    device_index: int  # CUDA's index (after CUDA_VISIBLE_DEVICES)
    uuid: str | None  # "GPU-…", to match NVML's card
    allocated_bytes: int  # live tensors
    reserved_bytes: int  # the caching allocator's pool: live tensors plus cached free blocks
    peak_allocated_bytes: int
    peak_reserved_bytes: int

    @property
    def cached_free_bytes(self) -> int:
        """Reserved but holding no tensor: `empty_cache` gives this back to the driver."""
        return self.reserved_bytes - self.allocated_bytes


def allocator_stats() -> tuple[AllocatorStats, ...]:
    """One entry per CUDA device once this process has initialised CUDA; () before that and without CUDA.

    Asking earlier would create a CUDA context (hundreds of MiB per card) just to report zeros.
    """
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return ()
    stats = []
    for index in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        stats.append(AllocatorStats(
            device_index=index,
            uuid=f"GPU-{uuid}" if uuid is not None else None,
            allocated_bytes=torch.cuda.memory_allocated(index),
            reserved_bytes=torch.cuda.memory_reserved(index),
            peak_allocated_bytes=torch.cuda.max_memory_allocated(index),
            peak_reserved_bytes=torch.cuda.max_memory_reserved(index),
        ))
    return tuple(stats)


def empty_cache() -> int:
    """Give torch's cached free blocks back to the driver; returns the bytes of reserved memory released."""
    before = sum(s.reserved_bytes for s in allocator_stats())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return before - sum(s.reserved_bytes for s in allocator_stats())


def reset_peak_stats() -> int:
    """Start peak tracking again from now; returns the peak allocated bytes (all devices) it replaced."""
    stats = allocator_stats()
    for item in stats:
        torch.cuda.reset_peak_memory_stats(item.device_index)
    return sum(s.peak_allocated_bytes for s in stats)


# --- the host ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostMemory:
    total_bytes: int
    available_bytes: int  # what new allocations can get without swapping (psutil's "available")
    process_rss_bytes: int  # this process's resident memory: models on the CPU live here

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.available_bytes


def host_memory() -> HostMemory:
    memory = psutil.virtual_memory()
    return HostMemory(memory.total, memory.available, psutil.Process().memory_info().rss)
