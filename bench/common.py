"""What every benchmark shares: timing with warm-up and medians, device facts, one JSON line per figure."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The model configs in ../shared/models; SHARED_MODELS_DIR points elsewhere (the GPU machine gets a copy in the repo).
SHARED_MODELS = Path(os.environ.get("SHARED_MODELS_DIR", PROJECT_ROOT.parent / "shared" / "models"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


COMPILE_WAIT_S = 600  # the SD UNet's cold compile took 71 s on the H100; its first shapes queue behind each other


def settled(run: Callable[[], object]) -> Callable[[], object]:
    """`run`, after one call of it and every background compile that call queued (core.accel.compiled): the steady state a
    user gets from the second minute on."""
    from core.accel import compiled

    run()
    compiled.wait_until_settled(COMPILE_WAIT_S)
    return run


def median_seconds(run: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of `run()` after `warmup` untimed calls, with the GPU drained around each timing."""
    for _ in range(warmup):
        run()
    timings = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def environment(device: torch.device) -> dict[str, str]:
    """Date, device, versions and commit: the header of every figure in docs/PERFORMANCE.md."""
    import transformers

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:  # the classifier and sentiment benchmarks run without it
        diffusers_version = "not installed"

    # BENCH_COMMIT first: the GPU machine's copy of the tree may carry a stale .git
    commit = os.environ.get("BENCH_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers_version,
        "commit": commit,
    }


def emit(figure: str, naive: float | None, ours: float, unit: str, higher_is_better: bool, **details: object) -> dict[str, object]:
    """Print one figure as a JSON line; `ratio` says how many times better our path is than the naive one."""
    ratio = None
    if naive:
        ratio = round(ours / naive if higher_is_better else naive / ours, 2)
    record = {"figure": figure, "naive": naive, "ours": ours, "unit": unit, "ratio": ratio, **details}
    print(json.dumps(record), flush=True)
    return record


def throughput(ask: Callable[[], object], clients: int, seconds: float) -> float:
    """Requests per second with `clients` threads calling `ask()` back to back for `seconds`."""
    done = [0] * clients
    deadline = time.perf_counter() + seconds

    def client(index: int) -> None:
        while time.perf_counter() < deadline:
            ask()
            done[index] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)
