"""Hostile input for every page (issue 10): hypothesis fuzzes each input a page accepts.

Image bytes (core.tasks.images, the hot dog and ImageNet uploads), CSV / TSV bytes (core.tasks.tables, the sentiment upload),
text (sentiment, the generation prompt), numbers at and past their limits (generation, DDPM and LoRA checks) and
PNG metadata on re-import (core.tasks.pnginfo, the generation page's PNG drop).

Each property: a correct result or one core.errors.DashboardError, never another exception, within the time bound
stated beside its settings (hypothesis `deadline`, per example, set for two slow shared CPU cores). On a page
(AppTest): no exception reaches it, and what it already showed stays.

Reproducible: derandomized, no example database, nothing printed. DASH_FUZZ=deep runs ten times the examples with
fresh random inputs each time (minutes; for a person, not CI).
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import re
import struct
import warnings
import zlib
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from core.errors import BadInputError, DashboardError
from core.models.registry import MODELS
from core.tasks import generation, lora, pnginfo, prompt_syntax, sd_settings, sentiment, tables, unconditional
from core.tasks.images import MAX_PIXELS, decode_image
from core.tasks.lora import LoraAdapter, LoraChoice
from core.tasks.sd_settings import SCHEDULERS, GenerationSettings, MemoryMode, Mode, Precision, SourceImages
from core.tasks.unconditional import UnconditionalSettings
from helpers import wait_for_generation_runs

HOME = str(Path(__file__).resolve().parent.parent / "Home.py")
CPU = torch.device("cpu")
DEEP = os.environ.get("DASH_FUZZ") == "deep"

pytestmark = [
    # Pillow warns about images over its own limit before core.tasks.images refuses them at a lower one, and about the
    # damaged EXIF of hostile files: expected here.
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:PIL"),
    # A deadline is checked when an example ends; an example that never ends is stopped here (each test takes < 20 s).
    pytest.mark.timeout(1200 if DEEP else 120),
]

# Profiles -----------------------------------------------------------------------------------------------------

settings.register_profile(
    "fuzz-ci", derandomize=True, database=None, print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
settings.register_profile("fuzz-deep", settings.get_profile("fuzz-ci"), derandomize=False)
PROFILE = settings.get_profile("fuzz-deep" if DEEP else "fuzz-ci")


def fuzz(max_examples: int, deadline_s: float) -> settings:
    """The profile with this test's example count (ten times as many with DASH_FUZZ=deep) and time bound per example."""
    return settings(PROFILE, max_examples=max_examples * (10 if DEEP else 1), deadline=timedelta(seconds=deadline_s))


# Time bounds per example (hypothesis deadlines), set for two slow shared CPU cores, ten times and more what an
# example takes there: a core call on a hostile file of a few KiB takes milliseconds, a text through a stand-in model
# or a page rerun (AppTest, stand-in models on the CPU) well under two seconds. Slower is a hang to a user.
CORE_S = 5.0  # decode an image, read a table or a PNG's settings, check numbers
MODEL_S = 15.0  # one text (up to 200,000 characters) through the classifier and its integrated gradients, or a prompt through CLIP's tokenizer
PAGE_S = 30.0  # one page rerun after an upload, a drop or typing


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# Realistic corpora, then mutated ------------------------------------------------------------------------------


