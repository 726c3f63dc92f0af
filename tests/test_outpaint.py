"""Outpainting's extended canvas and mask (core/tasks/outpaint.py): sizes, the mask over exactly the new area and the overlap
band, each fill, and amounts refused with the argument and value named."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.errors import BadInputError
from core.tasks import outpaint, sd_settings
from core.tasks.outpaint import OutpaintFill, extend_canvas

ORIGINAL = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8))  # 64 wide, 48 high


def expected_mask(size: tuple[int, int], kept_box: tuple[int, int, int, int]) -> np.ndarray:
    """White everywhere but `kept_box` (left, top, right, bottom; right and bottom exclusive)."""
    mask = np.full((size[1], size[0]), 255, np.uint8)
    left, top, right, bottom = kept_box
    mask[top:bottom, left:right] = 0
    return mask


def test_the_limits_are_those_of_a_generation_run():
    assert outpaint.MAX_SIDE_PX == sd_settings.MAX_SIDE_PX


@pytest.mark.parametrize(
    ("amounts", "kept_box"),
    [
        # the original sits at (left, top); the band of 16 px lies only along the sides that grow
        ({"left": 16}, (16 + 16, 0, 16 + 64, 48)),
        ({"right": 8, "bottom": 24}, (0, 0, 64 - 16, 48 - 16)),
        ({"left": 8, "right": 8, "top": 8, "bottom": 8}, (8 + 16, 8 + 16, 8 + 64 - 16, 8 + 48 - 16)),
    ],
)
def test_the_mask_covers_the_new_area_and_the_overlap_band_exactly(amounts, kept_box):
    extended = extend_canvas(ORIGINAL, **amounts, overlap_px=16)
    size = (64 + amounts.get("left", 0) + amounts.get("right", 0), 48 + amounts.get("top", 0) + amounts.get("bottom", 0))
    assert extended.image.size == extended.mask.size == size
    assert (extended.image.mode, extended.mask.mode) == ("RGB", "L")
    assert np.array_equal(np.asarray(extended.mask), expected_mask(size, kept_box))


def test_an_overlap_wider_than_the_picture_repaints_all_of_it():
    extended = extend_canvas(ORIGINAL.resize((64, 8)), top=8, bottom=8, overlap_px=16)
    assert np.asarray(extended.mask).min() == 255


def test_no_overlap_leaves_the_original_unmasked():
    extended = extend_canvas(ORIGINAL, left=8, top=16, overlap_px=0)
    assert np.array_equal(np.asarray(extended.mask), expected_mask((72, 64), (8, 16, 72, 64)))


@pytest.mark.parametrize("fill", list(OutpaintFill))
def test_every_fill_keeps_the_original_pixels(fill):
    extended = extend_canvas(ORIGINAL, left=16, right=8, top=8, bottom=16, fill=fill)
    assert np.array_equal(np.asarray(extended.image)[8:56, 16:80], np.asarray(ORIGINAL))


def test_edge_fill_stretches_the_border_pixels():
    pixels = np.asarray(extend_canvas(ORIGINAL, left=16, top=8, fill="edge").image)
    original = np.asarray(ORIGINAL)
    assert (pixels[8:, :16] == original[:, :1]).all()  # each row's first pixel, repeated
    assert (pixels[:8, 16:] == original[:1, :]).all()
    assert (pixels[:8, :16] == original[0, 0]).all()  # the corner takes the corner pixel


def test_blur_fill_is_a_smooth_copy_of_the_border_colours():
    left_half = np.zeros((48, 64, 3), np.uint8)
    left_half[:, :32] = (200, 30, 30)  # red on the left, black on the right
    pixels = np.asarray(extend_canvas(Image.fromarray(left_half), left=32, right=32, fill="blur").image).astype(int)
    new_left, new_right = pixels[:, :32], pixels[:, 96:]
    assert new_left[..., 0].mean() > 150 and new_right[..., 0].mean() < 20  # each side mirrors its own border
    assert np.abs(np.diff(new_left[24, :, 0])).max() < 10  # blurred: no sharp edges


def test_noise_fill_has_the_pictures_colours_and_is_repeatable():
    greenish = Image.new("RGB", (64, 48), (40, 180, 90))
    noisy = Image.fromarray(np.clip(np.asarray(greenish).astype(int) + np.random.default_rng(2).integers(-20, 21, (48, 64, 3)), 0, 255).astype(np.uint8))
    extended = extend_canvas(noisy, right=64, fill="noise", seed=7)
    new_area = np.asarray(extended.image)[:, 64:].reshape(-1, 3).astype(float)
    assert np.allclose(new_area.mean(axis=0), (40, 180, 90), atol=3)
    assert 8 < new_area.std(axis=0).min() < 16  # uniform ±20 has a spread of about 12
    assert extended.image == extend_canvas(noisy, right=64, fill="noise", seed=7).image
    assert extended.image != extend_canvas(noisy, right=64, fill="noise", seed=8).image


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"left": 12}, "`left` has to be a multiple of 8 but is 12"),
        ({"top": -8}, "`top` has to be between 0 and 2048 pixels but is -8"),
        ({"right": 8.5}, "`right` has to be a whole number but is 8.5"),
        ({"bottom": True}, "`bottom` has to be a whole number but is True"),
        ({}, "Nothing to outpaint: `left`, `right`, `top` and `bottom` are all 0"),
        ({"left": 1000, "right": 1000}, "`left` 1000 and `right` 1000 make the canvas 2064 pixels wide, over the limit of 2048"),
        ({"bottom": 2008}, "`top` 0 and `bottom` 2008 make the canvas 2056 pixels high, over the limit of 2048"),
        ({"left": 8, "overlap_px": 129}, "`overlap_px` has to be between 0 and 128 pixels but is 129"),
        ({"left": 8, "fill": "mirror"}, "`fill` 'mirror' is not one of edge, blur, noise"),
    ],
)
def test_bad_amounts_are_refused_with_their_name_and_value(arguments, message):
    with pytest.raises(BadInputError) as refused:
        extend_canvas(ORIGINAL, **arguments)
    assert message in str(refused.value)


def test_a_canvas_of_exactly_the_limit_is_accepted():
    extended = extend_canvas(ORIGINAL, left=2048 - 64 - 8, right=8, fill="edge", overlap_px=0)
    assert extended.image.width == 2048
