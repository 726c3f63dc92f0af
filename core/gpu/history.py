"""Memory and utilisation over the last minutes: one background sampler per process, a bounded ring buffer.

`core.app_state.get_history` builds and starts the one sampler every session reads, when a page first asks for it,
so a process that never shows the chart never samples. The buffer holds `capacity` samples and drops the oldest.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from core.gpu.nvml import GpuMonitor, allocator_stats, host_memory

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 2.0
CAPACITY = 300  # 10 minutes at one sample every 2 s; a few hundred KiB at most


@dataclass(frozen=True)
class GpuPoint:
    gpu_index: int  # NVML's index
    used_bytes: int | None
    utilization_pct: int | None


@dataclass(frozen=True)
class Sample:
    taken_at: float  # time.time()
    gpus: tuple[GpuPoint, ...]
    torch_allocated_bytes: int  # this process, all GPUs
    host_used_bytes: int
    process_rss_bytes: int


def take_sample(monitor: GpuMonitor) -> Sample:
    """One sample of every GPU (through the monitor's cached snapshot), torch's allocator and the host."""
    host = host_memory()
    return Sample(
        taken_at=time.time(),
        gpus=tuple(GpuPoint(gpu.index, gpu.used_bytes, gpu.utilization_pct) for gpu in monitor.snapshot().gpus),
        torch_allocated_bytes=sum(stats.allocated_bytes for stats in allocator_stats()),
        host_used_bytes=host.used_bytes,
        process_rss_bytes=host.process_rss_bytes,
    )


class HistorySampler:
    """Calls `sample` every `interval_s` on one daemon thread and keeps the last `capacity` results. Thread-safe."""

    def __init__(self, sample: Callable[[], Sample], *, interval_s: float = SAMPLE_INTERVAL_S, capacity: int = CAPACITY) -> None:
        if interval_s <= 0 or capacity <= 0:
            raise ValueError(f"interval_s and capacity must be above 0, not {interval_s} and {capacity}")
        self._sample = sample
        self.interval_s = interval_s
        self._samples: deque[Sample] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def samples(self) -> tuple[Sample, ...]:
        """Every kept sample, oldest first."""
        with self._lock:
            return tuple(self._samples)

    def start(self) -> None:
        """Start the thread unless it runs already (any number of callers, one thread)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="vram-history", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    @property
    def running(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    def tick(self) -> None:
        """Take one sample now (the thread calls this; tests call it to fill the buffer deterministically)."""
        sample = self._sample()
        with self._lock:
            self._samples.append(sample)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a dead thread would freeze every session's chart without a word: log and go on
                log.exception("history sample failed")
            self._stop.wait(self.interval_s)
