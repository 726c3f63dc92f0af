"""Inpainting inputs made in the app rather than uploaded: a mask painted in the browser, and the extended canvas and
mask of outpainting.

Outpainting is inpainting with a bigger picture: `extend_canvas` adds N pixels on any side, fills the new area with
something the model can start from (a stretched edge, a blurred mirror, or noise in the picture's colours, as
AUTOMATIC1111's and InvokeAI's infill methods do), and returns a mask that is white over the new area and over a band of
`overlap_px` into the original, so that the seam is repainted too.

Torch-free, so pages and tests can use it without loading a model.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
from enum import StrEnum
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter

from core.checks import check_number
from core.errors import BadInputError

# core/tasks/generation.py's limit on a run's sides (a test keeps the two equal): a canvas larger than a run is useless.
MAX_SIDE_PX = 2048
SIDE_MULTIPLE_PX = 8  # SD's VAE downsamples by 8: extensions in steps of 8 keep the latent grid aligned
DEFAULT_OVERLAP_PX = 16  # enough for the model to blend the seam, little enough to keep the original
MAX_OVERLAP_PX = 128
BLUR_RADIUS_PX = 24  # a mirrored copy this blurred gives colours and light, no shapes the model would copy
PNG_DATA_URL_PREFIX = "data:image/png;base64,"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PAINT_AGAIN = "Clear the mask and paint it again; reload the page if this repeats."


class OutpaintFill(StrEnum):
    EDGE = "edge"  # each border pixel stretched outwards
    BLUR = "blur"  # a mirror image of the border, blurred
    NOISE = "noise"  # random pixels with the picture's mean and spread per channel


class ExtendedCanvas(NamedTuple):
    image: Image.Image  # RGB, the original at (left, top)
    mask: Image.Image  # L: 255 over the new area and the overlap band, 0 elsewhere


def extend_canvas(
    image: Image.Image,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    fill: OutpaintFill | str = OutpaintFill.EDGE,
    overlap_px: int = DEFAULT_OVERLAP_PX,
    seed: int = 0,
) -> ExtendedCanvas:
    """`image` with `left`/`right`/`top`/`bottom` pixels added (each a multiple of 8, the canvas at most MAX_SIDE_PX a
    side), the new area filled by `fill`, and the mask of what to repaint. The overlap band lies only along the sides
    that grow, and covers the whole original where the original is narrower than it. `seed` makes the noise fill
    repeatable."""
    amounts = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in amounts.items():
        check_number(name, value, 0, MAX_SIDE_PX, whole=True, unit=" pixels")
        if value % SIDE_MULTIPLE_PX:
            lower = value // SIDE_MULTIPLE_PX * SIDE_MULTIPLE_PX
            raise BadInputError(f"`{name}` has to be a multiple of {SIDE_MULTIPLE_PX} but is {value}.", remedy=f"Use {lower} or {lower + SIDE_MULTIPLE_PX}.")
    if not any(amounts.values()):
        raise BadInputError("Nothing to outpaint: `left`, `right`, `top` and `bottom` are all 0.", remedy="Extend the picture on at least one side.")
    check_number("overlap_px", overlap_px, 0, MAX_OVERLAP_PX, whole=True, unit=" pixels")
    try:
        fill = OutpaintFill(fill)
    except ValueError:
        raise BadInputError(f"`fill` {fill!r} is not one of {', '.join(OutpaintFill)}.") from None
    width, height = image.width + left + right, image.height + top + bottom
    for axis, first, second, size in (("wide", "left", "right", width), ("high", "top", "bottom", height)):
        if size > MAX_SIDE_PX:
            raise BadInputError(
                f"`{first}` {amounts[first]} and `{second}` {amounts[second]} make the canvas {size} pixels {axis}, over the limit of {MAX_SIDE_PX}.",
                remedy="Extend by less, or downscale the picture first.",
            )
    pixels = np.asarray(image.convert("RGB"))
    pad = ((top, bottom), (left, right), (0, 0))
    if fill is OutpaintFill.EDGE:
        canvas = Image.fromarray(np.pad(pixels, pad, mode="edge"))
    elif fill is OutpaintFill.BLUR:
        canvas = Image.fromarray(np.pad(pixels, pad, mode="symmetric")).filter(ImageFilter.GaussianBlur(BLUR_RADIUS_PX))
    else:
        spread = pixels.reshape(-1, 3).astype(np.float64)
        noise = np.random.default_rng(seed).normal(spread.mean(axis=0), spread.std(axis=0), size=(height, width, 3))
        canvas = Image.fromarray(np.clip(noise + 0.5, 0, 255).astype(np.uint8))
    canvas.paste(image.convert("RGB"), (left, top))
    return ExtendedCanvas(canvas, _outpaint_mask((width, height), image.size, amounts, overlap_px))


def _outpaint_mask(canvas_size: tuple[int, int], original_size: tuple[int, int], amounts: dict[str, int], overlap_px: int) -> Image.Image:
    """White everywhere but the part of the original that stays: the original less `overlap_px` along each grown side."""
    def band(name: str) -> int:
        return overlap_px if amounts[name] else 0

    kept_left, kept_top = amounts["left"] + band("left"), amounts["top"] + band("top")
    kept_right = amounts["left"] + original_size[0] - band("right")
    kept_bottom = amounts["top"] + original_size[1] - band("bottom")
    mask = Image.new("L", canvas_size, 255)
    if kept_right > kept_left and kept_bottom > kept_top:
        mask.paste(0, (kept_left, kept_top, kept_right, kept_bottom))
    return mask


def painted_mask_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """The size the browser paints a mask at: the image's own, or scaled down to MAX_SIDE_PX on its longer side (a run
    is never larger, and a 12-megapixel canvas would make the browser slow for nothing)."""
    width, height = image_size
    scale = min(1.0, MAX_SIDE_PX / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def max_payload_chars(size: tuple[int, int]) -> int:
    """The longest data URL a mask of `size` can need: an RGBA PNG that did not compress at all, plus 1 % for chunk
    headers, in base64. Anything longer is refused before it is decoded."""
    width, height = size
    raw_bytes = height * (1 + 4 * width)  # each row: a filter byte and four bytes a pixel
    png_bytes = raw_bytes + raw_bytes // 100 + 4096
    return len(PNG_DATA_URL_PREFIX) + 4 * math.ceil(png_bytes / 3)


def decode_mask_payload(payload: object, size: tuple[int, int]) -> Image.Image | None:
    """The mask the browser painted, as an "L" image of `size` with only 0 and 255 (white = repaint), or None when
    nothing is painted.

    `payload` is a PNG data URL of exactly `size` pixels; its alpha channel (or, without one, its brightness) is the
    mask, cut at half. The browser is a client like any other: anything else is one BadInputError.
    """
    if not isinstance(payload, str) or not payload.startswith(PNG_DATA_URL_PREFIX):
        shown = repr(payload[:40]) if isinstance(payload, str) else f"a {type(payload).__name__}"
        raise BadInputError(f"The painted mask is not a PNG data URL (it starts {shown}).", remedy=_PAINT_AGAIN)
    limit = max_payload_chars(size)
    if len(payload) > limit:
        raise BadInputError(f"The painted mask is {len(payload):,} characters, more than a {size[0]}x{size[1]} mask can need ({limit:,}).", remedy=_PAINT_AGAIN)
    try:
        data = base64.b64decode(payload[len(PNG_DATA_URL_PREFIX):], validate=True)
    except binascii.Error as exc:
        raise BadInputError(f"The painted mask is not valid base64 ({exc}).", remedy=_PAINT_AGAIN) from exc
    if not data.startswith(PNG_SIGNATURE):
        raise BadInputError("The painted mask is not a PNG (its first bytes are not the PNG signature).", remedy=_PAINT_AGAIN)
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
    except Exception as exc:  # Pillow's PNG plugin raises several types on damaged data
        raise BadInputError(f"The painted mask is a damaged PNG ({exc}).", remedy=_PAINT_AGAIN) from exc
    if image.size != size:  # read from the header, before a pixel is decoded
        raise BadInputError(f"The painted mask is {image.width}x{image.height} pixels but should be {size[0]}x{size[1]}.", remedy=_PAINT_AGAIN)
    try:
        image.load()
    except Exception as exc:  # as above: a header that parsed can hide damaged data behind it
        raise BadInputError(f"The painted mask is a damaged PNG ({exc}).", remedy=_PAINT_AGAIN) from exc
    coverage = image.convert("RGBA").getchannel("A") if image.has_transparency_data else image.convert("L")
    mask = coverage.point(lambda value: 255 if value >= 128 else 0)
    return mask if mask.getbbox() is not None else None

