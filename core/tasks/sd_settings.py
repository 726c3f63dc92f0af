"""Stable Diffusion runs described and checked before any work: the settings, their limits, the result types, the
prompts' syntax, token counts and LoRA tags, and memory estimates. Plain Python without torch, so pnginfo, sweeps and pages import it cheaply.
"""
from __future__ import annotations

import importlib.util
import math
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from PIL import Image

from core.checks import check_number
from core.config import Settings
from core.errors import BadInputError
from core.models.info import ModelInfo
from core.models.registry import ModelSpec, spec_for_choice
from core.tasks import prompt_syntax
from core.tasks.prompt_syntax import LoraTag, PromptUsage, parse_prompt

if TYPE_CHECKING:
    from core.tasks.lora import LoraChoice

SD_MODEL_KEYS = ("sd15", "sd14", "mr-potato-head")

# Limits, as AUTOMATIC1111 has them: beyond these a run is refused with a message, never clamped.
MIN_SIDE_PX, MAX_SIDE_PX = 64, 2048
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_IMAGES = 8
MAX_SEED = 2**53 - 1  # the largest whole number a browser's number input holds exactly
MIN_STRENGTH = 0.01  # image to image at 1 % already keeps the input; below, no step of a 100-step run is left
MAX_HIRES_SCALE = 2.0  # A1111's slider goes to 4, but SD 1.x at 1024 px already needs a GPU and shows repeated subjects


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



PRECISION_DTYPES = {Precision.FP16: "float16", Precision.BF16: "bfloat16", Precision.FP32: "float32"}  # torch dtype names
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


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
GRAPHABLE_MODES = (MemoryMode.NONE, MemoryMode.VAE_SLICING, MemoryMode.VAE_TILING)


class HiresUpscaler(StrEnum):
    LATENT = "latent"  # interpolate the first pass's latents, then denoise them again at the larger size
    IMAGE = "image"  # decode the first pass, upscale the picture (Lanczos), then image to image at the larger size


# The upscaler names AUTOMATIC1111 writes in PNG metadata for ours.
HIRES_UPSCALER_A1111_NAMES = {HiresUpscaler.LATENT: "Latent", HiresUpscaler.IMAGE: "Lanczos"}


class Mode(StrEnum):
    TEXT_TO_IMAGE = "text to image"
    IMAGE_TO_IMAGE = "image to image"  # start from a noised input image; `strength` says how much noise
    INPAINT = "inpaint"  # repaint only where the mask is white


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
    # Variation (text to image): the starting noise is slerp(noise(seed), noise(variation_seed), variation_strength),
    # as AUTOMATIC1111's subseed: 0 is the seed's image, 1 the variation seed's, between them a blend of the two.
    variation_seed: int | None = None  # None with a strength above 0: drawn when the run starts, like the seed
    variation_strength: float = 0.0  # 0: off
    # Hires fix (text to image): a second pass at hires_scale times the size, denoising the upscaled first pass again.
    hires_scale: float = 1.0  # 1: off
    hires_steps: int = 0  # the second pass's steps before strength (as A1111's "Hires steps"); 0: the same as `steps`
    hires_strength: float = 0.7  # how much of the upscaled image is repainted (A1111's default denoising strength)
    hires_upscaler: HiresUpscaler = HiresUpscaler.LATENT

    @property
    def denoising_steps(self) -> int:
        """The steps that really run in the first pass: from an input image diffusers skips the first (1 - strength) of them."""
        if self.mode is Mode.TEXT_TO_IMAGE:
            return self.steps
        return min(int(self.steps * self.strength), self.steps)

    @property
    def varied(self) -> bool:
        return self.variation_strength > 0

    @property
    def hires(self) -> bool:
        return self.hires_scale > 1

    @property
    def output_size(self) -> tuple[int, int]:
        """The images' size: with the hires fix, the size times the scale, down to a multiple of 8 (the latents' grid)."""
        if not self.hires:
            return self.width, self.height
        return int(self.width * self.hires_scale) // 8 * 8, int(self.height * self.hires_scale) // 8 * 8

    @property
    def hires_denoising_steps(self) -> int:
        """The steps the hires pass runs: image to image of `hires_steps` (or `steps`) at `hires_strength`."""
        if not self.hires:
            return 0
        return min(int((self.hires_steps or self.steps) * self.hires_strength), self.hires_steps or self.steps)

    @property
    def total_denoising_steps(self) -> int:
        return self.denoising_steps + self.hires_denoising_steps

    def seeds(self) -> tuple[int, ...]:
        return seeds_from(self.seed, self.num_images)

    def variation_seeds(self) -> tuple[int, ...]:
        """Image i's variation seed is variation_seed + i, as its seed is seed + i (AUTOMATIC1111's subseeds)."""
        return seeds_from(self.variation_seed, self.num_images)

    def with_seed(self) -> GenerationSettings:
        """These settings with the seed, and a used variation's seed, drawn where they were left random."""
        settings = self if self.seed is not None else replace(self, seed=random_seed())
        if settings.varied and settings.variation_seed is None:
            settings = replace(settings, variation_seed=random_seed())
        return settings


