"""core.gpu.nvml: the NVML layer against a fake NVML (zero, one, two GPUs; missing; raising), and on the device against nvidia-smi."""
from __future__ import annotations

import mmap
import os
import shutil
import subprocess

import pytest
import torch
from fake_nvml import FakeGpu, FakeNvml

from core.gpu import nvml as gpu
from core.gpu.nvml import GpuMonitor

MIB = 2**20
GIB = 2**30


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_zero_gpus_is_an_empty_report_without_a_reason():
    report = GpuMonitor(FakeNvml()).snapshot()
    assert report.gpus == () and report.unavailable_reason is None and report.driver_version == "580.00"


def test_one_gpu_in_bytes_watts_and_percent_with_this_process_marked():
    card = FakeGpu(used_bytes=3 * GIB, processes=((os.getpid(), 900 * MIB), (1, None)))
    (snapshot,) = GpuMonitor(FakeNvml([card])).snapshot().gpus
    assert (snapshot.index, snapshot.name, snapshot.uuid) == (0, "NVIDIA Fake T4", "GPU-fake-0")
    assert (snapshot.total_bytes, snapshot.used_bytes, snapshot.free_bytes) == (16 * GIB, 3 * GIB, 13 * GIB)
    assert (snapshot.utilization_pct, snapshot.temperature_c, snapshot.power_w, snapshot.power_limit_w) == (37, 51, 42.0, 70.0)
    assert (snapshot.sm_clock_mhz, snapshot.sm_clock_max_mhz, snapshot.memory_clock_mhz) == (1590, 1590, 5000)
    assert [(p.pid, p.is_this_process, p.used_bytes) for p in snapshot.processes] == [(1, False, None), (os.getpid(), True, 900 * MIB)]
    assert snapshot.this_process_bytes == 900 * MIB


def test_two_gpus_are_both_reported_in_order():
    report = GpuMonitor(FakeNvml([FakeGpu(name="A"), FakeGpu(name="B", total_bytes=80 * GIB)])).snapshot()
    assert [(g.index, g.name, g.total_bytes) for g in report.gpus] == [(0, "A", 16 * GIB), (1, "B", 80 * GIB)]


def test_nvml_not_installed_is_reported_not_raised():
    report = GpuMonitor(None).snapshot()
    assert report.gpus == () and "nvidia-ml-py is not installed" in report.unavailable_reason


def test_nvml_init_failure_is_reported_with_its_cause():
    report = GpuMonitor(FakeNvml([FakeGpu()], init_error="Driver Not Loaded")).snapshot()
    assert report.gpus == () and "Driver Not Loaded" in report.unavailable_reason


def test_nvml_raising_on_every_query_gives_no_gpus_and_a_reason():
    report = GpuMonitor(FakeNvml([FakeGpu()], failing=True)).snapshot()
    assert report.gpus == () and "how many GPUs" in report.unavailable_reason


def test_a_gpu_that_starts_raising_reports_not_available_values():
    nvml = FakeNvml([FakeGpu()])
    monitor = GpuMonitor(nvml, ttl_s=0)
    assert monitor.snapshot().gpus[0].used_bytes == 2 * GIB
    nvml.failing = True  # the card fell off the bus after the handles were fetched
    (lost,) = monitor.snapshot().gpus
    assert lost.name == "GPU 0" and lost.used_bytes is None and lost.power_w is None and lost.processes == ()


def test_handles_are_fetched_once_and_snapshots_cached_for_the_ttl():
    nvml, clock = FakeNvml([FakeGpu(), FakeGpu()]), Clock()
    monitor = GpuMonitor(nvml, ttl_s=1.0, clock=clock)
    first = monitor.snapshot()
    clock.now_s += 0.5
    assert monitor.snapshot() is first
    memory_calls = nvml.calls.count("nvmlDeviceGetMemoryInfo")
    clock.now_s += 1.0
    assert monitor.snapshot() is not first
    assert nvml.calls.count("nvmlDeviceGetMemoryInfo") == 2 * memory_calls  # read again, once per card
    assert nvml.calls.count("nvmlInit") == 1 and nvml.calls.count("nvmlDeviceGetHandleByIndex") == 2


