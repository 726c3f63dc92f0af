"""A painted mask as the browser reports it (a PNG data URL) decoded into the mask Python uses, and every payload a
hostile or broken browser could send refused with one message (core/tasks/outpaint.py:decode_mask_payload, and
app_pages/mask_painter.py:paint_mask around it)."""
from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw
from streamlit.testing.v1 import AppTest

from app_pages import mask_painter
from core.errors import BadInputError
from core.tasks.outpaint import MAX_SIDE_PX, decode_mask_payload, max_payload_chars, painted_mask_size

SIZE = (80, 60)


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def painted_stroke(size: tuple[int, int] = SIZE) -> Image.Image:
    """What the browser's canvas holds after one stroke: red where painted, transparent elsewhere."""
    canvas = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(canvas).rectangle((10, 20, 29, 39), fill=(255, 40, 40, 255))
    return canvas


def test_the_alpha_channel_of_the_canvas_is_the_mask():
    mask = decode_mask_payload(data_url(painted_stroke()), SIZE)
    assert (mask.mode, mask.size, mask.getbbox()) == ("L", SIZE, (10, 20, 30, 40))
    assert set(np.unique(np.asarray(mask))) == {0, 255}


def test_antialiased_edges_are_cut_at_half_coverage():
    canvas = Image.new("RGBA", SIZE, (255, 40, 40, 0))
    canvas.putpixel((0, 0), (255, 40, 40, 127))
    canvas.putpixel((1, 0), (255, 40, 40, 128))
    mask = np.asarray(decode_mask_payload(data_url(canvas), SIZE))
    assert (mask[0, 0], mask[0, 1], np.count_nonzero(mask)) == (0, 255, 1)


def test_an_opaque_black_and_white_png_is_read_by_brightness():
    mask = decode_mask_payload(data_url(painted_stroke().convert("RGBA").getchannel("A").convert("RGB")), SIZE)
    assert mask.getbbox() == (10, 20, 30, 40)


@pytest.mark.parametrize("empty", [Image.new("RGBA", SIZE, (0, 0, 0, 0)), Image.new("L", SIZE, 0)])
def test_nothing_painted_is_no_mask(empty):
    assert decode_mask_payload(data_url(empty), SIZE) is None


def png_bytes_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def png_claiming(size: tuple[int, int]) -> bytes:
    """A PNG whose header claims `size`: one colour compresses to almost nothing, whatever the size."""
    buffer = io.BytesIO()
    Image.new("1", size).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"mask": "x"}, "not a PNG data URL (it starts a dict)"),
        (12, "not a PNG data URL (it starts a int)"),
        ("javascript:alert(1)", "not a PNG data URL (it starts 'javascript:alert(1)')"),
        (data_url(painted_stroke().convert("RGB"), "JPEG"), "not a PNG data URL (it starts 'data:image/jpeg;base64,"),
        ("data:image/png;base64,not base64!", "not valid base64"),
        (png_bytes_url(b"GIF89a this is no PNG"), "not a PNG (its first bytes are not the PNG signature)"),
        (data_url(painted_stroke((60, 80))), "is 60x80 pixels but should be 80x60"),
        (png_bytes_url(png_claiming((4000, 4000))), "is 4000x4000 pixels but should be 80x60"),
        (png_bytes_url(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "damaged PNG"),
        (png_bytes_url(base64.b64decode(data_url(Image.effect_noise(SIZE, 80)).split(",")[1])[:-200]), "damaged PNG"),
    ],
)
def test_hostile_payloads_are_refused_with_one_message(payload, message):
    with pytest.raises(BadInputError) as refused:
        decode_mask_payload(payload, SIZE)
    assert message in str(refused.value)


def test_a_huge_payload_is_refused_by_its_length_before_decoding(monkeypatch):
    def decoding(*_args, **_kwargs):
        raise AssertionError("decoded a payload longer than a mask can need")

    monkeypatch.setattr(base64, "b64decode", decoding)
    huge = "data:image/png;base64," + "A" * 200_000_000  # what Streamlit's 200 MB message limit lets through
    started = time.perf_counter()
    with pytest.raises(BadInputError, match=r"is 200,000,022 characters, more than a 80x60 mask can need \(31,422\)"):
        decode_mask_payload(huge, SIZE)
    assert time.perf_counter() - started < 0.5


def test_the_length_limit_holds_the_largest_mask_that_does_not_compress():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 4), dtype=np.uint8), mode="RGBA")
    payload = data_url(noise)
    assert len(payload) <= max_payload_chars((400, 300)) < 1.1 * len(payload)
    assert decode_mask_payload(payload, (400, 300)) is not None


@pytest.mark.parametrize(
    ("image_size", "mask_size"),
    [((640, 480), (640, 480)), ((2048, 100), (2048, 100)), ((4096, 3072), (2048, 1536)), ((3000, 7), (2048, 5)), ((1, 9000), (1, 2048))],
)
def test_masks_are_painted_at_the_pictures_size_up_to_the_largest_run(image_size, mask_size):
    assert painted_mask_size(image_size) == mask_size
    assert max(mask_size) <= MAX_SIDE_PX


def painter_page(monkeypatch: pytest.MonkeyPatch, payload: object, image_size: tuple[int, int]) -> AppTest:
    """The painter's Python side in a page, with the browser's report replaced by `payload`."""
    monkeypatch.setattr(mask_painter, "_component", lambda **_arguments: {"mask": payload})

    def page(image_size):
        import numpy as np
        import streamlit as st
        from PIL import Image

        from app_pages.mask_painter import paint_mask

        mask = paint_mask(Image.new("RGB", image_size, "gray"), key="mask")
        st.write("no mask" if mask is None else f"{mask.mode} {mask.size} {int(np.count_nonzero(np.asarray(mask)))}")

    return AppTest.from_function(page, args=(image_size,)).run()


def test_a_refused_payload_is_one_message_in_the_page_not_a_traceback(monkeypatch):
    at = painter_page(monkeypatch, "data:image/png;base64,AAAA", (80, 60))
    assert not at.exception
    assert [error.value.split("\n\n")[0] for error in at.error] == ["The painted mask is not a PNG (its first bytes are not the PNG signature)."]
    assert at.markdown[-1].value == "no mask"


def test_a_mask_painted_at_the_largest_run_size_is_scaled_up_to_the_picture(monkeypatch):
    painted = Image.new("RGBA", (2048, 1024), (0, 0, 0, 0))
    ImageDraw.Draw(painted).rectangle((0, 0, 1023, 1023), fill=(255, 40, 40, 255))  # the left half
    at = painter_page(monkeypatch, data_url(painted), (4096, 2048))
    assert not at.exception and not at.error
    assert at.markdown[-1].value == f"L (4096, 2048) {2048 * 2048}"
