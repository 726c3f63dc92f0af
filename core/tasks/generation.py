"""Stable Diffusion text to image, image to image and inpaint on a shared pipeline, read like a small diffusers pipeline.

`generate()` runs numbered steps: check the inputs, wait for the device's slot in the GPU queue, put the shared
pipeline in the run's precision, LoRA adapters and memory mode, build the mode's pipeline over the shared modules with
the run's own scheduler, one seeded generator per image, then diffusers' denoising loop with a step callback for
progress, a cheap latent preview and cancel. Everything that changes the shared pipeline happens while holding the
slot, and is undone before it is released where it belongs to the session (adapters), so runs never race or leak.
"""
from __future__ import annotations

import copy
import importlib.util
import itertools
import logging
import math
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import torch
from PIL import Image

from core.accel import compiled, cuda_graphs
from core.checks import check_number
from core.config import Settings
from core.errors import BadInputError, GpuOutOfMemoryError, InsufficientMemoryError
from core.formatting import human_bytes
from core.gpu.nvml import host_memory
from core.gpu.queue import SlotAbandoned, queue_for
from core.models.manager import LoadedModel, module_bytes, release_memory
from core.models.registry import ModelSpec, spec_for_choice
from core.tasks import lora
from core.tasks.jobs import JobCancelled, JobContext
from core.tasks.lora import LoraChoice

log = logging.getLogger(__name__)

SD_MODEL_KEYS = ("sd15", "sd14", "mr-potato-head")

# Limits, as AUTOMATIC1111 has them: beyond these a run is refused with a message, never clamped.
MIN_SIDE_PX, MAX_SIDE_PX = 64, 2048
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_IMAGES = 8
MAX_SEED = 2**53 - 1  # the largest whole number a browser's number input holds exactly
MIN_STRENGTH = 0.01  # image to image at 1 % already keeps the input; below, no step of a 100-step run is left
PREVIEW_EVERY_S = 0.4  # a preview costs a device-to-host copy (a sync): a few per second is enough for the eye


@dataclass(frozen=True)
class SchedulerChoice:
    class_name: str  # a diffusers scheduler class
    overrides: tuple[tuple[str, Any], ...] = ()  # on top of the model's own scheduler config
    a1111_name: str = ""  # the sampler name AUTOMATIC1111 writes in PNG metadata, when it differs
    needs: str | None = None  # a module the scheduler imports at run time


SCHEDULERS: dict[str, SchedulerChoice] = {
    "PNDM": SchedulerChoice("PNDMScheduler", a1111_name="PLMS"),  # SD 1.x's own (PLMS steps)
    "DDIM": SchedulerChoice("DDIMScheduler"),
    "Euler": SchedulerChoice("EulerDiscreteScheduler"),
    "Euler a": SchedulerChoice("EulerAncestralDiscreteScheduler"),
    "DPM++ 2M Karras": SchedulerChoice(
        "DPMSolverMultistepScheduler", (("algorithm_type", "dpmsolver++"), ("solver_order", 2), ("use_karras_sigmas", True))
    ),
    "LMS": SchedulerChoice("LMSDiscreteScheduler", needs="scipy"),  # integrates its coefficients with scipy
    "UniPC": SchedulerChoice("UniPCMultistepScheduler"),
}
DEFAULT_SCHEDULER = "PNDM"


class Precision(StrEnum):
    AUTO = "auto"  # the dtype the manager loaded the model in (fp16 on a GPU, fp32 on the CPU)
    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"


_DTYPES = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16, Precision.FP32: torch.float32}


class MemoryMode(StrEnum):
    NONE = "none"
    ATTENTION_SLICING = "attention slicing"  # attention one head slice at a time
    VAE_SLICING = "VAE slicing"  # decode one image of the batch at a time
    VAE_TILING = "VAE tiling"  # decode in overlapping tiles: large images in little memory
    MODEL_OFFLOAD = "model CPU offload"  # each model on the GPU only while it runs
    SEQUENTIAL_OFFLOAD = "sequential CPU offload"  # each layer on the GPU only while it runs: least memory, slowest


_GPU_ONLY_MODES = (MemoryMode.MODEL_OFFLOAD, MemoryMode.SEQUENTIAL_OFFLOAD)
# Modes that leave the UNet as loaded, so its calls can replay CUDA graphs (offload hooks move its weights and wrap
# its forward; attention slicing swaps its attention processors).
_GRAPHABLE_MODES = (MemoryMode.NONE, MemoryMode.VAE_SLICING, MemoryMode.VAE_TILING)