def _picture(width: int = 48, height: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _float_picture() -> Image.Image:
    """A 32-bit float greyscale image (TIFF mode F) with NaN (quiet and signalling) and infinities among ordinary values."""
    values = np.linspace(-1.0, 1.0, 48 * 32, dtype=np.float32).reshape(32, 48)
    values[0, :3] = [np.nan, np.inf, -np.inf]
    values[0, 3] = np.array([0x7FA00000], dtype=np.uint32).view(np.float32)[0]  # a signalling NaN: casting it warns
    return Image.fromarray(values)


def _image_corpus() -> dict[str, bytes]:
    picture = _picture()
    upright = Image.Exif()
    upright[0x0112] = 6  # "rotate 90° to show": a phone photo held upright
    alpha = picture.convert("RGBA")
    alpha.putalpha(Image.linear_gradient("L").resize(picture.size))
    return {
        "photo.png": encode(picture, "PNG"),
        "photo.jpg": encode(picture, "JPEG", quality=90),
        "anim.gif": encode(picture, "GIF", save_all=True, append_images=[picture.rotate(180)]),
        "photo.webp": encode(picture, "WEBP"),
        "photo.bmp": encode(picture, "BMP"),
        "photo.tiff": encode(picture, "TIFF"),
        "anim.png": encode(picture, "PNG", save_all=True, append_images=[picture.rotate(90)]),
        "deep.png": encode(Image.fromarray((np.arange(48 * 32, dtype=np.uint32).reshape(32, 48) * 40).astype(np.uint16)), "PNG"),
        "print.jpg": encode(picture.convert("CMYK"), "JPEG"),
        "logo.png": encode(alpha, "PNG"),
        "palette.png": encode(picture.convert("P"), "PNG", transparency=0),
        "grey.png": encode(picture.convert("LA"), "PNG"),
        "phone.jpg": encode(picture, "JPEG", exif=upright.tobytes()),
        "float.tiff": encode(_float_picture(), "TIFF"),
    }


IMAGES = _image_corpus()
# Formats' first bytes, so random tails reach each decoder's parser rather than "unidentified image".
MAGIC = (b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff\xe0", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ")
# Edits that break files the way transfers and hostile tools do; payloads with bytes every format treats specially.
EDITS = ("overwrite", "insert", "delete", "truncate", "duplicate")
SPECIAL_BYTES = (b"\x00", b"\xff", b"\xff\xff\xff\x7f", b"\x7f\xff\xff\xff", b'"', b",", b"\t", b"\r", b"\n", b"\r\n", b"\\", b";", b"\xef\xbb\xbf", b"\xff\xfe")


@st.composite
def mutated(draw, corpus: dict[str, bytes]) -> tuple[str, bytes]:
    """A file of `corpus`, with up to four edits anywhere in it."""
    name = draw(st.sampled_from(sorted(corpus)))
    data = bytearray(corpus[name])
    edits = st.tuples(st.sampled_from(EDITS), st.floats(0, 1, exclude_max=True), st.one_of(st.sampled_from(SPECIAL_BYTES), st.binary(min_size=1, max_size=8)))
    for kind, where, payload in draw(st.lists(edits, min_size=1, max_size=4)):
        at = int(where * len(data))
        if kind == "overwrite":
            data[at : at + len(payload)] = payload
        elif kind == "insert":
            data[at:at] = payload
        elif kind == "delete":
            del data[at : at + 4 * len(payload)]
        elif kind == "truncate":
            del data[max(at, 1) :]
        else:
            data[at:at] = data[at : at + 64] * (1 + payload[0] % 8)
    return name, bytes(data)


# PNG chunks: signature, then (length, type, body, CRC) each. Fuzzing at this level keeps the CRCs right, so Pillow
# reads far enough to meet the hostile part (a size claim, a text chunk after the data, a broken zTXt).
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, position = [], len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunks.append((kind, data[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIGNATURE + b"".join(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks)


def with_size(chunks: list[tuple[bytes, bytes]], width: int, height: int) -> list[tuple[bytes, bytes]]:
    """The same chunks with the header claiming another size (the data stays that of the small image)."""
    (kind, header), *rest = chunks
    return [(kind, struct.pack(">II", width, height) + header[8:]), *rest]


def text_chunk(kind: str, text: str, key: str = pnginfo.PARAMETERS_KEY) -> tuple[bytes, bytes]:
    """A PNG text chunk as Pillow and AUTOMATIC1111 write them: tEXt (Latin-1), zTXt (Latin-1, compressed), iTXt (UTF-8)."""
    keyword = key.encode("latin-1") + b"\x00"
    if kind == "tEXt":
        return b"tEXt", keyword + text.encode("latin-1", "replace")
    if kind == "zTXt":
        return b"zTXt", keyword + b"\x00" + zlib.compress(text.encode("latin-1", "replace"))
    if kind == "iTXt-z":
        return b"iTXt", keyword + b"\x01\x00\x00\x00" + zlib.compress(text.encode("utf-8"))
    return b"iTXt", keyword + b"\x00\x00\x00\x00" + text.encode("utf-8")


PNG_BASES = {name: png_chunks(IMAGES[name]) for name in ("photo.png", "anim.png", "deep.png", "palette.png")}
# Sizes at and past the pixel limit (and Pillow's own, 89 million, and its error limit at twice that).
SIZE_CLAIMS = ((0, 0), (0, 7), (1, 1), (6324, 6324), (6325, 6325), (MAX_PIXELS, 1), (MAX_PIXELS + 1, 1), (7000, 7000), (9500, 9500), (13_500, 13_500), (2**31 - 1, 2**31 - 1))


@st.composite
def claimed_size_pngs(draw) -> tuple[str, bytes]:
    """A small PNG whose header claims another size (a decompression bomb claims billions of pixels in a few bytes)."""
    width, height = draw(st.one_of(st.sampled_from(SIZE_CLAIMS), st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))))
    return "claim.png", png_from_chunks(with_size(PNG_BASES["photo.png"], width, height))


def image_files() -> st.SearchStrategy[tuple[str, bytes]]:
    """(file name, bytes): valid files of every kind, damaged ones, size claims, and noise behind a format's magic."""
    return st.one_of(
        st.sampled_from(sorted(IMAGES.items())),
        mutated(IMAGES),
        mutated(IMAGES),
        claimed_size_pngs(),
        st.tuples(st.just("noise.png"), st.binary(max_size=512)),
        st.tuples(st.just("magic.png"), st.builds(lambda magic, tail: magic + tail, st.sampled_from(MAGIC), st.binary(max_size=256))),
    )


# Text: realistic reviews and prompts, odd Unicode (bidi overrides, zero-width and combining marks, emoji
# sequences, surrogate-free astral characters, control characters, line separators) and huge repetitions.
REVIEWS = (
    "I loved this film: the cast is wonderful and the ending made me cry happy tears.",
    "Two hours I will never get back. Dull, slow and badly acted.",
    "Not bad, not great.",
    "a watercolour painting of a lighthouse at dawn, highly detailed",
)
ODD = ("\u202e", "\u200b", "\ufeff", "\x00", "\r", "\x0b", "\x85", "\u2028", "e\u0301", "👩\u200d👩\u200d👧", "ǅ", "ß", "İ", "\U0001f600", "\U000e0041", "\ufffd", "﷽", "[SEP]", "<|endoftext|>", "\\", '"')
odd_text = st.lists(st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(ODD)), max_size=30).map("".join)
huge_text = st.builds(lambda unit, times: unit * times, st.sampled_from(["good ", "😀", "e\u0301", "\u202eab", "x", " ", "\n"]), st.integers(1_000, 40_000))
texts = st.one_of(st.sampled_from(REVIEWS), odd_text, st.builds(" ".join, st.lists(st.sampled_from(REVIEWS + ODD), max_size=6)), huge_text)


# Images -------------------------------------------------------------------------------------------------------


def decoded_or_refused(data: bytes, name: str):
    """decode_image's result, checked, or None after one BadInputError naming the file. NumPy's warnings of a NaN or
    overflowing cast are errors here: such a cast makes a wrong picture without raising."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="(invalid value|overflow|divide by zero) encountered", category=RuntimeWarning)
        try:
            decoded = decode_image(data, name)
        except DashboardError as error:
            assert isinstance(error, BadInputError) and name in str(error) and error.remedy
            return None
    width, height = decoded.image.size
    assert decoded.image.mode == "RGB" and 0 < width * height <= MAX_PIXELS
    assert decoded.caption.startswith(name)
    return decoded


@fuzz(max_examples=150, deadline_s=CORE_S)
@given(file=image_files(), name=st.one_of(st.just("upload"), odd_text.filter(bool)))
@example(file=("float.tiff", IMAGES["float.tiff"]), name="upload")  # NaN and infinities scaled with the finite values
@example(file=("claim.png", png_from_chunks(with_size(PNG_BASES["photo.png"], 7000, 7000))), name="upload")
def test_decode_image_gives_an_upright_rgb_image_or_one_bad_input_error(file, name):
    decoded = decoded_or_refused(file[1], f"{name}-{file[0]}")
    assert decoded is not None or IMAGES.get(file[0]) != file[1]  # every file of the corpus is read


def test_float_images_scale_their_finite_values_and_keep_nan_dark():
    decoded = decoded_or_refused(IMAGES["float.tiff"], "float.tiff")
    grey = np.asarray(decoded.image)[..., 0]
    assert grey[0, 0] == 0 and grey[0, 1] == 255 and grey[0, 2] == 0 and grey[0, 3] == 0  # NaN, +inf, -inf, signalling NaN
    assert grey[-1, -1] == 255 and grey[0, 4] == 0  # the largest finite value is white, the smallest black


# Tables -------------------------------------------------------------------------------------------------------

CSV_CORPUS = {
    "reviews.csv": b'id,review,stars\n007,Great film,5\n008,,3\n009,"Fine, I guess",3\n',
    "reviews.tsv": b"id\treview\n1\tGood, really good\n2\tBad\n",
    "semicolon.csv": b"name;text\nA;nice\nB;awful\n",
    "pipe.txt": b"a|b\n1|x\n2|y\n",
    "multiline.csv": b'id,text\n1,"line one\nline two"\n2,"say ""hi"""\n',
    "excel.csv": "avis;note\ncafé crème très bon;5\n".encode("cp1252"),
    "utf16.csv": "text,n\nhello,1\nwörld,2\n".encode("utf-16"),
    "bom.csv": codecs.BOM_UTF8 + b"text\nhi\n",
    "sentences.csv": b"I came, I saw, I left.\nWell, that was fun\n",
    "crlf.csv": b"a,b\r\n1,2\r\nx,y\r\n",
    "japanese.csv": "名前,感想\n太郎,とても良い\n".encode("shift_jis"),
    "numbers.csv": b"a,b\n1,2\n3,4\n",
}
CSV_NAMES = st.builds(lambda stem, ext: stem + ext, st.sampled_from(["data", "reviews", "ü ñ", ""]), st.sampled_from([".csv", ".tsv", ".tab", ".txt", ".CSV", ""]))
csv_files = st.one_of(
    st.sampled_from(sorted(CSV_CORPUS.items())),
    mutated(CSV_CORPUS),
    mutated(CSV_CORPUS),
    st.tuples(CSV_NAMES, st.binary(max_size=300)),
    st.tuples(CSV_NAMES, odd_text.map(lambda text: text.encode("utf-8"))),
)
encodings = st.sampled_from((None, None, None, *tables.ENCODINGS, "no-such-codec"))


