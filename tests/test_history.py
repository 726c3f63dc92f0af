"""core.gpu.history: one lazily started sampler thread, a bounded buffer, safe under concurrent readers."""
from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import pytest
from fake_nvml import FakeGpu, FakeNvml

from core.gpu.history import HistorySampler, Sample, take_sample
from core.gpu.nvml import GpuMonitor


def numbered() -> Callable[[], Sample]:
    """A sample function whose samples carry a running number (in host_used_bytes) and the sampling thread."""
    counter = itertools.count()
    threads: set[int] = set()

    def sample() -> Sample:
        threads.add(threading.get_ident())
        return Sample(0.0, (), 0, next(counter), 0)

    sample.threads = threads
    return sample


def test_nothing_runs_until_started():
    sampler = HistorySampler(numbered(), interval_s=60)
    assert not sampler.running and sampler.samples() == ()
    sampler.start()
    assert sampler.running
    sampler.stop()
    assert not sampler.running


def test_buffer_keeps_only_the_newest_samples():
    sampler = HistorySampler(numbered(), capacity=5)
    for _ in range(12):
        sampler.tick()
    assert [s.host_used_bytes for s in sampler.samples()] == [7, 8, 9, 10, 11]


def test_many_sessions_starting_it_at_once_get_one_thread():
    sample = numbered()
    enough = threading.Event()

    def counting() -> Sample:
        result = sample()
        if result.host_used_bytes >= 3:
            enough.set()
        return result

    sampler = HistorySampler(counting, interval_s=0.001, capacity=1000)
    readers = [threading.Thread(target=sampler.start) for _ in range(8)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(10)
    assert enough.wait(10)
    sampler.stop()
    assert len(sample.threads) == 1
    values = [s.host_used_bytes for s in sampler.samples()]
    assert values == list(range(len(values))) and len(values) >= 4  # in order, none lost or repeated


def test_concurrent_writers_and_readers_stay_bounded_and_consistent():
    sampler = HistorySampler(numbered(), capacity=50)
    seen_lengths: list[int] = []

    def writer():
        for _ in range(200):
            sampler.tick()

    def reader():
        for _ in range(200):
            seen_lengths.append(len(sampler.samples()))

    threads = [threading.Thread(target=f) for f in (writer, writer, reader, reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert max(seen_lengths) <= 50
    values = [s.host_used_bytes for s in sampler.samples()]
    assert len(values) == 50 and values == sorted(values) and values[-1] == 399


def test_a_failing_sample_does_not_stop_the_sampler():
    calls = itertools.count()
    recovered = threading.Event()

    def flaky() -> Sample:
        number = next(calls)
        if number == 0:
            raise RuntimeError("NVML hiccup")
        recovered.set()
        return Sample(0.0, (), 0, number, 0)

    sampler = HistorySampler(flaky, interval_s=0.001)
    sampler.start()
    assert recovered.wait(10)
    sampler.stop()
    assert sampler.samples()[0].host_used_bytes == 1


def test_a_sample_covers_every_gpu_and_the_host():
    monitor = GpuMonitor(FakeNvml([FakeGpu(used_bytes=1), FakeGpu(used_bytes=2, utilization_pct=90)]))
    sample = take_sample(monitor)
    assert [(p.gpu_index, p.used_bytes, p.utilization_pct) for p in sample.gpus] == [(0, 1, 37), (1, 2, 90)]
    assert sample.host_used_bytes > 0 and sample.process_rss_bytes > 0 and sample.torch_allocated_bytes >= 0


@pytest.mark.parametrize(("interval_s", "capacity"), [(0, 10), (1.0, 0)])
def test_bad_arguments_are_refused(interval_s, capacity):
    with pytest.raises(ValueError, match="must be above 0"):
        HistorySampler(numbered(), interval_s=interval_s, capacity=capacity)
