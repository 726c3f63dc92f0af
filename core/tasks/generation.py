"""Stable Diffusion text to image, image to image and inpaint on a shared pipeline, read like a small diffusers pipeline.

`generate()` runs numbered steps: check the inputs, wait for the device's slot in the GPU queue, put the shared
pipeline in the run's precision, LoRA adapters and memory mode, build the mode's pipeline over the shared modules with
the run's own scheduler, one seeded generator per image, then diffusers' denoising loop with a step callback for
progress, a cheap latent preview and cancel. Everything that changes the shared pipeline happens while holding the
slot, and is undone before it is released where it belongs to the session (adapters), so runs never race or leak.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from PIL import Image, ImageFilter

from core.accel import Acceleration, cuda_graphs
from core.errors import InsufficientMemoryError
from core.formatting import human_bytes
from core.gpu.nvml import host_memory
from core.gpu.queue import SlotAbandoned, queue_for
from core.models.manager import LoadedModel
from core.models.memory import out_of_memory_guard
from core.tasks import lora
from core.tasks.jobs import JobCancelled, JobContext
from core.tasks.lora import LoraChoice
from core.tasks.prompt_embeddings import encode_prompts
from core.tasks.prompt_syntax import CHUNK_TOKENS, Fragment, parse_prompt
from core.tasks.sd_pipeline import restore_plain, run_dtype, run_pipeline, set_memory_mode, set_precision, torch_modules
from core.tasks.sd_settings import (
    GRAPHABLE_MODES,
    GeneratedImage,
    GenerationResult,
    GenerationSettings,
    HiresUpscaler,
    Mode,
    SourceImages,
    check_inputs,
    estimate_memory,
    memory_remedy,
    prompt_usage,
    with_lora_tags,
)

log = logging.getLogger(__name__)
PREVIEW_EVERY_S = 0.4  # a preview costs a device-to-host copy (a sync): a few per second is enough for the eye


def memory_available_bytes(pipe: Any, device: torch.device) -> int:
    """What a run on `device` can have: the device's free memory, plus what the pipeline's modules hold there already
    (the estimate counts the weights, and they are loaded). Free on a GPU: the driver's figure plus torch's cached,
    unused blocks (the budget of core.models.memory is for models: runs live in the margin it leaves); on the CPU: the RAM
    psutil calls available."""
    held_bytes = sum(
        tensor.numel() * tensor.element_size()
        for module in torch_modules(pipe).values() for tensor in itertools.chain(module.parameters(), module.buffers())
        if tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)
    )
    if device.type == "cuda":
        cached_bytes = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached_bytes + held_bytes
    return host_memory().available_bytes + held_bytes


def check_memory(model: LoadedModel, settings: GenerationSettings) -> None:
    """Refuse a run whose own estimate is more than the device has available, before it starts: such a run would
    fail out of memory on a GPU, and on the CPU push the whole server into swap."""
    device = model.device
    estimate = estimate_memory(model.info, settings)
    available_bytes = memory_available_bytes(model.obj, device)
    if estimate.total_bytes > available_bytes:
        memory = "GPU memory" if device.type == "cuda" else "RAM"
        raise InsufficientMemoryError(
            f"{settings.num_images} image(s) of {settings.width}x{settings.height} with memory mode {settings.memory_mode} need about "
            f"{human_bytes(estimate.total_bytes)} of {memory} (weights {human_bytes(estimate.weights_bytes)}, working memory "
            f"{human_bytes(estimate.activations_bytes)}), but only about {human_bytes(available_bytes)} is available on {device}.",
            remedy=memory_remedy(device.type == "cuda"),
        )


def latent_preview(latents: torch.Tensor) -> Image.Image:
    """An approximate RGB picture of SD 1.x latents without the VAE: a fixed linear map, each image 1/8 size, side by side."""
    factors = torch.tensor(_LATENT_RGB_FACTORS, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("bchw,cr->bhwr", latents.float(), factors)
    strip = torch.cat(list(rgb), dim=1)  # images side by side
    pixels = ((strip + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels)


# Least-squares fit of SD 1.x VAE decodes to latents (as ComfyUI and AUTOMATIC1111 use for their live previews).
_LATENT_RGB_FACTORS = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))


class StepReporter:
    """Progress with it/s and time left, a preview a few times a second, and cancel within a step.

    Progress counts the steps the user asked for: PNDM runs one extra model call (PLMS warm-up), and a user who
    asked for 30 steps should see "30 of 30" at the end, as diffusers' own progress bar shows.
    """

    def __init__(self, context: JobContext | None, abandoned: Callable[[], bool], steps: int) -> None:
        self.context = context
        self.abandoned = abandoned
        self.steps = steps
        self.started = time.perf_counter()
        self.last_preview = -math.inf
        self.first_step_begun = False
        self.label = "step"

    def begin_pass(self, label: str, steps: int) -> None:
        """A further denoising pass (the hires fix's): progress counts its own steps, under its own label."""
        self.label, self.steps, self.started, self.last_preview = label, steps, time.perf_counter(), -math.inf

    def stop_requested(self) -> bool:
        return (self.context is not None and self.context.cancelled) or self.abandoned()

    def check_stop(self) -> None:
        """Raise JobCancelled on a stop: it leaves the denoising loop (or a model call) at once, and partial
        results are never decoded."""
        if self.stop_requested():
            raise JobCancelled

    def unet_called(self) -> None:
        """At each UNet call: a stop ends the run here, and the first call says step 1 has begun (until then the
        label still says what came before, "preparing the model", for the whole first step)."""
        self.check_stop()
        if self.context is not None and not self.first_step_begun:
            self.first_step_begun = True
            self.context.report(0, self.steps, f"step 1 of {self.steps}")

    def step(self, done: int, preview: Callable[[], Image.Image]) -> None:
        """Before or after step `done`: raise JobCancelled on a stop, else report (`preview` is called only when shown)."""
        self.check_stop()
        if self.context is None:
            return
        now = time.perf_counter()
        rate = done / (now - self.started) if done else 0.0
        detail = f"{self.label} {done} of {self.steps}" + (f" · {rate:.2f} it/s · about {(self.steps - done) / rate:.0f} s left" if rate else "")
        image = None
        if done and (now - self.last_preview >= PREVIEW_EVERY_S or done == self.steps):
            image, self.last_preview = preview(), now
        self.context.report(done, self.steps, detail, image)

    def __call__(self, pipe: Any, index: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers' `callback_on_step_end`."""
        self.step(max(1, round((index + 1) * self.steps / pipe.num_timesteps)), lambda: latent_preview(tensors["latents"]))
        return tensors


def hooks_inside_models_allowed(device: torch.device, accel: Acceleration, graphed: bool) -> bool:
    """Whether stop checks may go on the UNet's and VAE's inner modules: only where no CUDA graph capture or
    torch.compile trace can meet them. A hook inside a captured region would run at capture only (and a raise there
    would break the capture); the compile worker traces the shared modules in the background, whoever's run is on.
    So: always on the CPU (neither applies there); on a GPU only with compile off and this run's UNet not graphed.
    A graph replay is checked between calls, which on a GPU are milliseconds apart."""
    return device.type != "cuda" or not (accel.compile or (graphed and accel.cuda_graphs))


@contextmanager
def stops_within_model_calls(reporter: StepReporter, unet: torch.nn.Module, vae: torch.nn.Module | None, inside: bool) -> Iterator[None]:
    """Within: a cancel or a session gone ends the run at the next module call of the UNet or the VAE, mid-step or
    mid-decode, not at the end of a step that takes minutes on a CPU at 2048 pixels.

    Forward pre-hooks on the shared modules, for the run holding the device's slot, removed when it ends. The UNet's
    own hook sits outside any captured or compiled region (graphs and compiles call the class's forward, not the
    module), so it is always on; the inner modules' hooks only where `inside` (see hooks_inside_models_allowed).
    """
    def check(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        reporter.check_stop()

    handles = [unet.register_forward_pre_hook(lambda module, args: reporter.unet_called())]
    if inside:
        inner = [*unet.modules()][1:] + ([*vae.modules()] if vae is not None else [])
        handles += [module.register_forward_pre_hook(check) for module in inner]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def report(context: JobContext | None, detail: str) -> None:
    if context is not None:
        context.report(0, 0, detail)


def ordinal_place(n: int) -> str:
    return "next in line" if n == 1 else f"{n}{'nd' if n == 2 else 'rd' if n == 3 else 'th'} in line"


@contextmanager
def device_slot(device: torch.device, context: JobContext | None, reporter: StepReporter) -> Iterator[None]:
    """Wait for the device's turn (one run at a time per GPU, first come first served), saying the place in line."""
    report(context, "waiting for the device")
    try:
        with queue_for(device).slot(on_wait=lambda n: report(context, f"waiting for the GPU: {ordinal_place(n)}"), cancelled=reporter.stop_requested):
            yield
    except SlotAbandoned:
        raise JobCancelled from None


def prepare_source(source: SourceImages | None, settings: GenerationSettings) -> tuple[SourceImages | None, tuple[str, ...]]:
    """The input image (and mask) at the run's size, RGB and L, with a note when the image had to be resized."""
    if source is None or settings.mode is Mode.TEXT_TO_IMAGE:
        return None, ()
    size = (settings.width, settings.height)
    image = source.image.convert("RGB")
    notes: tuple[str, ...] = ()
    if image.size != size:
        notes = (f"The input image is {image.width}x{image.height} pixels; it was resized to {settings.width}x{settings.height}, the size of this run.",)
        image = image.resize(size, Image.Resampling.LANCZOS)
    mask = None
    if source.mask is not None and settings.mode is Mode.INPAINT:
        mask = source.mask.convert("L").resize(size, Image.Resampling.NEAREST)
    return SourceImages(image, mask), notes


def generate(
    model: LoadedModel,
    settings: GenerationSettings,
    context: JobContext | None = None,
    abandoned: Callable[[], bool] = lambda: False,
    source: SourceImages | None = None,
    loras: tuple[LoraChoice, ...] = (),
) -> GenerationResult:
    """Make `settings.num_images` images with the shared SD pipeline in `model`, in `settings.mode`.

    Prompts are read as AUTOMATIC1111 reads them (weights, BREAK, any length: docs/PROMPTS.md). `loras` are the
    session's adapters, each at the weight a `<lora:name:weight>` tag of the prompt gives it, else its own; they are
    on the shared pipeline only while the run holds the device, so no other session's images ever see them. Raises BadInputError before any work, JobCancelled when cancelled (partial
    results dropped), and GpuOutOfMemoryError (memory already released) when the device runs out of memory.
    """
    device = model.device
    # 1. Check inputs
    check_inputs(settings, device.type, source)
    check_memory(model, settings)
    loras = with_lora_tags(settings.prompt, loras)
    lora.check_choices(loras)
    settings = replace(settings.with_seed(), loras=tuple((choice.adapter.name, choice.weight) for choice in loras))
    source, notes = prepare_source(source, settings)

    # 2. Wait for the device: alone, or in a batch shared with other sessions' text-to-image runs
    reporter = StepReporter(context, abandoned, settings.denoising_steps)
    from core.tasks import shared_batch  # it builds on this module's run pieces

    if model.accel.shared_batches and shared_batch.shares_batches(settings, loras) and _read_alike_by_diffusers(model, settings):
        return shared_batch.generate_together(model, settings, context, reporter, notes)
    with device_slot(device, context, reporter):
        return _run(model, settings, context, reporter, source, loras, notes)


def _read_alike_by_diffusers(model: LoadedModel, settings: GenerationSettings) -> bool:
    """Whether diffusers' own prompt encoding, which the shared batch uses, reads both prompts as this app does: plain
    text (no brackets, escapes, BREAK or tags) of at most one chunk each."""
    sides = ((settings.prompt, True), (settings.negative_prompt, False))
    return all(
        parse_prompt(text, read_tags).parts in ((), (Fragment(text, 1.0),)) and prompt_usage(model.info, text).tokens <= CHUNK_TOKENS
        for text, read_tags in sides
    )


def _mode_arguments(settings: GenerationSettings, source: SourceImages | None) -> dict[str, Any]:
    if settings.mode is Mode.TEXT_TO_IMAGE:
        return {"width": settings.width, "height": settings.height}
    if settings.mode is Mode.IMAGE_TO_IMAGE:  # the image sets the size
        return {"image": source.image, "strength": settings.strength}
    return {"image": source.image, "mask_image": source.mask, "strength": settings.strength, "width": settings.width, "height": settings.height}


def _run(
    model: LoadedModel, settings: GenerationSettings, context: JobContext | None, reporter: StepReporter,
    source: SourceImages | None, loras: tuple[LoraChoice, ...], notes: tuple[str, ...],
) -> GenerationResult:
    pipe, device = model.obj, model.device
    with out_of_memory_guard(f"making {settings.num_images} image(s) of {settings.width}x{settings.height}", remedy=memory_remedy(on_gpu=True)):
        try:
            # 3. Put the shared pipeline in this run's precision, adapters and memory mode (casts and adapters need the plain state)
            report(context, "preparing the model")
            if pipe.unet.dtype != run_dtype(pipe, settings.precision):
                restore_plain(pipe, device)
                set_precision(pipe, settings.precision, device)
            if loras:
                restore_plain(pipe, device)
                lora.apply(pipe, loras)
            set_memory_mode(pipe, settings.memory_mode, device)

            # 4. This run's pipeline over the shared modules, and one generator per image (CPU generators: the same
            # noise on any device)
            run_pipe = run_pipeline(pipe, settings.mode, settings.scheduler)
            seeds = settings.seeds()
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
            # A variation starts from noise of its own; a hires fix keeps the first pass's latents (or images) for the second
            variation = {"latents": variation_latents(run_pipe, settings, run_dtype(pipe, settings.precision))} if settings.varied else {}
            first_pass_output = {"output_type": "latent" if settings.hires_upscaler is HiresUpscaler.LATENT else "pil"} if settings.hires else {}

            # 5. Denoise and decode
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            run_started = reporter.started = time.perf_counter()
            # LoRA layers change the UNet's modules for this run only: a graph of them would be captured for nothing.
            fast = not loras and settings.memory_mode in GRAPHABLE_MODES
            with (
                cuda_graphs.graphed_unet(pipe.unet, model.accel, allowed=fast) as unet_calls,
                cuda_graphs.graphed_text_encoder(pipe.text_encoder, model.accel, allowed=fast),
                cuda_graphs.compiled_vae_decode(pipe.vae, model.accel, allowed=fast),
                stops_within_model_calls(reporter, pipe.unet, pipe.vae, inside=hooks_inside_models_allowed(device, model.accel, graphed=fast)),
            ):
                # Each 77-token chunk through the (graphed) text encoder, weights applied: a prompt of any length read whole.
                embeddings = encode_prompts(
                    run_pipe.tokenizer, run_pipe.text_encoder, settings.prompt, settings.negative_prompt, run_pipe._execution_device, run_pipe.text_encoder.dtype,
                )
                output = run_pipe(
                    prompt_embeds=embeddings.prompt_embeds, negative_prompt_embeds=embeddings.negative_prompt_embeds,
                    num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale, num_images_per_prompt=settings.num_images,
                    generator=generators, callback_on_step_end=reporter, **_mode_arguments(settings, source), **variation, **first_pass_output,
                )
                if settings.hires:
                    output = hires_pass(pipe, settings, output.images, reporter, embeddings)
            seconds = time.perf_counter() - run_started
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        finally:
            pipe.maybe_free_model_hooks()  # with model offload: every model back on the CPU, as diffusers does after a call
            if loras:  # the shared pipeline leaves this run exactly as it came: base weights, no adapter
                restore_plain(pipe, device)
                lora.remove(pipe)

    # 7. Results, with a note for each image the safety checker blacked out
    flags = output.nsfw_content_detected or [False] * len(output.images)
    made = output.images
    if settings.mode is Mode.INPAINT:  # a blacked-out image stays black
        made = [image if flag else kept_outside_the_mask(source, image) for image, flag in zip(made, flags, strict=True)]
    images = tuple(GeneratedImage(image, seed, bool(flag)) for image, seed, flag in zip(made, seeds, flags, strict=True))
    blacked = [str(i + 1) for i, image in enumerate(images) if image.blacked_out]
    if blacked:
        notes += (f"The model's safety checker judged image {', '.join(blacked)} not safe for work and blacked it out; try another seed or prompt.",)
    return GenerationResult(
        images=images, settings=settings, model_name=model.spec.repo_id, model_title=model.spec.title, is_standin=model.is_standin,
        device=str(device), dtype=str(pipe.unet.dtype).removeprefix("torch."), seconds=seconds,
        steps_per_s=settings.total_denoising_steps / seconds if seconds > 0 else 0.0, peak_memory_bytes=peak, notes=notes,
        unet_path=unet_calls.path,
    )


# AUTOMATIC1111's default mask blur: the repainted area fades into the kept pixels over a few pixels.
MASK_BLUR_PX = 4


def kept_outside_the_mask(source: SourceImages, image: Image.Image) -> Image.Image:
    """The inpainted image with the source's own pixels wherever the mask keeps them, blended over the mask's blurred
    edge, as AUTOMATIC1111 pastes the original back: otherwise the VAE's round trip changes every pixel a little, far
    from the mask too (about 30 levels of 255 with random weights on the H100, tests/test_gpu_features.py)."""
    edge = source.mask.filter(ImageFilter.GaussianBlur(MASK_BLUR_PX))
    return Image.composite(image, source.image, edge)


def variation_latents(run_pipe: Any, settings: GenerationSettings, dtype: torch.dtype) -> torch.Tensor:
    """The starting noise of a varied run: for each image slerp(noise(seed), noise(variation seed), strength), each
    noise drawn as diffusers draws a seed's (a CPU generator, the run's dtype), so that strength 0 is exactly the
    seed's image and 1 the variation seed's."""
    shape = (1, run_pipe.unet.config.in_channels, settings.height // run_pipe.vae_scale_factor, settings.width // run_pipe.vae_scale_factor)

    def noise(seed: int) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype).float()

    pairs = zip(settings.seeds(), settings.variation_seeds(), strict=True)
    return torch.cat([slerp(noise(seed), noise(variation_seed), settings.variation_strength).to(dtype) for seed, variation_seed in pairs])


def slerp(low: torch.Tensor, high: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from `low` (t = 0) to `high` (t = 1), each tensor taken as one vector: the blend keeps
    the length of Gaussian noise, which a straight mix does not (at t = 0.5 it is 0.71 of it, and the image washes out).
    Each weight is a ratio of sines computed before it multiplies, so the ends are exact."""
    dot = float(low.flatten() @ high.flatten() / (low.norm() * high.norm()))
    if dot > 0.9995:  # (nearly) one direction, as from one seed twice: no angle to turn through
        return torch.lerp(low, high, t)
    omega = math.acos(dot)
    return math.sin((1 - t) * omega) / math.sin(omega) * low + math.sin(t * omega) / math.sin(omega) * high


def hires_pass(pipe: Any, settings: GenerationSettings, first_pass: Any, reporter: StepReporter, embeddings: Any) -> Any:
    """The hires fix's second pass, as AUTOMATIC1111's: the first pass's latents interpolated (or its images decoded and
    Lanczos-upscaled) to `settings.output_size`, then image to image over the same shared modules at `hires_strength`,
    each image with its own seed's generator again, and the first pass's prompt encodings (weights and chunks)."""
    width, height = settings.output_size
    if settings.hires_upscaler is HiresUpscaler.LATENT:
        scale = pipe.vae_scale_factor
        upscaled = torch.nn.functional.interpolate(first_pass.float(), size=(height // scale, width // scale), mode="bilinear").to(first_pass.dtype)
    else:
        upscaled = [image.resize((width, height), Image.Resampling.LANCZOS) for image in first_pass]
    reporter.begin_pass("hires step", settings.hires_denoising_steps)
    img2img = run_pipeline(pipe, Mode.IMAGE_TO_IMAGE, settings.scheduler)
    return img2img(
        prompt_embeds=embeddings.prompt_embeds, negative_prompt_embeds=embeddings.negative_prompt_embeds, image=upscaled, strength=settings.hires_strength,
        num_inference_steps=settings.hires_steps or settings.steps, guidance_scale=settings.guidance_scale, num_images_per_prompt=settings.num_images,
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in settings.seeds()], callback_on_step_end=reporter,
    )
