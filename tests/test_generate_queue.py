"""The generation page's queue through AppTest: several runs per user on the job board, their places, cancel."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.app_state import get_job_board
from core.gpu.queue import queue_for
from helpers import wait_for_generation_runs

HOME = str(Path(__file__).resolve().parent.parent / "Home.py")
WAIT_S = 60


@pytest.fixture()
def device_held(app_env) -> Iterator[threading.Event]:
    """Another user's run holds the CPU until the returned event is set, so that this session's runs wait in line."""
    holding, release = threading.Event(), threading.Event()

    def other_users_run() -> None:
        with queue_for("cpu").slot(owner="another user"):
            holding.set()
            release.wait(WAIT_S)

    other = threading.Thread(target=other_users_run)
    other.start()
    assert holding.wait(WAIT_S)
    yield release
    release.set()
    other.join(WAIT_S)


def open_page() -> AppTest:
    at = AppTest.from_file(HOME, default_timeout=WAIT_S).run()
    at.switch_page("app_pages/generate.py").run()
    at.toggle(key="generate:random_seed").set_value(False).run()
    for name, value in {"width": 64, "height": 64, "steps": 2, "seed": 5}.items():
        at.number_input(key=f"generate:{name}").set_value(value)
    return at.run()


def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition the board's worker threads make true (their places arrive from the GPU queue)."""
    pause = threading.Event()
    for _ in range(int(WAIT_S / 0.05)):
        if condition():
            return
        pause.wait(0.05)
    raise AssertionError("timed out")


def places(at: AppTest) -> list[int | None]:
    """The places of the session's unfinished runs, oldest first."""
    return [job.place for job in get_job_board().jobs(at.session_state["generate:session_owner"]) if not job.finished]


def queue_lines(at: AppTest) -> list[str]:
    """The queue panel's heading and one line per queued job."""
    return [element.value for element in at.markdown if element.value.startswith("**Your queue**") or " · image generation · " in element.value]


def test_two_runs_queued_while_the_device_is_busy_both_finish_into_the_gallery(device_held):
    at = open_page()
    at.button(key="generate:start").click().run()
    assert not at.button(key="generate:start").disabled  # Generate stays enabled while a run goes on
    at.number_input(key="generate:seed").set_value(6).run()
    at.button(key="generate:start").click().run()
    first, second = at.session_state["generate:runs"]
    wait_until(lambda: places(at) == [1, 2])
    at.run()
    assert queue_lines(at) == ["**Your queue** (2 runs) · turns on the CPU go round the users",
                               f"**Job {first}** · image generation · place 1 in line", f"**Job {second}** · image generation · place 2 in line"]

    device_held.set()
    wait_for_generation_runs(at, WAIT_S)
    at.run()
    assert not at.exception, at.exception
    gallery = at.session_state["generate:gallery"]
    assert [entry.result.settings.seed for entry in gallery] == [6, 5]  # newest first: both collected, in order
    assert not at.session_state["generate:runs"] and queue_lines(at) == []


def test_cancel_one_of_two_queued_runs_the_other_finishes(device_held):
    at = open_page()
    at.button(key="generate:start").click().run()
    at.button(key="generate:start").click().run()
    first, second = at.session_state["generate:runs"]
    wait_until(lambda: places(at) == [1, 2])
    at.run().button(key=f"generate:cancel:{first}").click().run()
    assert get_job_board().wait(first, WAIT_S)
    wait_until(lambda: places(at) == [1])  # the cancelled run left the line: the other moved up
    at.run()
    assert any("Cancelled" in info.value for info in at.info)
    assert queue_lines(at)[1:] == [f"**Job {second}** · image generation · place 1 in line"]

    device_held.set()
    wait_for_generation_runs(at, WAIT_S)
    at.run()
    assert len(at.session_state["generate:gallery"]) == 1 and not at.session_state["generate:runs"]


def test_more_runs_than_the_limit_are_refused_with_a_message(device_held, monkeypatch):
    monkeypatch.setenv("DASH_MAX_QUEUED_RUNS", "1")
    get_job_board.clear()
    try:
        at = open_page()
        at.button(key="generate:start").click().run()
        at.button(key="generate:start").click().run()
        assert len(at.session_state["generate:runs"]) == 1
        assert any("You already have 1 runs queued or running" in error.value for error in at.error)
        device_held.set()
        wait_for_generation_runs(at, WAIT_S)  # a run left going ended the interpreter under it: "terminate called", exit 134
    finally:
        get_job_board.clear()