def test_this_machine_without_nvml_library_does_not_raise():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    report = GpuMonitor(gpu.load_nvml()).snapshot()
    assert report.gpus == () and report.unavailable_reason


def test_allocator_is_empty_and_actions_free_nothing_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert gpu.allocator_stats() == () and gpu.empty_cache() == 0 and gpu.reset_peak_stats() == 0


def test_host_memory_sees_this_process_grow():
    before = gpu.host_memory()
    # A fresh mapping, each page written: resident for sure (a bytes object could reuse memory that earlier tests freed
    # and the allocator kept, and the process would not grow).
    block = mmap.mmap(-1, 64 * MIB)
    for offset in range(0, 64 * MIB, mmap.PAGESIZE):
        block[offset] = 1
    after = gpu.host_memory()
    assert before.total_bytes > before.available_bytes > 0 and before.used_bytes > 0
    assert after.process_rss_bytes - before.process_rss_bytes >= 60 * MIB
    block.close()


# --- on the device ------------------------------------------------------------------------------------------------

# nvidia-smi and NVML read the same counters a few milliseconds apart; an idle card moves by far less than this.
SMI_MARGIN_BYTES = 64 * MIB


def _nvidia_smi() -> list[dict[str, str]]:
    fields = ["index", "name", "uuid", "memory.total", "memory.used"]
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
        check=True, capture_output=True, text=True,
    ).stdout
    return [dict(zip(fields, (part.strip() for part in line.split(",")), strict=True)) for line in out.strip().splitlines()]


@pytest.mark.gpu
def test_numbers_agree_with_nvidia_smi():
    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi is not on PATH")
    torch.ones(1, device="cuda")  # this process on the card, as when a model is loaded
    torch.cuda.synchronize()
    report = GpuMonitor(gpu.load_nvml()).snapshot()
    smi = _nvidia_smi()
    assert report.unavailable_reason is None and len(report.gpus) == len(smi)
    for card, row in zip(report.gpus, smi, strict=True):
        print(f"GPU {card.index}: NVML used {card.used_bytes / MIB:.0f} MiB, nvidia-smi {row['memory.used']} MiB; "
              f"total {card.total_bytes / MIB:.0f} vs {row['memory.total']} MiB; {card.power_w} W, {card.temperature_c} °C")
        assert card.name == row["name"] and card.uuid == row["uuid"]
        assert abs(card.total_bytes - int(row["memory.total"]) * MIB) < MIB  # nvidia-smi rounds down to MiB
        assert abs(card.used_bytes - int(row["memory.used"]) * MIB) <= SMI_MARGIN_BYTES
        assert card.utilization_pct is not None and 0 <= card.utilization_pct <= 100
        assert card.power_w is not None and card.power_limit_w is not None and 0 < card.power_w <= card.power_limit_w * 1.2


@pytest.mark.gpu
def test_allocator_and_nvml_see_a_256_mib_tensor():
    torch.ones(1, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # earlier tests' cached blocks would take the tensor without NVML seeing any change
    monitor = GpuMonitor(gpu.load_nvml(), ttl_s=0)
    (stats_before, *_) = gpu.allocator_stats()
    card_before = next(c for c in monitor.snapshot().gpus if c.uuid == stats_before.uuid)
    block = torch.empty(256 * MIB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    (stats_after, *_) = gpu.allocator_stats()
    card_after = next(c for c in monitor.snapshot().gpus if c.uuid == stats_after.uuid)
    assert stats_after.allocated_bytes - stats_before.allocated_bytes == 256 * MIB
    assert stats_after.reserved_bytes >= stats_after.allocated_bytes and stats_after.peak_allocated_bytes >= stats_after.allocated_bytes
    assert card_after.used_bytes - card_before.used_bytes >= 256 * MIB - SMI_MARGIN_BYTES
    del block
    assert gpu.empty_cache() >= 256 * MIB
