"""The generation page's inpaint input: the mask drawn as a shape, painted freehand, or uploaded; or the picture
extended on its sides (outpainting), which is inpainting on the bigger canvas (docs/INPAINT.md).

`inpaint_source` draws the choice and returns what the run repaints: the picture (or the extended canvas) and the
mask, with a preview of the mask over it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import streamlit as st
from PIL import Image

from app_pages.common import show_error
from app_pages.mask_painter import paint_mask
from core.api import BadInputError, SourceImages, decode_image, mask_overlay, outpaint, shape_mask

SHAPE, PAINT, UPLOAD, EXTEND = "Draw a shape", "Paint", "Upload a mask", "Extend the canvas"
SIDES = ("left", "right", "top", "bottom")
MAX_EXTEND_PX = 512  # per side, per run: SD 1.x invents little more than its own 512 pixels at once
# Each option's inputs, written back while another option is shown so that switching loses nothing (the painter's
# strokes live in the browser: see docs/INPAINT.md).
OPTION_INPUTS = {
    SHAPE: ("mask_shape", "mask_x", "mask_y"),
    PAINT: (),
    UPLOAD: (),
    EXTEND: tuple(f"outpaint_{side}" for side in SIDES) + ("outpaint_fill", "outpaint_overlap"),
}
MASK_INPUTS = ("mask_origin", *(name for names in OPTION_INPUTS.values() for name in names))


def inpaint_source(image: Image.Image | None, key: Callable[[str], str], image_types: list[str]) -> SourceImages | None:
    """The picture and its mask (white is repainted), shown with the mask over it in red; None without a picture.
    Extending the canvas sets the run's width and height to the canvas's size (this runs before those inputs are
    drawn)."""
    if image is None:  # nothing to mask yet: the inputs are kept for when a picture comes
        keep_inputs(MASK_INPUTS, key)
        return None
    how = st.radio("Mask: white is repainted", list(OPTION_INPUTS), horizontal=True, key=key("mask_origin"))
    keep_inputs([name for name in MASK_INPUTS[1:] if name not in OPTION_INPUTS[how]], key)
    state = st.session_state
    if how == PAINT:  # the painter shows the mask over the picture itself
        return SourceImages(image, paint_mask(image, key=key("mask_paint")))
    if how == EXTEND:
        source = extended_source(image, key)
        if source.mask is not None:
            state[key("width")], state[key("height")] = source.image.size
    else:
        source = SourceImages(image, shape_input(image, key) if how == SHAPE else uploaded_mask(key, image_types))
    st.image(mask_overlay(source.image, source.mask) if source.mask is not None else source.image, width=256,
             caption=f"{source.image.width}×{source.image.height}" + (" · red is repainted" if source.mask is not None else ""))
    return source


def keep_inputs(names: Sequence[str], key: Callable[[str], str]) -> None:
    """Streamlit forgets a widget's value in a run that does not draw it: write those not drawn back to themselves."""
    for name in names:
        if key(name) in st.session_state:
            st.session_state[key(name)] = st.session_state[key(name)]


def shape_input(image: Image.Image, key: Callable[[str], str]) -> Image.Image:
    shape_column, x_column, y_column = st.columns([1.3, 2, 2])
    shape = shape_column.selectbox("Shape", ["rectangle", "ellipse"], key=key("mask_shape"))
    left, right = x_column.slider("From left to right edge (%)", 0, 100, (25, 75), key=key("mask_x"))
    top, bottom = y_column.slider("From top to bottom edge (%)", 0, 100, (25, 75), key=key("mask_y"))
    return shape_mask(image.size, (left, top, right, bottom), ellipse=shape == "ellipse")


def uploaded_mask(key: Callable[[str], str], image_types: list[str]) -> Image.Image | None:
    upload = st.file_uploader("Mask image, the size of the input image (white = repaint)", type=image_types, key=key("mask_upload"))
    if upload is None:
        return None
    try:
        return decode_image(upload.getvalue(), upload.name).image.convert("L")
    except BadInputError as error:
        show_error(error)
        return None


def extended_source(image: Image.Image, key: Callable[[str], str]) -> SourceImages:
    """The picture on a canvas grown by the amounts asked, the new area filled, and the mask over it and a seam band
    into the original; the picture alone, without a mask, while the amounts are refused (with the message)."""
    columns = st.columns(4)
    amounts = {side: column.number_input(f"{side.capitalize()} (px)", 0, MAX_EXTEND_PX, step=outpaint.SIDE_MULTIPLE_PX, key=key(f"outpaint_{side}"))
               for side, column in zip(SIDES, columns, strict=True)}
    fill_column, overlap_column = st.columns(2)
    fill = fill_column.selectbox("Fill of the new area, for the model to start from", list(outpaint.OutpaintFill), key=key("outpaint_fill"),
                                 help="edge: the border pixels stretched outwards; blur: a blurred mirror of the border; noise: random pixels in the picture's colours")
    st.session_state.setdefault(key("outpaint_overlap"), outpaint.DEFAULT_OVERLAP_PX)
    overlap = overlap_column.number_input("Overlap into the picture (px)", 0, outpaint.MAX_OVERLAP_PX, step=8,
                                          key=key("outpaint_overlap"), help="A band of the original along each grown side is repainted too, so the seam blends")
    canvas_width, canvas_height = image.width + amounts["left"] + amounts["right"], image.height + amounts["top"] + amounts["bottom"]
    # The run's size is a multiple of 8: the canvas is cut to it, keeping the grown sides whole.
    image = image.crop((0, 0, image.width - canvas_width % 8, image.height - canvas_height % 8)) if (canvas_width % 8 or canvas_height % 8) else image
    try:
        extended = outpaint.extend_canvas(image, **{side: int(amount) for side, amount in amounts.items()}, fill=fill, overlap_px=int(overlap))
    except BadInputError as error:
        show_error(error)
        return SourceImages(image)
    st.caption(f"The run paints the whole {extended.image.width}×{extended.image.height} canvas: its width and height follow the canvas. "
               "Strength 1 suits outpainting: the new area holds nothing to keep.")
    return SourceImages(extended.image, extended.mask)
