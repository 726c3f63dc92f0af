"""Every user's generation runs: submit several, see each one's place and progress, cancel any of your own.

One board per process holds each owner's jobs (a user's e-mail when logged in, else the browser's id): starting,
waiting for the GPU, on it, and finished until the page collects them. Each job is a core.tasks.jobs.Job whose work runs
in a core.gpu.queue seat, so every GPU slot it takes is its owner's (turns go round the owners) and tells the
board its place. Memory stays bounded: a few unfinished jobs per owner, a few finished ones for a while, and none of a
session that has gone.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.errors import BadInputError, DashboardError
from core.gpu.queue import Seat, SlotAbandoned, seated
from core.tasks.jobs import Job, JobCancelled, JobContext, JobSnapshot, JobState


class NotYourJobError(DashboardError):
    """An owner asked for a job that another owner submitted."""

    remedy = "Only your own runs can be cancelled or collected; reload the page to see your queue as it is."


@dataclass(frozen=True)
class BoardJob:
    """What an owner sees of one of its jobs."""

    id: int
    name: str
    place: int | None  # in its GPU's queue: 1 = next in line, 0 = on the device, None = not in line (starting, finished)
    snapshot: JobSnapshot

    @property
    def finished(self) -> bool:
        return self.snapshot.state is not JobState.RUNNING


@dataclass(eq=False)
class _Entry:
    id: int
    owner: str
    abandoned: Callable[[], bool]  # true once the session that submitted it has gone
    job: Job[Any] | None = None  # set as soon as the job exists, before the board lets anyone else see the entry
    place: int | None = None
    finished_at: float | None = None  # when the board first saw it finished, by its clock


class JobBoard:
    """Thread-safe: one instance serves every session of the process (core.app_state builds it)."""

    def __init__(
        self,
        max_unfinished_per_owner: int,
        keep_finished_per_owner: int = 20,  # a page collects finished jobs at its next rerun; these wait for it
        keep_finished_s: float = 3600.0,  # an uncollected result (a page that never reran) is dropped after this
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_unfinished_per_owner = max_unfinished_per_owner
        self._keep_finished_per_owner = keep_finished_per_owner
        self._keep_finished_s = keep_finished_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}  # every owner's, in the order they were submitted
        self._ids = itertools.count(1)

    def submit(self, owner: str, work: Callable[[JobContext], Any], name: str, abandoned: Callable[[], bool] = lambda: False) -> int:
        """Start `work` as `owner`'s job and return its id; `abandoned()` turns true once the submitting session has gone.

        Raises BadInputError when the owner already has `max_unfinished_per_owner` jobs not finished.
        """
        with self._lock:
            self._tidy()
            unfinished = sum(1 for entry in self._entries.values() if entry.owner == owner and not entry.job.finished)
            if unfinished >= self.max_unfinished_per_owner:
                raise BadInputError(
                    f"You already have {unfinished} runs queued or running, the most one user may have; this one was not added.",
                    remedy="Wait for one of them to finish, or cancel one in the queue, then add this run again.",
                )
            entry = _Entry(next(self._ids), owner, abandoned)
            entry.job = Job(self._seated(entry, work), name)
            self._entries[entry.id] = entry
            return entry.id

    def _seated(self, entry: _Entry, work: Callable[[JobContext], Any]) -> Callable[[JobContext], Any]:
        """`work` in a seat for `entry`: its GPU slots are the owner's, in the order the owner asked for them."""

        def run(context: JobContext) -> Any:
            seat = Seat(
                owner=entry.owner, sequence=entry.id,
                on_place=lambda place: self._set_place(entry, place),
                gives_up=lambda: context.cancelled or entry.abandoned(),
            )
            with seated(seat):
                try:
                    return work(context)
                except SlotAbandoned:  # the seat gave its place up: cancelled, or its session left
                    raise JobCancelled from None

        return run

    def _set_place(self, entry: _Entry, place: int) -> None:
        with self._lock:
            entry.place = place

    def jobs(self, owner: str) -> list[BoardJob]:
        """The owner's jobs, oldest first: unfinished ones and finished ones not yet collected."""
        with self._lock:
            self._tidy()
            return [self._view(entry) for entry in self._entries.values() if entry.owner == owner]

    def cancel(self, owner: str, job_id: int) -> None:
        """Ask `owner`'s job to stop: waiting, it leaves the queue at once; running, at its next step.

        Raises NotYourJobError for another owner's job; a job no longer on the board (collected) needs nothing.
        """
        with self._lock:
            entry = self._own_entry(owner, job_id)
            if entry is not None:
                entry.job.cancel()

    def collect(self, owner: str, job_id: int) -> Job[Any] | None:
        """Take a finished job off the board (its result goes to the page's gallery); None while it is unfinished
        or when it is no longer on the board. Raises NotYourJobError for another owner's job."""
        with self._lock:
            entry = self._own_entry(owner, job_id)
            if entry is None or not entry.job.finished:
                return None
            del self._entries[job_id]
            return entry.job

    def wait(self, job_id: int, timeout_s: float | None = None) -> bool:
        """Block until the job ends (for tests and scripts; pages poll `jobs()` instead)."""
        with self._lock:
            entry = self._entries.get(job_id)
        return entry is None or entry.job.wait(timeout_s)

    def _own_entry(self, owner: str, job_id: int) -> _Entry | None:
        entry = self._entries.get(job_id)
        if entry is not None and entry.owner != owner:
            raise NotYourJobError(f"Run {job_id} is not one of yours, so it was left alone.")
        return entry

    def _view(self, entry: _Entry) -> BoardJob:
        snapshot = entry.job.snapshot()
        return BoardJob(entry.id, entry.job.name, entry.place if snapshot.state is JobState.RUNNING else None, snapshot)

    def _tidy(self) -> None:
        """Cancel the jobs of sessions that have gone and drop what nobody will collect (under the lock)."""
        now = self._clock()
        finished_per_owner: dict[str, list[_Entry]] = {}
        for entry in list(self._entries.values()):
            gone = entry.abandoned()
            if gone:
                entry.job.cancel()
            if not entry.job.finished:
                continue
            if entry.finished_at is None:
                entry.finished_at = now
            if gone or now - entry.finished_at > self._keep_finished_s:
                del self._entries[entry.id]
            else:
                finished_per_owner.setdefault(entry.owner, []).append(entry)
        for finished in finished_per_owner.values():
            beyond_the_limit = len(finished) - self._keep_finished_per_owner
            for entry in finished[:max(beyond_the_limit, 0)]:  # the oldest go first
                del self._entries[entry.id]
