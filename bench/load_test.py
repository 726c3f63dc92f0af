"""Load test: concurrent browser and AppTest sessions against the app, with stand-in models, for a bounded time.

    python -m bench.load_test --sessions N --seconds S [--apptest-sessions M]
        [--torch-threads T] [--server-env NAME=VALUE ...] [--server-log FILE] [--screenshots DIR]

Starts the app as the README does (`streamlit run Home.py`, the project's config) on a free port with stand-in models,
warms it up with one browser session that visits every page once, then drives it with N browser sessions (Playwright,
one Chromium, one context each) while M AppTest sessions run the same pages in this process, each in its own thread.
Every session cycles through hot dog (Samples source), sentiment (a text of its own) and text to image (64x64, 3 steps,
a prompt of its own), each starting at another page so that the three kinds run side by side, and starts new requests
until S seconds are over; a session always finishes one whole cycle, so that every kind ran in every session.

Every text and prompt carries a marker `load <session> r<request>` ("load b2 r7"). After each request the newest
result on the session's page (or in its AppTest tree and session state) must be this request's, and no other session's
marker may appear anywhere in it: one that does is a wrong-session result.

Prints one JSON line per figure (bench.common.emit): sessions held, requests completed per kind with latencies,
failures with their reasons, wrong-session results, the GPU queue (waits, places, run times), the server's RSS before and
after (psutil), tracebacks in the server's log, the wall time; then one line per session. Exits 1 when a request failed,
a result reached the wrong session or the server logged a traceback through the app's code.

Without options the server runs exactly as configured. On a small CPU host two settings change the figures several
times over (docs/RELIABILITY.md, Load): `--torch-threads 1` and `--server-env STREAMLIT_RUNNER_POST_SCRIPT_GC=false`;
tests/test_load.py passes both to stay within CI time. The load generators (this process and its Chromium) run at a
lower CPU priority than the server, as users' browsers would run on other machines.

Two kinds of session, two queues: the browser sessions share the server's models and GPU queue, the AppTest sessions
share this process's. Streamlit's AppTest swaps a process-wide Runtime for each script run (and sets it back to None
after), so the script runs of AppTest sessions take turns through one lock here; their generation jobs, which run in
background threads, still overlap in the queue.
"""
from __future__ import annotations

import argparse
import asyncio
import html
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from bench.app_server import CHROMIUM_FLAGS, PROJECT_ROOT, app_server

KINDS = ("hotdog", "sentiment", "generate")
PAGE_TITLES = {"hotdog": "Hot dog or not", "sentiment": "Sentiment", "generate": "Image generation"}
PAGE_FILES = {"hotdog": "app_pages/hotdog.py", "sentiment": "app_pages/sentiment.py", "generate": "app_pages/generate.py"}
GENERATION_SIZE_PX = 64  # the stand-in UNet's attention grows with the square of the latent: keep runs tiny
GENERATION_STEPS = 3
REQUEST_TIMEOUT_S = 90  # one request, queue included: 20 times a typical one with the CPU host settings on 2 busy cores
MARKER = re.compile(r"load ([a-z]\d+) r(\d+)\b")
QUEUE_PLACE = re.compile(r"waiting for the GPU: (next|\d+)\w* in line", re.IGNORECASE)
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
VIEWPORT = {"width": 1280, "height": 900}
MIB = 1024 * 1024
# Browsers and AppTest sessions stand for users' machines, yet here they share the server's CPU cores: at a lower CPU
# priority they take no time the server could use (Chromium, started after, inherits it; the server, started before,
# does not).
CLIENT_NICENESS = 10


class LoadFailure(Exception):
    """A request did not give the result it should have (the message says what was seen)."""


@dataclass(frozen=True)
class QueueFigures:
    """What one generation request saw of the GPU queue."""

    to_start_s: float  # browser: click to the page showing the run out of the queue; AppTest: job start to out of it
    shown_waiting_s: float  # how long the page (or the job) said "waiting for the GPU: ... in line"; 0 if never seen
    furthest_place: int  # 1 for "next in line", 2 for "2nd", ...; 0 if never seen waiting
    run_s: float | None  # the run itself, as its result reports it (queue excluded)