# On a CPU, SD 1.x's own 512x512 in 25 steps takes minutes, even with the stand-in model (83 s a step on this
# project's 2-core CI machine): the form starts smaller there, so that pressing Generate finishes in under a minute.
CPU_DEFAULTS = GenerationSettings(width=256, height=256, steps=10)


def defaults_for(device_type: str) -> GenerationSettings:
    return CPU_DEFAULTS if device_type == "cpu" else GenerationSettings()


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


def precisions_for(device_type: str) -> tuple[Precision, ...]:
    # CPUs lack fast half-precision kernels for these models: fp32 only.
    return tuple(Precision) if device_type == "cuda" else (Precision.AUTO, Precision.FP32)


def memory_modes_for(device_type: str) -> tuple[MemoryMode, ...]:
    return tuple(MemoryMode) if device_type == "cuda" else tuple(m for m in MemoryMode if m not in _GPU_ONLY_MODES)


def check_inputs(settings: GenerationSettings, device_type: str, source: SourceImages | None = None) -> None:
    """Refuse bad settings before any work, naming the argument and its value (an empty prompt is fine).

    The prompts are read as AUTOMATIC1111 reads them (docs/PROMPTS.md): a weight that is no number is refused with
    the text that holds it. Image to image needs `source.image`; inpaint needs its `mask` too, the size of the image.
    """
    s = settings
    check_prompt_syntax(s.prompt, s.negative_prompt)
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
    if s.precision not in precisions_for(device_type):
        raise BadInputError(f"`precision` {s.precision} needs a GPU; on the {device_type.upper()} this model runs in fp32.")
    if s.memory_mode not in memory_modes_for(device_type):
        raise BadInputError(f"`memory_mode` '{s.memory_mode}' moves weights between the CPU and a GPU, and this model runs on the {device_type.upper()}.")
    if s.mode is not Mode.TEXT_TO_IMAGE:
        check_number("strength", s.strength, MIN_STRENGTH, 1)
        if s.denoising_steps < 1:
            raise BadInputError(
                f"`strength` {s.strength:g} of {s.steps} steps leaves no step to run.", remedy=f"Use at least {math.ceil(1 / s.strength)} steps or a higher strength."
            )
        if source is None:
            raise BadInputError(f"{s.mode.capitalize()} needs an input image.", remedy="Upload an image or pick one from the gallery.")
    _check_variation_and_hires(s)
    if s.mode is Mode.INPAINT:
        if source.mask is None:
            raise BadInputError("Inpaint needs a mask: white where the picture is repainted.", remedy="Draw a mask on the image or upload one.")
        if source.mask.size != source.image.size:
            raise BadInputError(
                f"The mask is {source.mask.width}x{source.mask.height} pixels but the image is {source.image.width}x{source.image.height}.",
                remedy="Upload a mask of the image's size, or draw one.",
            )


def _check_variation_and_hires(s: GenerationSettings) -> None:
    check_number("variation_strength", s.variation_strength, 0, 1)
    if s.variation_seed is not None:
        check_number("variation_seed", s.variation_seed, 0, MAX_SEED, whole=True)
    check_number("hires_scale", s.hires_scale, 1, MAX_HIRES_SCALE)
    check_number("hires_steps", s.hires_steps, 0, MAX_STEPS, whole=True)
    check_number("hires_strength", s.hires_strength, MIN_STRENGTH, 1)
    if s.hires_upscaler not in tuple(HiresUpscaler):
        raise BadInputError(f"`hires_upscaler` {s.hires_upscaler!r} is not one of {', '.join(HiresUpscaler)}.")
    for name, used in (("variation_strength", s.varied), ("hires_scale", s.hires)):
        if used and s.mode is not Mode.TEXT_TO_IMAGE:
            raise BadInputError(f"`{name}` {getattr(s, name):g} applies to text to image only, and this run is {s.mode}.",
                                remedy=f"Set `{name}` to {0 if name == 'variation_strength' else 1} (off), or switch to text to image.")
    if not s.hires:
        return
    width, height = s.output_size
    if max(width, height) > MAX_SIDE_PX:
        raise BadInputError(f"`hires_scale` {s.hires_scale:g} makes {s.width}x{s.height} into {width}x{height}, more than {MAX_SIDE_PX} pixels a side.",
                            remedy=f"Use a scale of at most {MAX_SIDE_PX / max(s.width, s.height):.2f}, or a smaller size.")
    if s.hires_denoising_steps < 1:
        raise BadInputError(f"`hires_strength` {s.hires_strength:g} of {s.hires_steps or s.steps} hires steps leaves no step to run.",
                            remedy=f"Use at least {math.ceil(1 / s.hires_strength)} hires steps or a higher hires strength.")