class Mode(StrEnum):
    TEXT_TO_IMAGE = "text to image"
    IMAGE_TO_IMAGE = "image to image"  # start from a noised input image; `strength` says how much noise
    INPAINT = "inpaint"  # repaint only where the mask is white


# Each mode's diffusers pipeline, built over the loaded model's components (see run_pipeline): nothing loads twice.
PIPELINE_CLASSES = {
    Mode.TEXT_TO_IMAGE: "StableDiffusionPipeline",
    Mode.IMAGE_TO_IMAGE: "StableDiffusionImg2ImgPipeline",
    Mode.INPAINT: "StableDiffusionInpaintPipeline",
}


@dataclass(frozen=True)
class GenerationSettings:
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 25  # PNDM/DPM++ give a clean SD 1.x image in 20-30 steps; 50 is diffusers' default
    guidance_scale: float = 7.5  # diffusers' and AUTOMATIC1111's default for SD 1.x
    width: int = 512  # SD 1.x was trained at 512x512
    height: int = 512
    num_images: int = 1
    seed: int | None = None  # None: a random seed, drawn when the run starts and reported with the result
    scheduler: str = DEFAULT_SCHEDULER
    precision: Precision = Precision.AUTO
    memory_mode: MemoryMode = MemoryMode.NONE
    mode: Mode = Mode.TEXT_TO_IMAGE
    strength: float = 0.75  # image to image and inpaint: 1 repaints from pure noise (AUTOMATIC1111's default 0.75)
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, weight), as written to PNG metadata

    @property
    def denoising_steps(self) -> int:
        """The steps that really run: from an input image diffusers skips the first (1 - strength) of them."""
        if self.mode is Mode.TEXT_TO_IMAGE:
            return self.steps
        return min(int(self.steps * self.strength), self.steps)

    def seeds(self) -> tuple[int, ...]:
        return seeds_from(self.seed, self.num_images)

    def with_seed(self) -> GenerationSettings:
        return self if self.seed is not None else replace(self, seed=random_seed())


# On a CPU, SD 1.x's own 512x512 in 25 steps takes minutes, even with the stand-in model (83 s a step on this
# project's 2-core CI machine): the form starts smaller there, so that pressing Generate finishes in under a minute.
CPU_DEFAULTS = GenerationSettings(width=256, height=256, steps=10)


def defaults_for(device: torch.device) -> GenerationSettings:
    return CPU_DEFAULTS if device.type == "cpu" else GenerationSettings()


def seeds_from(seed: int | None, count: int) -> tuple[int, ...]:
    """Image i gets seed + i (as in AUTOMATIC1111), so any image of a batch can be made again alone."""
    if seed is None:
        raise ValueError("the seed is drawn (random_seed) before a run")
    return tuple((seed + i) % (MAX_SEED + 1) for i in range(count))


def random_seed() -> int:
    return secrets.randbelow(2**32)


@dataclass(frozen=True)
class SourceImages:
    """The input of image to image and inpaint: a picture and, for inpaint, a mask (white = repaint)."""

    image: Image.Image
    mask: Image.Image | None = None


@dataclass(frozen=True)
class PromptLength:
    tokens: int  # without the start and end tokens
    limit: int  # what the text encoder reads (75 for CLIP's 77 positions)
    ignored_text: str  # the words past the limit, which the model never sees

    @property
    def truncated(self) -> bool:
        return self.tokens > self.limit


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int  # on the device during the run (less with an offload mode)
    activations_bytes: int  # rough: latents, attention and the VAE decode at this size and batch

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activations_bytes


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int
    blacked_out: bool  # the model's safety checker replaced it with a black image


@dataclass(frozen=True)
class GenerationResult:
    images: tuple[GeneratedImage, ...]
    settings: GenerationSettings  # with the seed that was used
    model_name: str  # repo id or folder, as written to PNG metadata
    model_title: str
    is_standin: bool
    device: str
    dtype: str
    seconds: float  # the run on the device, waiting in the queue excluded
    steps_per_s: float
    peak_memory_bytes: int | None  # torch's peak allocation on the GPU during the run; None on the CPU
    notes: tuple[str, ...] = field(default=())
    unet_path: str = "eager"  # how the denoising steps ran: "eager" or "CUDA graph" (core.accel.cuda_graphs)

    def settings_for(self, index: int) -> GenerationSettings:
        """The settings that make image `index` again on its own."""
        return replace(self.settings, seed=self.images[index].seed, num_images=1)


