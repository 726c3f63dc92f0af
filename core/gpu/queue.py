"""A fair queue per GPU: one generation at a time on a device, turns shared round-robin between owners.

Streamlit has no request queue and a diffusers pipeline is not thread-safe, so every run takes a slot here first.
A ticket carries an owner (a user's e-mail, a browser id): each owner's first waiting ticket goes before anyone's
second, so one user's ten runs do not make another's one wait behind all ten. The ticket on the device is never
pre-empted. A waiting run learns its place whenever it changes (someone left, or joined ahead under the fair order),
and one that is cancelled (or whose session left) while it waits gives its place up, so the runs behind it move up.
"""
from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

# How often a waiting run re-checks whether it was cancelled: the cancel flag belongs to the caller and cannot wake us.
_CANCEL_POLL_S = 0.1


class SlotAbandoned(Exception):
    """The run was cancelled (or its session left) before it reached the front of the queue."""


@dataclass(frozen=True)
class Seat:
    """Whom the work running in this context queues for; core.tasks.job_board sets one around each job's work.

    A `slot()` taken inside `seated(seat)` belongs to the seat's owner, tells `on_place` its places (0 once it holds
    the device) and leaves the queue when `gives_up()` turns true, though its caller (core.tasks.generation) knows no board.
    """

    owner: str | None = None  # None: each ticket is its own owner (first come first served)
    sequence: int | None = None  # the order the owner asked in; None: the order the tickets arrive in
    on_place: Callable[[int], None] = lambda place: None
    gives_up: Callable[[], bool] = lambda: False


_NO_SEAT = Seat()
_seat: ContextVar[Seat | None] = ContextVar("gpu_queue_seat", default=None)


@contextmanager
def seated(seat: Seat) -> Iterator[None]:
    """Run the block's `slot()` calls for `seat` (a thread starts with none: set it inside the job's thread)."""
    token = _seat.set(seat)
    try:
        yield
    finally:
        _seat.reset(token)


@dataclass(eq=False)
class _Ticket:
    owner: str | None
    sequence: int
    arrival: int
    round: int  # the owner's turn: waiting tickets go by (round, arrival)

    @property
    def order(self) -> tuple[int, int]:
        return self.round, self.arrival


class GpuQueue:
    """One ticket holds the device until its `slot()` block ends; the others wait in fair order.

    Fair order is start-time fair queuing with one unit per run: a ticket's round is one past its owner's latest
    ticket in the queue, and never earlier than the round now on the device, fixed when it joins. Rounds fixed at
    arrival keep places stable: a run finishing never reshuffles who is next, only a newcomer can go ahead.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._changed = threading.Condition()
        self._holder: _Ticket | None = None  # the run on the device (or about to be: its thread may not be awake yet)
        self._waiting: list[_Ticket] = []
        self._arrivals = itertools.count()
        self._round = 0  # the round of the ticket last given the device

    def __len__(self) -> int:
        with self._changed:
            return len(self._waiting) + (self._holder is not None)

    @contextmanager
    def slot(
        self,
        on_wait: Callable[[int], None] = lambda place: None,
        cancelled: Callable[[], bool] = lambda: False,
        owner: str | None = None,
    ) -> Iterator[None]:
        """Hold the device for the block. `on_wait(place)` hears 1 for "next in line", 2 for "second", ...

        `owner` (None: the seat's, else the ticket is its own owner) is whom turns are shared between.
        Raises SlotAbandoned, after leaving the queue, when `cancelled()` turns true while waiting.
        """
        seat = _seat.get() or _NO_SEAT

        def tell(place: int) -> None:
            seat.on_place(place)  # the board first, so whoever hears `on_wait` finds the board up to date
            on_wait(place)

        with self._changed:
            ticket = self._join(seat.owner if owner is None else owner, seat.sequence)
            try:
                self._wait_for_front(ticket, tell, lambda: cancelled() or seat.gives_up())
            except BaseException:
                self._leave(ticket)
                raise
        seat.on_place(0)
        try:
            yield
        finally:
            with self._changed:
                self._leave(ticket)

    def _join(self, owner: str | None, sequence: int | None) -> _Ticket:
        arrival = next(self._arrivals)
        ticket = _Ticket(owner, arrival if sequence is None else sequence, arrival, self._round)
        if owner is not None:
            own = [waiting for waiting in self._waiting if waiting.owner == owner]
            on_device = self._holder is not None and self._holder.owner == owner
            ticket.round = max([self._round + 1 if on_device else self._round, *(waiting.round + 1 for waiting in own)])
            # The owner's rounds go to its tickets in the order it asked for them, not the order their threads came.
            rounds = sorted([ticket.round, *(waiting.round for waiting in own)])
            for mine, turn in zip(sorted([ticket, *own], key=lambda t: t.sequence), rounds, strict=True):
                mine.round = turn
        self._waiting.append(ticket)
        self._give_device_if_free()
        self._changed.notify_all()  # a newcomer can go ahead of waiting tickets: they hear their new places
        return ticket

    def _give_device_if_free(self) -> None:
        if self._holder is None and self._waiting:
            self._holder = min(self._waiting, key=lambda waiting: waiting.order)
            self._waiting.remove(self._holder)
            self._round = self._holder.round

    def _place(self, ticket: _Ticket) -> int:
        if ticket is self._holder:
            return 0
        return 1 + sum(waiting.order < ticket.order for waiting in self._waiting)

    def _wait_for_front(self, ticket: _Ticket, on_wait: Callable[[int], None], cancelled: Callable[[], bool]) -> None:
        last_place = None
        while (place := self._place(ticket)) > 0:
            if place != last_place:
                on_wait(place)
                last_place = place
            if cancelled():
                raise SlotAbandoned
            self._changed.wait(_CANCEL_POLL_S)

    def _leave(self, ticket: _Ticket) -> None:
        if ticket is self._holder:
            self._holder = None
        else:
            self._waiting.remove(ticket)
        self._give_device_if_free()
        self._changed.notify_all()


_queues: dict[str, GpuQueue] = {}
_queues_lock = threading.Lock()


def queue_for(device: object) -> GpuQueue:
    """The process-wide queue of one device (`cuda:0`, `cpu`); `cuda` and `cuda:0` are the same card."""
    name = str(device)
    if name == "cuda":
        name = "cuda:0"
    with _queues_lock:
        queue = _queues.get(name)
        if queue is None:
            queue = _queues[name] = GpuQueue(name)
        return queue
