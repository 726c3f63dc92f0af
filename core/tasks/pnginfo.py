"""Generation settings in a PNG `parameters` text chunk, in the layout AUTOMATIC1111 writes (and other tools read).

    a prompt, on one or more lines
    Negative prompt: what to avoid
    Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: owner/name, ...

Only the settings go in: never a token, a user name or a server path other than the model folder the user chose.
"""
from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TypeVar

from PIL import Image, PngImagePlugin

from core.errors import BadInputError
from core.tasks import sd_settings
from core.tasks.images import MAX_PIXELS
from core.tasks.sd_settings import (
    HIRES_UPSCALER_A1111_NAMES,
    SCHEDULERS,
    GenerationSettings,
    HiresUpscaler,
    MemoryMode,
    Mode,
    Precision,
    SourceImages,
)

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
SOFTWARE = "model-dashboard"
# Written into the settings of an image a stand-in model (random weights) made, so the file itself says it is noise.
STANDIN_KEY, STANDIN_VALUE = "Stand-in", "random weights"
# Far more than any prompt and settings line (AUTOMATIC1111's run to a few thousand characters); a PNG's text chunk
# may hold 64 MiB, which the form, the tokenizer and the browser should never see.
MAX_TEXT_CHARS = 64 * 1024
# The last line's "Key: value" pairs, as AUTOMATIC1111 reads them: a key is a run of these characters starting with a
# letter or digit, right before a colon; a value with a comma or a quote is written as a JSON string.
_KEY_RUN = re.compile(r"[\w \-/+]+")
_VALUE = re.compile(r'\s*("(?:\\.|[^\\"])*"(?=,|$)|[^,]*)(?:,|$)')
_REMEDY = "Drop a PNG made by this app or by AUTOMATIC1111."
Value = TypeVar("Value")


@dataclass(frozen=True)
class ParsedParameters:
    settings: GenerationSettings
    model: str | None  # the repo id or folder written as "Model", if any


def _sampler_name(scheduler: str) -> str:
    return SCHEDULERS[scheduler].a1111_name or scheduler


def _quote(value: str) -> str:
    """A JSON string when the value would not read back as written: a comma, colon, quote, line break or outer spaces."""
    return json.dumps(value, ensure_ascii=False) if re.search(r'[,:"\n]', value) or value != value.strip() else value


def _number(value: float) -> str:
    """The shortest text that reads back as exactly this number ("7.5", "7", "0.30000000000000004"), as `:g` does not."""
    return repr(float(value)).removesuffix(".0")


def parameters_text(settings: GenerationSettings, model: str, *, is_standin: bool) -> str:
    """The `parameters` text for one image: `settings.seed` must be that image's seed; `is_standin` when a stand-in
    model (random weights) made it."""
    pairs = {
        "Steps": settings.steps,
        "Sampler": _sampler_name(settings.scheduler),
        "CFG scale": _number(settings.guidance_scale),
        "Seed": settings.seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model": model,
        "Precision": settings.precision.value,
    }
    if settings.memory_mode is not MemoryMode.NONE:  # VAE tiling changes pixels a little: worth knowing
        pairs["Memory mode"] = settings.memory_mode.value
    if settings.mode is not Mode.TEXT_TO_IMAGE:
        pairs["Mode"] = settings.mode.value
        pairs["Denoising strength"] = _number(settings.strength)  # AUTOMATIC1111's name for img2img strength
    if settings.varied:
        pairs["Variation seed"] = settings.variation_seed
        pairs["Variation seed strength"] = _number(settings.variation_strength)
    if settings.hires:  # A1111's keys; its "Denoising strength" of a text-to-image run is the hires pass's
        pairs["Denoising strength"] = _number(settings.hires_strength)
        pairs["Hires upscale"] = _number(settings.hires_scale)
        if settings.hires_steps:
            pairs["Hires steps"] = settings.hires_steps
        pairs["Hires upscaler"] = HIRES_UPSCALER_A1111_NAMES[settings.hires_upscaler]
    if settings.loras:  # adapters are the session's files: recorded by name, never re-loaded from here
        pairs["LoRA"] = ", ".join(f"{name}:{_number(weight)}" for name, weight in settings.loras)
    pairs |= _standin_pair(is_standin) | {"Version": SOFTWARE}
    lines = [settings.prompt]
    if settings.negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {settings.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in pairs.items()))
    return "\n".join(lines)


def png_bytes(image: Image.Image, settings: GenerationSettings, model: str, *, is_standin: bool) -> bytes:
    return png_with_parameters(image, parameters_text(settings, model, is_standin=is_standin))