def is_missing(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def table_or_refused(data: bytes, name: str, encoding: str | None):
    """read_table's table, checked with everything the sentiment page then does with it, or None after one BadInputError."""
    try:
        table = tables.read_table(data, name, encoding)
    except DashboardError as error:
        assert isinstance(error, BadInputError) and error.remedy
        return None
    frame = table.frame
    assert len(frame) >= 1 and len(frame.columns) >= 1 and frame.columns.is_unique
    assert all(isinstance(column, str) for column in frame.columns)
    assert all(isinstance(cell, str) or is_missing(cell) for column in frame.columns for cell in frame[column])
    assert table.delimiter in (*tables.DELIMITERS, "\x1f")
    codecs.lookup(table.encoding)
    guess = table.guess_text_column()
    assert guess is None or guess in table.text_columns
    for column in list(frame.columns)[:4]:
        try:
            texts = tables.column_texts(table, column)
        except DashboardError as error:
            assert isinstance(error, BadInputError) and error.remedy
            continue
        assert texts.texts and all(isinstance(text, str) and text.strip() for text in texts.texts)
        assert len(texts.rows) == len(texts.texts) and texts.blank_rows == len(frame) - len(texts.texts)
        result = tables.with_columns(frame, texts.rows, {"label": ["positive"] * len(texts.texts)})
        assert list(result.columns[: len(frame.columns)]) == list(frame.columns) and len(result) == len(frame)
        tables.to_csv_bytes(result).decode("utf-8")
    return table


@fuzz(max_examples=200, deadline_s=CORE_S)
@given(file=csv_files, encoding=encodings)
@example(file=("mac.csv", b"id,text\r1,old Mac line ends\r"), encoding=None)  # csv.Error from the delimiter sniffing
@example(file=("bom.csv", codecs.BOM_UTF8), encoding="utf-8")  # pandas' EmptyDataError: "\ufeff" is no whitespace to str.strip()
def test_read_table_gives_a_table_of_text_or_one_bad_input_error(file, encoding):
    table_or_refused(file[1], file[0], encoding)


cells = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
headers = cells.filter(lambda name: name.strip() and not name.startswith("\ufeff"))


@fuzz(max_examples=100, deadline_s=CORE_S)
@given(
    header=st.lists(headers, min_size=2, max_size=4, unique=True),
    rows=st.lists(st.lists(cells, min_size=4, max_size=4), min_size=1, max_size=6),
    tsv=st.booleans(), encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]),
)
def test_a_well_formed_file_comes_back_cell_for_cell(header, rows, tsv, encoding):
    """Any text in any cell (quotes, delimiters, line breaks, odd Unicode), written by Python's csv module."""
    rows = [row[: len(header)] for row in rows]
    buffer = io.StringIO()
    csv.writer(buffer, delimiter="\t" if tsv else ",").writerows([header, *rows])
    table = table_or_refused(buffer.getvalue().encode(encoding), "cells.tsv" if tsv else "cells.csv", None)
    assert table is not None
    assert list(table.frame.columns) == header
    assert [[None if is_missing(cell) else cell for cell in row] for row in table.frame.itertuples(index=False)] == [[cell or None for cell in row] for row in rows]


