"""Stable Diffusion 1.5 text-to-image: the naive tutorial way against the app's core path, in one process.

    python -m bench.bench_generation [--quick]

Full size: SD 1.5's UNet, VAE and CLIP text encoder from ../shared/models/stable-diffusion-v1-5 with random weights,
saved in Hub layout and loaded through the core's loader as the real repo would be (speed and memory do not depend on
weight values; there is no safety checker, which the real repo has). `--quick` runs the tiny stand-in on the CPU.
One JSON line per figure: s/image for 512x512, 50 PNDM steps, and peak allocated memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import COMPILE_WAIT_S, SHARED_MODELS, emit, environment, median_seconds, settled, synchronize
from core.accel import EAGER, Acceleration, compiled
from core.config import Settings
from core.models.manager import LoadedModel, ModelManager, release_memory
from core.models.registry import MODELS
from core.tasks import generation
from core.tasks.sd_settings import GenerationSettings, MemoryMode, Precision

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def build_full_size_sd(models_root: Path) -> Path:
    """SD 1.5's architecture with random fp16 weights, in Hub layout under `models_root`/<repo id>; built on the GPU when there is one."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from core.models.standins import clip_tokenizer_files  # the stand-in's generated CLIP vocabulary (the real one is not here)

    source = SHARED_MODELS / "stable-diffusion-v1-5"
    folder = models_root / MODELS["sd15"].repo_id
    folder.mkdir(parents=True, exist_ok=True)
    clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of 1B parameters is slow on a CPU
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(source / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(source / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(source / "text_encoder"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_pretrained(source / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(dtype=torch.float16).save_pretrained(folder)  # fp16 on disk: half the bytes to write; loaded in either dtype
    for leftover in ("vocab.json", "merges.txt"):
        (folder / leftover).unlink()
    return folder


def dpm_model_and_settings(device: torch.device, standin: bool, compile_: bool = False) -> tuple[LoadedModel, GenerationSettings]:
    """The SD1.5 model (full size, random weights; or the tiny stand-in) in a fresh folder, compile off unless asked,
    and the 25-step DPM++ 2M Karras 512² settings the per-request targets name (the stand-in: 64², 4 steps)."""
    root = Path(tempfile.mkdtemp())
    settings = Settings(models_root=root / "models", standin_dir=root / "standins", standin_fallback=standin, device=device.type,
                        compile=compile_, compile_cache_dir=root / "inductor")
    if not standin:
        build_full_size_sd(root / "models")
    model = ModelManager(settings).get(MODELS["sd15"], allow_standin=standin)
    base = GenerationSettings(steps=25, scheduler="DPM++ 2M Karras", width=512, height=512)
    return model, replace(base, steps=4, width=64, height=64) if standin else base


def build_full_size_ddpm(models_root: Path) -> Path:
    """The DDPM butterflies model's architecture with random weights, in Hub layout under `models_root`/<repo id>."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    source = SHARED_MODELS / "ddpm-butterflies-32px"
    folder = models_root / MODELS["ddpm-butterflies"].repo_id
    torch.manual_seed(0)
    unet = UNet2DModel.from_config(UNet2DModel.load_config(source / "unet"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_pretrained(source / "scheduler")).save_pretrained(folder)
    return folder


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the tiny stand-in on the CPU, 64x64, a few steps")
    parser.add_argument("--first-image-only", action="store_true", help="load, first image and its background compile only (run it again for a warm cache)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    print(json.dumps({"environment": environment(device)}), flush=True)
    root = Path(tempfile.mkdtemp())
    settings = Settings(models_root=root / "models", standin_dir=root / "standins", standin_fallback=args.quick, device=device.type)
    if not args.quick:
        build_full_size_sd(root / "models")
    manager = ModelManager(settings)
    base = GenerationSettings(prompt=PROMPT, steps=50, seed=0, width=512, height=512)
    if args.quick:
        base = replace(base, steps=4, width=64, height=64)
    model = bench_first_image(manager, base, device)
    if args.first_image_only:
        return
    repeats = 2 if args.quick else 3
    naive = bench_naive(model, base, device, repeats)
    release_memory()  # the naive pipeline is gone with bench_naive's frame: give its memory back before our figures
    bench_ours(model, base, device, repeats, naive)


def bench_first_image(manager: ModelManager, base: GenerationSettings, device: torch.device) -> LoadedModel:
    """Load from local safetensors (the files just written are in the page cache, as after an app restart), then the
    first image: what a user waits for after the app starts, graph capture included."""
    started = time.perf_counter()
    model = manager.get(MODELS["sd15"])
    synchronize(device)
    load_s = time.perf_counter() - started
    emit("SD1.5 load from local safetensors", None, load_s, "s", False, device=str(model.device), dtype=str(model.dtype))
    result = generation.generate(model, base)
    synchronize(device)
    emit(f"SD1.5 first image after the app starts ({base.steps} steps, load included)", None, time.perf_counter() - started, "s", False,
         unet_path=result.unet_path)
    if compiled.wait_until_settled(COMPILE_WAIT_S):
        for record in compiled.records():
            emit(f"torch.compile of the {record.model} in the background, {record.shape}", None, record.seconds, "s", False, state=str(record.state),
                 cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
    return model


def bench_naive(model: LoadedModel, base: GenerationSettings, device: torch.device, repeats: int) -> float:
    """What a tutorial does: an fp32 pipeline from the same folder, `.to(device)`, one call per image."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model.source.location, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)

    def run() -> None:
        pipe(PROMPT, num_inference_steps=base.steps, width=base.width, height=base.height, generator=torch.Generator("cpu").manual_seed(0))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(run, device, warmup=1, repeats=repeats)
    emit(f"SD1.5 {base.width}x{base.height} {base.steps} steps PNDM, naive fp32", None, seconds, "s/image", False, peak_allocated_bytes=peak_bytes(device))
    return seconds


def bench_ours(model: LoadedModel, base: GenerationSettings, device: torch.device, repeats: int, naive_s: float) -> None:
    """The app's path (queue slot, per-run scheduler, callback) in its default precision, fp32, other samplers and each memory mode."""

    def figure(name: str, settings: GenerationSettings, warmup: int = 1, runs: int = repeats, same_work: bool = True, accel: Acceleration | None = None) -> None:
        results = []
        runs_on = model if accel is None else dataclasses.replace(model, accel=accel)
        # One call first: it settles the memory mode and dtype (before the peak is measured) and queues the compile.
        run = settled(lambda: results.append(generation.generate(runs_on, settings)))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = median_seconds(run, device, warmup=warmup, repeats=runs)
        emit(name, naive_s if same_work else None, seconds / settings.num_images, "s/image", False, peak_allocated_bytes=peak_bytes(device),
             precision=str(settings.precision), memory_mode=str(settings.memory_mode), scheduler=settings.scheduler, steps=settings.steps,
             unet_path=results[-1].unet_path)

    size = f"SD1.5 {base.width}x{base.height}"
    figure(f"{size} {base.steps} steps PNDM, ours ({str(model.dtype).removeprefix('torch.')})", base)
    figure(f"{size} 25 steps DPM++ 2M Karras, ours", replace(base, steps=25, scheduler="DPM++ 2M Karras"), same_work=False)
    figure(f"{size} {base.steps} steps PNDM, 4 images per run, ours", replace(base, num_images=4), runs=max(repeats - 1, 1))
    if device.type != "cuda":
        return
    # The rest without compiles (each new dtype or shape would compile for a minute): graphs, or eager where a mode
    # changes the UNet.
    graphs_only = Acceleration(cuda_graphs=True, compile=False)
    figure(f"{size} {base.steps} steps PNDM, ours, compile off", base, accel=graphs_only)
    figure(f"{size} {base.steps} steps PNDM, ours, compile and CUDA graphs off (eager)", base, accel=EAGER)
    figure(f"{size} {base.steps} steps PNDM, ours fp32", replace(base, precision=Precision.FP32), accel=graphs_only)
    figure(f"{size} {base.steps} steps PNDM, ours bf16", replace(base, precision=Precision.BF16), accel=graphs_only)
    for mode in MemoryMode:
        if mode is not MemoryMode.NONE:  # offload modes are slow: one timed run each
            slow = mode in (MemoryMode.MODEL_OFFLOAD, MemoryMode.SEQUENTIAL_OFFLOAD)
            figure(f"{size} {base.steps} steps PNDM, ours, {mode}", replace(base, memory_mode=mode), warmup=0, runs=1 if slow else repeats, accel=graphs_only)


if __name__ == "__main__":
    main()
