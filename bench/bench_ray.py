"""The ray backend (core.backends.ray_client) against the local backend: how Serve scales with replicas, and what it costs.

    python -m bench.bench_ray [--quick]          CPU: hot dog images/s with 1, 2 and 4 replicas (ratios to 1 replica)
    python -m bench.bench_ray --device cuda      one GPU: hot dog and SD 1.5 per request, local backend vs Serve

CPU: ViT-base (the hot dog model's architecture from ../shared/models, random weights; `--quick`: the tiny stand-in)
on a Ray of 4 CPUs, one CPU per replica; 16 sessions ask for one image each, again and again, so Serve batches
requests across them. GPU: both backends hold the same full-size models on the same card (the replicas half a GPU
each); requests are sent one after another, so the difference is the per-request cost of going through Serve.
One JSON line per figure (bench.common.emit): `naive` is the baseline (1 replica, or the local backend).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import ray
import torch
from ray import serve

from bench.bench_classifiers import full_size_hotdog, photos
from bench.common import COMPILE_WAIT_S, emit, environment, median_seconds, throughput
from core.accel import compiled
from core.backends import ray_client as serving
from core.backends.ray_config import KINDS, DeploymentOptions, ServingOptions
from core.config import Settings
from core.models.manager import LoadedModel, ModelManager
from core.models.registry import MODELS
from core.tasks import generation
from core.tasks.classify import classify_images
from core.tasks.jobs import Job, JobContext, JobState
from core.tasks.sd_settings import GenerationSettings

CLIENTS = 16  # sessions asking at once in the scaling figures
REPLICA_COUNTS = (1, 2, 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the tiny stand-in instead of ViT-base, shorter runs")
    args = parser.parse_args()
    # Every model here is built on this machine: nothing may wait on the Hub (the replicas inherit this).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    print(json.dumps({"environment": {**environment(device), "ray": ray.__version__}}), flush=True)
    root = Path(tempfile.mkdtemp())
    if not args.quick:
        full_size_hotdog(root / "models")
    settings = Settings(models_root=root / "models", standin_dir=root / "standins", standin_fallback=True, device=device.type, backend="ray")
    resources = {"num_cpus": 4} if device.type == "cpu" else {}  # on the GPU machine: every core and the card
    ray.init(namespace=serving.NAMESPACE, log_to_driver=False, include_dashboard=False, **resources,
             runtime_env=serving.code_runtime_env())
    try:
        if device.type == "cpu":
            bench_scaling(settings, seconds=5 if args.quick else 15)
        else:
            bench_overhead(settings, root / "models", device)
    finally:
        serve.shutdown()
        ray.shutdown()


def options(**changes: object) -> ServingOptions:
    chosen = DeploymentOptions(**changes)
    return ServingOptions({kind: chosen for kind in KINDS}, {})


def run_job(work: Callable[[JobContext], object]) -> None:
    job = Job(work, "bench")
    job.wait()
    if job.snapshot().state is not JobState.DONE:
        raise RuntimeError(f"the benchmark run ended {job.snapshot().state}: {job.snapshot().error}")


def bench_scaling(settings: Settings, seconds: float) -> None:
    """Hot dog images/s through Serve with 1, 2 and 4 one-CPU replicas, 16 sessions at once."""
    one = photos(1)
    torch.set_num_threads(1)  # the local figure with one thread, as each replica has
    local = ModelManager(replace(settings, backend="local"))
    model = local.get(MODELS["hotdog"])  # also builds the stand-in, if one is used, before any replica needs it
    classify_images(model, one)
    local_rate = throughput(lambda: classify_images(model, one), CLIENTS, seconds)
    emit("hot dog, local backend, 1 thread, 16 sessions", None, round(local_rate, 1), "images/s", True, stand_in=model.is_standin)
    baseline = None
    for count in REPLICA_COUNTS:
        manager = serving.RayManager(settings, options=options(num_cpus=1, min_replicas=count, max_replicas=count, max_ongoing_requests=32, max_batch_size=16))
        started = time.perf_counter()
        served = manager.get(MODELS["hotdog"])
        deploy_s = time.perf_counter() - started
        for _ in range(3):  # warm every replica's first forward
            classify_images(served, one)
        rate = throughput(lambda served=served: classify_images(served, one), CLIENTS, seconds)
        baseline = baseline or rate
        emit(f"hot dog through Serve, {count} replica(s) of 1 CPU, 16 sessions", round(baseline, 1), round(rate, 1), "images/s", True,
             replicas=count, vs_local=round(rate / local_rate, 2), deploy_s=round(deploy_s, 1))
    manager.unload_all()


def settled_state(run: Callable[[], object], model: LoadedModel) -> Callable[[], object]:
    """`run` after one call of it and the background compiles it asked for, wherever the model runs: the steady state
    (as bench.common.settled, and in the model's replica for the ray backend)."""
    run()
    waited = model.obj.wait_for_compiles(COMPILE_WAIT_S) if isinstance(model.obj, serving.ServedModel) else compiled.wait_until_settled(COMPILE_WAIT_S)
    if not waited:
        raise RuntimeError(f"{model.spec.title}: background compiles still running after {COMPILE_WAIT_S} s")
    run()  # the compiled shapes' graphs captured
    return run


def bench_overhead(settings: Settings, models_root: Path, device: torch.device) -> None:
    """Per request on one GPU: the local backend against the same call through Serve (replicas sharing the card)."""
    from bench.bench_generation import PROMPT, build_full_size_sd

    build_full_size_sd(models_root)
    local = ModelManager(replace(settings, backend="local"))
    manager = serving.RayManager(settings, options=options(num_cpus=1, num_gpus=0.5, max_ongoing_requests=32, max_batch_size=16))
    one = photos(1)
    # The local backend first: its compiles fill inductor's cache, which the replica (same machine, same folder) reads.
    here = local.get(MODELS["hotdog"])
    settled_state(lambda: classify_images(here, one), here)
    served = manager.get(MODELS["hotdog"])
    settled_state(lambda: classify_images(served, one), served)
    ours_ms = median_seconds(lambda: classify_images(here, one), device, warmup=5, repeats=50) * 1000
    served_ms = median_seconds(lambda: classify_images(served, one), device, warmup=5, repeats=50) * 1000
    emit("hot dog ViT-base, one image, local backend vs Serve", round(ours_ms, 2), round(served_ms, 2), "ms", False,
         overhead_ms=round(served_ms - ours_ms, 2), dtype=str(here.dtype))
    # Serve batches the sessions' requests: a first round asks for the compiles of its batch sizes.
    settled_state(lambda: throughput(lambda: classify_images(served, one), CLIENTS, 5), served)
    local_rate = throughput(lambda: classify_images(here, one), CLIENTS, 10)
    served_rate = throughput(lambda: classify_images(served, one), CLIENTS, 10)
    emit("hot dog ViT-base, 16 sessions one image each, local backend vs Serve (batched)", round(local_rate, 1), round(served_rate, 1), "images/s", True)
    local.unload("hotdog")
    manager.unload("hotdog")

    sd_settings = GenerationSettings(prompt=PROMPT, steps=50, seed=0, width=512, height=512)
    # As the page runs it: a Job with progress and previews (streamed back from the replica through Serve).
    here = local.get(MODELS["sd15"])
    ours = settled_state(lambda: run_job(lambda context: generation.generate(here, sd_settings, context)), here)
    served = manager.get(MODELS["sd15"])
    theirs = settled_state(lambda: run_job(lambda context: generation.generate(served, sd_settings, context)), served)
    ours_s = median_seconds(ours, device, warmup=1, repeats=5)
    served_s = median_seconds(theirs, device, warmup=1, repeats=5)
    emit("SD1.5 512x512 50 steps PNDM, local backend vs Serve", round(ours_s, 3), round(served_s, 3), "s/image", False,
         overhead_ms=round((served_s - ours_s) * 1000, 1), dtype=str(here.dtype))


if __name__ == "__main__":
    main()