def model_spec_for(choice: str, custom: str, settings: Settings) -> ModelSpec:
    """The spec for one of SD_MODEL_KEYS, or for a custom SD 1.x repo id (owner/name) or folder inside the models root."""
    return spec_for_choice(choice, custom, SD_MODEL_KEYS, "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", settings)


def available_schedulers() -> tuple[str, ...]:
    return tuple(name for name, choice in SCHEDULERS.items() if choice.needs is None or importlib.util.find_spec(choice.needs))


def precisions_for(device: torch.device) -> tuple[Precision, ...]:
    # CPUs lack fast half-precision kernels for these models: fp32 only.
    return tuple(Precision) if device.type == "cuda" else (Precision.AUTO, Precision.FP32)


def memory_modes_for(device: torch.device) -> tuple[MemoryMode, ...]:
    return tuple(MemoryMode) if device.type == "cuda" else tuple(m for m in MemoryMode if m not in _GPU_ONLY_MODES)


def check_inputs(settings: GenerationSettings, device: torch.device, source: SourceImages | None = None) -> None:
    """Refuse bad settings before any work, naming the argument and its value (an empty prompt is fine).

    Image to image needs `source.image`; inpaint needs its `mask` too, the size of the image.
    """
    s = settings
    for name, high in (("steps", MAX_STEPS), ("num_images", MAX_IMAGES)):
        check_number(name, getattr(s, name), 1, high, whole=True)
    check_number("guidance_scale", s.guidance_scale, 0, MAX_GUIDANCE)
    for name in ("width", "height"):
        value = getattr(s, name)
        check_number(name, value, MIN_SIDE_PX, MAX_SIDE_PX, whole=True, unit=" pixels")
        if value % 8:
            raise BadInputError(f"`{name}` has to be a multiple of 8 but is {value}.", remedy=f"Use {value // 8 * 8} or {value // 8 * 8 + 8}.")
    if s.seed is not None:
        check_number("seed", s.seed, 0, MAX_SEED, whole=True)
    if s.scheduler not in SCHEDULERS:
        raise BadInputError(f"`scheduler` {s.scheduler!r} is not one of {', '.join(SCHEDULERS)}.")
    if s.scheduler not in available_schedulers():
        raise BadInputError(f"`scheduler` {s.scheduler!r} needs the Python package {SCHEDULERS[s.scheduler].needs}, which is not installed.", remedy="Choose another scheduler, or ask the operator to install it.")
    if s.precision not in precisions_for(device):
        raise BadInputError(f"`precision` {s.precision} needs a GPU; on the {device.type.upper()} this model runs in fp32.")
    if s.memory_mode not in memory_modes_for(device):
        raise BadInputError(f"`memory_mode` '{s.memory_mode}' moves weights between the CPU and a GPU, and this model runs on the {device.type.upper()}.")
    if s.mode is not Mode.TEXT_TO_IMAGE:
        check_number("strength", s.strength, MIN_STRENGTH, 1)
        if s.denoising_steps < 1:
            raise BadInputError(
                f"`strength` {s.strength:g} of {s.steps} steps leaves no step to run.", remedy=f"Use at least {math.ceil(1 / s.strength)} steps or a higher strength."
            )
        if source is None:
            raise BadInputError(f"{s.mode.capitalize()} needs an input image.", remedy="Upload an image or pick one from the gallery.")
    if s.mode is Mode.INPAINT:
        if source.mask is None:
            raise BadInputError("Inpaint needs a mask: white where the picture is repainted.", remedy="Draw a mask on the image or upload one.")
        if source.mask.size != source.image.size:
            raise BadInputError(
                f"The mask is {source.mask.width}x{source.mask.height} pixels but the image is {source.image.width}x{source.image.height}.",
                remedy="Upload a mask of the image's size, or draw one.",
            )


# A fast tokenizer keeps its padding and truncation settings on the object and sets them on every call: counting a
# prompt with the tokenizer a run is encoding with (padded to 77) would hand that run unpadded ids. So runs encode
# with a private copy per pipeline (one run at a time per pipeline, by the queue), and the page's counting uses the
# loaded tokenizer, one caller at a time.
_counting_lock = threading.Lock()