# PNG metadata -------------------------------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-0", "0x10", "1_000", "٣", "２５", " 7 ", "", "9" * 5000, "1e5", "512.0", "0", "150", "151", "2048", "2056", "64", "56"]),
)
SAMPLERS = sorted({*SCHEDULERS, *(choice.a1111_name for choice in SCHEDULERS.values() if choice.a1111_name), "DPM++ SDE Karras", "euler", "Euler  a", ""})
VALUES = {
    "Steps": NUMBERS,
    "Seed": NUMBERS,
    "CFG scale": NUMBERS,
    "Denoising strength": NUMBERS,
    "Size": st.one_of(st.builds(lambda w, h: f"{w}x{h}", NUMBERS, NUMBERS), st.sampled_from(["512x512", "64x2048", "-64x512", "512x", "x", "512X512", "512x512x3"])),
    "Sampler": st.one_of(st.sampled_from(SAMPLERS), odd_text),
    "Precision": st.one_of(st.sampled_from([p.value for p in Precision]), odd_text),
    "Memory mode": st.one_of(st.sampled_from([m.value for m in MemoryMode]), odd_text),
    "Mode": st.one_of(st.sampled_from([m.value for m in Mode]), odd_text),
    "Model": st.one_of(st.sampled_from(["stable-diffusion-v1-5/stable-diffusion-v1-5", "../../etc/passwd", "/abs/folder", "a" * 300]), odd_text),
    "LoRA": odd_text,
    "Version": odd_text,
    "Schedule type": odd_text,
}


def quoted(value: str) -> st.SearchStrategy[str]:
    """The value as written (unquoted), as a JSON string, or as a broken one (bad escape, lone surrogate, no end)."""
    return st.sampled_from([value, json.dumps(value, ensure_ascii=False), json.dumps(value), f'"{value}', f'"{value}" tail', '"\\q"', '"\\ud800"', f'"{value}\\"'])


@st.composite
def parameters_texts(draw) -> str:
    """A `parameters` text: prompt lines (one may start "Negative prompt:"), then a settings line of known and
    unknown keys with hostile values; sometimes huge, to find a parse that does not finish."""
    prompt = draw(st.lists(st.one_of(odd_text, st.sampled_from(REVIEWS), st.just("Negative prompt: blurry, low quality")), max_size=3))
    keys = draw(st.lists(st.one_of(st.sampled_from(sorted(VALUES)), odd_text), max_size=9))
    pairs = []
    for key in keys:
        value = draw(VALUES.get(key, odd_text))
        pairs.append(f"{key}: {draw(quoted(value))}")
    text = "\n".join([*prompt, ", ".join(pairs)])
    if draw(st.integers(0, 9)) == 0:
        text += draw(st.sampled_from(["a", "Steps ", " ", "Seed: \"", "a: \"x, "])) * draw(st.integers(10_000, 300_000))
    return text


def round_trip_settings(settings: GenerationSettings) -> GenerationSettings:
    return settings if settings.seed is not None else replace(settings, seed=0)  # the writer needs the image's seed


def parsed_or_refused(text: str):
    """parse_parameters' result, checked, or None after one BadInputError."""
    try:
        parsed = pnginfo.parse_parameters(text)
    except DashboardError as error:
        assert isinstance(error, BadInputError) and error.remedy and len(str(error)) < 1000
        return None
    settings = parsed.settings
    # What a run accepts, less what depends on the machine (precision, memory mode) or on the input image.
    machine_free = replace(settings, precision=Precision.AUTO, memory_mode=MemoryMode.NONE)
    generation.check_inputs(machine_free, CPU.type, SourceImages(Image.new("RGB", (8, 8)), Image.new("L", (8, 8))))
    for value in (settings.prompt, settings.negative_prompt, parsed.model or ""):
        value.encode("utf-8")  # text a page can show
    # Written again and read back, it is the same (AUTOMATIC1111's layout cannot hold a prompt starting "Negative prompt:").
    if not settings.prompt.startswith(pnginfo.NEGATIVE_PREFIX):
        written = round_trip_settings(settings)
        again = pnginfo.parse_parameters(pnginfo.parameters_text(written, parsed.model or "", is_standin=False))
        assert again.settings == written and again.model == (parsed.model or "")
    return parsed


@fuzz(max_examples=250, deadline_s=CORE_S)
@given(text=parameters_texts())
@example(text="p\nSteps: 20, Sampler: \"Eu\\qler\", CFG scale: 7, Seed: 1")  # a bad JSON escape: kept as written
@example(text="p\nSteps: 20, Sampler: \"Euler\" a, CFG scale: 7, Seed: 1")  # text after a quoted value
@example(text='p\nSteps: 20, Sampler: Euler, CFG scale: 7, Model: "\\ud800"')  # a lone surrogate no page can show
@example(text="p\nSteps: 1000, Sampler: Euler, CFG scale: nan, Seed: -3, Size: 100x4000")  # the form clamped these silently
@example(text="p\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: " + "9" * 400)  # past a float: check_inputs' `:g` overflowed
@example(text="p\nSteps: 20, Sampler: Euler, Seed: 1, Mode: image to image, Denoising strength: 7")  # the strength slider raised
@example(text="p\nSteps: 20, Sampler: Euler, CFG scale: 7.123456789, Seed: 1")  # `:g` wrote it back as 7.12346
@example(text='p\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Model: " padded "')  # written back without its spaces
@example(text="x" * 200_000)  # minutes in the regular expression's retries, before the one-pass scan
def test_png_settings_text_parses_to_settings_a_run_accepts_or_one_bad_input_error(text):
    parsed_or_refused(text)