@dataclass(frozen=True)
class Request:
    session: str
    kind: str
    seconds: float  # from the action that starts the request to its result on the page
    ok: bool
    reason: str = ""
    queue: QueueFigures | None = None  # generation only
    foreign_markers: tuple[str, ...] = ()  # other sessions' markers seen in this session after this request


@dataclass
class Session:
    name: str  # "b1" for a browser session, "a1" for an AppTest session, "w1" for the warm-up
    requests: list[Request] = field(default_factory=list)
    held: bool = False  # one connection (browser) or one AppTest from first to last request, and no failure

    def completed(self, kind: str) -> int:
        return sum(1 for r in self.requests if r.kind == kind and r.ok)

    @property
    def failures(self) -> list[Request]:
        return [r for r in self.requests if not r.ok]

    @property
    def wrong_session(self) -> list[Request]:
        return [r for r in self.requests if r.foreign_markers]


def foreign_markers(text: str, session: str) -> tuple[str, ...]:
    return tuple(sorted({m.group(0) for m in MARKER.finditer(text) if m.group(1) != session}))


def sentiment_text(marker: str) -> str:
    return f"{marker}: a wonderful film, the cast was great and the ending made me smile"


def generation_prompt(marker: str) -> str:
    return f"{marker}, a lighthouse on a cliff at dawn"


def failure_reason(error: BaseException) -> str:
    """The error's first line, and for a Playwright timeout the line that says what it waited for."""
    lines = [line.strip() for line in str(error).strip().splitlines()]
    waited = next((line for line in lines if line.startswith("- waiting for")), "")
    return f"{type(error).__name__}: {lines[0] if lines else ''}" + (f" ({waited.removeprefix('- ')})" if waited else "")


def schedule(session: Session, deadline: float, first_kind: int) -> Iterator[tuple[str, int]]:
    """(kind, request number) in the order hot dog, sentiment, generation from `first_kind` on, until the deadline has
    passed and each kind was done once; a failure ends the session (the requests after it would only repeat it)."""
    number = 0
    while (time.monotonic() < deadline or any(session.completed(kind) == 0 for kind in KINDS)) and not session.failures:
        yield KINDS[(first_kind + number) % len(KINDS)], number + 1
        number += 1


# Browser sessions ---------------------------------------------------------------------------------------------

IDLE_JS = """() => {
    const status = document.querySelector('[data-testid="stStatusWidget"]');
    return !status || !/Running|Stop/.test(status.innerText);
}"""
# Polled after Generate (window.__load set just before the click): notes when the page first says the run waits in
# line and the furthest place; true once the run has left the queue (it prepares the model or shows a step), has
# ended (its prompt in the gallery) or has failed (an error on the page).
LEFT_QUEUE_JS = """([caption]) => {
    const text = document.querySelector('[data-testid="stMain"]').innerText;
    const seen = window.__load;
    const match = text.match(/Waiting for the GPU: (next|\\d+)\\w* in line/);
    if (match) {
        seen.place = Math.max(seen.place, match[1] === 'next' ? 1 : Number(match[1]));
        if (seen.firstWaiting === null) seen.firstWaiting = performance.now();
    }
    const failed = document.querySelector('[data-testid="stException"], [data-testid="stAlertContentError"]');
    if (failed || /Preparing the model|Step \\d+ of \\d+/.test(text) || text.includes(caption)) {
        seen.left = performance.now();
        return true;
    }
    return false;
}"""
RUN_HEADING = re.compile(r"Run (\d+) · .* in ([\d.]+) s")


