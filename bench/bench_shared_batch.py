"""Many users, one GPU: 8 sessions asking for an image at once, one run after another (today) vs one shared batch.

    python -m bench.bench_shared_batch                       # SD 1.5 architecture, random weights, on the GPU
    python -m bench.bench_shared_batch --device cpu --standin # the tiny stand-in: a smoke test in under a minute

Full size: SD 1.5's UNet, VAE and CLIP text encoder from ../shared/models/stable-diffusion-v1-5 with random weights,
as bench.bench_generation builds them. Each session asks one 512x512 image of 25 DPM++ 2M Karras steps with its own
prompt and seed; all start together (a barrier), through generation.generate (the GPU queue serves them one at a
time) or, with the model's Acceleration.shared_batches on, through core.tasks.shared_batch (one UNet call per step for all). Figures, one JSON line each: the wall time of
all 8, their p95 latency, a lone request's p95 latency both ways, and the largest pixel difference between the two
paths' images.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from bench.bench_generation import dpm_model_and_settings
from bench.common import emit, environment, synchronize
from core.accel import compiled
from core.tasks import generation
from core.tasks.sd_settings import GenerationResult, GenerationSettings

PROMPTS = ("a lighthouse at dusk", "a bowl of ramen", "a red fox in snow", "a city at night", "an old sailing ship",
           "a mountain lake", "a robot reading a book", "a field of sunflowers")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--standin", action="store_true", help="the tiny stand-in model, 64x64, 4 steps")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--lone-runs", type=int, default=10, help="lone requests timed per path, for the p95")
    parser.add_argument("--profile", action="store_true", help="also the timelines of a lone run and of all sessions, both paths")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="CUDA graphs of the eager steps only (the app compiles in the background by default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(json.dumps({"environment": environment(device)}), flush=True)
    model, base = dpm_model_and_settings(device, args.standin, args.compile)
    runs = [replace(base, prompt=PROMPTS[i % len(PROMPTS)], seed=i) for i in range(args.sessions)]
    alone = dataclasses.replace(model, accel=dataclasses.replace(model.accel, shared_batches=False))  # today's path
    together = dataclasses.replace(model, accel=dataclasses.replace(model.accel, shared_batches=True))
    paths = {"one at a time": lambda s: generation.generate(alone, s), "shared batch": lambda s: generation.generate(together, s)}

    for run in paths.values():  # warm-up: CUDA graphs of the solo shape and of the shared batch's buckets
        at_once(run, runs)
    if args.compile:  # the settled state the app reaches: every shape seen compiled in the background, then graphed
        started = time.perf_counter()
        assert compiled.wait_until_settled(1200), "background compiles still running after 20 minutes"
        print(json.dumps({"background_compiles_s": round(time.perf_counter() - started, 1),
                          "compiled": [f"{r.model} {r.shape}: {r.state}" for r in compiled.records()]}), flush=True)
        for run in paths.values():
            at_once(run, runs)
            timed(run, runs[0])
    results = {name: at_once(run, runs) for name, run in paths.items()}
    (solo_s, solo_latencies, solo_images), (shared_s, shared_latencies, shared_images) = results.values()
    details = {"sessions": args.sessions, "steps": base.steps, "size": f"{base.width}x{base.height}", "dtype": str(model.dtype),
               "unet_path": shared_images[0].unet_path, "compile": args.compile}
    emit(f"{args.sessions} simultaneous images, all done", solo_s, shared_s, "s", False, **details)
    emit(f"{args.sessions} simultaneous images, p95 latency", p95(solo_latencies), p95(shared_latencies), "s", False, **details)
    emit("largest pixel difference, shared vs one at a time", None, largest_difference(solo_images, shared_images), "levels of 255", False)
    lone: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.lone_runs):  # alternated, so that drift hits both alike
        for name, run in paths.items():
            lone[name].append(timed(run, runs[0])[0])
    emit("a lone request, p95 latency", p95(lone["one at a time"]), p95(lone["shared batch"]), "s", False, runs=args.lone_runs, **details)
    emit("a lone request, median latency", statistics.median(lone["one at a time"]), statistics.median(lone["shared batch"]), "s", False,
         runs=args.lone_runs, **details)
    if args.profile:
        profile_paths(paths, runs)
    synchronize(device)


def profile_paths(paths: dict[str, Callable[[GenerationSettings], GenerationResult]], runs: list[GenerationSettings]) -> None:
    """Where the time goes on each path: the GPU's busy share, the CPU's waits for it, and the costliest CPU calls."""
    from torch.profiler import ProfilerActivity, profile

    from bench.profile_gpu import timeline

    for name, run in paths.items():
        print(json.dumps({"profile": name, "lone": timeline(lambda run=run: run(runs[0]))}), flush=True)
        print(json.dumps({"profile": name, "all sessions": timeline(lambda run=run: at_once(run, runs))}), flush=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            at_once(run, runs)
        top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        print(json.dumps({"profile": name, "top_cpu_self_ms": {e.key: round(e.self_cpu_time_total / 1000, 1) for e in top}}), flush=True)


def timed(run: Callable[[GenerationSettings], GenerationResult], settings: GenerationSettings) -> tuple[float, GenerationResult]:
    started = time.perf_counter()
    result = run(settings)
    return time.perf_counter() - started, result


def at_once(run: Callable[[GenerationSettings], GenerationResult], runs: list[GenerationSettings]) -> tuple[float, list[float], list[GenerationResult]]:
    """Every run in its own thread, released together: the wall time of all, each one's latency, each one's result."""
    start = threading.Barrier(len(runs) + 1)
    outcomes: list[tuple[float, GenerationResult] | None] = [None] * len(runs)

    def session(index: int) -> None:
        start.wait()
        outcomes[index] = timed(run, runs[index])

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(runs))]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - started
    assert all(outcomes), "a session failed: see its traceback above"
    return wall_s, [latency for latency, _ in outcomes], [result for _, result in outcomes]


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def largest_difference(first: list[GenerationResult], second: list[GenerationResult]) -> int:
    return max(
        int(np.abs(np.asarray(a.image).astype(np.int16) - np.asarray(b.image).astype(np.int16)).max())
        for one, other in zip(first, second, strict=True) for a, b in zip(one.images, other.images, strict=True)
    )


if __name__ == "__main__":
    main()