# The expression core.tasks.pnginfo read the pairs of the last line with (after AUTOMATIC1111's `re_param_code`): quadratic
# on a long run without a colon, so compared with the one-pass scan that replaced it only on short lines.
REGEX_PAIR = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
line_characters = st.one_of(st.sampled_from(list(' ,:"\\-/+x7_\t\u00a0é')), st.characters(exclude_categories=("Cs",)))


@fuzz(max_examples=300, deadline_s=CORE_S)
@given(line=st.text(line_characters, max_size=60))
@example(line='Steps: 20, Sampler: "a, b", CFG scale: 7')
@example(line=' -/x: 1, y: "\\"", z :2')
def test_settings_line_pairs_are_those_the_regular_expression_finds(line):
    expected = REGEX_PAIR.findall(line)
    found = pnginfo._pairs(line)
    assert [key for key, _ in found] == [key for key, _ in expected]
    assert [value for _, value in found] == [pnginfo._unquote(value) for _, value in expected]


@st.composite
def hostile_pngs(draw) -> tuple[bytes, str | None]:
    """(PNG bytes, the settings text a reader must find or None when it need not): text chunks of every kind before,
    after or instead of the image data, twice, under another key, with size claims and damage."""
    text = draw(st.one_of(parameters_texts(), st.sampled_from(REVIEWS)))
    base, chunks = draw(st.sampled_from(sorted(PNG_BASES.items())))
    chunks = list(chunks)
    kind = draw(st.sampled_from(["tEXt", "zTXt", "iTXt", "iTXt-z"]))
    chunk = text_chunk(kind, text, draw(st.sampled_from([pnginfo.PARAMETERS_KEY] * 4 + ["Parameters", "comment"])))
    first_data = next(i for i, (name, _) in enumerate(chunks) if name == b"IDAT")
    place = draw(st.sampled_from(["before", "after", "end", "twice", "none"]))
    if place == "before":
        chunks.insert(first_data, chunk)
    elif place == "after":
        chunks.insert(first_data + 1, chunk)
    elif place == "end":
        chunks.insert(len(chunks) - 1, chunk)
    elif place == "twice":
        chunks[first_data:first_data] = [chunk, text_chunk("tEXt", "other")]
    size = draw(st.one_of(st.none(), st.sampled_from(SIZE_CLAIMS)))
    if size is not None:
        chunks = with_size(chunks, *size)
    data = png_from_chunks(chunks)
    damaged = draw(st.integers(0, 3)) == 0
    if damaged:
        _, data = draw(mutated({"x.png": data}))
    representable = kind.startswith("iTXt") or text.encode("latin-1", "replace").decode("latin-1") == text
    # Read: text before the image data, or after the first frame's (all of it in a still image; ours and
    # AUTOMATIC1111's come first). Text after the last frame of an animated PNG would need every frame decoded.
    found = place in ("before", "after") or (place == "end" and base != "anim.png")
    readable = found and chunk[1].startswith(b"parameters\x00") and representable and text
    return data, text if readable and size is None and not damaged else None


@fuzz(max_examples=120, deadline_s=CORE_S)
@given(png=hostile_pngs())
@example(png=(png_from_chunks(with_size(PNG_BASES["photo.png"][:-1] + [text_chunk("tEXt", "late"), PNG_BASES["photo.png"][-1]], 7000, 7000)), None))
def test_a_dropped_png_gives_its_settings_text_or_one_bad_input_error(png):
    """read_parameters then parse_parameters, as the generation page's PNG drop does."""
    data, expected = png
    try:
        text = pnginfo.read_parameters(data, "dropped.png")
    except DashboardError as error:
        assert isinstance(error, BadInputError) and "dropped.png" in str(error) and error.remedy
        assert expected is None
        return
    assert text and isinstance(text, str)
    if expected is not None:
        assert text == expected
    parsed_or_refused(text)


def test_text_after_the_data_of_an_image_past_the_pixel_limit_is_not_decoded():
    """Pillow's own limit is 89 million pixels; 49 million is past the app's 40 million, so it must not be decoded."""
    chunks = PNG_BASES["photo.png"]
    data = png_from_chunks(with_size(chunks[:-1] + [text_chunk("tEXt", "late")] + chunks[-1:], 7000, 7000))
    with pytest.raises(BadInputError, match=r"7000×7000 = 49,000,000 pixels, over the limit of 40,000,000"):
        pnginfo.read_parameters(data, "big.png")
    before = png_from_chunks(with_size(chunks[:1] + [text_chunk("tEXt", "early")] + chunks[1:], 7000, 7000))
    assert pnginfo.read_parameters(before, "big.png") == "early"  # text before the data needs no pixels


# Numbers at and past their limits -----------------------------------------------------------------------------


def whole_numbers(low: int, high: int) -> st.SearchStrategy[int]:
    """At and around both limits, anywhere between, and far past them (within 64 bits; larger ones have their own tests below)."""
    edges = [low - 1, low, low + 1, high - 1, high, high + 1, 0, -1, 2**31, 2**53, 2**63 - 1, -(2**63)]
    return st.one_of(st.sampled_from(edges), st.integers(low - 10, high + 10), st.integers(-(2**64), 2**64))


def real_numbers(low: float, high: float) -> st.SearchStrategy[float]:
    edges = [low, high, math.nextafter(low, -math.inf), math.nextafter(high, math.inf), 0.0, -0.0, 5e-324, math.nan, math.inf, -math.inf, 1e308]
    return st.one_of(st.sampled_from(edges), st.floats(low - 1, high + 1), st.floats())


