"""Every bad or unusual image input of issue 4: a correct RGB image or one clear BadInputError."""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.errors import BadInputError
from core.tasks.images import decode_image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_empty_file_is_refused_by_name():
    with pytest.raises(BadInputError, match="empty.png is empty"):
        decode_image(b"", "empty.png")


def test_not_an_image_is_refused():
    with pytest.raises(BadInputError, match="notes.txt is not an image"):
        decode_image(b"hello, this is text", "notes.txt")


def test_truncated_file_is_refused():
    data = encode(Image.effect_noise((200, 200), 60).convert("RGB"), "JPEG")
    with pytest.raises(BadInputError, match="truncated or damaged"):
        decode_image(data[: len(data) // 2], "cut.jpg")


def test_decompression_bomb_is_refused_before_decoding():
    # A 20,000 x 20,000 PNG of one colour is a few hundred KiB on disk and 1.2 GB decoded.
    bomb = encode(Image.new("1", (20_000, 20_000)), "PNG")
    assert len(bomb) < 2_000_000
    with pytest.raises(BadInputError, match=r"bomb.png claims more pixels than this app decodes"):
        decode_image(bomb, "bomb.png")


def test_pixel_limit_names_the_size():
    with pytest.raises(BadInputError, match=r"big.png is 3000×2000 = 6,000,000 pixels, over the limit of 1,000,000"):
        decode_image(encode(Image.new("RGB", (3000, 2000)), "PNG"), "big.png", max_pixels=1_000_000)


def test_16_bit_png_is_scaled_not_clipped():
    ramp = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    decoded = decode_image(encode(Image.fromarray(ramp), "PNG"), "deep.png")
    pixels = np.asarray(decoded.image)
    assert decoded.image.mode == "RGB"
    assert pixels[..., 0].min() == 0 and pixels[..., 0].max() == 255
    assert len(np.unique(pixels[..., 0])) == 256  # clipping would collapse almost all values to 255
    assert any("16-bit" in note for note in decoded.notes)


def test_cmyk_jpeg_becomes_rgb():
    decoded = decode_image(encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), "print.jpg")
    red, green, blue = decoded.image.getpixel((16, 16))
    assert decoded.image.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_rgba_transparency_is_drawn_over_white():
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    decoded = decode_image(encode(image, "PNG"), "logo.png")
    assert decoded.image.getpixel((5, 5)) == (255, 255, 255)
    assert decoded.image.getpixel((0, 0)) == (0, 0, 255)
    assert "transparency drawn over white" in decoded.notes
    opaque = decode_image(encode(Image.new("RGBA", (4, 4), (1, 2, 3, 255)), "PNG"), "opaque.png")
    assert opaque.image.getpixel((1, 1)) == (1, 2, 3) and opaque.notes == ()


def test_greyscale_with_alpha_and_transparent_palette():
    grey_alpha = Image.new("LA", (4, 4), (0, 0))
    grey_alpha.putpixel((0, 0), (40, 255))
    decoded = decode_image(encode(grey_alpha, "PNG"), "la.png").image
    assert decoded.getpixel((0, 0)) == (40, 40, 40) and decoded.getpixel((2, 2)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 0, 0])
    palette.putpixel((0, 0), 0)
    decoded = decode_image(encode(palette, "PNG", transparency=0), "pal-alpha.png").image
    assert decoded.getpixel((0, 0)) == (255, 255, 255) and decoded.getpixel((3, 3)) == (200, 0, 0)


def test_greyscale_and_palette_become_rgb():
    grey = decode_image(encode(Image.new("L", (8, 8), 128), "PNG"), "grey.png").image
    palette = decode_image(encode(Image.new("RGB", (8, 8), (10, 200, 30)).convert("P"), "PNG"), "pal.png").image
    assert grey.mode == palette.mode == "RGB"
    assert grey.getpixel((1, 1)) == (128, 128, 128)
    assert palette.getpixel((1, 1))[1] > 150


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    decoded = decode_image(data, "anim.gif")
    assert decoded.image.getpixel((8, 8))[0] > 200 and "first frame of 3" in decoded.notes


def test_exif_rotated_photo_is_turned_upright():
    wide = Image.new("RGB", (40, 20), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    decoded = decode_image(encode(wide, "JPEG", exif=exif.tobytes(), quality=95), "phone.jpg")
    assert decoded.image.size == (20, 40)
    assert sum(decoded.image.getpixel((10, 5))) > 600  # the white half is now on top
    assert any("EXIF" in note for note in decoded.notes)


def _valid_files() -> dict[str, bytes]:
    picture = Image.effect_noise((48, 32), 50).convert("RGB")
    return {
        "png": encode(picture, "PNG"),
        "jpg": encode(picture, "JPEG"),
        "gif": encode(picture, "GIF", save_all=True, append_images=[picture.rotate(180)]),
        "webp": encode(picture, "WEBP"),
        "bmp": encode(picture, "BMP"),
        "tiff": encode(picture, "TIFF"),
    }


VALID_FILES = _valid_files()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(sorted(VALID_FILES)),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.integers(0, 40)), min_size=1, max_size=6),
)
def test_damaged_files_decode_or_raise_bad_input_only(kind, edits):
    """Flipped, dropped and inserted bytes in every format: an RGB image or BadInputError, never anything else."""
    data = bytearray(VALID_FILES[kind])
    for where, value, length in edits:
        at = int(where * len(data))
        if length == 0:
            data[at] = value
        elif length % 2:
            del data[at : at + length]
        else:
            data[at:at] = bytes([value]) * length
    try:
        decoded = decode_image(bytes(data), f"damaged.{kind}")
    except BadInputError as error:
        assert f"damaged.{kind}" in str(error)
    else:
        assert decoded.image.mode == "RGB" and decoded.image.size[0] * decoded.image.size[1] > 0
