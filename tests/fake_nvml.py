"""A fake NVML with pynvml's interface, for tests without a GPU (core/gpu/nvml.py takes the NVML library as an argument)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class FakeNvmlError(Exception):
    """What every FakeNvml call raises when told to fail, as pynvml raises NVMLError."""


class _Memory(NamedTuple):
    total: int
    free: int
    used: int


class _Utilization(NamedTuple):
    gpu: int
    memory: int


class _Process(NamedTuple):
    pid: int
    usedGpuMemory: int | None  # pynvml's field name


@dataclass(frozen=True)
class FakeGpu:
    name: str = "NVIDIA Fake T4"
    total_bytes: int = 16 * 2**30
    used_bytes: int = 2 * 2**30
    utilization_pct: int = 37
    temperature_c: int = 51
    power_mw: int = 42_000
    power_limit_mw: int = 70_000
    processes: tuple[tuple[int, int | None], ...] = ()  # (pid, used bytes)


@dataclass
class FakeNvml:
    """pynvml's functions (same names) over fixed cards. `init_error` fails nvmlInit; `failing` fails every other call."""

    gpus: Sequence[FakeGpu] = ()
    init_error: str | None = None
    failing: bool = False
    calls: list[str] = field(default_factory=list)

    NVMLError = FakeNvmlError
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    nvmlMemory_v2 = 2

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.failing:
            raise FakeNvmlError(f"{name}: GPU is lost")

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error:
            raise FakeNvmlError(self.init_error)

    def nvmlSystemGetDriverVersion(self) -> str:
        self._call("nvmlSystemGetDriverVersion")
        return "580.00"

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._call("nvmlDeviceGetHandleByIndex")
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        self._call("nvmlDeviceGetName")
        return gpu.name

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        self._call("nvmlDeviceGetUUID")
        return f"GPU-fake-{list(self.gpus).index(gpu)}"

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu, version: int | None = None) -> _Memory:
        self._call("nvmlDeviceGetMemoryInfo")
        return _Memory(gpu.total_bytes, gpu.total_bytes - gpu.used_bytes, gpu.used_bytes)

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> _Utilization:
        self._call("nvmlDeviceGetUtilizationRates")
        return _Utilization(gpu.utilization_pct, gpu.utilization_pct // 2)

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        self._call("nvmlDeviceGetTemperature")
        return gpu.temperature_c

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        self._call("nvmlDeviceGetPowerUsage")
        return gpu.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, gpu: FakeGpu) -> int:
        self._call("nvmlDeviceGetEnforcedPowerLimit")
        return gpu.power_limit_mw

    def nvmlDeviceGetClockInfo(self, gpu: FakeGpu, clock: int) -> int:
        self._call("nvmlDeviceGetClockInfo")
        return 1590 if clock == self.NVML_CLOCK_SM else 5000

    def nvmlDeviceGetMaxClockInfo(self, gpu: FakeGpu, clock: int) -> int:
        self._call("nvmlDeviceGetMaxClockInfo")
        return 1590 if clock == self.NVML_CLOCK_SM else 5001

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> list[_Process]:
        self._call("nvmlDeviceGetComputeRunningProcesses")
        return [_Process(pid, used) for pid, used in gpu.processes]
