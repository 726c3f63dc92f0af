"""Turning uploaded bytes into an upright RGB image, or one clear BadInputError naming the file."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import BadInputError

# 40 megapixels covers any camera photo; decompression bombs claim far more than that in a few KiB.
MAX_PIXELS = 40_000_000
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class DecodedImage:
    name: str
    image: Image.Image  # RGB, EXIF orientation applied
    notes: tuple[str, ...]  # what was done to it, for the page to say ("first frame of 12", "EXIF rotation")


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    if not data:
        raise BadInputError(f"{name} is empty (0 bytes).", remedy="Choose a non-empty image file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadInputError(
            f"{name} claims more pixels than this app decodes (limit {max_pixels:,}): {exc}",
            remedy="Downscale the image before uploading it.",
        ) from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise BadInputError(f"{name} is not an image this app can read ({type(exc).__name__}).", remedy="Upload a JPEG, PNG, GIF, BMP or WebP file.") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise BadInputError(
            f"{name} is {width}×{height} = {width * height:,} pixels, over the limit of {max_pixels:,}.",
            remedy="Downscale the image before uploading it.",
        )
    notes: list[str] = []
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        image.seek(0)
        notes.append(f"first frame of {frames}")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInputError(f"{name} is truncated or damaged ({exc}).", remedy="Re-export or re-download the file.") from exc
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
        notes.append("turned upright from its EXIF orientation")
    return DecodedImage(name, to_rgb(image, notes), tuple(notes))


def to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    """RGB for the models: 16-bit scaled (not clipped), transparency over white, CMYK/palette/grey converted."""
    if image.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        notes.append("16-bit greyscale scaled to 8 bits")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(float(array.max() - array.min()), 1e-12)
        image = Image.fromarray(((array - array.min()) / span * 255.0).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        background = Image.new("RGB", image.size, "white")
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        notes.append("transparency drawn over white")
        return background
    if image.mode == "CMYK":
        notes.append("converted from CMYK")
    return image.convert("RGB")
