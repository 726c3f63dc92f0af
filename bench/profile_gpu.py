"""Where the time goes on the GPU: the evidence behind docs/PERFORMANCE.md's notes on each target.

    python -m bench.profile_gpu

For each fixed-shape forward (ResNet50, ViT-base, the SD 1.5 UNet step, the VAE decoder, the CLIP text encoder) at
full size with random weights: wall time per call eager and replayed from a CUDA graph, and the GPU's own busy time per
call from torch.profiler (the sum of its kernels). Wall well above GPU time means launch-bound, where graphs help;
wall close to GPU time means the kernels themselves are the limit. Variants the app does not use by default
(channels-last UNet, fused QKV projections, unfolded BatchNorm) are timed beside them, so each choice has a figure.
`--pipeline` times whole images instead and reads their timelines: how much of a run the GPU is busy, and how often
the CPU waits for it. One JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from pathlib import Path
from unittest import mock

import torch
import torchvision
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.bench_classifiers import full_size_hotdog
from bench.bench_generation import PROMPT, build_full_size_sd
from bench.common import environment, median_seconds, settled
from core.accel import Acceleration, cuda_graphs
from core.config import Settings
from core.models.loading import fold_batch_norms
from core.models.manager import ModelManager
from core.models.registry import MODELS
from core.tasks import classify, generation, imagenet
from core.tasks.sd_settings import GenerationSettings

GRAPHS = Acceleration(cuda_graphs=True, compile=False)  # the graphed eager step; compiled ones are measured apart
CUDA = torch.device("cuda")


def gpu_busy_ms(run: Callable[[], object], calls: int = 5) -> float:
    """The GPU's kernel time per call of `run`, from the profiler (graph replays included)."""
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1000 / calls


def measure(name: str, run: Callable[[], object], repeats: int = 20, **details: object) -> None:
    wall_ms = median_seconds(run, CUDA, warmup=3, repeats=repeats) * 1000
    print(json.dumps({"profile": name, "wall_ms": round(wall_ms, 3), "gpu_busy_ms": round(gpu_busy_ms(run), 3), **details}), flush=True)


