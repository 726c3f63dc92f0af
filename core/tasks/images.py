"""Turning uploaded bytes into an upright RGB image, or one clear BadInputError naming the file."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from core.errors import BadInputError

# 40 megapixels covers any camera photo; decompression bombs claim far more than that in a few KiB.
MAX_PIXELS = 40_000_000
EXIF_ORIENTATION = 0x0112
_TOO_BIG_REMEDY = "Downscale the image before uploading it."


@dataclass(frozen=True)
class DecodedImage:
    name: str
    image: Image.Image  # RGB, EXIF orientation applied
    notes: tuple[str, ...]  # what was done to it, for the page to say ("first frame of 12", "EXIF rotation")

    @property
    def caption(self) -> str:
        """The file name, and what decoding did to it, if anything."""
        return self.name + (f" ({', '.join(self.notes)})" if self.notes else "")


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """The first frame of `data` as upright RGB; BadInputError for empty, unreadable, damaged or oversized files.

    The pixel count is checked from the header, before a single pixel is decoded.
    """
    if not data:
        raise BadInputError(f"{name} is empty (0 bytes).", remedy="Choose a non-empty image file.")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadInputError(f"{name} claims more pixels than this app decodes (limit {max_pixels:,}): {exc}", remedy=_TOO_BIG_REMEDY) from exc
    except Exception as exc:  # each PIL format plugin raises its own types on malformed bytes
        raise BadInputError(
            f"{name} is not an image this app can read: its bytes are damaged, cut short or of another format.", remedy="Upload a JPEG, PNG, GIF, BMP, TIFF or WebP file."
        ) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise BadInputError(f"{name} is {width}×{height} = {width * height:,} pixels, over the limit of {max_pixels:,}.", remedy=_TOO_BIG_REMEDY)
    notes: list[str] = []
    try:
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            image.seek(0)
            notes.append(f"first frame of {frames}")
        image.load()
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
            notes.append("turned upright from its EXIF orientation")
    except Exception as exc:  # as above: a header that parsed can still hide damaged data behind it
        raise BadInputError(f"{name} is truncated or damaged ({exc}).", remedy="Re-export or re-download the file.") from exc
    return DecodedImage(name, to_rgb(image, notes), tuple(notes))


def to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    """RGB for the models: 16-bit scaled (not clipped), transparency over white, CMYK/palette/grey converted."""
    if image.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        notes.append("16-bit greyscale scaled to 8 bits")
    elif image.mode == "F":  # 32-bit float: its finite range to 0..255; NaN black, infinities at the ends
        array = np.asarray(image)  # float32: a signalling NaN is replaced before any cast, which would warn
        finite = array[np.isfinite(array)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        array = np.nan_to_num(array, nan=low, posinf=high, neginf=low).astype(np.float64)
        scaled = (array - low) / max(high - low, 1e-12) * 255.0
        image = Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in {"RGBA", "LA", "PA"}:
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        background = Image.new("RGB", image.size, "white")
        background.paste(rgba, mask=alpha)
        if alpha.getextrema()[0] < 255:
            notes.append("transparency drawn over white")
        return background
    if image.mode == "CMYK":
        notes.append("converted from CMYK")
    return image.convert("RGB")


def shape_mask(size: tuple[int, int], box_percent: tuple[float, float, float, float], ellipse: bool = False) -> Image.Image:
    """An inpainting mask of `size`: white (repaint) inside a box given in percent of the width and height
    (left, top, right, bottom), or inside the ellipse that fills it; black elsewhere."""
    from PIL import ImageDraw

    width, height = size
    left, top, right, bottom = box_percent
    box = (round(left * width / 100), round(top * height / 100), round(right * width / 100) - 1, round(bottom * height / 100) - 1)
    mask = Image.new("L", size, 0)
    if box[2] >= box[0] and box[3] >= box[1]:
        (ImageDraw.Draw(mask).ellipse if ellipse else ImageDraw.Draw(mask).rectangle)(box, fill=255)
    return mask


def mask_overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image with the masked (white) part tinted red, to show what will be repainted."""
    red = Image.new("RGB", image.size, (255, 40, 40))
    return Image.composite(Image.blend(image.convert("RGB"), red, 0.55), image.convert("RGB"), mask.convert("L").resize(image.size))