def is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def generation_accepts(s: GenerationSettings, source: SourceImages | None) -> bool:
    """What check_inputs must accept: its documented limits, written out once more as the oracle."""
    return (
        all(is_whole(getattr(s, name)) for name in ("steps", "width", "height", "num_images"))
        and 1 <= s.steps <= sd_settings.MAX_STEPS
        and 0 <= s.guidance_scale <= sd_settings.MAX_GUIDANCE
        and all(side % 8 == 0 and sd_settings.MIN_SIDE_PX <= side <= sd_settings.MAX_SIDE_PX for side in (s.width, s.height))
        and 1 <= s.num_images <= sd_settings.MAX_IMAGES
        and (s.seed is None or 0 <= s.seed <= sd_settings.MAX_SEED)
        and s.scheduler in sd_settings.available_schedulers()
        and s.precision in sd_settings.precisions_for(CPU.type)
        and s.memory_mode in sd_settings.memory_modes_for(CPU.type)
        and (
            s.mode is Mode.TEXT_TO_IMAGE
            or (sd_settings.MIN_STRENGTH <= s.strength <= 1 and s.denoising_steps >= 1 and source is not None
                and (s.mode is Mode.IMAGE_TO_IMAGE or (source.mask is not None and source.mask.size == source.image.size)))
        )
    )


def accepted(check, *args) -> bool:
    """True when `check` passes, False after one BadInputError; any other exception fails the test."""
    try:
        check(*args)
    except DashboardError as error:
        assert isinstance(error, BadInputError) and str(error)
        return False
    return True


SOURCES = st.sampled_from([
    None,
    SourceImages(Image.new("RGB", (64, 64))),
    SourceImages(Image.new("RGB", (64, 64)), Image.new("L", (64, 64))),
    SourceImages(Image.new("RGB", (64, 64)), Image.new("L", (32, 32))),
])


@fuzz(max_examples=300, deadline_s=CORE_S)
@given(
    settings=st.builds(
        GenerationSettings,
        steps=whole_numbers(1, sd_settings.MAX_STEPS), guidance_scale=real_numbers(0, sd_settings.MAX_GUIDANCE),
        width=whole_numbers(sd_settings.MIN_SIDE_PX, sd_settings.MAX_SIDE_PX), height=whole_numbers(sd_settings.MIN_SIDE_PX, sd_settings.MAX_SIDE_PX),
        num_images=whole_numbers(1, sd_settings.MAX_IMAGES), seed=st.none() | whole_numbers(0, sd_settings.MAX_SEED),
        scheduler=st.sampled_from(sorted(SCHEDULERS)) | odd_text, precision=st.sampled_from(Precision), memory_mode=st.sampled_from(MemoryMode),
        mode=st.sampled_from(Mode), strength=real_numbers(0, 1), prompt=texts,
    ),
    source=SOURCES,
)
def test_generation_check_accepts_exactly_the_settings_within_its_limits(settings, source):
    assert accepted(generation.check_inputs, settings, CPU, source) == generation_accepts(settings, source)


@fuzz(max_examples=150, deadline_s=CORE_S)
@given(num_images=whole_numbers(1, unconditional.MAX_IMAGES), steps=whole_numbers(1, unconditional.MAX_STEPS), seed=st.none() | whole_numbers(0, sd_settings.MAX_SEED))
def test_ddpm_check_accepts_exactly_the_settings_within_its_limits(num_images, steps, seed):
    within = 1 <= num_images <= unconditional.MAX_IMAGES and 1 <= steps <= unconditional.MAX_STEPS and (seed is None or 0 <= seed <= sd_settings.MAX_SEED)
    assert accepted(unconditional.check_inputs, UnconditionalSettings(num_images, steps, seed)) == within


ADAPTER = LoraAdapter("style", "style.safetensors", {})


@fuzz(max_examples=150, deadline_s=CORE_S)
@given(weights=st.lists(st.one_of(real_numbers(-lora.MAX_WEIGHT, lora.MAX_WEIGHT), whole_numbers(-4, 4)), max_size=3))
def test_lora_check_accepts_exactly_the_weights_within_its_limits(weights):
    choices = tuple(LoraChoice(replace(ADAPTER, name=f"style{i}"), weight) for i, weight in enumerate(weights))
    within = all(math.isfinite(weight) and -lora.MAX_WEIGHT <= weight <= lora.MAX_WEIGHT for weight in weights)
    assert accepted(lora.check_choices, choices) == within


# Found by the fuzzing above, fixed, and kept as plain regressions.


def test_generation_check_refuses_an_integer_past_a_float():
    assert not accepted(generation.check_inputs, GenerationSettings(seed=10**400), CPU)


def test_generation_check_refuses_a_fractional_seed():
    assert not accepted(generation.check_inputs, GenerationSettings(seed=1.5), CPU)


def test_ddpm_check_refuses_a_fractional_seed():
    assert not accepted(unconditional.check_inputs, UnconditionalSettings(seed=1.5))


def test_lora_check_refuses_an_integer_weight_past_a_float():
    assert not accepted(lora.check_choices, (LoraChoice(ADAPTER, 10**400),))


# Text through the models (stand-ins on the CPU) ---------------------------------------------------------------


def test_sentiment_takes_any_text_and_any_lines(manager):
    model = manager.get(MODELS["sentiment"], allow_standin=True)
    labels = set(model.info.labels)

    @fuzz(max_examples=25, deadline_s=MODEL_S)
    @given(text=texts)
    def one_text(text):
        try:
            result = sentiment.classify_text(model, text)
        except DashboardError as error:
            assert isinstance(error, BadInputError) and not text.strip()
            return
        assert {score.label for score in result.scores} == labels
        assert [score.score for score in result.scores] == sorted((score.score for score in result.scores), reverse=True)
        assert sum(score.score for score in result.scores) == pytest.approx(1, abs=1e-4)
        assert result.truncated == (result.token_count > result.max_tokens)
        attributions = sentiment.explain(model, text)
        assert attributions.label in labels and 0 <= attributions.covered_chars <= len(text)
        for word in attributions.words:
            assert 0 <= word.start <= word.end <= len(text) and word.word == text[word.start : word.end] and -1 <= word.score <= 1

    @fuzz(max_examples=15, deadline_s=MODEL_S)
    @given(block=st.one_of(st.lists(texts, max_size=8).map("\n".join), st.builds(lambda n: "ok\n" * n, st.integers(1990, 2010))))
    def many_lines(block):
        try:
            lines = sentiment.split_lines(block)
        except DashboardError as error:
            assert isinstance(error, BadInputError) and "2,000" in str(error)
            return
        assert all(text == text.strip() and text for _, text in lines)
        assert [number for number, _ in lines] == sorted({number for number, _ in lines})
        if lines:
            scores = sentiment.score_texts(model, [text for _, text in lines])
            assert len(scores) == len(lines) and set(scores.top_labels) <= labels

    one_text()
    many_lines()


