"""What AUTOMATIC1111's prompt syntax and an X/Y plot cost on the app's own path (issue 19's GPU figures).

    python -m bench.bench_prompts                  # SD 1.5 architecture, random weights, on the GPU
    python -m bench.bench_prompts --device cpu --standin   # the tiny stand-in: a smoke test

A weighted prompt (`(word:1.3)`, `[word]`) and a plain prompt of the same words through `generation.generate`,
alternated, the median of each: the weighted one's overhead (target 2 % or less). Then a 4x4 X/Y plot (CFG x seed)
through `core.tasks.sweeps.run_sweep` against the same 16 images made one by one without it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from bench.bench_generation import dpm_model_and_settings
from bench.common import emit, environment, synchronize
from core.tasks import generation, sweeps
from core.tasks.sd_settings import GenerationSettings

PLAIN = "a lighthouse at dawn, oil painting, dramatic sky, seagulls over the rocks"
WEIGHTED = "a (lighthouse:1.3) at [dawn], (oil painting:0.8), ((dramatic sky)), seagulls over the rocks"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--standin", action="store_true", help="the tiny stand-in model, 64x64, 4 steps")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(json.dumps({"environment": environment(device)}), flush=True)
    model, base = dpm_model_and_settings(device, args.standin)
    base = replace(base, prompt=PLAIN, seed=1)

    def seconds(settings: GenerationSettings) -> float:
        started = time.perf_counter()
        generation.generate(model, settings)
        synchronize(device)
        return time.perf_counter() - started

    weighted = replace(base, prompt=WEIGHTED)
    for settings in (base, weighted):  # warm-up: graphs captured, chunks' encoder shapes seen
        seconds(settings)
    plain_s, weighted_s = [], []
    for _ in range(args.repeats):  # alternated, so that drift hits both alike
        plain_s.append(seconds(base))
        weighted_s.append(seconds(weighted))
    details = {"steps": base.steps, "size": f"{base.width}x{base.height}", "repeats": args.repeats, "dtype": str(model.dtype)}
    plain_median, weighted_median = statistics.median(plain_s), statistics.median(weighted_s)
    emit("weighted prompt vs plain, one image", plain_median, weighted_median, "s", False,
         overhead_percent=round(100 * (weighted_median / plain_median - 1), 2), **details)

    plan = sweeps.plan_sweep(base, sweeps.parse_axis(sweeps.AxisKind.CFG_SCALE, "4-10 [4]", name="X"),
                             sweeps.parse_axis(sweeps.AxisKind.SEED, "1-4", name="Y"))
    one_by_one = timed(lambda: [generation.generate(model, cell.settings) for cell in plan.cells], device)
    swept = timed(lambda: sweeps.run_sweep(plan, lambda s, loras: [i.image for i in generation.generate(model, s).images], model.spec.repo_id, is_standin=model.is_standin), device)
    emit("4x4 X/Y plot (CFG x seed), 16 images and the grid", one_by_one, swept, "s", False, cells=len(plan.cells), **details)


def timed(run: Callable[[], object], device: torch.device) -> float:
    started = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
