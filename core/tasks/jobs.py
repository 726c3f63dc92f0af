"""Long work (a CSV of 100,000 rows, an image generation) in a background thread, outside Streamlit's reruns.

A page starts a `Job`, keeps it in `st.session_state`, and reads `job.snapshot()` on each rerun (or in a fragment).
Cancel is cooperative: the work calls `context.check_cancelled()` between steps, as Streamlit cannot stop a thread.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from core.errors import DashboardError

log = logging.getLogger(__name__)
Result = TypeVar("Result")


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobCancelled(Exception):
    """Raised inside the work by `check_cancelled()`; the job ends as CANCELLED and its partial result is dropped."""


@dataclass(frozen=True)
class JobSnapshot:
    state: JobState
    done: int
    total: int
    elapsed_s: float
    detail: str  # what the work says it is doing ("waiting for the GPU, 2nd in line", "batch 3 of 40")
    preview: Any  # the latest intermediate output the work chose to show (an image), or None
    error: DashboardError | None

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 0.0

    @property
    def rate_per_s(self) -> float | None:
        return self.done / self.elapsed_s if self.done and self.elapsed_s > 0 else None

    @property
    def eta_s(self) -> float | None:
        rate = self.rate_per_s
        return (self.total - self.done) / rate if rate else None


class JobContext:
    """What the work sees: report progress, and learn whether the user asked it to stop."""

    def __init__(self, job: Job[Any]) -> None:
        self._job = job

    def report(self, done: int, total: int, detail: str = "", preview: Any = None) -> None:
        with self._job._lock:
            self._job._done, self._job._total, self._job._detail = done, total, detail
            if preview is not None:
                self._job._preview = preview

    @property
    def cancelled(self) -> bool:
        return self._job._cancel.is_set()

    def check_cancelled(self) -> None:
        if self.cancelled:
            raise JobCancelled


class Job(Generic[Result]):
    """Runs `work(context)` in a daemon thread; `result` is set when it ends as DONE."""

    def __init__(self, work: Callable[[JobContext], Result], name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._state = JobState.RUNNING
        self._done, self._total, self._detail, self._preview = 0, 0, "starting", None
        self._error: DashboardError | None = None
        self._started = time.perf_counter()
        self._ended: float | None = None
        self.result: Result | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"job-{name}", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[JobContext], Result]) -> None:
        state, result, error = JobState.DONE, None, None
        try:
            result = work(JobContext(self))
        except JobCancelled:
            state = JobState.CANCELLED
        except DashboardError as exc:
            state, error = JobState.FAILED, exc
        except Exception:  # a page must get a message, never a dead thread: keep the trace in the log
            log.exception("job %s failed", self.name)
            # Nothing of the exception reaches the page: a library's message can quote paths, internals or a secret.
            state, error = JobState.FAILED, DashboardError(f"{self.name} failed unexpectedly.", remedy="Try again; if it keeps failing, the server log has the details.")
        with self._lock:
            self._state, self.result, self._error = state, result, error
            self._ended = time.perf_counter()
        self._finished.set()

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the job ends (for tests and scripts; pages poll `snapshot()` instead)."""
        return self._finished.wait(timeout_s)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            end = self._ended if self._ended is not None else time.perf_counter()
            return JobSnapshot(self._state, self._done, self._total, end - self._started, self._detail, self._preview, self._error)
