"""Sessions that ask together share forwards (core.tasks.cross_session) against each request its own forward, one run.

    python -m bench.bench_cross_session            # GPU: full-size hot dog ViT-base and DistilBERT, random weights
    python -m bench.bench_cross_session --quick    # the tiny stand-ins on the CPU: a smoke test in under a minute

Both paths go through the local backend on the same loaded model: `naive` with the model's
`Acceleration.batch_sessions` off (today's path: 16 sessions make 16 forwards of one row), `ours` with it on.
Figures, one JSON line each (bench.common.emit), for the hot dog model (one image per session) and for sentiment (one
short text per session): 16 sessions asking back to back (images/s or texts/s, the median of `--rounds`), a lone
request's p50 and p95 latency, the p95 latency of 16 requests released together, and the largest probability
difference between a request batched with the others and the same request alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.bench_classifiers import full_size_hotdog, photos
from bench.bench_sentiment import build_full_size, sentences
from bench.common import COMPILE_WAIT_S, emit, environment, synchronize, throughput
from core.accel import compiled
from core.backends.local import LocalBackend
from core.config import Settings
from core.models.manager import LoadedModel
from core.models.registry import MODELS
from core.tasks import cross_session

SESSIONS = 16  # as docs/PERFORMANCE.md's Ray table: 16 sessions, one image each


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the tiny stand-ins and short rounds (a CPU smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="throughput rounds per path (default 3, quick 2)")
    parser.add_argument("--lone-runs", type=int, default=None, help="lone requests timed per path (default 100, quick 20)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built on this machine
    device = torch.device(args.device)
    rounds = args.rounds or (2 if args.quick else 3)
    lone_runs = args.lone_runs or (20 if args.quick else 100)
    seconds = 1.0 if args.quick else 5.0
    if args.quick:
        # On a small shared machine a second OpenMP thread stalls each tiny forward: the stand-in DistilBERT's took
        # 170 ms with two threads and 1.5 ms with one here (2 cores, other work on them). One thread, as bench_ray.
        torch.set_num_threads(1)
    print(json.dumps({"environment": environment(device)}), flush=True)
    root = Path(tempfile.mkdtemp())
    if not args.quick:
        full_size_hotdog(root / "models")
        build_full_size(root / "models" / MODELS["sentiment"].repo_id)
    settings = Settings(models_root=None if args.quick else root / "models", standin_dir=root / "standins", standin_fallback=True,
                        device=device.type)
    backend = LocalBackend(settings)
    figures = Figures(device, rounds, lone_runs, seconds)

    hotdog = backend.get(MODELS["hotdog"])
    images = photos(SESSIONS)
    figures.compare(
        "hot dog", hotdog, "images/s", images,
        lambda model, image: backend.classify_images(model, [image]),
        lambda run: np.array([[score.score for score in sorted(result.scores, key=lambda s: s.label)] for result in run.results]),
    )
    backend.unload("hotdog")

    text_model = backend.get(MODELS["sentiment"])
    figures.compare(
        "sentiment", text_model, "texts/s", sentences(SESSIONS),
        lambda model, text: backend.score_texts(model, [text]), lambda scores: scores.probabilities,
    )


class Figures:
    def __init__(self, device: torch.device, rounds: int, lone_runs: int, seconds: float) -> None:
        self.device, self.rounds, self.lone_runs, self.seconds = device, rounds, lone_runs, seconds

    def compare(
        self, name: str, model: LoadedModel, unit: str, inputs: Sequence[object],
        ask: Callable[[LoadedModel, object], object], probabilities: Callable[[object], np.ndarray],
    ) -> None:
        paths = {
            "naive": replace(model, accel=replace(model.accel, batch_sessions=False)),
            "ours": replace(model, accel=replace(model.accel, batch_sessions=True)),
        }
        details = {"model": model.spec.title, "stand_in": model.is_standin, "dtype": str(model.dtype).removeprefix("torch."),
                   "sessions": SESSIONS, "window_ms": model.accel.batch_window_ms}
        # Warm-up: each path's shapes (and on the GPU the batch sizes' background compiles and graphs) before timing.
        for path in paths.values():
            throughput(lambda path=path: ask(path, inputs[0]), SESSIONS, self.seconds)
        if not compiled.wait_until_settled(COMPILE_WAIT_S):
            raise RuntimeError(f"{name}: background compiles still running after {COMPILE_WAIT_S} s")
        rates: dict[str, list[float]] = {label: [] for label in paths}
        for _ in range(self.rounds):  # interleaved, so that a busy neighbour on the machine hits both paths alike
            for label, path in paths.items():
                rates[label].append(throughput(lambda path=path: ask(path, inputs[0]), SESSIONS, self.seconds))
        naive_rate, ours_rate = (statistics.median(rates[label]) for label in paths)
        emit(f"{name}, {SESSIONS} sessions one input each, back to back", round(naive_rate, 1), round(ours_rate, 1), unit, True,
             rounds={label: [round(rate, 1) for rate in values] for label, values in rates.items()}, **details)

        lone = {label: self.lone_latencies_ms(lambda path=path: ask(path, inputs[0])) for label, path in paths.items()}
        for quantile in (50, 95):
            emit(f"{name}, a lone request, p{quantile} latency", percentile(lone["naive"], quantile), percentile(lone["ours"], quantile),
                 "ms", False, runs=self.lone_runs, **details)

        alone = [probabilities(ask(paths["naive"], item)) for item in inputs]
        batcher = cross_session.batcher_for(model.obj.model, lambda: missing_batcher(name))  # both are pipelines
        before = batcher.counts()
        together = {label: self.released_together(lambda item, path=path: ask(path, item), inputs) for label, path in paths.items()}
        after = batcher.counts()
        emit(f"{name}, {SESSIONS} requests released together, requests per forward", 1.0,
             round((after.requests - before.requests) / (after.forwards - before.forwards), 1), "requests", True, **details)
        emit(f"{name}, {SESSIONS} requests released together, p95 latency", percentile(together["naive"][1], 95),
             percentile(together["ours"][1], 95), "ms", False, **details)
        difference = max(float(np.abs(probabilities(result) - solo).max()) for result, solo in zip(together["ours"][0], alone, strict=True))
        emit(f"{name}, largest probability difference, batched vs alone", None, difference, "probability", False, **details)

    def lone_latencies_ms(self, run: Callable[[], object]) -> list[float]:
        for _ in range(3):
            run()
        latencies = []
        for _ in range(self.lone_runs):
            synchronize(self.device)
            started = time.perf_counter()
            run()
            synchronize(self.device)
            latencies.append((time.perf_counter() - started) * 1000)
        return latencies

    def released_together(self, run: Callable[[object], object], inputs: Sequence[object]) -> tuple[list[object], list[float]]:
        """Every input in its own thread, released at once by a barrier: results in order, latencies in ms."""
        barrier = threading.Barrier(len(inputs))
        results: list[object] = [None] * len(inputs)
        latencies = [0.0] * len(inputs)

        def session(index: int) -> None:
            barrier.wait()
            started = time.perf_counter()
            results[index] = run(inputs[index])
            latencies[index] = (time.perf_counter() - started) * 1000

        threads = [threading.Thread(target=session, args=(i,)) for i in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results, latencies


def missing_batcher(name: str) -> cross_session.SessionBatcher:
    raise RuntimeError(f"{name}: the batched path made no batcher (is the model a transformers pipeline?)")


def percentile(values: list[float], quantile: int) -> float:
    return round(float(np.percentile(values, quantile)), 3)


if __name__ == "__main__":
    main()
