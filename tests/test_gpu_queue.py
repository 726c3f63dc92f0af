from __future__ import annotations

import threading
from contextlib import nullcontext

import pytest

from core.gpu.queue import GpuQueue, Seat, SlotAbandoned, queue_for, seated

WAIT_S = 10


class Waiter:
    """A thread that takes a slot, records the places it was told, and holds the slot until released."""

    def __init__(
        self, queue: GpuQueue, order: list[str], name: str, cancelled: threading.Event | None = None, owner: str | None = None, seat: Seat | None = None,
    ) -> None:
        self.places: list[int] = []
        self.in_slot = threading.Event()
        self.release = threading.Event()
        self.place_changed = threading.Condition()
        self.error: BaseException | None = None
        cancel = cancelled or threading.Event()
        self.owner, self.seat = owner, seat
        self.thread = threading.Thread(target=self._run, args=(queue, order, name, cancel), daemon=True)

    def _on_wait(self, place: int) -> None:
        with self.place_changed:
            self.places.append(place)
            self.place_changed.notify_all()

    def _run(self, queue: GpuQueue, order: list[str], name: str, cancel: threading.Event) -> None:
        try:
            with seated(self.seat) if self.seat else nullcontext(), queue.slot(on_wait=self._on_wait, cancelled=cancel.is_set, owner=self.owner):
                order.append(name)
                self.in_slot.set()
                self.release.wait(WAIT_S)
        except SlotAbandoned as error:
            self.error = error

    def start(self) -> Waiter:
        self.thread.start()
        return self

    def wait_for_place(self, place: int) -> None:
        """Until the latest place it was told is `place`."""
        with self.place_changed:
            assert self.place_changed.wait_for(lambda: self.places[-1:] == [place], WAIT_S), f"not at place {place}: told {self.places}"


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


def waiting_in_turn(queue: GpuQueue, order: list[str], runs: list[tuple[str, str | None]]) -> dict[str, Waiter]:
    """Start one waiter per (name, owner), each only once the one before it has its place: a known arrival order."""
    waiters = {}
    for name, owner in runs:
        waiter = waiters[name] = Waiter(queue, order, name, owner=owner).start()
        with waiter.place_changed:
            assert waiter.place_changed.wait_for(lambda w=waiter: w.places or w.in_slot.is_set(), WAIT_S)
    return waiters


def run_to_the_end(waiters: dict[str, Waiter]) -> None:
    """Release every waiter at once: who gets the device next is then the queue's choice alone."""
    for waiter in waiters.values():
        waiter.release.set()
    for waiter in waiters.values():
        waiter.thread.join(WAIT_S)
        assert not waiter.thread.is_alive()


def test_one_owners_ten_runs_do_not_make_anothers_one_wait_behind_them():
    queue, order = GpuQueue("test"), []
    waiters = waiting_in_turn(queue, order, [(f"a{n}", "a@example.com") for n in range(1, 11)])
    assert waiters["a1"].in_slot.wait(WAIT_S)
    assert [waiters[f"a{n}"].places[-1] for n in range(2, 11)] == list(range(1, 10))

    waiters |= waiting_in_turn(queue, order, [("b1", "b@example.com")])
    assert waiters["b1"].places == [1]  # next in line, ahead of a's nine waiting runs
    waiters["a2"].wait_for_place(2)  # told when b's run joined ahead of it
    waiters["a10"].wait_for_place(10)
    assert waiters["a1"].in_slot.is_set() and not waiters["b1"].in_slot.is_set()  # the run on the device stays there

    run_to_the_end(waiters)
    assert order == ["a1", "b1"] + [f"a{n}" for n in range(2, 11)]


def test_turns_go_round_robin_between_three_owners_and_a_newcomer_joins_the_current_round():
    queue, order = GpuQueue("test"), []
    waiters = waiting_in_turn(queue, order, [(f"{owner}{n}", owner) for owner in "abc" for n in (1, 2, 3)])
    for place, name in enumerate(("b1", "c1", "a2", "b2", "c2", "a3", "b3", "c3"), start=1):
        waiters[name].wait_for_place(place)

    waiters["a1"].release.set()
    assert waiters["b1"].in_slot.wait(WAIT_S)
    waiters |= waiting_in_turn(queue, order, [("d1", "d")])  # round 1 is on the device now: d goes after c1 only
    assert waiters["d1"].places == [2]
    run_to_the_end(waiters)
    assert order == ["a1", "b1", "c1", "d1", "a2", "b2", "c2", "a3", "b3", "c3"]


def test_each_run_with_no_owner_is_its_own_owner_and_they_keep_their_arrival_order():
    queue, order = GpuQueue("test"), []
    waiters = waiting_in_turn(queue, order, [("a1", "a"), ("a2", "a"), ("anon1", None), ("a3", "a"), ("anon2", None)])
    run_to_the_end(waiters)
    assert order == ["a1", "anon1", "anon2", "a2", "a3"]  # each anonymous run has its first turn before a's second


def test_an_owners_runs_go_in_the_order_it_asked_whatever_order_their_threads_arrive_in():
    queue, order, heard = GpuQueue("test"), [], []
    first = Waiter(queue, order, "first").start()
    assert first.in_slot.wait(WAIT_S)
    asked_second = Waiter(queue, order, "asked second", seat=Seat("a", sequence=2)).start()
    asked_second.wait_for_place(1)
    asked_first = Waiter(queue, order, "asked first", seat=Seat("a", sequence=1, on_place=heard.append)).start()
    asked_first.wait_for_place(1)
    asked_second.wait_for_place(2)
    run_to_the_end({"first": first, "asked second": asked_second, "asked first": asked_first})
    assert order == ["first", "asked first", "asked second"]
    assert heard == [1, 0]  # the seat hears its places, then 0 when it holds the device


def test_a_seat_that_gives_up_leaves_the_queue():
    queue, order, gone = GpuQueue("test"), [], threading.Event()
    first = Waiter(queue, order, "first").start()
    assert first.in_slot.wait(WAIT_S)
    leaver = Waiter(queue, order, "leaver", seat=Seat("a", gives_up=gone.is_set)).start()
    leaver.wait_for_place(1)
    gone.set()
    leaver.thread.join(WAIT_S)
    assert isinstance(leaver.error, SlotAbandoned) and len(queue) == 1
    run_to_the_end({"first": first})