def unconditional_parameters_text(steps: int, seed: int, model: str, *, is_standin: bool) -> str:
    """The `parameters` text of an image from an unconditional (DDPM) model: no prompt, no sampler choice."""
    pairs = {"Steps": steps, "Seed": seed, "Model": model} | _standin_pair(is_standin) | {"Version": SOFTWARE}
    return ", ".join(f"{key}: {_quote(str(value))}" for key, value in pairs.items())


def _standin_pair(is_standin: bool) -> dict[str, str]:
    return {STANDIN_KEY: STANDIN_VALUE} if is_standin else {}


def png_with_parameters(image: Image.Image, text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_parameters(data: bytes, name: str = "the file", max_pixels: int = MAX_PIXELS) -> str:
    """The `parameters` text of a PNG; BadInputError when it is not a PNG, carries none or cannot be read.

    Text before the image data (ours and AUTOMATIC1111's) needs no decoding. Text after it is read by decoding the
    pixels, so only in an image within `max_pixels` (the limit of core.tasks.images), and in an animated PNG only up to its
    second frame: text after the last frame would need every frame decoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise BadInputError(f"{name} is a {image.format} image, not a PNG: only PNGs carry generation settings.", remedy=_REMEDY)
            if PARAMETERS_KEY not in image.info:
                width, height = image.size
                if width * height > max_pixels:
                    raise BadInputError(
                        f"{name} is {width}×{height} = {width * height:,} pixels, over the limit of {max_pixels:,}, and carries no "
                        "generation settings before its image data.", remedy=_REMEDY,
                    )
                image.load()
            text = image.info.get(PARAMETERS_KEY)
    except BadInputError:
        raise
    except Image.DecompressionBombError as error:
        raise BadInputError(f"{name} claims more pixels than this app decodes: {error}", remedy=_REMEDY) from None
    except Exception:  # as in core.tasks.images: each PIL plugin raises its own types on malformed bytes
        raise BadInputError(f"{name} is not a readable image: its bytes are damaged, cut short or of another format.", remedy=_REMEDY) from None
    if not text:
        raise BadInputError(f"{name} carries no generation settings (no `parameters` text in the PNG).", remedy=_REMEDY)
    return text


def parse_parameters(text: str) -> ParsedParameters:
    """Settings from a `parameters` text; what it does not say keeps the default. Unknown keys are ignored.

    BadInputError for a text longer than MAX_TEXT_CHARS, a value that is not a number or choice this app knows, or
    settings that no run accepts (core.tasks.sd_settings.check_inputs); the precision and memory mode, which depend on the
    machine, are checked when the run starts.
    """
    if len(text) > MAX_TEXT_CHARS:
        raise BadInputError(f"The PNG's settings text is {len(text):,} characters long, more than this app reads ({MAX_TEXT_CHARS:,}).", remedy="Fill the form by hand.")
    lines = text.strip().split("\n")
    pairs: dict[str, str] = {}
    if len(_pairs(lines[-1])) >= 3:  # A1111's rule: a last line with fewer pairs is part of the prompt
        pairs = dict(_pairs(lines.pop()))
    prompt_lines, negative_lines = [], []
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX) or negative_lines:
            negative_lines.append(line.removeprefix(NEGATIVE_PREFIX).strip() if not negative_lines else line)
        else:
            prompt_lines.append(line)
    defaults = GenerationSettings()
    try:
        mode = _read(pairs, "Mode", Mode, defaults.mode, _one_of(Mode))
        hires_scale = _read(pairs, "Hires upscale", float, defaults.hires_scale, "a number")
        width, height = _read(pairs, "Size", _size, (defaults.width, defaults.height), f"WIDTHxHEIGHT in {_WHOLE}s")
        settings = GenerationSettings(
            prompt="\n".join(prompt_lines),
            negative_prompt="\n".join(negative_lines),
            steps=_read(pairs, "Steps", _whole, defaults.steps, _WHOLE),
            guidance_scale=_read(pairs, "CFG scale", float, defaults.guidance_scale, "a number"),
            width=width,
            height=height,
            seed=_read(pairs, "Seed", _whole, None, _WHOLE),
            scheduler=_scheduler_from_sampler(pairs.get("Sampler", defaults.scheduler)),
            precision=_read(pairs, "Precision", Precision, defaults.precision, _one_of(Precision)),
            memory_mode=_read(pairs, "Memory mode", MemoryMode, defaults.memory_mode, _one_of(MemoryMode)),
            mode=mode,
            # In a text-to-image PNG (A1111's too) "Denoising strength" is the hires pass's; it means nothing without one.
            strength=defaults.strength if mode is Mode.TEXT_TO_IMAGE else _read(pairs, "Denoising strength", float, defaults.strength, "a number"),
            variation_seed=_read(pairs, "Variation seed", _whole, None, _WHOLE),
            variation_strength=_read(pairs, "Variation seed strength", float, 0.0, "a number") if "Variation seed" in pairs else 0.0,
            hires_scale=hires_scale,
            hires_steps=_read(pairs, "Hires steps", _whole, defaults.hires_steps, _WHOLE),
            hires_strength=_read(pairs, "Denoising strength", float, defaults.hires_strength, "a number") if hires_scale > 1 and mode is Mode.TEXT_TO_IMAGE else defaults.hires_strength,
            hires_upscaler=_read(pairs, "Hires upscaler", _hires_upscaler, defaults.hires_upscaler, "one of: " + ", ".join(HIRES_UPSCALER_A1111_NAMES.values())),
        )
        # Refuse what no run accepts, by the run's own rule, so the form never gets (and silently clamps) a value past
        # its limits; the precision and memory mode depend on the machine and are checked when the run starts.
        sd_settings.check_inputs(replace(settings, precision=Precision.AUTO, memory_mode=MemoryMode.NONE), "cpu", _ANY_SOURCE)
    except (ValueError, BadInputError) as error:
        raise BadInputError(f"The PNG's settings could not be read: {str(error).rstrip('.')}.", remedy="Fill the form by hand.") from None
    return ParsedParameters(settings, pairs.get("Model"))


def _pairs(line: str) -> list[tuple[str, str]]:
    """The line's (key, value) pairs, as AUTOMATIC1111's kind of regular expression finds them (tests/test_fuzz.py
    compares), in one pass: such an expression retries its key at every character of a long run without a colon,
    which takes minutes on a hostile line."""
    found, position = [], 0
    while run := _KEY_RUN.search(line, position):
        key = run.group().lstrip(" -/+")  # a key starts with a letter or a digit
        if not key or not line.startswith(":", run.end()):
            position = run.end()
            continue
        value = _VALUE.match(line, run.end() + 1)
        found.append((key, _unquote(value.group(1))))
        position = value.end()
    return found


def _unquote(value: str) -> str:
    """A JSON string's text; as AUTOMATIC1111 does, a value that is not valid JSON (or not text) is kept as written."""
    if not value.startswith('"'):
        return value.strip()
    try:
        text = json.loads(value)
        text.encode("utf-8")  # a lone surrogate ("\ud800") is no text a page can show
    except (ValueError, UnicodeEncodeError):
        return value.strip()
    return text


# The run's own check needs an input image for image to image and inpaint, which a PNG's settings do not carry.
_ANY_SOURCE = SourceImages(Image.new("RGB", (8, 8)), Image.new("L", (8, 8)))
# No setting takes a whole number longer than the largest seed; a longer one is refused before it costs time (Python
# reads 4,300 digits) or overflows the float that check_inputs formats it as.
_MAX_DIGITS = len(str(sd_settings.MAX_SEED))
_WHOLE = f"a whole number of at most {_MAX_DIGITS} digits"


def _read(pairs: dict[str, str], key: str, read: Callable[[str], Value], default: Value, expected: str) -> Value:
    """`read(pairs[key])`, or `default` when the text does not say; a ValueError names the key and its value."""
    if key not in pairs:
        return default
    try:
        return read(pairs[key])
    except ValueError:
        raise ValueError(f"`{key}` {_shown(pairs[key])} is not {expected}") from None


def _whole(text: str) -> int:
    """int(text), for at most _MAX_DIGITS digits."""
    if len(text.strip().lstrip("+-")) > _MAX_DIGITS:
        raise ValueError(text)
    return int(text)


def _size(text: str) -> tuple[int, int]:
    width, height = (_whole(side) for side in text.split("x"))
    return width, height


def _one_of(choices: type[StrEnum]) -> str:
    return "one of: " + ", ".join(choice.value for choice in choices)


def _shown(value: str) -> str:
    """A value for a message: quoted, and cut short if a hostile file made it long."""
    return repr(value if len(value) <= 60 else value[:60] + "…")


def _hires_upscaler(name: str) -> HiresUpscaler:
    """Ours from A1111's upscaler name: its latent upscalers ("Latent", "Latent (bicubic)") all interpolate latents;
    of its image upscalers this app has Lanczos only."""
    if name.startswith("Latent"):
        return HiresUpscaler.LATENT
    if name == HIRES_UPSCALER_A1111_NAMES[HiresUpscaler.IMAGE]:
        return HiresUpscaler.IMAGE
    raise ValueError(name)


def _scheduler_from_sampler(sampler: str) -> str:
    for name, choice in SCHEDULERS.items():
        if sampler in (name, choice.a1111_name):
            return name
    raise ValueError(f"sampler {_shown(sampler)} is not one this app offers ({', '.join(SCHEDULERS)})")
