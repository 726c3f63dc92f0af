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
from dataclasses import dataclass

from PIL import Image, PngImagePlugin

from core.errors import BadInputError
from core.generation import SCHEDULERS, GenerationSettings, MemoryMode, Mode, Precision

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
SOFTWARE = "model-dashboard"
# One "Key: value" pair of the last line; a value with a comma or a quote is written as a JSON string.
_PAIR = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


@dataclass(frozen=True)
class ParsedParameters:
    settings: GenerationSettings
    model: str | None  # the repo id or folder written as "Model", if any


def _sampler_name(scheduler: str) -> str:
    return SCHEDULERS[scheduler].a1111_name or scheduler


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if re.search(r'[,:"\n]', value) else value


def parameters_text(settings: GenerationSettings, model: str) -> str:
    """The `parameters` text for one image: `settings.seed` must be that image's seed."""
    pairs = {
        "Steps": settings.steps,
        "Sampler": _sampler_name(settings.scheduler),
        "CFG scale": f"{settings.guidance_scale:g}",
        "Seed": settings.seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model": model,
        "Precision": settings.precision.value,
    }
    if settings.memory_mode is not MemoryMode.NONE:  # VAE tiling changes pixels a little: worth knowing
        pairs["Memory mode"] = settings.memory_mode.value
    if settings.mode is not Mode.TEXT_TO_IMAGE:
        pairs["Mode"] = settings.mode.value
        pairs["Denoising strength"] = f"{settings.strength:g}"  # AUTOMATIC1111's name for img2img strength
    if settings.loras:  # adapters are the session's files: recorded by name, never re-loaded from here
        pairs["LoRA"] = ", ".join(f"{name}:{weight:g}" for name, weight in settings.loras)
    pairs["Version"] = SOFTWARE
    lines = [settings.prompt]
    if settings.negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {settings.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in pairs.items()))
    return "\n".join(lines)


def png_bytes(image: Image.Image, settings: GenerationSettings, model: str) -> bytes:
    return png_with_parameters(image, parameters_text(settings, model))


def unconditional_parameters_text(steps: int, seed: int, model: str) -> str:
    """The `parameters` text of an image from an unconditional (DDPM) model: no prompt, no sampler choice."""
    return ", ".join(f"{key}: {_quote(str(value))}" for key, value in {"Steps": steps, "Seed": seed, "Model": model, "Version": SOFTWARE}.items())


def png_with_parameters(image: Image.Image, text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_parameters(data: bytes, name: str = "the file") -> str:
    """The `parameters` text of a PNG; BadInputError when it is not a PNG or carries none."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise BadInputError(f"{name} is a {image.format} image, not a PNG: only PNGs carry generation settings.", remedy="Drop a PNG made by this app or by AUTOMATIC1111.")
            if PARAMETERS_KEY not in image.info:
                image.load()  # text written after the image data is read only with it (ours and AUTOMATIC1111's come before)
            text = image.info.get(PARAMETERS_KEY)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise BadInputError(f"{name} is not a readable image ({type(error).__name__}).", remedy="Drop a PNG made by this app or by AUTOMATIC1111.") from None
    if not text:
        raise BadInputError(f"{name} carries no generation settings (no `parameters` text in the PNG).", remedy="Drop a PNG made by this app or by AUTOMATIC1111.")
    return text


def parse_parameters(text: str) -> ParsedParameters:
    """Settings from a `parameters` text; what it does not say keeps the default. Unknown keys are ignored."""
    lines = text.strip().split("\n")
    pairs: dict[str, str] = {}
    if len(_PAIR.findall(lines[-1])) >= 3:  # A1111's rule: a last line with fewer pairs is part of the prompt
        for key, value in _PAIR.findall(lines.pop()):
            pairs[key] = json.loads(value) if value.startswith('"') else value.strip()
    prompt_lines, negative_lines = [], []
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX) or negative_lines:
            negative_lines.append(line.removeprefix(NEGATIVE_PREFIX).strip() if not negative_lines else line)
        else:
            prompt_lines.append(line)
    defaults = GenerationSettings()
    try:
        width, height = (int(side) for side in pairs["Size"].split("x")) if "Size" in pairs else (defaults.width, defaults.height)
        settings = GenerationSettings(
            prompt="\n".join(prompt_lines),
            negative_prompt="\n".join(negative_lines),
            steps=int(pairs.get("Steps", defaults.steps)),
            guidance_scale=float(pairs.get("CFG scale", defaults.guidance_scale)),
            width=width,
            height=height,
            seed=int(pairs["Seed"]) if "Seed" in pairs else None,
            scheduler=_scheduler_from_sampler(pairs.get("Sampler", defaults.scheduler)),
            precision=Precision(pairs.get("Precision", defaults.precision.value)),
            memory_mode=MemoryMode(pairs.get("Memory mode", defaults.memory_mode.value)),
            mode=Mode(pairs.get("Mode", defaults.mode.value)),
            strength=float(pairs.get("Denoising strength", defaults.strength)),
        )
    except ValueError as error:
        raise BadInputError(f"The PNG's settings could not be read: {error}.", remedy="Fill the form by hand.") from None
    return ParsedParameters(settings, pairs.get("Model"))


def _scheduler_from_sampler(sampler: str) -> str:
    for name, choice in SCHEDULERS.items():
        if sampler in (name, choice.a1111_name):
            return name
    raise ValueError(f"sampler {sampler!r} is not one this app offers ({', '.join(SCHEDULERS)})")
