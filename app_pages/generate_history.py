"""The generation page's history: every image a user made, kept on disk with its settings (core.tasks.image_history),
per login or per browser, across reloads and restarts. Search by prompt, newest first in pages, and for each image
its settings, "Use settings" (fills the form as dropping its PNG does), a download and Delete; the usage against the
store's size limit, past which the oldest images (of anyone) are removed first.
"""
from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable

import streamlit as st
from PIL import Image

from app_pages.common import literal, show_error
from core.api import (
    BadInputError,
    DashboardError,
    GenerationResult,
    GenerationSettings,
    HistoryEntry,
    ImageRecord,
    UnconditionalResult,
    human_bytes,
    pnginfo,
    sweeps,
)
from core.app_state import get_image_history

PAGE_SIZE = 9  # images per page of the history
COLUMNS = 3  # wide enough for each image's three buttons
QUERY_KEY, PAGE_KEY, ERROR_KEY = "generate:history_query", "generate:history_page", "generate:history_error"
PENDING_KEY = "generate:history_pending"  # (PNG, record) of images made before the browser sent its id
PENDING_LIMIT = 64  # images waiting for an id that never comes (a browser that blocks the component) are not all held


def records_of(result: GenerationResult | UnconditionalResult, pngs: tuple[bytes, ...]) -> list[ImageRecord]:
    """Each image's settings as the history keeps them; the parameters text is the one written into its PNG."""
    records = []
    for i, (image, png) in enumerate(zip(result.images, pngs, strict=True)):
        if isinstance(result, UnconditionalResult):
            parameters = pnginfo.read_parameters(png)
            records.append(ImageRecord("", "", result.model_name, image.seed, image.image.width, image.image.height, result.settings.steps, parameters))
        else:
            records.append(record_of(result.settings_for(i), image.image, result.model_name, png))
    return records


def record_of(settings: GenerationSettings, image: Image.Image, model_name: str, png: bytes) -> ImageRecord:
    """A text-to-image run's image as the history keeps it: its size as made (a hires fix's is larger than `settings`')."""
    return ImageRecord(settings.prompt, settings.negative_prompt, model_name, settings.seed, image.width, image.height, settings.steps,
                       pnginfo.read_parameters(png))


def keep(owner: str | None, result: GenerationResult | UnconditionalResult, pngs: tuple[bytes, ...]) -> None:
    """Add a finished run's PNGs to the owner's history; with no owner yet (the browser has not answered) they wait
    for it (`keep_pending`)."""
    keep_records(owner, lambda: list(zip(pngs, records_of(result, pngs), strict=True)))


def keep_sweep(owner: str | None, result: sweeps.SweepResult) -> None:
    """An X/Y plot's cells, each as the run of its own settings that it is (the grid is a picture of them, not kept)."""
    keep_records(owner, lambda: [(cell.png, record_of(cell.cell.settings, cell.image, result.model_name, cell.png)) for cell in result.cells])


def keep_records(owner: str | None, pairs: Callable[[], list[tuple[bytes, ImageRecord]]]) -> None:
    st.session_state[ERROR_KEY] = None
    pending: list[tuple[bytes, ImageRecord]] = st.session_state.setdefault(PENDING_KEY, [])
    pending.extend(pairs())
    del pending[:-PENDING_LIMIT]
    keep_pending(owner)


def keep_pending(owner: str | None) -> None:
    """The images made before the browser answered with its id, kept once it has (at the next rerun): the history
    holds every image, a session's first run too. A store that cannot take them leaves a message, not a traceback: the
    gallery has them all the same."""
    pending: list[tuple[bytes, ImageRecord]] = st.session_state.get(PENDING_KEY) or []
    if owner is None or not pending:
        return
    history = get_image_history()
    taken, pending[:] = list(pending), []
    try:
        for png, record in taken:
            history.add(owner, png, record)
    except BadInputError as error:
        st.session_state[ERROR_KEY] = error
    except (OSError, sqlite3.Error) as error:
        st.session_state[ERROR_KEY] = DashboardError(f"The history could not keep these images ({error}); they are still in this session's gallery.")


def use_settings(parameters: str, fill_form: Callable[[GenerationSettings, str | None], None]) -> None:
    st.session_state[ERROR_KEY] = None
    try:
        parsed = pnginfo.parse_parameters(parameters)
    except BadInputError as error:
        st.session_state[ERROR_KEY] = error
        return
    fill_form(parsed.settings, parsed.model)


def delete(owner: str, image_id: str) -> None:
    get_image_history().delete(owner, image_id)


