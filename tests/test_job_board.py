from __future__ import annotations

import threading

import pytest

from core.errors import BadInputError
from core.gpu.queue import GpuQueue
from core.tasks.job_board import JobBoard, NotYourJobError
from core.tasks.jobs import JobState

WAIT_S = 10


class FakeRuns:
    """Work for board jobs that queues like a generation: each takes the test's GPU queue (passing no owner and no
    cancel check, as core.tasks.generation knows no board), records its turn, and holds the device until released."""

    def __init__(self) -> None:
        self.queue = GpuQueue("test")
        self.order: list[str] = []
        self.released: dict[str, threading.Event] = {}
        self.changed = threading.Condition()
        self.heard: dict[str, int] = {}  # the latest place each run was told; 0 once on the device
        self.on_device = 0
        self.most_on_device = 0

    def work(self, name: str):
        release = self.released[name] = threading.Event()

        def run(context):
            with self.queue.slot(on_wait=lambda place: self._hear(name, place)):
                with self.changed:
                    self.on_device += 1
                    self.most_on_device = max(self.most_on_device, self.on_device)
                    self.order.append(name)
                self._hear(name, 0)
                release.wait(WAIT_S)
                with self.changed:
                    self.on_device -= 1
            return name

        return run

    def _hear(self, name: str, place: int) -> None:
        with self.changed:
            self.heard[name] = place
            self.changed.notify_all()

    def wait_until_heard(self, places: dict[str, int]) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: all(self.heard.get(name) == place for name, place in places.items()), WAIT_S), self.heard

    def release_all(self) -> None:
        """From here on, who gets the device next is the queue's choice alone."""
        for release in self.released.values():
            release.set()


def submit(board: JobBoard, runs: FakeRuns, owner: str, name: str, abandoned=lambda: False) -> int:
    return board.submit(owner, runs.work(name), name, abandoned)


def places(board: JobBoard, owner: str) -> dict[str, int | None]:
    return {job.name: job.place for job in board.jobs(owner)}


def finish(board: JobBoard, job_ids: list[int]) -> None:
    for job_id in job_ids:
        assert board.wait(job_id, WAIT_S)


def test_one_users_run_goes_second_after_another_users_ten_not_eleventh():
    board, runs = JobBoard(max_unfinished_per_owner=10), FakeRuns()
    ids = [submit(board, runs, "a@example.com", "a1")]
    runs.wait_until_heard({"a1": 0})
    ids += [submit(board, runs, "a@example.com", f"a{n}") for n in range(2, 11)]
    runs.wait_until_heard({f"a{n}": n - 1 for n in range(2, 11)})  # in the order asked, whatever their threads did

    ids.append(submit(board, runs, "b-browser-id", "b1"))
    runs.wait_until_heard({"b1": 1} | {f"a{n}": n for n in range(2, 11)})
    assert places(board, "b-browser-id") == {"b1": 1}
    assert places(board, "a@example.com") == {"a1": 0} | {f"a{n}": n for n in range(2, 11)}

    runs.release_all()
    finish(board, ids)
    assert runs.order == ["a1", "b1"] + [f"a{n}" for n in range(2, 11)]
    assert runs.most_on_device == 1
    assert all(job.snapshot.state is JobState.DONE and job.place is None for job in board.jobs("a@example.com"))


def test_cancelling_a_waiting_run_takes_it_out_at_once_and_the_others_move_up():
    board, runs = JobBoard(max_unfinished_per_owner=10), FakeRuns()
    ids = [submit(board, runs, "a", "a1")]
    runs.wait_until_heard({"a1": 0})
    ids += [submit(board, runs, "a", name) for name in ("a2", "a3", "a4")]
    runs.wait_until_heard({"a2": 1, "a3": 2, "a4": 3})

    board.cancel("a", ids[1])
    assert board.wait(ids[1], WAIT_S)  # while a1 still holds the device
    runs.wait_until_heard({"a3": 1, "a4": 2})
    assert places(board, "a") == {"a1": 0, "a2": None, "a3": 1, "a4": 2}
    assert [job.snapshot.state for job in board.jobs("a")][1] is JobState.CANCELLED

    runs.release_all()
    finish(board, ids)
    assert runs.order == ["a1", "a3", "a4"]


def test_nobody_can_cancel_or_collect_another_users_run():
    board, runs = JobBoard(max_unfinished_per_owner=10), FakeRuns()
    theirs = submit(board, runs, "a@example.com", "a1")
    runs.wait_until_heard({"a1": 0})

    with pytest.raises(NotYourJobError, match=f"Run {theirs} is not one of yours"):
        board.cancel("b@example.com", theirs)
    runs.release_all()
    finish(board, [theirs])
    with pytest.raises(NotYourJobError):
        board.collect("b@example.com", theirs)
    assert [job.snapshot.state for job in board.jobs("a@example.com")] == [JobState.DONE]
    assert board.jobs("b@example.com") == []