def prompt_length(pipe: Any, prompt: str) -> PromptLength:
    """How many tokens `prompt` is, and what the text encoder will not read (CLIP sees 77 tokens, start and end included)."""
    tokenizer = pipe.tokenizer
    limit = tokenizer.model_max_length - 2
    with _counting_lock:
        ids = tokenizer(prompt, truncation=False, add_special_tokens=False, verbose=False).input_ids
        ignored = tokenizer.decode(ids[limit:]).strip() if len(ids) > limit else ""
    return PromptLength(len(ids), limit, ignored)


def estimate_memory(pipe: Any, settings: GenerationSettings, device: torch.device) -> MemoryEstimate:
    """A rough device-memory figure for a run, shown before it starts (the GPU tests record the real peaks)."""
    dtype_bytes = torch.finfo(_dtype_for(pipe, settings.precision)).bits // 8
    scale = dtype_bytes / torch.finfo(pipe.unet.dtype).bits * 8  # weights are counted in the dtype they are loaded in
    sizes = {name: module_bytes(module) * scale for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    weights = sum(sizes.values())
    if settings.memory_mode is MemoryMode.MODEL_OFFLOAD:
        weights = max(sizes.values())
    elif settings.memory_mode is MemoryMode.SEQUENTIAL_OFFLOAD:
        weights = 0.02 * weights  # one layer at a time
    pixels = settings.width * settings.height
    decoded_images = 1 if settings.memory_mode in (MemoryMode.VAE_SLICING, MemoryMode.SEQUENTIAL_OFFLOAD) else settings.num_images
    if settings.memory_mode is MemoryMode.VAE_TILING:
        pixels = min(pixels, 512 * 512)
    # The VAE decoder holds about a dozen 128-channel full-size feature maps; the UNet's peak (CFG doubles the
    # batch) at 1/8 size is smaller. Calibrated against SD 1.5 at 512x512 (about 1 GB of activations in fp16).
    vae_bytes = decoded_images * pixels * 128 * 12 * dtype_bytes
    unet_bytes = 2 * settings.num_images * (settings.width * settings.height // 64) * 1280 * 8 * dtype_bytes
    if settings.memory_mode is MemoryMode.ATTENTION_SLICING:
        unet_bytes //= 2
    return MemoryEstimate(int(weights), int(vae_bytes + unet_bytes))


def memory_available_bytes(pipe: Any, device: torch.device) -> int:
    """What a run on `device` can have: the device's free memory, plus what the pipeline's modules hold there already
    (the estimate counts the weights, and they are loaded). Free on a GPU: the driver's figure plus torch's cached,
    unused blocks (the budget of core.models.memory is for models: runs live in the margin it leaves); on the CPU: the RAM
    psutil calls available."""
    held_bytes = sum(
        tensor.numel() * tensor.element_size()
        for module in _torch_modules(pipe).values() for tensor in itertools.chain(module.parameters(), module.buffers())
        if tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)
    )
    if device.type == "cuda":
        cached_bytes = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached_bytes + held_bytes
    return host_memory().available_bytes + held_bytes


def memory_remedy(on_gpu: bool) -> str:
    offload = ", model CPU offload for the least memory" if on_gpu else ""
    return f"Try a smaller size, fewer images per run, or a memory mode (VAE slicing for batches, VAE tiling for large images{offload})."


def check_memory(pipe: Any, settings: GenerationSettings, device: torch.device) -> None:
    """Refuse a run whose own estimate is more than the device has available, before it starts: such a run would
    fail out of memory on a GPU, and on the CPU push the whole server into swap."""
    estimate = estimate_memory(pipe, settings, device)
    available_bytes = memory_available_bytes(pipe, device)
    if estimate.total_bytes > available_bytes:
        memory = "GPU memory" if device.type == "cuda" else "RAM"
        raise InsufficientMemoryError(
            f"{settings.num_images} image(s) of {settings.width}x{settings.height} with memory mode {settings.memory_mode} need about "
            f"{human_bytes(estimate.total_bytes)} of {memory} (weights {human_bytes(estimate.weights_bytes)}, working memory "
            f"{human_bytes(estimate.activations_bytes)}), but only about {human_bytes(available_bytes)} is available on {device}.",
            remedy=memory_remedy(device.type == "cuda"),
        )


def build_scheduler(pipe: Any, name: str) -> Any:
    """A fresh scheduler for one run, from the model's own scheduler config: switching costs no reload."""
    import diffusers

    choice = SCHEDULERS[name]
    return getattr(diffusers, choice.class_name).from_config(pipe.scheduler.config, **dict(choice.overrides))


# Device-side state of each shared pipeline that runs change: which memory mode and dtype it is in, and what to
# restore. Only touched while holding the device's queue slot.
@dataclass
class _PipelineState:
    loaded_dtype: torch.dtype
    memory_mode: MemoryMode = MemoryMode.NONE
    attn_processors: dict[str, Any] | None = None  # the UNet's processors before attention slicing replaced them
    weights_backup: dict[str, dict[str, torch.Tensor]] | None = None  # CPU copy of the loaded weights, for lossy casts
    run_tokenizer: Any = None  # the runs' own copy of the tokenizer (see prompt_length)


_states: weakref.WeakKeyDictionary[Any, _PipelineState] = weakref.WeakKeyDictionary()


def _state_of(pipe: Any) -> _PipelineState:
    state = _states.get(pipe)
    if state is None:
        state = _states[pipe] = _PipelineState(loaded_dtype=pipe.unet.dtype)
    return state


def _dtype_for(pipe: Any, precision: Precision) -> torch.dtype:
    return _state_of(pipe).loaded_dtype if precision is Precision.AUTO else _DTYPES[precision]


def _torch_modules(pipe: Any) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def restore_plain(pipe: Any, device: torch.device) -> None:
    """Undo any memory mode: no offload hooks, default VAE decoding, the UNet's own attention, every weight on `device`."""
    state = _state_of(pipe)
    pipe.remove_all_hooks()
    if state.attn_processors is not None:
        pipe.unet.set_attn_processor(state.attn_processors)
        state.attn_processors = None
    pipe.vae.disable_slicing()
    pipe.vae.disable_tiling()
    pipe.to(device)
    state.memory_mode = MemoryMode.NONE


def set_memory_mode(pipe: Any, mode: MemoryMode, device: torch.device) -> None:
    """Put the shared pipeline in `mode`, from whatever mode it was in. Hold the device's queue slot."""
    state = _state_of(pipe)
    if mode is state.memory_mode:
        return
    restore_plain(pipe, device)
    if mode is MemoryMode.ATTENTION_SLICING:
        state.attn_processors = dict(pipe.unet.attn_processors)
        pipe.enable_attention_slicing()
    elif mode is MemoryMode.VAE_SLICING:
        pipe.vae.enable_slicing()
    elif mode is MemoryMode.VAE_TILING:
        pipe.vae.enable_tiling()
    elif mode is MemoryMode.MODEL_OFFLOAD:
        pipe.enable_model_cpu_offload(device=device)
    elif mode is MemoryMode.SEQUENTIAL_OFFLOAD:
        pipe.enable_sequential_cpu_offload(device=device)
    state.memory_mode = mode


def set_precision(pipe: Any, precision: Precision, device: torch.device) -> None:
    """Cast the shared pipeline's weights to the run's dtype. Hold the slot, with no memory mode on.

    Widening the loaded dtype (fp16 -> fp32) and back is exact. A lossy cast (fp16 -> bf16) first keeps a CPU copy
    of the loaded weights, and going back restores them from it, so one user's bf16 run never degrades the next one's.
    """
    state = _state_of(pipe)
    target = _dtype_for(pipe, precision)
    if pipe.unet.dtype == target:
        return
    modules = _torch_modules(pipe)
    lossy = torch.finfo(target).bits < torch.finfo(state.loaded_dtype).bits or {target, state.loaded_dtype} == {torch.float16, torch.bfloat16}
    if lossy and state.weights_backup is None:
        state.weights_backup = {name: {k: v.to("cpu", copy=True) for k, v in m.state_dict().items()} for name, m in modules.items()}
    for module in modules.values():
        module.to(dtype=target)
    if target == state.loaded_dtype and state.weights_backup is not None:
        for name, module in modules.items():
            module.load_state_dict(state.weights_backup[name])
        state.weights_backup = None


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
        detail = f"step {done} of {self.steps}" + (f" · {rate:.2f} it/s · about {(self.steps - done) / rate:.0f} s left" if rate else "")
        image = None
        if done and (now - self.last_preview >= PREVIEW_EVERY_S or done == self.steps):
            image, self.last_preview = preview(), now
        self.context.report(done, self.steps, detail, image)

    def __call__(self, pipe: Any, index: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers' `callback_on_step_end`."""
        self.step(max(1, round((index + 1) * self.steps / pipe.num_timesteps)), lambda: latent_preview(tensors["latents"]))
        return tensors


def hooks_inside_models_allowed(device: torch.device, graphed: bool) -> bool:
    """Whether stop checks may go on the UNet's and VAE's inner modules: only where no CUDA graph capture or
    torch.compile trace can meet them. A hook inside a captured region would run at capture only (and a raise there
    would break the capture); the compile worker traces the shared modules in the background, whoever's run is on.
    So: always on the CPU (neither applies there); on a GPU only with compile off and this run's UNet not graphed.
    A graph replay is checked between calls, which on a GPU are milliseconds apart."""
    return device.type != "cuda" or not (compiled.is_enabled() or (graphed and cuda_graphs.is_enabled()))


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


def _place(n: int) -> str:
    return "next in line" if n == 1 else f"{n}{'nd' if n == 2 else 'rd' if n == 3 else 'th'} in line"


@contextmanager
def device_slot(device: torch.device, context: JobContext | None, reporter: StepReporter) -> Iterator[None]:
    """Wait for the device's turn (one run at a time per GPU, first come first served), saying the place in line."""
    report(context, "waiting for the device")
    try:
        with queue_for(device).slot(on_wait=lambda n: report(context, f"waiting for the GPU: {_place(n)}"), cancelled=reporter.stop_requested):
            yield
    except SlotAbandoned:
        raise JobCancelled from None


def out_of_memory_error(what: str) -> GpuOutOfMemoryError:
    """Free what an out-of-memory run held (call it outside the except block, whose traceback pins the tensors)."""
    release_memory()
    return GpuOutOfMemoryError(
        f"The GPU ran out of memory making {what}; what the run held is released.",
        remedy=memory_remedy(on_gpu=True),
    )


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

    `loras` are this run's adapters: on the shared pipeline only while the run holds the device, so no other
    session's images ever see them. Raises BadInputError before any work, JobCancelled when cancelled (partial
    results dropped), and GpuOutOfMemoryError (memory already released) when the device runs out of memory.
    """
    if model.is_remote:  # the ray backend: this function runs on a Serve replica (core/backends/ray_client.py)
        return model.obj.generate(settings, context, abandoned, source, loras)
    pipe, device = model.obj, model.device
    # 1. Check inputs
    check_inputs(settings, device, source)
    check_memory(pipe, settings, device)
    lora.check_choices(loras)
    settings = replace(settings.with_seed(), loras=tuple((choice.adapter.name, choice.weight) for choice in loras))
    source, resize_notes = prepare_source(source, settings)
    notes = [_prompt_note(pipe, settings.prompt, "prompt"), _prompt_note(pipe, settings.negative_prompt, "negative prompt"), *resize_notes]

    # 2. Wait for the device
    reporter = StepReporter(context, abandoned, settings.denoising_steps)
    with device_slot(device, context, reporter):
        return _run(model, settings, context, reporter, source, loras, tuple(n for n in notes if n))


def _prompt_note(pipe: Any, text: str, what: str) -> str:
    length = prompt_length(pipe, text)
    if not length.truncated:
        return ""
    return f"The {what} is {length.tokens} tokens long and the model reads only the first {length.limit}: it ignored “{length.ignored_text}”."


def _mode_arguments(settings: GenerationSettings, source: SourceImages | None) -> dict[str, Any]:
    if settings.mode is Mode.TEXT_TO_IMAGE:
        return {"width": settings.width, "height": settings.height}
    if settings.mode is Mode.IMAGE_TO_IMAGE:  # the image sets the size
        return {"image": source.image, "strength": settings.strength}
    return {"image": source.image, "mask_image": source.mask, "strength": settings.strength, "width": settings.width, "height": settings.height}


def run_pipeline(pipe: Any, mode: Mode, scheduler: str) -> Any:
    """A pipeline for one run of `mode` over the loaded model's own modules (nothing copied, cast or loaded twice),
    with the run's own scheduler and the runs' own tokenizer.

    Built as `from_pipe` builds it, but not with `from_pipe`: that casts the shared modules to float32 unless it is
    given a dtype, which would silently double every later run's memory. The scheduler is set after construction,
    so the constructor's legacy-config checks never rewrite it.
    """
    import diffusers

    state = _state_of(pipe)
    if state.run_tokenizer is None:
        state.run_tokenizer = copy.deepcopy(pipe.tokenizer)
    components = {**pipe.components, "tokenizer": state.run_tokenizer}
    run_pipe = getattr(diffusers, PIPELINE_CLASSES[mode])(**components, requires_safety_checker=False)
    run_pipe.scheduler = keep_timesteps_on_the_cpu(build_scheduler(pipe, scheduler))
    run_pipe.set_progress_bar_config(disable=True)
    return run_pipe


def keep_timesteps_on_the_cpu(scheduler: Any) -> Any:
    """The scheduler keeps its timesteps on the CPU whatever device the pipeline asks for.

    With GPU timesteps, each PNDM or DDIM step reads a CPU table at a GPU timestep and compares one with 0: each read
    waits for the GPU to finish the step's UNet call, so the CPU cannot queue the next step while the GPU works, and
    the GPU idles through every step's Python. The values are the same on either device, and so are the images; the
    UNet gets its timestep on the GPU from core.accel.cuda_graphs without a copy.
    """
    set_timesteps = scheduler.set_timesteps

    def on_the_cpu(*args: Any, device: Any = None, **kwargs: Any) -> Any:
        return set_timesteps(*args, **kwargs)

    scheduler.set_timesteps = on_the_cpu
    return scheduler


def _run(
    model: LoadedModel, settings: GenerationSettings, context: JobContext | None, reporter: StepReporter,
    source: SourceImages | None, loras: tuple[LoraChoice, ...], notes: tuple[str, ...],
) -> GenerationResult:
    pipe, device = model.obj, model.device
    out_of_memory = False
    try:
        # 3. Put the shared pipeline in this run's precision, adapters and memory mode (casts and adapters need the plain state)
        report(context, "preparing the model")
        if pipe.unet.dtype != _dtype_for(pipe, settings.precision):
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

        # 5. Denoise and decode
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        reporter.started = time.perf_counter()
        # LoRA layers change the UNet's modules for this run only: a graph of them would be captured for nothing.
        fast = not loras and settings.memory_mode in _GRAPHABLE_MODES
        with (
            cuda_graphs.graphed_unet(pipe.unet, allowed=fast) as unet_calls,
            cuda_graphs.graphed_text_encoder(pipe.text_encoder, allowed=fast),
            cuda_graphs.compiled_vae_decode(pipe.vae, allowed=fast),
            stops_within_model_calls(reporter, pipe.unet, pipe.vae, inside=hooks_inside_models_allowed(device, graphed=fast)),
        ):
            output = run_pipe(
                prompt=settings.prompt, negative_prompt=settings.negative_prompt or None,
                num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale, num_images_per_prompt=settings.num_images,
                generator=generators, callback_on_step_end=reporter, **_mode_arguments(settings, source),
            )
        seconds = time.perf_counter() - reporter.started
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    except torch.OutOfMemoryError:
        out_of_memory = True
    finally:
        pipe.maybe_free_model_hooks()  # with model offload: every model back on the CPU, as diffusers does after a call
        if loras:  # the shared pipeline leaves this run exactly as it came: base weights, no adapter
            restore_plain(pipe, device)
            lora.remove(pipe)
    if out_of_memory:
        # 6. Out of memory: free what the run held
        raise out_of_memory_error(f"{settings.num_images} image(s) of {settings.width}x{settings.height}")

    # 7. Results, with a note for each image the safety checker blacked out
    flags = output.nsfw_content_detected or [False] * len(output.images)
    images = tuple(GeneratedImage(image, seed, bool(flag)) for image, seed, flag in zip(output.images, seeds, flags, strict=True))
    blacked = [str(i + 1) for i, image in enumerate(images) if image.blacked_out]
    if blacked:
        notes += (f"The model's safety checker judged image {', '.join(blacked)} not safe for work and blacked it out; try another seed or prompt.",)
    return GenerationResult(
        images=images, settings=settings, model_name=model.spec.repo_id, model_title=model.spec.title, is_standin=model.is_standin,
        device=str(device), dtype=str(pipe.unet.dtype).removeprefix("torch."), seconds=seconds,
        steps_per_s=settings.denoising_steps / seconds if seconds > 0 else 0.0, peak_memory_bytes=peak, notes=notes,
        unet_path=unet_calls.path,
    )