def test_a_prompt_of_any_text_is_counted_in_tokens(manager):
    info = manager.get(MODELS["sd15"], allow_standin=True).info

    @fuzz(max_examples=25, deadline_s=MODEL_S)
    @given(prompt=st.one_of(texts, st.builds(lambda unit, n: unit * n, st.sampled_from(["a lighthouse, ", "😀", "\u202e"]), st.integers(100, 50_000))))
    def count(prompt):
        try:
            usage = sd_settings.prompt_usage(info, prompt)
            generation.check_inputs(GenerationSettings(prompt=prompt, negative_prompt=prompt), CPU.type)
        except BadInputError as error:  # a weight that is no number, or past the length limits: refused with a message
            assert str(error)
        else:
            assert usage.tokens >= 0 and 1 <= usage.chunks <= prompt_syntax.MAX_CHUNKS

    count()


# Pages --------------------------------------------------------------------------------------------------------


def open_page(path: str) -> AppTest:
    at = AppTest.from_file(HOME, default_timeout=2 * PAGE_S).run()  # the first run also loads the model
    at.switch_page(path).run()
    assert not at.exception
    return at


def upload_images(at: AppTest, key: str, files: list[tuple[str, bytes]]) -> None:
    """Replace the page's uploads with `files`, each refused by name or shown, and nothing raised."""
    uploader = at.file_uploader(key=key).clear()
    for name, data in files:
        uploader.upload(name, data, "image/png")
    at.run()
    assert not at.exception, at.exception


def image_captions(at: AppTest) -> list[str]:
    return [image.proto.imgs[0].caption for image in at.get("image")]


@st.composite
def image_batches(draw) -> list[tuple[str, bytes]]:
    """One good photo and up to three hostile files, named so that each message can be traced to its file."""
    hostile = draw(st.lists(image_files(), min_size=1, max_size=3))
    files = [(f"hostile{i}-{name}", data) for i, (name, data) in enumerate(hostile)]
    files.insert(draw(st.integers(0, len(files))), ("good.png", IMAGES["photo.png"]))
    return files


def assert_each_file_shown_or_refused(at: AppTest, files: list[tuple[str, bytes]]) -> None:
    errors, captions = [error.value for error in at.error], image_captions(at)
    assert any(caption.startswith("good.png") for caption in captions)  # the good file's result is still shown
    for name, _ in files:
        assert any(caption.startswith(name) for caption in captions) or any(name in error for error in errors)


def test_hotdog_page_shows_or_refuses_each_hostile_upload_and_keeps_the_good_one(app_env):
    at = open_page("app_pages/hotdog.py")

    @fuzz(max_examples=15, deadline_s=PAGE_S)
    @given(files=image_batches())
    def upload(files):
        upload_images(at, "hotdog:upload", files)
        assert_each_file_shown_or_refused(at, files)

    upload()


def test_imagenet_page_shows_or_refuses_each_hostile_upload_and_keeps_the_good_one(app_env):
    at = open_page("app_pages/imagenet.py")

    @fuzz(max_examples=8, deadline_s=PAGE_S)
    @given(files=image_batches())
    def upload(files):
        upload_images(at, "imagenet:upload", files)
        assert_each_file_shown_or_refused(at, files)
        assert at.session_state["imagenet:run"] is not None

    upload()


SENTIMENT = "app_pages/sentiment.py"
RESULT_KEY = "sentiment:csv_result"


def classify_file(at: AppTest) -> None:
    """Press Classify, let the background job end, and rerun as the progress fragment does when it sees the end."""
    at.button(key="sentiment:run").click().run()
    if "sentiment:csv_run" in at.session_state:  # a small file may be done and collected by the click's own rerun
        assert at.session_state["sentiment:csv_run"].job.wait(PAGE_S)
        at.run()
    assert not at.exception, at.exception
    assert at.session_state["sentiment:csv_note"] is None if "sentiment:csv_note" in at.session_state else True  # no failed job


def test_sentiment_page_takes_any_file_and_keeps_the_results_it_showed(app_env):
    at = open_page(SENTIMENT)
    at.file_uploader(key="sentiment:file").upload("good.csv", b"text\nnice\nbad\n", "text/csv").run()
    classify_file(at)
    shown = {"result": at.session_state[RESULT_KEY]}

    @fuzz(max_examples=20, deadline_s=PAGE_S)
    @given(
        file=csv_files, extension=st.sampled_from(["csv", "tsv", "tab", "txt"]),
        encoding=st.sampled_from(["auto-detect", *tables.ENCODINGS]), classify=st.integers(0, 3).map(lambda n: n == 0),
    )
    def upload(file, extension, encoding, classify):
        name, data = f"{file[0]}.{extension}", file[1]  # the uploader refuses other extensions before the page runs
        at.selectbox(key="sentiment:encoding").select(encoding)
        at.file_uploader(key="sentiment:file").clear().upload(name, data, "text/csv").run()
        assert not at.exception, at.exception
        assert at.session_state[RESULT_KEY] is shown["result"]  # the results shown before stay, whatever the new file
        result = shown["result"]
        assert f"Results: {result.name}, column “{result.column}”" in [header.value for header in at.subheader]
        described = any(f"**{name}**:" in caption.value for caption in at.caption)
        assert described or at.error  # the new file is described, or refused with a message
        run_buttons = [button for button in at.button if button.key == "sentiment:run" and not button.disabled]
        if classify and run_buttons:  # a column of text was found
            classify_file(at)  # hostile cells through the background job: a result, never a failed job
            shown["result"] = at.session_state[RESULT_KEY]
            assert shown["result"].name == name and len(shown["result"].frame) == len(at.session_state["sentiment:table"][1].frame)

    upload()


