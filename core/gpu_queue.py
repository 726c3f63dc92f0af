"""A fair first-come-first-served queue per GPU: one generation at a time on a device.

Streamlit has no request queue and a diffusers pipeline is not thread-safe, so every run takes a slot here first.
A waiting run learns its place whenever it changes, and one that is cancelled (or whose session left) while it
waits gives its place up, so the runs behind it move up.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# How often a waiting run re-checks whether it was cancelled: the cancel flag belongs to the caller and cannot wake us.
_CANCEL_POLL_S = 0.1


class SlotAbandoned(Exception):
    """The run was cancelled (or its session left) before it reached the front of the queue."""


class GpuQueue:
    """FIFO of tickets; the ticket at the front holds the device until its `slot()` block ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._changed = threading.Condition()
        self._tickets: deque[object] = deque()  # front = the run on the device (or about to be)

    def __len__(self) -> int:
        with self._changed:
            return len(self._tickets)

    @contextmanager
    def slot(
        self,
        on_wait: Callable[[int], None] = lambda place: None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Iterator[None]:
        """Hold the device for the block. `on_wait(place)` hears 1 for "next in line", 2 for "second", ...

        Raises SlotAbandoned, after leaving the queue, when `cancelled()` turns true while waiting.
        """
        ticket = object()
        with self._changed:
            self._tickets.append(ticket)
            try:
                self._wait_for_front(ticket, on_wait, cancelled)
            except BaseException:
                self._leave(ticket)
                raise
        try:
            yield
        finally:
            with self._changed:
                self._leave(ticket)

    def _wait_for_front(self, ticket: object, on_wait: Callable[[int], None], cancelled: Callable[[], bool]) -> None:
        last_place = None
        while (place := self._tickets.index(ticket)) > 0:
            if place != last_place:
                on_wait(place)
                last_place = place
            if cancelled():
                raise SlotAbandoned
            self._changed.wait(_CANCEL_POLL_S)

    def _leave(self, ticket: object) -> None:
        self._tickets.remove(ticket)
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