@torch.inference_mode()
def classifiers(root: Path) -> None:
    image = torch.randn(1, 3, 224, 224, device=CUDA, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    batch = torch.randn(256, 3, 224, 224, device=CUDA, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    for folded in (False, True):
        model = torchvision.models.resnet50().eval()
        if folded:
            fold_batch_norms(model)
        model = model.to(CUDA, torch.float16).to(memory_format=torch.channels_last)
        measure("ResNet50 1 image eager", lambda m=model: m(image), folded_batchnorm=folded)
        measure("ResNet50 1 image CUDA graph", lambda m=model: cuda_graphs.graphed_forward(m, imagenet._logits, image, GRAPHS), folded_batchnorm=folded)
        measure("ResNet50 256 images eager", lambda m=model: m(batch), repeats=10, folded_batchnorm=folded, images=256)
    full_size_hotdog(root)
    vit = ModelManager(Settings(models_root=root, standin_dir=root / "standins", compile=False)).get(MODELS["hotdog"]).obj.model
    pixels = torch.randn(1, 3, 224, 224, device=CUDA, dtype=vit.dtype)
    measure("ViT-base 1 image eager", lambda: classify._logits(vit, pixels))
    measure("ViT-base 1 image CUDA graph", lambda: cuda_graphs.graphed_forward(vit, classify._logits, pixels, GRAPHS))


@torch.inference_mode()
def stable_diffusion(root: Path) -> None:
    build_full_size_sd(root)
    manager = ModelManager(Settings(models_root=root, standin_dir=root / "standins", compile=False))
    manager.get(MODELS["sd15"])
    manager.unload("sd15")
    pipe = manager.get(MODELS["sd15"]).obj  # the second load reads from the page cache, as an app restart would
    print(json.dumps({"profile": "SD1.5 load from local safetensors to the GPU", "seconds": round(manager.status([MODELS["sd15"]])[0].load_s, 3)}), flush=True)
    unet = pipe.unet
    for images in (1, 4):
        unet_variants(unet, 2 * images)  # classifier-free guidance: two UNet rows per image
    latents = torch.randn(1, 4, 64, 64, device=CUDA, dtype=unet.dtype)
    measure("SD1.5 VAE decode 512x512", lambda: pipe.vae.decode(latents).sample, repeats=10)
    tokens = torch.randint(0, 50, (1, 77), device=CUDA)
    measure("SD1.5 CLIP text encoder, one prompt", lambda: pipe.text_encoder(tokens)[0])


def unet_variants(unet: torch.nn.Module, batch: int) -> None:
    sample = torch.randn(batch, 4, 64, 64, device=CUDA, dtype=unet.dtype)
    context = torch.randn(batch, 77, 768, device=CUDA, dtype=unet.dtype)
    timestep = torch.tensor(500, device=CUDA)

    def step() -> torch.Tensor:
        return unet(sample, timestep, context, return_dict=False)[0]

    measure("SD1.5 UNet step eager", step, batch=batch)
    with cuda_graphs.graphed_unet(unet, GRAPHS):
        measure("SD1.5 UNet step CUDA graph", step, batch=batch)
    unet.to(memory_format=torch.channels_last)
    with cuda_graphs.graphed_unet(unet, GRAPHS):
        measure("SD1.5 UNet step CUDA graph, channels-last", step, batch=batch)
    unet.to(memory_format=torch.contiguous_format)
    unet.fuse_qkv_projections()
    with cuda_graphs.graphed_unet(unet, GRAPHS):
        measure("SD1.5 UNet step CUDA graph, fused QKV", step, batch=batch)
    unet.unfuse_qkv_projections()


def top_kernels(name: str, run: Callable[[], object], count: int = 6) -> None:
    """The kernels that take the GPU's time in one call of `run`, largest first: what a faster path has to beat."""
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda event: event.self_device_time_total, reverse=True)
    total = sum(event.self_device_time_total for event in events) or 1
    top = [{"kernel": event.key[:80], "share": round(event.self_device_time_total / total, 3)} for event in events[:count]]
    print(json.dumps({"profile": name, "gpu_busy_ms": round(total / 1000, 3), "top_kernels": top}), flush=True)


@torch.inference_mode()
def compiled(root: Path, modes: list[str]) -> None:
    """torch.compile on top of the same models: compile time, then wall and GPU time as above (graph replay on top)."""
    torch.backends.cudnn.benchmark = True
    batch = torch.randn(256, 3, 224, 224, device=CUDA, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    resnet = torchvision.models.resnet50().eval().to(CUDA, torch.float16).to(memory_format=torch.channels_last)
    top_kernels("ResNet50 256 images eager", lambda: resnet(batch))
    build_full_size_sd(root / "sd")
    unet = ModelManager(Settings(models_root=root / "sd", standin_dir=root / "standins", compile=False)).get(MODELS["sd15"]).obj.unet
    unet.to(memory_format=torch.channels_last)
    sample = torch.randn(2, 4, 64, 64, device=CUDA, dtype=unet.dtype)
    context = torch.randn(2, 77, 768, device=CUDA, dtype=unet.dtype)
    timestep = torch.tensor(500, device=CUDA)
    top_kernels("SD1.5 UNet step eager, channels-last", lambda: unet(sample, timestep, context, return_dict=False)[0])
    for mode in modes:
        started = time.perf_counter()
        fast_resnet = torch.compile(resnet, mode=mode)
        fast_resnet(batch)
        print(json.dumps({"profile": "ResNet50 compile", "mode": mode, "compile_s": round(time.perf_counter() - started, 1)}), flush=True)
        measure("ResNet50 256 images compiled", lambda m=fast_resnet: m(batch), repeats=10, mode=mode, images=256)
        started = time.perf_counter()
        fast_unet = torch.compile(unet, mode=mode)
        fast_unet(sample, timestep, context, return_dict=False)
        print(json.dumps({"profile": "SD1.5 UNet compile", "mode": mode, "compile_s": round(time.perf_counter() - started, 1)}), flush=True)
        graph = cuda_graphs._Graph(lambda s, t, e, m=fast_unet: m(s, t, e, return_dict=False)[0], (sample, timestep, context))
        measure("SD1.5 UNet step compiled, CUDA graph, channels-last", lambda g=graph: g(sample, timestep, context), mode=mode, batch=2)
        torch._dynamo.reset()


@torch.inference_mode()
def vit_attention(root: Path) -> None:
    """ViT-base, one image, per attention implementation: graphed eager step and graphed compiled step."""
    full_size_hotdog(root)
    pixels = torch.randn(1, 3, 224, 224, device=CUDA, dtype=torch.float16)
    for attention in ("sdpa", "eager"):
        from transformers import ViTForImageClassification

        vit = ViTForImageClassification.from_pretrained(root / MODELS["hotdog"].repo_id, attn_implementation=attention, dtype=torch.float16).to(CUDA).eval()
        measure("ViT-base 1 image CUDA graph", lambda m=vit: cuda_graphs.graphed_forward(m, classify._logits, pixels, GRAPHS), attention=attention)
        top_kernels(f"ViT-base 1 image eager, {attention} attention", lambda m=vit: classify._logits(m, pixels), count=5)
        started = time.perf_counter()
        fast = torch.compile(classify._logits, mode="default", dynamic=False)
        fast(vit, pixels)
        graph = cuda_graphs._Graph(lambda x, m=vit, f=fast: f(m, x), (pixels,))
        measure("ViT-base 1 image compiled, CUDA graph", lambda g=graph: g(pixels), attention=attention, compile_s=round(time.perf_counter() - started, 1))


SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}


def timeline(run: Callable[[], object]) -> dict[str, object]:
    """One call of `run` from the profiler's timeline: its span, the GPU's busy time in it (kernels and copies, overlaps
    counted once), the GPU's longest idle gaps, and how often and how long the CPU waited for the GPU."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = prof.events()
    on_gpu = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    busy_us, gaps, reach = 0.0, [], None
    for start, end in on_gpu:
        if reach is not None and start > reach:
            gaps.append(start - reach)
        busy_us += max(0.0, end - max(start, reach or start))
        reach = end if reach is None else max(reach, end)
    span_us = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    syncs = [e for e in events if e.name in SYNC_CALLS]
    return {
        "span_ms": round(span_us / 1000, 1), "gpu_busy_ms": round(busy_us / 1000, 1), "gpu_idle_ms": round((span_us - busy_us) / 1000, 1),
        "cpu_waits_for_gpu": len(syncs), "cpu_wait_ms": round(sum(e.cpu_time_total for e in syncs) / 1000, 1),
        "longest_gpu_gaps_ms": [round(gap / 1000, 2) for gap in sorted(gaps, reverse=True)[:5]],
    }


def whole_runs(root: Path) -> None:
    """Whole 512x512 images on the app's path (compiled and graphed, as served from the second minute on), with the
    two ways it keeps the GPU fed switched off in turn: each variant's median wall time and one run's timeline."""
    build_full_size_sd(root)
    manager = ModelManager(Settings(models_root=root, standin_dir=root / "standins", compile_cache_dir=root / "inductor"))
    model = manager.get(MODELS["sd15"])
    variants = {
        "as the app runs it": [],
        "timesteps on the GPU (diffusers' default)": [mock.patch.object(generation, "keep_timesteps_on_the_cpu", lambda scheduler: scheduler)],
        "text encoder without a graph": [mock.patch.object(cuda_graphs, "graphed_text_encoder", lambda *args, **kwargs: nullcontext())],
    }
    for scheduler, steps in (("PNDM", 50), ("DPM++ 2M Karras", 25)):
        settings = GenerationSettings(prompt=PROMPT, width=512, height=512, steps=steps, scheduler=scheduler, seed=0)
        run = settled(lambda s=settings: generation.generate(model, s))
        for variant, patches in variants.items():
            with ExitStack() as stack:
                for patch in patches:
                    stack.enter_context(patch)
                wall_ms = median_seconds(run, CUDA, warmup=2, repeats=7) * 1000
                print(json.dumps({"profile": f"SD1.5 512x512 {steps} steps {scheduler}, one image", "variant": variant,
                                  "wall_ms": round(wall_ms, 1), **timeline(run)}), flush=True)


@torch.inference_mode()
def unet_rows(root: Path) -> None:
    """What a shared batch can gain (issue 20): the UNet step and the VAE decode per row as the batch grows, graphed
    eager and graphed compiled, as the app loads SD 1.5 (fp16, channels-last). If 16 rows cost more than 4 times 2
    rows, 8 images together cannot be done 2 times sooner than one after another, whatever the scheduling."""
    build_full_size_sd(root)
    pipe = ModelManager(Settings(models_root=root, standin_dir=root / "standins", compile=False)).get(MODELS["sd15"]).obj
    unet, vae = pipe.unet, pipe.vae
    for compile_mode in (None, "default"):
        for rows in (2, 4, 8, 16):
            if compile_mode and rows not in (2, 16):
                continue
            sample = torch.randn(rows, 4, 64, 64, device=CUDA, dtype=unet.dtype)
            inputs = (sample, torch.full((rows,), 500.0, device=CUDA), torch.randn(rows, 77, 768, device=CUDA, dtype=unet.dtype))
            started = time.perf_counter()
            step = torch.compile(cuda_graphs.unet_step, mode=compile_mode, dynamic=False) if compile_mode else cuda_graphs.unet_step
            graph = cuda_graphs._Graph(lambda *t, f=step: f(unet, *t), inputs)
            measure("SD1.5 UNet step, CUDA graph", lambda g=graph, i=inputs: g(*i), rows=rows, compile=compile_mode,
                    setup_s=round(time.perf_counter() - started, 1))
            del graph
        for images in (1, 8):
            latents = torch.randn(images, 4, 64, 64, device=CUDA, dtype=vae.dtype)
            decode = torch.compile(cuda_graphs.vae_decode_step, mode=compile_mode, dynamic=False) if compile_mode else cuda_graphs.vae_decode_step
            measure("SD1.5 VAE decode 512x512", lambda d=decode, x=latents: d(vae, x), repeats=5, images=images, compile=compile_mode)
        torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", nargs="*", metavar="MODE", help="time torch.compile in these modes instead")
    parser.add_argument("--vit", action="store_true", help="ViT-base's attention implementations only")
    parser.add_argument("--pipeline", action="store_true", help="whole SD images on the app's path only")
    parser.add_argument("--rows", action="store_true", help="the UNet step and VAE decode per row as the batch grows only")
    args = parser.parse_args()
    print(json.dumps({"environment": environment(CUDA)}), flush=True)
    root = Path(tempfile.mkdtemp())
    if args.vit:
        vit_attention(root)
        return
    if args.pipeline:
        whole_runs(root)
        return
    if args.rows:
        unet_rows(root)
        return
    if args.compile is not None:
        compiled(root, args.compile)
        return
    classifiers(root / "classifiers")
    stable_diffusion(root / "sd")


if __name__ == "__main__":
    main()