class BrowserSession:
    """One Playwright context on the app: one Streamlit session, moved between pages through the sidebar."""

    def __init__(self, session: Session, page, screenshots: Path | None) -> None:
        self.session, self.page, self.screenshots = session, page, screenshots
        self.sockets: list = []
        self.pending: dict[object, float] = {}  # HTTP requests without an answer yet, with when they were sent
        self.failed: list[str] = []
        page.on("websocket", self.on_websocket)
        page.on("request", self.on_request)
        page.on("requestfinished", self.on_request_done)
        page.on("requestfailed", self.on_request_failed)

    def on_websocket(self, socket) -> None:
        self.sockets.append(socket)

    def on_request(self, request) -> None:
        self.pending[request] = time.monotonic()

    def on_request_done(self, request) -> None:
        self.pending.pop(request, None)

    def on_request_failed(self, request) -> None:
        self.pending.pop(request, None)
        self.failed.append(f"{request.url} ({request.failure})")

    def network_note(self) -> str:
        """Requests without an answer for over 5 s (a page part waiting for its script, say) and failed ones."""
        now = time.monotonic()
        waiting = [f"{r.url.split('/')[-1]} for {now - t:.0f} s" for r, t in self.pending.items() if now - t > 5]
        return "; ".join(filter(None, [
            f"no answer seen: {', '.join(waiting[:8])}" if waiting else "",
            f"failed: {', '.join(self.failed[-3:])}" if self.failed else "",
        ]))

    async def idle(self) -> None:
        await self.page.wait_for_function(IDLE_JS, polling=100)

    async def open(self, url: str) -> None:
        await self.page.goto(url)
        await self.page.get_by_text("Model dashboard").first.wait_for()
        await self.idle()

    def error_boxes(self):
        return self.page.locator("[data-testid='stException'], [data-testid='stAlertContentError']")

    async def problem(self) -> str:
        """The text of an exception or error box on the page, if any."""
        if await self.error_boxes().count():
            return " | ".join(text.strip()[:300] for text in await self.error_boxes().all_inner_texts())
        return ""

    async def result(self, expected) -> None:
        """Wait for `expected`, or fail as soon as an error shows instead."""
        await expected.or_(self.error_boxes()).first.wait_for()
        if problem := await self.problem():
            raise LoadFailure(f"error on the page: {problem}")

    async def request(self, kind: str, number: int) -> Request:
        marker = f"load {self.session.name} r{number}"
        started, queue = time.perf_counter(), None
        try:
            await self.page.get_by_test_id("stSidebar").get_by_role("link", name=PAGE_TITLES[kind]).click()
            if kind == "hotdog":
                started = await self.hotdog()
            elif kind == "sentiment":
                started = await self.sentiment(marker)
            else:
                started, queue = await self.generate(marker, self.session.completed("generate") + 1)
            seconds = time.perf_counter() - started
            if problem := await self.problem():
                raise LoadFailure(f"error on the page: {problem}")
            foreign = foreign_markers(await self.page.get_by_test_id("stMain").inner_text(), self.session.name)
        except Exception as error:  # Playwright's timeouts and errors fail this request too, with their reason
            seen = " ".join(filter(None, [await self.problem() if not self.page.is_closed() else "", self.network_note()]))
            if self.screenshots is not None and not self.page.is_closed():
                self.screenshots.mkdir(parents=True, exist_ok=True)
                await self.page.screenshot(path=str(self.screenshots / f"load-failure-{self.session.name}-r{number}-{kind}.png"), full_page=True)
            return Request(self.session.name, kind, time.perf_counter() - started, False, failure_reason(error) + (f" (page: {seen})" if seen else ""))
        return Request(self.session.name, kind, seconds, True, queue=queue, foreign_markers=foreign)

    async def set_value(self, label: str, value: object, submit: str = "Enter") -> None:
        """Type a value and submit it (Enter for a number, Control+Enter for a text area): each submit reruns the page."""
        box = self.page.get_by_label(label, exact=True)
        await box.fill(str(value))
        await box.press(submit)

    async def hotdog(self) -> float:
        page = self.page
        # A fresh visit: the radio is back on Upload and the page asks for a picture.
        await page.get_by_text("Upload one or more images, take a photo, or pick a sample.").wait_for()
        await self.idle()
        started = time.perf_counter()
        await page.get_by_text("Samples", exact=True).click()
        await self.result(page.get_by_text(re.compile(r"^1 image\(s\) in \d+ ms")))
        await page.get_by_role("heading").filter(has_text=re.compile("Hot dog!|🚫")).wait_for()  # the verdict
        await self.idle()
        return started

    async def sentiment(self, marker: str) -> float:
        page = self.page
        await page.get_by_text("stand-in model with random weights").first.wait_for()
        await self.idle()
        text = sentiment_text(marker)
        started = time.perf_counter()
        await self.set_value("Text", text, submit="Control+Enter")
        # The words of this very text, highlighted, and the label with its score: the newest result is this request's.
        await self.result(page.get_by_test_id("stHtml").filter(has_text=text))
        await page.get_by_role("heading").filter(has_text="%").wait_for()
        await self.idle()
        return started

    async def generate(self, marker: str, run_number: int) -> tuple[float, QueueFigures]:
        page = self.page
        await page.get_by_text("random weights").first.wait_for()  # the stand-in is loaded
        await self.idle()
        prompt = generation_prompt(marker)
        # Every rerun request carries all the values typed so far, so one wait after the last is enough; the newest
        # gallery entry is checked below for this prompt, size and steps, so a value that got lost fails the request.
        await self.set_value("Prompt", prompt, submit="Control+Enter")
        await self.set_value("Width", GENERATION_SIZE_PX)
        await self.set_value("Height", GENERATION_SIZE_PX)
        await self.set_value("Steps", GENERATION_STEPS)
        await self.idle()

        caption = f"“{prompt}”"
        await page.evaluate("() => { window.__load = {place: 0, firstWaiting: null, left: null}; }")
        started = time.perf_counter()
        await page.get_by_role("button", name="Generate").click()
        await page.wait_for_function(LEFT_QUEUE_JS, arg=[caption], polling=100)
        to_start_s = time.perf_counter() - started
        seen = await page.evaluate("() => window.__load")
        await self.result(page.get_by_test_id("stCaptionContainer").filter(has_text=caption))
        await page.get_by_text(f"This session's images ({run_number}), newest first").wait_for()
        await self.idle()

        # The newest gallery entry is this session's newest run, made with this request's prompt and settings.
        newest = (await page.get_by_test_id("stCaptionContainer").filter(has_text="“load ").all_inner_texts())[0]
        size = f"{GENERATION_SIZE_PX}×{GENERATION_SIZE_PX}"
        if caption not in newest or f"{GENERATION_STEPS} steps" not in newest or size not in newest:
            raise LoadFailure(f"the newest gallery caption is not this request's {GENERATION_STEPS}-step {size} run: {newest!r}")
        heading = await page.get_by_test_id("stMarkdownContainer").filter(has_text=re.compile(r"^Run \d+ · ")).first.inner_text()
        match = RUN_HEADING.search(heading)
        if match is None or int(match.group(1)) != run_number:
            raise LoadFailure(f"the newest gallery entry is {heading!r}, this session's run {run_number} expected")
        shown_waiting_s = (seen["left"] - seen["firstWaiting"]) / 1000 if seen["firstWaiting"] is not None else 0.0
        return started, QueueFigures(to_start_s, shown_waiting_s, int(seen["place"]), float(match.group(2)))


