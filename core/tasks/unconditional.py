"""Unconditional image generation with a DDPM model (`DDPMPipeline`: a UNet2DModel and its scheduler), no prompt.

The denoising loop is diffusers' `DDPMPipeline.__call__` written out, because that pipeline has no step callback:
each step checks for cancel and reports progress with a preview of the current images, as text to image does.
Runs take the same per-device queue slot as every other generation.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from core.checks import check_number
from core.config import Settings
from core.models.manager import LoadedModel
from core.models.memory import out_of_memory_guard
from core.models.registry import ModelSpec, spec_for_choice
from core.tasks.generation import StepReporter, device_slot, report, stops_within_model_calls
from core.tasks.jobs import JobContext
from core.tasks.sd_settings import MAX_SEED, GeneratedImage, memory_remedy, random_seed, seeds_from

DDPM_MODEL_KEYS = ("ddpm-butterflies", "ddpm-cifar10")
MAX_STEPS = 1000  # DDPM was trained with 1000 noise levels; fewer steps skip levels (faster, blurrier)
MAX_IMAGES = 64  # 32-pixel images are cheap: a grid of 64 is one small batch


@dataclass(frozen=True)
class UnconditionalSettings:
    num_images: int = 16
    steps: int = 1000  # DDPM's own schedule; 100-250 already give recognisable samples
    seed: int | None = None  # None: drawn when the run starts; image i gets seed + i

    def seeds(self) -> tuple[int, ...]:
        return seeds_from(self.seed, self.num_images)


@dataclass(frozen=True)
class UnconditionalResult:
    images: tuple[GeneratedImage, ...]
    grid: Image.Image  # every image in one picture
    settings: UnconditionalSettings  # with the seed that was used
    model_name: str
    model_title: str
    is_standin: bool
    device: str
    dtype: str
    seconds: float
    steps_per_s: float
    peak_memory_bytes: int | None
    unet_path: str = "eager"  # the DDPM loop's small UNet calls are not graphed (core.tasks.generation's are)


def model_spec_for(choice: str, custom: str, settings: Settings) -> ModelSpec:
    """The spec for one of DDPM_MODEL_KEYS, or for a custom DDPM repo id (owner/name) or folder inside the models root."""
    return spec_for_choice(choice, custom, DDPM_MODEL_KEYS, "ddpm-butterflies", "google/ddpm-cifar10-32", settings)


def check_inputs(settings: UnconditionalSettings) -> None:
    for name, high in (("num_images", MAX_IMAGES), ("steps", MAX_STEPS)):
        check_number(name, getattr(settings, name), 1, high, whole=True)
    if settings.seed is not None:
        check_number("seed", settings.seed, 0, MAX_SEED, whole=True)


def image_grid(images: list[Image.Image]) -> Image.Image:
    """The images in a near-square grid, row by row."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def to_pil(samples: torch.Tensor) -> list[Image.Image]:
    """Model space [-1, 1] to 8-bit RGB images, as DDPMPipeline's postprocessing does."""
    pixels = ((samples.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(p) for p in pixels]


def generate(
    model: LoadedModel,
    settings: UnconditionalSettings,
    context: JobContext | None = None,
    abandoned: Callable[[], bool] = lambda: False,
) -> UnconditionalResult:
    """Sample `settings.num_images` images from the DDPM model in `model`; cancel and errors as core.tasks.generation.generate."""
    # 1. Check inputs
    check_inputs(settings)
    if settings.seed is None:
        settings = replace(settings, seed=random_seed())

    # 2. Wait for the device
    reporter = StepReporter(context, abandoned, settings.steps)
    with device_slot(model.device, context, reporter):
        return _run(model, settings, context, reporter)


def _run(model: LoadedModel, settings: UnconditionalSettings, context: JobContext | None, reporter: StepReporter) -> UnconditionalResult:
    pipe, device = model.obj, model.device
    unet = pipe.unet
    with out_of_memory_guard(f"making {settings.num_images} image(s)", remedy=memory_remedy(on_gpu=True)):
        # 3. This run's scheduler (the shared one keeps per-run state) and one CPU generator per image
        report(context, "preparing the model")
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(settings.steps)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in settings.seeds()]
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        noise = [torch.randn((1, unet.config.in_channels, height, width), generator=g) for g in generators]
        samples = torch.cat(noise).to(device=device, dtype=unet.dtype)

        # 4. Denoise: the model predicts the noise, the scheduler takes one step back
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        reporter.started = time.perf_counter()
        # The DDPM UNet is never graphed nor compiled: stop checks can go inside it, whatever the device.
        with torch.inference_mode(), stops_within_model_calls(reporter, unet, None, inside=True):
            for index, timestep in enumerate(scheduler.timesteps):
                reporter.step(index, lambda samples=samples: image_grid(to_pil(samples)))
                noise_prediction = unet(samples, timestep).sample
                samples = scheduler.step(noise_prediction, timestep, samples, generator=generators).prev_sample
            reporter.step(settings.steps, lambda: image_grid(to_pil(samples)))
        seconds = time.perf_counter() - reporter.started
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        images = to_pil(samples)

    # 5. Results
    return UnconditionalResult(
        images=tuple(GeneratedImage(image, seed, blacked_out=False) for image, seed in zip(images, settings.seeds(), strict=True)),
        grid=image_grid(images), settings=settings, model_name=model.spec.repo_id, model_title=model.spec.title,
        is_standin=model.is_standin, device=str(device), dtype=str(unet.dtype).removeprefix("torch."), seconds=seconds,
        steps_per_s=settings.steps / seconds if seconds > 0 else 0.0, peak_memory_bytes=peak,
    )
