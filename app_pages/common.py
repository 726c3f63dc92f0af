"""UI pieces every page shares: loading a model with a clear failure message and the stand-in offer."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import streamlit as st

from core.api import (
    BadInputError,
    Classification,
    DashboardError,
    DecodedImage,
    LabelScore,
    LoadedModel,
    ModelSpec,
    ModelUnavailableError,
    decode_image,
)
from core.app_state import get_backend

# (file, title, icon, url path): Home.py builds the navigation from this, the Home page its links.
TASK_PAGES = (
    ("app_pages/hotdog.py", "Hot dog or not", "🌭", "hotdog"),
    ("app_pages/imagenet.py", "ImageNet classifier", "🖼️", "imagenet"),
    ("app_pages/sentiment.py", "Sentiment", "💬", "sentiment"),
    ("app_pages/generate.py", "Image generation", "🎨", "generate"),
    ("app_pages/vram.py", "VRAM monitor", "📊", "vram"),
)

STANDIN_NOTE = "{title}: stand-in model with random weights. Its outputs are meaningless and only show that the page works."
# In the name of every file a stand-in model's results are downloaded as; the files' contents say so too.
STANDIN_FILE_SUFFIX = "-standin-random-weights"

# What Streamlit's Markdown (every st.markdown, caption, alert, label and image caption) reads as syntax anywhere in a
# line: emphasis, code, links and images, HTML, $ math, ~ strikethrough, | tables, & entities, and a colon that opens
# a :color[...] / :material/...: directive or an emoji shortcode.
_INLINE_SYNTAX = re.compile(r"([\\`*_\[\]<>$~|&]|:(?=[\w/\[]))")
# And what it reads as syntax only at the start of a line: headings, list items ("- ", "+ ", "1. ", "1) "), setext
# underlines ("==="). Escaping a dot or parenthesis after a number that is no list changes nothing shown.
_LINE_START_SYNTAX = re.compile(r"^(\s*\d*)([-#+=.)])", re.MULTILINE)


def literal(text: object) -> str:
    """`text` (a prompt, a file name, a model id, a message quoting one) escaped so that a Markdown element shows it
    exactly as written: `**bold**` stays two stars, `![x](http://...)` is no image the browser fetches."""
    escaped = _INLINE_SYNTAX.sub(r"\\\1", str(text))
    return _LINE_START_SYNTAX.sub(r"\1\\\2", escaped)


def show_error(error: DashboardError) -> None:
    """The error and its remedy; both may quote what the user typed, so both are shown literally."""
    st.error(f"{literal(error)}\n\n**What to do:** {literal(error.remedy)}")


def _standin_key(spec: ModelSpec) -> str:
    return f"use_standin:{spec.key}"


@contextmanager
def model_in_use(spec: ModelSpec) -> Iterator[LoadedModel]:
    """The model for one run, counted as busy so that the memory policy never moves or evicts it mid-run."""
    with get_backend().use(spec, allow_standin=st.session_state.get(_standin_key(spec), False)) as model:
        yield model


def require_model(spec: ModelSpec) -> LoadedModel:
    """The loaded model, or a message (with the stand-in offer when the real one cannot be had) and a stop."""
    allow_standin = st.session_state.get(_standin_key(spec), False)
    try:
        with st.spinner(f"Loading {literal(spec.title)}…"):
            model = get_backend().get(spec, allow_standin=allow_standin)
    except DashboardError as error:
        show_error(error)
        if isinstance(error, ModelUnavailableError):
            st.button(
                "Use the stand-in model (random weights)",
                key=f"standin_button:{spec.key}",
                on_click=st.session_state.__setitem__,
                args=(_standin_key(spec), True),
            )
        st.stop()
    if model.is_standin:
        st.warning(STANDIN_NOTE.format(title=literal(spec.title)), icon="⚠️")
    return model


SAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "samples"


def image_inputs(key: str, default_sample: str | None = None) -> list[DecodedImage]:
    """Images from uploads (several at once), the camera, or the bundled samples (`default_sample` chosen first).

    A file that cannot be read gets its own message; the others still go through.
    """
    source = st.radio("Image source", ["Upload", "Camera", "Samples"], horizontal=True, key=f"{key}:source")
    files: list[tuple[str, bytes]] = []
    if source == "Upload":
        uploads = st.file_uploader(
            "Images (JPEG, PNG, GIF, WebP, BMP)", accept_multiple_files=True, key=f"{key}:upload",
            type=["jpg", "jpeg", "png", "gif", "webp", "bmp", "tif", "tiff"],
        )
        files = [(upload.name, upload.getvalue()) for upload in uploads or []]
    elif source == "Camera":
        photo = st.camera_input("Take a photo", key=f"{key}:camera")
        files = [("camera photo", photo.getvalue())] if photo else []
    else:
        names = sorted(path.name for path in SAMPLES_DIR.glob("*.png"))
        default = [default_sample] if default_sample in names else names[:1]
        chosen = st.multiselect("Sample pictures (drawn, bundled with the app)", names, default=default, key=f"{key}:samples")
        files = [(name, (SAMPLES_DIR / name).read_bytes()) for name in chosen]
    decoded: list[DecodedImage] = []
    for name, data in files:
        try:
            decoded.append(decode_image(data, name))
        except BadInputError as error:
            show_error(error)
    return decoded


def show_scores(scores: tuple[LabelScore, ...]) -> None:
    """Every label as a bar with its probability, highest first; the winner in bold."""
    for rank, item in enumerate(scores):
        text = f"**{literal(item.label)}: {item.score:.1%}**" if rank == 0 else f"{literal(item.label)}: {item.score:.1%}"
        st.progress(min(max(item.score, 0.0), 1.0), text=text)


def show_classifications(images: list[DecodedImage], results: tuple[Classification, ...], heading: Callable[[str], str]) -> None:
    """Each image beside its scores, under the heading made of its top label."""
    for decoded, result in zip(images, results, strict=True):
        image_column, score_column = st.columns([3, 2], gap="large")
        image_column.image(decoded.image, caption=literal(decoded.caption))
        with score_column:
            st.subheader(heading(result.top.label))
            show_scores(result.scores)
