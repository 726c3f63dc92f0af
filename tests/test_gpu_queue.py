from __future__ import annotations

import threading

import pytest

from core.gpu_queue import GpuQueue, SlotAbandoned, queue_for

WAIT_S = 10


class Waiter:
    """A thread that takes a slot, records the places it was told, and holds the slot until released."""

    def __init__(self, queue: GpuQueue, order: list[str], name: str, cancelled: threading.Event | None = None) -> None:
        self.places: list[int] = []
        self.in_slot = threading.Event()
        self.release = threading.Event()
        self.place_changed = threading.Condition()
        self.error: BaseException | None = None
        cancel = cancelled or threading.Event()
        self.thread = threading.Thread(target=self._run, args=(queue, order, name, cancel), daemon=True)

    def _on_wait(self, place: int) -> None:
        with self.place_changed:
            self.places.append(place)
            self.place_changed.notify_all()

    def _run(self, queue: GpuQueue, order: list[str], name: str, cancel: threading.Event) -> None:
        try:
            with queue.slot(on_wait=self._on_wait, cancelled=cancel.is_set):
                order.append(name)
                self.in_slot.set()
                self.release.wait(WAIT_S)
        except SlotAbandoned as error:
            self.error = error

    def start(self) -> Waiter:
        self.thread.start()
        return self

    def wait_for_place(self, place: int) -> None:
        with self.place_changed:
            assert self.place_changed.wait_for(lambda: place in self.places, WAIT_S), f"never told place {place}: {self.places}"


def test_one_run_at_a_time_first_come_first_served_and_places_move_up():
    queue, order = GpuQueue("test"), []
    first = Waiter(queue, order, "first").start()
    assert first.in_slot.wait(WAIT_S)
    second = Waiter(queue, order, "second").start()
    second.wait_for_place(1)
    third = Waiter(queue, order, "third").start()
    third.wait_for_place(2)
    assert not second.in_slot.is_set() and not third.in_slot.is_set()

    first.release.set()
    assert second.in_slot.wait(WAIT_S)
    third.wait_for_place(1)  # moved up when the first run left
    assert not third.in_slot.is_set()
    second.release.set()
    assert third.in_slot.wait(WAIT_S)
    third.release.set()
    for waiter in (first, second, third):
        waiter.thread.join(WAIT_S)
    assert order == ["first", "second", "third"]
    assert len(queue) == 0


def test_a_run_cancelled_while_waiting_frees_its_place():
    queue, order = GpuQueue("test"), []
    first = Waiter(queue, order, "first").start()
    assert first.in_slot.wait(WAIT_S)
    cancel = threading.Event()
    leaver = Waiter(queue, order, "leaver", cancelled=cancel).start()
    leaver.wait_for_place(1)
    last = Waiter(queue, order, "last").start()
    last.wait_for_place(2)

    cancel.set()
    leaver.thread.join(WAIT_S)
    assert isinstance(leaver.error, SlotAbandoned)
    last.wait_for_place(1)
    first.release.set()
    assert last.in_slot.wait(WAIT_S)
    last.release.set()
    last.thread.join(WAIT_S)
    assert order == ["first", "last"]


def test_an_error_inside_the_slot_still_frees_the_device():
    queue = GpuQueue("test")
    with pytest.raises(RuntimeError), queue.slot():
        raise RuntimeError("boom")
    assert len(queue) == 0
    with queue.slot():
        assert len(queue) == 1


def test_one_queue_per_device():
    assert queue_for("cuda") is queue_for("cuda:0")
    assert queue_for("cpu") is not queue_for("cuda:0")
    assert queue_for("cuda:1") is not queue_for("cuda:0")