async def run_browser_session(browser, url: str, session: Session, deadline: float, first_kind: int, screenshots: Path | None) -> None:
    context = await browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(REQUEST_TIMEOUT_S * 1000)
    try:
        driver = BrowserSession(session, await context.new_page(), screenshots)
        try:
            await driver.open(url)
        except Exception as error:  # recorded as this session's failure
            session.requests.append(Request(session.name, "open", 0.0, False, failure_reason(error)))
            return
        for kind, number in schedule(session, deadline, first_kind):
            session.requests.append(await driver.request(kind, number))
        streams = [s for s in driver.sockets if "_stcore/stream" in s.url]
        session.held = not session.failures and len(streams) == 1 and not streams[0].is_closed()
    finally:
        await context.close()


# AppTest sessions ---------------------------------------------------------------------------------------------

APPTEST_RUN_LOCK = threading.Lock()  # AppTest script runs swap a process-wide Runtime: one at a time


def apptest_run(target):
    """Run an AppTest (or the widget's AppTest) script once, in turn with the other AppTest sessions."""
    with APPTEST_RUN_LOCK:
        return target.run()


def apptest_text(at) -> str:
    """Everything the AppTest tree shows, as text (HTML tags stripped), to look for markers."""
    parts: list[str] = []

    def walk(node) -> None:
        if getattr(node, "proto", None) is not None:
            parts.append(str(node.proto))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at.main)
    walk(at.sidebar)
    return html.unescape(re.sub(r"<[^>]+>", "", "\n".join(parts)))