def test_sentiment_page_takes_any_text_and_keeps_the_other_tabs_result(app_env):
    at = open_page(SENTIMENT)
    at.text_area(key="sentiment:lines").input("great film\nawful plot").run()
    lines_result = at.session_state["sentiment:lines_result"]

    @fuzz(max_examples=15, deadline_s=PAGE_S)
    @given(text=texts)
    def type_text(text):
        at.text_area(key="sentiment:text").input(text).run()
        assert not at.exception, at.exception
        assert at.session_state["sentiment:lines_result"] is lines_result
        if text.strip():
            assert any(markdown.value.startswith("### :") for markdown in at.markdown) or at.error
        else:
            assert at.info

    @fuzz(max_examples=10, deadline_s=PAGE_S)
    @given(block=st.lists(texts, max_size=6).map("\n".join))
    def type_lines(block):
        one_result = at.session_state.get("sentiment:one") if "sentiment:one" in at.session_state else None
        at.text_area(key="sentiment:lines").input(block).run()
        assert not at.exception, at.exception
        assert (at.session_state["sentiment:one"] if "sentiment:one" in at.session_state else None) is one_result

    type_text()
    type_lines()


GENERATE = "app_pages/generate.py"
FORM = ("prompt", "negative", "steps", "guidance", "width", "height", "random_seed", "seed", "scheduler", "precision", "memory_mode", "mode", "strength")
STRENGTH_SLIDER = (sd_settings.MIN_STRENGTH, 1.0)  # app_pages/generate.py's slider: what core accepts


def form_values(at: AppTest) -> dict:
    return {name: at.session_state[f"generate:{name}"] for name in FORM}


def png_with(text: str) -> tuple[bytes, str]:
    return pnginfo.png_with_parameters(Image.new("RGB", (8, 8)), text), text


def open_generate_page_with_one_image() -> AppTest:
    at = open_page(GENERATE)
    at.toggle(key="generate:random_seed").set_value(False).run()
    for name, value in {"width": 64, "height": 64, "steps": 2, "seed": 3}.items():
        at.number_input(key=f"generate:{name}").set_value(value)
    at.text_area(key="generate:prompt").input("a lighthouse").run()
    at.button(key="generate:start").click().run()
    wait_for_generation_runs(at, PAGE_S)
    at.run()
    assert len(at.session_state["generate:gallery"]) == 1
    return at


def test_generate_page_takes_any_dropped_png_and_prompt_and_keeps_its_gallery(app_env):
    at = open_generate_page_with_one_image()
    gallery = at.session_state["generate:gallery"]

    @fuzz(max_examples=20, deadline_s=PAGE_S)
    @given(png=st.one_of(hostile_pngs(), parameters_texts().map(png_with)))
    @example(png=png_with("p\nSteps: 1000, Sampler: Euler, CFG scale: nan, Seed: -3, Size: 100x4000"))  # the form showed 1 step, 64 px
    @example(png=png_with("p\nSteps: 20, Sampler: Euler, Seed: 1, Mode: image to image, Denoising strength: 7"))  # the slider raised
    @example(png=png_with('p\nSteps: 20, Sampler: Euler, CFG scale: 7, Model: "\\ud800"'))  # a text input raised UnicodeEncodeError
    def drop(png):
        data, _ = png
        try:
            expected = pnginfo.parse_parameters(pnginfo.read_parameters(data)).settings
        except DashboardError:
            expected = None
        assume(expected is None or expected.mode is Mode.TEXT_TO_IMAGE or expected.strength >= STRENGTH_SLIDER[0])
        # Back to the listed model in text to image: a PNG's custom model may be refused, which stops the page early.
        at.radio(key="generate:mode").set_value("text to image")
        at.selectbox(key="generate:model").select("sd15").run()
        before = form_values(at)
        at.file_uploader(key="generate:png").clear().upload("dropped.png", data, "image/png").run()
        assert not at.exception, at.exception
        assert at.session_state["generate:gallery"] is gallery and len(gallery) == 1
        after = form_values(at)
        if expected is None:
            assert after == before and at.session_state["generate:png_error"] is not None and at.error
        else:
            assert (after["steps"], after["guidance"], after["width"], after["height"]) == (expected.steps, expected.guidance_scale, expected.width, expected.height)
            assert (after["prompt"], after["negative"], after["scheduler"], after["mode"]) == (expected.prompt, expected.negative_prompt, expected.scheduler, expected.mode.value)
            assert after["random_seed"] == (expected.seed is None) and (expected.seed is None or after["seed"] == expected.seed)
            if at.session_state["generate:model"] == "custom":  # a model of the PNG's own: used if valid, else refused by name
                assert at.get("image") or any("model" in error.value.lower() for error in at.error)

    @fuzz(max_examples=10, deadline_s=PAGE_S)
    @given(prompt=st.one_of(texts, st.builds(lambda n: "a lighthouse, " * n, st.integers(10, 5000))))
    def type_prompt(prompt):
        at.text_area(key="generate:prompt").input(prompt).run()
        assert not at.exception, at.exception
        assert at.session_state["generate:gallery"] is gallery
        # The tokens and chunks, or the one message for a prompt the run would refuse (over the length limits, a bad weight).
        assert any(caption.value.startswith("Prompt: ") for caption in at.caption) or any("prompt" in error.value for error in at.error)

    drop()
    type_prompt()


def test_a_png_with_a_strength_below_the_slider_fills_the_form(app_env):
    at = open_page(GENERATE)
    data, _ = png_with("p\nSteps: 100, Sampler: Euler, CFG scale: 7, Seed: 1, Mode: image to image, Denoising strength: 0.02")
    at.file_uploader(key="generate:png").upload("low.png", data, "image/png").run()
    assert not at.exception