def test_an_owner_may_have_only_so_many_unfinished_runs_and_may_add_again_once_one_ends():
    board, runs = JobBoard(max_unfinished_per_owner=3), FakeRuns()
    ids = [submit(board, runs, "a", name) for name in ("a1", "a2", "a3")]
    runs.wait_until_heard({"a1": 0, "a2": 1, "a3": 2})

    with pytest.raises(BadInputError, match="You already have 3 runs queued or running") as refused:
        submit(board, runs, "a", "a4")
    assert "cancel one" in refused.value.remedy
    ids.append(submit(board, runs, "b", "b1"))  # the limit is per owner

    board.cancel("a", ids[2])
    assert board.wait(ids[2], WAIT_S)
    ids.append(submit(board, runs, "a", "a5"))
    runs.release_all()
    finish(board, ids)
    assert runs.order == ["a1", "b1", "a2", "a5"]


def test_a_gone_sessions_runs_are_cancelled_and_dropped_and_the_owners_other_tab_keeps_its_own():
    board, runs = JobBoard(max_unfinished_per_owner=10), FakeRuns()
    ids = [submit(board, runs, "b", "b1")]
    runs.wait_until_heard({"b1": 0})
    closed_tab = threading.Event()
    ids += [submit(board, runs, "a", name, abandoned=closed_tab.is_set) for name in ("a1", "a2")]
    ids.append(submit(board, runs, "a", "a3"))  # the same user in another tab that stays open
    runs.wait_until_heard({"a1": 1, "a2": 2, "a3": 3})

    closed_tab.set()
    finish(board, ids[1:3])  # they leave the queue by themselves: nobody has to call the board
    runs.wait_until_heard({"a3": 1})
    assert places(board, "a") == {"a3": 1}  # nobody will collect the closed tab's results: they are gone

    runs.release_all()
    finish(board, ids)
    assert runs.order == ["b1", "a3"]


def test_finished_runs_wait_to_be_collected_but_only_so_many_and_for_so_long():
    now = [0.0]
    board = JobBoard(max_unfinished_per_owner=10, keep_finished_per_owner=2, keep_finished_s=60, clock=lambda: now[0])
    ids = [board.submit("a", lambda context, n=n: f"image {n}", f"run {n}") for n in (1, 2, 3)]
    finish(board, ids)

    assert [job.name for job in board.jobs("a")] == ["run 2", "run 3"]  # the oldest went beyond the limit
    job = board.collect("a", ids[2])
    assert job is not None and job.result == "image 3"
    assert board.collect("a", ids[2]) is None  # collected once only
    assert [job.name for job in board.jobs("a")] == ["run 2"]
    now[0] = 61.0
    assert board.jobs("a") == []  # never collected: dropped after a while


def test_a_run_not_finished_is_not_collected():
    board, runs = JobBoard(max_unfinished_per_owner=10), FakeRuns()
    running = submit(board, runs, "a", "a1")
    runs.wait_until_heard({"a1": 0})
    assert board.collect("a", running) is None
    runs.release_all()
    finish(board, [running])
    assert board.collect("a", running).result == "a1"


def test_many_threads_submitting_at_once_get_exactly_the_limit_each_and_all_runs_take_turns():
    board, runs, limit = JobBoard(max_unfinished_per_owner=4), FakeRuns(), 4
    owners, tries_per_thread, threads_per_owner = ("a", "b", "c", "d"), 5, 2
    start = threading.Barrier(len(owners) * threads_per_owner)
    accepted: list[tuple[str, int]] = []
    refused: list[str] = []
    record = threading.Lock()

    def submit_many(owner: str, thread_number: int) -> None:
        start.wait(WAIT_S)
        for attempt in range(tries_per_thread):
            try:
                job_id = submit(board, runs, owner, f"{owner}-{thread_number}-{attempt}")
            except BadInputError:
                with record:
                    refused.append(owner)
            else:
                with record:
                    accepted.append((owner, job_id))

    threads = [threading.Thread(target=submit_many, args=(owner, n)) for owner in owners for n in range(threads_per_owner)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert sorted(owner for owner, _ in accepted) == sorted(owners * limit)
    assert sorted(refused) == sorted(owners * (tries_per_thread * threads_per_owner - limit))
    assert len({job_id for _, job_id in accepted}) == len(accepted)

    runs.release_all()
    finish(board, [job_id for _, job_id in accepted])
    assert len(runs.order) == len(accepted) and runs.most_on_device == 1
    assert all(job.finished and job.snapshot.state is JobState.DONE for owner in owners for job in board.jobs(owner))