def queue_place(detail: str) -> int:
    match = QUEUE_PLACE.search(detail)
    if match is None:
        return 0
    return 1 if match.group(1) == "next" else int(match.group(1))


class AppTestSession:
    """One AppTest on Home.py: one session, moved between pages with switch_page."""

    def __init__(self, session: Session) -> None:
        from streamlit.testing.v1 import AppTest

        self.session = session
        self.at = AppTest.from_file(str(PROJECT_ROOT / "Home.py"), default_timeout=REQUEST_TIMEOUT_S)
        apptest_run(self.at)
        self.check_page()

    def request(self, kind: str, number: int) -> Request:
        marker = f"load {self.session.name} r{number}"
        started, queue = time.perf_counter(), None
        try:
            self.at.switch_page(PAGE_FILES[kind])
            apptest_run(self.at)
            self.check_page()
            if kind == "hotdog":
                started = self.hotdog()
            elif kind == "sentiment":
                started = self.sentiment(marker)
            else:
                started, queue = self.generate(marker, self.session.completed("generate") + 1)
            seconds = time.perf_counter() - started
            foreign = foreign_markers(apptest_text(self.at), self.session.name)
        except Exception as error:  # any exception fails this request, with its reason
            traceback.print_exc(file=sys.stderr)
            return Request(self.session.name, kind, time.perf_counter() - started, False, failure_reason(error))
        return Request(self.session.name, kind, seconds, True, queue=queue, foreign_markers=foreign)

    def check_page(self) -> None:
        if self.at.exception:
            raise LoadFailure(f"exception on the page: {self.at.exception[0].message}")
        if self.at.error:
            raise LoadFailure(f"error on the page: {self.at.error[0].value}")

    def hotdog(self) -> float:
        started = time.perf_counter()
        apptest_run(self.at.radio(key="hotdog:source").set_value("Samples"))
        self.check_page()
        if not any(caption.value.startswith("1 image(s) in") for caption in self.at.caption):
            raise LoadFailure("no classification caption")
        return started

    def sentiment(self, marker: str) -> float:
        text = sentiment_text(marker)
        started = time.perf_counter()
        apptest_run(self.at.text_area(key="sentiment:text").input(text))
        self.check_page()
        scored_text = self.at.session_state["sentiment:one"][0][1]  # the inputs of the result the page shows
        if scored_text != text or not any("%" in markdown.value for markdown in self.at.markdown):
            raise LoadFailure(f"the result shown is for {scored_text!r}, not for this request's text")
        if text not in apptest_text(self.at):
            raise LoadFailure("this request's text is not in the highlighted words")
        return started

    def generate(self, marker: str, run_number: int) -> tuple[float, QueueFigures]:
        at, prompt = self.at, generation_prompt(marker)
        at.text_area(key="generate:prompt").input(prompt)
        at.number_input(key="generate:width").set_value(GENERATION_SIZE_PX)
        at.number_input(key="generate:height").set_value(GENERATION_SIZE_PX)
        at.number_input(key="generate:steps").set_value(GENERATION_STEPS)
        apptest_run(at)
        started = time.perf_counter()
        apptest_run(at.button(key="generate:start").click())
        self.check_page()
        from core.app_state import get_job_board

        runs = at.session_state["generate:runs"] if "generate:runs" in at.session_state else {}
        if not runs:  # the run ended before the click's own rerun did: already in the gallery
            return self.check_generated(run_number, prompt, started, QueueFigures(0.0, 0.0, 0, time.perf_counter() - started))
        job_id, run = max(runs.items())  # this click's run: the session's newest on the board
        board = get_job_board()
        left_s, first_waiting_s, place, snapshot = None, None, 0, None
        while not board.wait(job_id, 0.05):  # a bounded wait on the job itself, looking at its place in line in between
            listed = next((job for job in board.jobs(run.owner) if job.id == job_id), None)
            if listed is None:
                break
            snapshot = listed.snapshot
            if queue_place(snapshot.detail):
                place = max(place, queue_place(snapshot.detail))
                first_waiting_s = snapshot.elapsed_s if first_waiting_s is None else first_waiting_s
            elif left_s is None and not (snapshot.detail == "starting" or snapshot.detail.startswith("waiting for")):
                left_s = snapshot.elapsed_s
            if time.perf_counter() - started > REQUEST_TIMEOUT_S:
                board.cancel(run.owner, job_id)
                raise LoadFailure(f"the generation still runs after {REQUEST_TIMEOUT_S} s: {snapshot.detail}")
        if left_s is None:  # it ended between two looks, so it left the queue no later than its end
            left_s = snapshot.elapsed_s if snapshot is not None else time.perf_counter() - started
        apptest_run(at)  # as the page's fragment does when it sees the end
        shown_waiting_s = left_s - first_waiting_s if first_waiting_s is not None else 0.0
        return self.check_generated(run_number, prompt, started, QueueFigures(left_s, shown_waiting_s, place, None))

    def check_generated(self, run_number: int, prompt: str, started: float, queue: QueueFigures) -> tuple[float, QueueFigures]:
        """The newest gallery entry is this request's run, with its prompt and size (`queue.run_s` taken from it)."""
        at = self.at
        self.check_page()
        newest = at.session_state["generate:gallery"][0]
        settings = newest.result.settings
        if newest.number != run_number or settings.prompt != prompt:
            raise LoadFailure(f"the newest gallery entry is run {newest.number} “{settings.prompt}”, expected run {run_number} “{prompt}”")
        if (settings.width, settings.height, settings.steps) != (GENERATION_SIZE_PX, GENERATION_SIZE_PX, GENERATION_STEPS):
            raise LoadFailure(f"the run was {settings.width}x{settings.height} with {settings.steps} steps")
        if f"“{prompt}”" not in apptest_text(at):
            raise LoadFailure("this request's prompt is not in the gallery captions")
        return started, replace(queue, run_s=newest.result.seconds)