def first_page() -> None:
    st.session_state[PAGE_KEY] = 0


def turn_page(by: int) -> None:
    st.session_state[PAGE_KEY] = st.session_state.get(PAGE_KEY, 0) + by


def described(record: ImageRecord) -> str:
    what = f"“{literal(record.prompt)}”" if record.prompt else "no prompt (unconditional)"
    return (what + (f" · not: “{literal(record.negative_prompt)}”" if record.negative_prompt else "")
            + f"  \n{literal(record.model)} · seed {record.seed} · {record.width}×{record.height} · {record.steps} steps{sampling(record)}")


def sampling(record: ImageRecord) -> str:
    """The sampler and CFG scale from the image's own settings text: the cells of an X/Y plot often differ in them only.
    An unconditional (DDPM) image's text has neither (the reader would fill in defaults)."""
    if "CFG scale: " not in record.parameters:
        return ""
    try:
        settings = pnginfo.parse_parameters(record.parameters).settings
    except BadInputError:
        return ""
    return f" · {settings.scheduler} · CFG {settings.guidance_scale:g}"


def show_image(owner: str, entry: HistoryEntry, fill_form: Callable[[GenerationSettings, str | None], None]) -> None:
    stored = get_image_history().get(owner, entry.id)
    if stored is None:  # deleted (or evicted) since the page was listed
        return
    with st.container(border=True, key=f"generate:history:{entry.id}"):
        st.image(stored.png_bytes, width="stretch")
        st.caption(described(entry.record) + f"  \n{time.strftime('%Y-%m-%d %H:%M', time.localtime(entry.created_at))} · {human_bytes(entry.byte_size)}")
        st.button("Use settings", key=f"generate:history_use:{entry.id}", on_click=use_settings, args=(entry.record.parameters, fill_form),
                  help="Fill the form with this image's settings", icon="↩️", width="stretch")
        download_column, delete_column = st.columns(2)
        download_column.download_button("PNG", stored.png_bytes, file_name=f"history-seed{entry.record.seed}-{entry.id[:8]}.png", mime="image/png",
                                        key=f"generate:history_download:{entry.id}", icon="⬇️", on_click="ignore", width="stretch")
        delete_column.button("Delete", key=f"generate:history_delete:{entry.id}", on_click=delete, args=(owner, entry.id), icon="🗑️", width="stretch")


def history_panel(owner: str | None, fill_form: Callable[[GenerationSettings, str | None], None]) -> None:
    """The owner's kept images, newest first, PAGE_SIZE at a time; `fill_form` puts settings in the page's form."""
    st.divider()
    st.subheader("History")
    if owner is None:
        st.caption("Your history appears once this browser has sent its id (a moment after the page opens).")
        return
    history = get_image_history()
    mine, everyone = history.usage(owner), history.usage()
    st.caption(f"Your {mine.image_count} kept image{'' if mine.image_count == 1 else 's'} ({human_bytes(mine.total_bytes)}), kept across reloads and "
               f"restarts for {'your login' if owner.startswith('user:') else 'this browser'}. The history holds {human_bytes(everyone.total_bytes)} "
               f"of its {human_bytes(everyone.max_bytes)} limit for all users; past it the oldest images are removed first.")
    if st.session_state.get(ERROR_KEY):
        show_error(st.session_state[ERROR_KEY])
    query = st.text_input("Search prompts", key=QUERY_KEY, on_change=first_page, placeholder="any part of a prompt")
    total = history.count(owner, query)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    page = min(max(st.session_state.get(PAGE_KEY, 0), 0), pages - 1)  # a search or a delete may leave fewer pages
    st.session_state[PAGE_KEY] = page
    if total == 0:
        st.info("No kept image matches this search." if query.strip() else "Nothing kept yet: the images you generate appear here.")
        return
    newer_column, where_column, older_column = st.columns([1, 3, 1], vertical_alignment="center")
    newer_column.button("Newer", key="generate:history_newer", on_click=turn_page, args=(-1,), disabled=page == 0, icon="⬅️")
    where_column.caption(f"Page {page + 1} of {pages} · {total} image{'' if total == 1 else 's'}" + (" matching the search" if query.strip() else "") + ", newest first")
    older_column.button("Older", key="generate:history_older", on_click=turn_page, args=(1,), disabled=page == pages - 1, icon="➡️")
    entries = history.list(owner, query, PAGE_SIZE, page * PAGE_SIZE)
    columns = st.columns(COLUMNS)
    for i, entry in enumerate(entries):
        with columns[i % COLUMNS]:
            show_image(owner, entry, fill_form)
