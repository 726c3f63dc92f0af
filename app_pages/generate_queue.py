"""The generation page's queue: every run a user adds goes on the process's job board (core.tasks.job_board), which
shares the GPU's turns between users; this panel lists the user's runs with their place, progress, the running one's
preview and a Cancel button each, and reruns the page when one of this session's runs ends so that the page collects
it into the gallery.

A session remembers the runs it submitted (their ids and owner): only the session that submitted a run collects it,
while the panel shows every run of the same owner (its other tabs too), any of which it may cancel.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import streamlit as st

from app_pages.common import literal
from core.api import BoardJob, Job, JobContext
from core.app_state import get_job_board

RUNS_KEY = "generate:runs"
OTHER_TAB_PREVIEW_WIDTH = 256


@dataclass(frozen=True)
class Run:
    job_id: int
    owner: str  # the board's owner it was submitted as (the owner may change once the browser's id arrives)
    preview_width: int  # how wide its preview is shown


def session_runs() -> dict[int, Run]:
    """This session's runs still on the board, by job id, oldest first."""
    return st.session_state.setdefault(RUNS_KEY, {})


def submit(owner: str, work: Callable[[JobContext], Any], name: str, preview_width: int, abandoned: Callable[[], bool]) -> None:
    """Add a run to the owner's queue; BadInputError (from the board) when the owner has too many already."""
    job_id = get_job_board().submit(owner, work, name, abandoned=abandoned)
    session_runs()[job_id] = Run(job_id, owner, preview_width)


def take_finished() -> list[Job[Any]]:
    """This session's finished runs, taken off the board, oldest first; runs the board dropped are forgotten."""
    board, runs, finished = get_job_board(), session_runs(), []
    for run in list(runs.values()):
        job = board.collect(run.owner, run.job_id)
        if job is not None:
            finished.append(job)
            del runs[run.job_id]
        elif run.job_id not in {listed.id for listed in board.jobs(run.owner)}:
            del runs[run.job_id]  # dropped by the board (its session counted as gone): nothing left to collect
    return finished


def place_phrase(job: BoardJob, device_word: str) -> str:
    if job.place is None:
        return "starting"  # loading the model, or checking its inputs, before it joins the line
    return f"on the {device_word}" if job.place == 0 else f"place {job.place} in line"


def capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


@st.fragment(run_every=0.5)
def queue_panel(owner: str, device_word: str) -> None:
    """The owner's unfinished runs, refreshed without rerunning the page; a run of this session ending reruns it."""
    board, runs = get_job_board(), session_runs()
    jobs = board.jobs(owner)
    if any(job.finished and job.id in runs for job in jobs):
        st.rerun()
    waiting = [job for job in jobs if not job.finished]
    if not waiting:
        return
    st.markdown(f"**Your queue** ({len(waiting)} run{'' if len(waiting) == 1 else 's'}) · turns on the {device_word} go round the users")
    for job in waiting:
        run = runs.get(job.id)
        with st.container(border=True, key=f"generate:queued:{job.id}"):
            text_column, cancel_column = st.columns([5, 2], vertical_alignment="center")
            text_column.markdown(f"**Job {job.id}** · {literal(job.name)} · {place_phrase(job, device_word)}"
                                 + ("" if run is not None else " · from another tab"))
            cancel_column.button("Cancel", key=f"generate:cancel:{job.id}", on_click=board.cancel, args=(owner, job.id), icon="⏹️")
            snapshot = job.snapshot
            st.progress(snapshot.fraction, text=literal(capitalised(snapshot.detail)))
            if job.place == 0 and snapshot.preview is not None:
                st.image(snapshot.preview, caption="Preview of the current step (a rough decode for Stable Diffusion)",
                         width=run.preview_width if run is not None else OTHER_TAB_PREVIEW_WIDTH)