def check_prompt_syntax(prompt: str, negative_prompt: str) -> None:
    """BadInputError, saying which prompt, for a weight or LoRA tag that is no number or a prompt over the length limit."""
    for what, text, read_tags in (("prompt", prompt, True), ("negative prompt", negative_prompt, False)):
        try:
            parse_prompt(text, read_tags)
        except BadInputError as error:
            raise BadInputError(f"In the {what}: {error}", remedy=error.remedy) from None


# A fast tokenizer keeps its padding and truncation settings on the object and sets them on every call: counting a
# prompt with the tokenizer a run is encoding with (padded to 77) would hand that run unpadded ids. So runs encode
# with a private copy per pipeline (one run at a time per pipeline, by the queue), and the page's counting uses the
# loaded tokenizer, one caller at a time.
counting_lock = threading.Lock()


def prompt_usage(info: ModelInfo, prompt: str) -> PromptUsage:
    """How many tokens `prompt` is and in how many 75-token chunks the model reads it (all of it: see docs/PROMPTS.md).
    BadInputError for bad syntax or a prompt over the chunk limit."""
    with counting_lock:
        return prompt_syntax.prompt_usage(info.tokenizer, prompt)


def with_lora_tags(prompt: str, choices: Sequence[LoraChoice]) -> tuple[LoraChoice, ...]:
    """The session's adapters with the weights the prompt's `<lora:name:weight>` tags give them (the last tag of a
    name wins); untagged adapters keep their own weight. BadInputError for a tag naming no adapter of the session,
    with the names it has."""
    by_name = {choice.adapter.name: choice for choice in choices}
    tags: dict[str, LoraTag] = {tag.name: tag for tag in parse_prompt(prompt).loras}
    unknown = [name for name in tags if name not in by_name]
    if unknown:
        have = ", ".join(f"`{name}`" for name in by_name) if by_name else "none"
        raise BadInputError(
            f"The prompt's tag asks for the LoRA `{unknown[0]}`, but this session has no adapter of that name; its adapters: {have}.",
            remedy="Add the adapter under “LoRA adapters”, or change the tag's name to one of yours.",
        )
    return tuple(replace(choice, weight=tags[name].weight) if name in tags else choice for name, choice in by_name.items())


def estimate_memory(info: ModelInfo, settings: GenerationSettings) -> MemoryEstimate:
    """A rough device-memory figure for a run, shown before it starts (the GPU tests record the real peaks)."""
    loaded = {component.name: component for component in info.components}
    dtype_bytes = DTYPE_BYTES[loaded["unet"].dtype_name if settings.precision is Precision.AUTO else PRECISION_DTYPES[settings.precision]]
    # Weights are counted in the dtype they are loaded in, then as they will be in the run's precision.
    scale = dtype_bytes / DTYPE_BYTES[loaded["unet"].dtype_name]
    sizes = {name: component.size_bytes * scale for name, component in loaded.items()}
    weights = sum(sizes.values())
    if settings.memory_mode is MemoryMode.MODEL_OFFLOAD:
        weights = max(sizes.values())
    elif settings.memory_mode is MemoryMode.SEQUENTIAL_OFFLOAD:
        weights = 0.02 * weights  # one layer at a time
    width, height = settings.output_size  # the hires pass's size, the larger one, when it is on
    pixels = width * height
    decoded_images = 1 if settings.memory_mode in (MemoryMode.VAE_SLICING, MemoryMode.SEQUENTIAL_OFFLOAD) else settings.num_images
    if settings.memory_mode is MemoryMode.VAE_TILING:
        pixels = min(pixels, 512 * 512)
    # The VAE decoder holds about a dozen 128-channel full-size feature maps; the UNet's peak (CFG doubles the
    # batch) at 1/8 size is smaller. Calibrated against SD 1.5 at 512x512 (about 1 GB of activations in fp16).
    vae_bytes = decoded_images * pixels * 128 * 12 * dtype_bytes
    unet_bytes = 2 * settings.num_images * (width * height // 64) * 1280 * 8 * dtype_bytes
    if settings.memory_mode is MemoryMode.ATTENTION_SLICING:
        unet_bytes //= 2
    return MemoryEstimate(int(weights), int(vae_bytes + unet_bytes))


def memory_remedy(on_gpu: bool) -> str:
    offload = ", model CPU offload for the least memory" if on_gpu else ""
    return f"Try a smaller size, fewer images per run, or a memory mode (VAE slicing for batches, VAE tiling for large images{offload})."