def run_apptest_session(session: Session, deadline: float, first_kind: int) -> None:
    try:
        driver = AppTestSession(session)
    except Exception as error:  # recorded as this session's failure
        session.requests.append(Request(session.name, "open", 0.0, False, failure_reason(error)))
        return
    for kind, number in schedule(session, deadline, first_kind):
        session.requests.append(driver.request(kind, number))
    session.held = not session.failures


# The whole test -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    browser_sessions: list[Session]
    apptest_sessions: list[Session]
    wall_s: float
    rss_start_bytes: int  # the server just started
    rss_before_bytes: int  # after the warm-up: every page served once
    rss_after_bytes: int  # every session of the load closed
    rss_peak_bytes: int  # sampled every half second during the load


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def sample_peak(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_bytes(pid))
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


async def drive(url: str, pid: int, browsers: int, apptests: int, seconds: float, screenshots: Path | None) -> Outcome:
    from playwright.async_api import async_playwright

    if not Path(CHROMIUM).exists():
        raise SystemExit(f"Chromium not found at {CHROMIUM}: `make test` installs Debian's chromium package")
    loop = asyncio.get_running_loop()
    rss_start = rss_bytes(pid)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        # Warm-up: one browser session visits every page once (stand-ins built and loaded, libraries imported), so that
        # "before" is the memory of a server that has served everything the load asks for.
        warm = Session("w1")
        await run_browser_session(browser, url, warm, time.monotonic(), 0, screenshots)
        if warm.failures:
            raise SystemExit(f"the warm-up failed: {warm.failures[0].kind}: {warm.failures[0].reason}")
        rss_before = rss_bytes(pid)

        peak, stop = [rss_before], asyncio.Event()
        sampler = asyncio.create_task(sample_peak(pid, peak, stop))
        browser_sessions = [Session(f"b{i + 1}") for i in range(browsers)]
        apptest_sessions = [Session(f"a{i + 1}") for i in range(apptests)]
        started = time.monotonic()
        deadline = started + seconds
        with ThreadPoolExecutor(max_workers=max(apptests, 1), thread_name_prefix="apptest") as threads:
            await asyncio.gather(
                *(run_browser_session(browser, url, s, deadline, i % len(KINDS), screenshots) for i, s in enumerate(browser_sessions)),
                *(loop.run_in_executor(threads, run_apptest_session, s, deadline, (i + 1) % len(KINDS)) for i, s in enumerate(apptest_sessions)),
            )
        wall_s = time.monotonic() - started
        stop.set()
        await sampler
        await browser.close()
    rss_after = rss_bytes(pid)
    return Outcome(browser_sessions, apptest_sessions, wall_s, rss_start, rss_before, rss_after, max(peak[0], rss_after))


def summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median_s": None, "max_s": None}
    return {"median_s": round(statistics.median(values), 3), "max_s": round(max(values), 3)}


def log_tracebacks(log: str) -> tuple[list[str], list[str]]:
    """The tracebacks in the server's log: (those through the project's code, those in libraries only).

    The first kind is a failure of the app. The second is reported but not counted as one: Streamlit's server logs some
    of its own errors when a browser disconnects.
    """
    ours = (str(PROJECT_ROOT / "core"), str(PROJECT_ROOT / "app_pages"), str(PROJECT_ROOT / "Home.py"))
    app, library = [], []
    for block in log.split("Traceback (most recent call last):")[1:]:
        lines = block.strip("\n").splitlines()
        end = next((i for i, line in enumerate(lines) if line and not line.startswith(" ")), len(lines) - 1)
        trace = "\n".join(lines[: end + 1])
        (app if any(root in trace for root in ours) else library).append(trace)
    return app, library


def report(outcome: Outcome, seconds: float, log: str) -> bool:
    """Print the figures; True when nothing failed, no result reached the wrong session and the app logged no traceback."""
    from bench.common import emit

    sessions = outcome.browser_sessions + outcome.apptest_sessions
    requests = [r for s in sessions for r in s.requests]
    failures = [r for r in requests if not r.ok]
    wrong = [r for r in requests if r.foreign_markers]
    origins = (("browser", "b"), ("apptest", "a"))

    emit("load: sessions held", None, sum(s.held for s in sessions), "sessions", True,
         browser=f"{sum(s.held for s in outcome.browser_sessions)}/{len(outcome.browser_sessions)}",
         apptest=f"{sum(s.held for s in outcome.apptest_sessions)}/{len(outcome.apptest_sessions)}")
    for kind in KINDS:
        done = [r for r in requests if r.kind == kind and r.ok]
        by_origin = {
            origin: {"completed": len(times), **summary(times)}
            for origin, prefix in origins
            for times in [[r.seconds for r in done if r.session.startswith(prefix)]]
        }
        emit(f"load: {kind} requests completed", None, len(done), "requests", True, **by_origin)
    emit("load: requests per second", None, round(sum(r.ok for r in requests) / outcome.wall_s, 2), "requests/s", True)
    emit("load: failures", None, len(failures), "requests", False, reasons=[f"{r.session} {r.kind}: {r.reason}" for r in failures[:10]])
    emit("load: wrong-session results", None, len(wrong), "requests", False, seen=[f"{r.session} {r.kind}: {', '.join(r.foreign_markers)}" for r in wrong[:10]])
    for origin, prefix in origins:
        queues = [r.queue for r in requests if r.kind == "generate" and r.ok and r.queue and r.session.startswith(prefix)]
        if not queues:
            continue
        shown = summary([q.shown_waiting_s for q in queues])
        emit(f"load: GPU queue wait, {origin} sessions", None, shown["median_s"], "s", False, max_s=shown["max_s"], runs=len(queues),
             runs_seen_waiting=sum(1 for q in queues if q.furthest_place), furthest_place=max(q.furthest_place for q in queues),
             until_out_of_queue=summary([q.to_start_s for q in queues]), run_itself=summary([q.run_s for q in queues]))
    emit("load: server RSS before", None, round(outcome.rss_before_bytes / MIB, 1), "MiB", False,
         at_start_mib=round(outcome.rss_start_bytes / MIB, 1), when="after a warm-up session visited every page")
    growth = outcome.rss_after_bytes - outcome.rss_before_bytes
    emit("load: server RSS after", None, round(outcome.rss_after_bytes / MIB, 1), "MiB", False, peak_mib=round(outcome.rss_peak_bytes / MIB, 1),
         growth_mib=round(growth / MIB, 1), growth_percent=round(100 * growth / outcome.rss_before_bytes, 1))
    app_traces, library_traces = log_tracebacks(log)
    emit("load: server log tracebacks through the app's code", None, len(app_traces), "tracebacks", False,
         last_lines=[trace.splitlines()[-1] for trace in app_traces[:5]])
    emit("load: server log tracebacks in libraries only", None, len(library_traces), "tracebacks", False,
         last_lines=[trace.splitlines()[-1] for trace in library_traces[:5]])
    emit("load: wall time", None, round(outcome.wall_s, 1), "s", False, asked_s=seconds)
    for s in sessions:
        emit(f"load: session {s.name}", None, sum(r.ok for r in s.requests), "requests", True, session=s.name, held=s.held,
             **{kind: s.completed(kind) for kind in KINDS}, failures=len(s.failures), wrong_session=len(s.wrong_session))
    for trace in app_traces:
        print(f"server traceback through the app's code:\n{trace}", file=sys.stderr)
    return not failures and not wrong and not app_traces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4, help="browser sessions (Playwright contexts)")
    parser.add_argument("--seconds", type=float, default=40, help="how long sessions start new requests")
    parser.add_argument("--apptest-sessions", type=int, default=2, help="AppTest sessions in this process")
    parser.add_argument("--torch-threads", type=int,
                        help="torch's CPU threads in the server (OMP_NUM_THREADS) and in this process; default: torch's own choice, as `streamlit run` gets")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the server only, to compare settings (for example STREAMLIT_RUNNER_POST_SCRIPT_GC=false)")
    parser.add_argument("--server-log", type=Path, help="keep the server's output in this file (default: a temporary file)")
    parser.add_argument("--screenshots", type=Path, help="save a screenshot of each failed browser request in this folder")
    args = parser.parse_args()

    import torch

    from bench.common import environment

    with tempfile.TemporaryDirectory(prefix="load-test-") as folder:
        root = Path(folder)
        environ = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DASH_STANDIN_FALLBACK": "1"}
        if args.torch_threads:
            environ["OMP_NUM_THREADS"] = str(args.torch_threads)
            torch.set_num_threads(args.torch_threads)
        # The AppTest sessions read the same settings in this process, with their own stand-in folder (two processes
        # building the same stand-in in one folder at once would race).
        os.environ.update(environ, DASH_STANDIN_DIR=str(root / "standins-apptest"))
        facts = {**environment(torch.device("cpu")), "cpus": os.cpu_count(), "torch_threads": args.torch_threads or "torch's default",
                 "server_env": args.server_env, "sessions": {"browser": args.sessions, "apptest": args.apptest_sessions}}
        print(json.dumps({"environment": facts}), flush=True)
        server_environ = dict(item.split("=", 1) for item in args.server_env)
        log_path = args.server_log or root / "streamlit.log"
        with app_server(log_path, **environ, DASH_STANDIN_DIR=str(root / "standins-server"), **server_environ) as server:
            os.nice(CLIENT_NICENESS)
            outcome = asyncio.run(drive(server.url, server.process.pid, args.sessions, args.apptest_sessions, args.seconds, args.screenshots))
        ok = report(outcome, args.seconds, log_path.read_text())
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
