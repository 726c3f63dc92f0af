"""core.tasks.cross_session: requests of different threads share forwards, each gets its own rows (CPU, fp32).

Deterministic: a forward that blocks until released lets the others queue behind it (`wait_until_queued` says when they
have), events order the rest; nothing sleeps and nothing is timed.
"""
from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from core.backends.base import held_for_the_run
from core.backends.local import LocalBackend
from core.config import Settings
from core.errors import BadInputError, GpuOutOfMemoryError
from core.models.registry import MODELS
from core.tasks import classify, cross_session, imagenet, sentiment
from core.tasks.cross_session import SessionBatcher, row_layout
from core.tasks.images import decode_image
from core.tasks.jobs import Job, JobState
from helpers import sentiment_with_spread_weights

WAIT_S = 60  # a safety net for a broken batcher (the test fails instead of hanging); never reached when it works
# fp32 on the CPU: a row's logits in a batch of several may be summed in another order than alone.
PROBABILITY_TOLERANCE = 1e-5


class HeldForward:
    """Wraps a forward: records each call's rows; the first call (or every call, `hold_every`) waits for `release`."""

    def __init__(self, forward: Callable[..., torch.Tensor], rows_of: Callable[..., int]) -> None:
        self.forward, self.rows_of = forward, rows_of
        self.rows: list[int] = []
        self.entered, self.release = threading.Event(), threading.Event()
        self._lock = threading.Lock()

    def __call__(self, *args: object) -> torch.Tensor:
        with self._lock:
            first = not self.rows
            self.rows.append(self.rows_of(*args))
        if first:
            self.entered.set()
            assert self.release.wait(WAIT_S), "the test never released the first forward"
        return self.forward(*args)


class Threads:
    """Calls run in threads, their results (or errors) kept in order."""

    def __init__(self) -> None:
        self.results: dict[int, object] = {}
        self._threads: list[threading.Thread] = []

    def start(self, call: Callable[[], object]) -> None:
        index = len(self._threads)

        def target() -> None:
            try:
                self.results[index] = call()
            except Exception as error:  # kept for the test to check
                self.results[index] = error

        thread = threading.Thread(target=target, daemon=True)  # a broken batcher fails the test, never hangs the run
        self._threads.append(thread)
        thread.start()

    def join(self) -> list[object]:
        for thread in self._threads:
            thread.join(WAIT_S)
            assert not thread.is_alive(), "a request never finished"
        return [self.results[i] for i in range(len(self._threads))]


def picture(colour: tuple[int, int, int], name: str, size: tuple[int, int] = (120, 90)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return decode_image(buffer.getvalue(), name)


PICTURES = [picture((40 * i, 255 - 30 * i, 90), f"{i}.png", (120 + 10 * i, 90)) for i in range(6)]


def largest_difference(together: classify.ClassificationRun, alone: classify.ClassificationRun) -> float:
    assert [r.name for r in together.results] == [r.name for r in alone.results]
    differences = [0.0]
    for mine, theirs in zip(together.results, alone.results, strict=True):
        assert [s.label for s in mine.scores] == [s.label for s in theirs.scores]
        differences += [abs(a.score - b.score) for a, b in zip(mine.scores, theirs.scores, strict=True)]
    return max(differences)


def lined_up(batcher_of: Callable[[], SessionBatcher], held: HeldForward, first: Callable[[], object], others: list[Callable[[], object]]) -> list[object]:
    """`first` runs and holds the model; `others` queue behind it; then it is released. Every result, in order."""
    threads = Threads()
    threads.start(first)
    assert held.entered.wait(WAIT_S)
    for call in others:
        threads.start(call)
    assert batcher_of().wait_until_queued(len(others), WAIT_S), "the other requests never queued"
    held.release.set()
    return threads.join()


def existing_batcher(module: torch.nn.Module) -> Callable[[], SessionBatcher]:
    return lambda: cross_session.batcher_for(module, lambda: pytest.fail("the model has no batcher yet"))


# The batcher alone, on a forward of plain tensors ---------------------------------------------------------------


def doubled(rows: torch.Tensor) -> torch.Tensor:
    if torch.isnan(rows).any():
        raise BadInputError("a row is NaN")
    return rows * 2


def never_waiting(batcher: SessionBatcher, monkeypatch: pytest.MonkeyPatch) -> SessionBatcher:
    """The batcher, failing the test where it would wait (its condition's wait is the only way it waits)."""

    def refused(*args: object) -> bool:
        raise AssertionError("the request waited")

    monkeypatch.setattr(batcher._changed, "wait", refused)
    return batcher


def test_a_lone_request_runs_at_once_as_a_batch_of_one_without_waiting_the_window(monkeypatch):
    batcher = never_waiting(SessionBatcher(window_s=3600), monkeypatch)
    held = HeldForward(doubled, lambda rows: len(rows))
    held.release.set()
    output = batcher.run((torch.ones(1, 3),), held, "key")
    assert held.rows == [1]
    assert torch.equal(output, torch.full((1, 3), 2.0))


def test_a_leader_waits_for_a_request_still_preprocessing_and_they_share_one_forward(monkeypatch):
    batcher = SessionBatcher(window_s=3600)
    leader_waits, leader_acted = threading.Event(), threading.Event()  # acted: it waits, or it ran without waiting
    real_wait = batcher._changed.wait

    def noted_wait(timeout=None):
        leader_waits.set()
        leader_acted.set()
        return real_wait(timeout)

    def early_request() -> torch.Tensor:
        try:
            return batcher.run((torch.ones(1, 3),), held, "key")
        finally:
            leader_acted.set()

    monkeypatch.setattr(batcher._changed, "wait", noted_wait)
    held = HeldForward(doubled, lambda rows: len(rows))
    held.release.set()
    preprocessing, ready = threading.Event(), threading.Event()
    threads = Threads()

    def late_request() -> torch.Tensor:
        with batcher.joining() as seat:
            preprocessing.set()
            assert ready.wait(WAIT_S)
            return seat.run((torch.full((2, 3), 5.0),), held, "key")

    threads.start(late_request)
    assert preprocessing.wait(WAIT_S)
    threads.start(early_request)
    assert leader_acted.wait(WAIT_S)
    assert leader_waits.is_set(), "the leader ran without waiting for the request still preprocessing"
    ready.set()
    late, early = threads.join()
    assert held.rows == [3]
    assert torch.equal(early, torch.full((1, 3), 2.0)) and torch.equal(late, torch.full((2, 3), 10.0))


def test_a_request_that_fails_before_submitting_is_not_waited_for(monkeypatch):
    batcher = never_waiting(SessionBatcher(window_s=3600), monkeypatch)
    with pytest.raises(BadInputError), batcher.joining():
        raise BadInputError("a broken upload")
    held = HeldForward(doubled, lambda rows: len(rows))
    held.release.set()
    assert torch.equal(batcher.run((torch.ones(1, 2),), held, "key"), torch.full((1, 2), 2.0))  # would wait an hour
    assert held.rows == [1]


def test_requests_of_another_shape_or_dtype_never_share_a_forward():
    batcher = SessionBatcher()
    layouts = []
    held = HeldForward(lambda rows: (layouts.append((tuple(rows.shape), rows.dtype)), rows * 2)[1], lambda rows: len(rows))

    def ask(rows: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: batcher.run((rows,), held, row_layout((rows,)))

    requests = [torch.ones(1, 3), torch.ones(2, 3), torch.ones(1, 4), torch.ones(1, 3), torch.ones(1, 3, dtype=torch.float64)]
    results = lined_up(lambda: batcher, held, ask(requests[0]), [ask(rows) for rows in requests[1:]])
    assert layouts == [((1, 3), torch.float32), ((3, 3), torch.float32), ((1, 4), torch.float32), ((1, 3), torch.float64)]
    for rows, result in zip(requests, results, strict=True):
        assert torch.equal(result, rows * 2) and result.dtype == rows.dtype


def test_a_forward_holds_at_most_the_row_limit_and_a_larger_request_runs_alone():
    batcher = SessionBatcher(max_rows=4)
    held = HeldForward(doubled, lambda rows: len(rows))
    requests = [torch.full((rows, 2), float(i)) for i, rows in enumerate([1, 2, 2, 1, 3, 6])]
    results = lined_up(lambda: batcher, held, lambda: batcher.run((requests[0],), held, "key"),
                       [lambda rows=rows: batcher.run((rows,), held, "key") for rows in requests[1:]])
    assert held.rows == [1, 4, 4, 6]  # [1], [2 + 2], [1 + 3], [6] alone
    for rows, result in zip(requests, results, strict=True):
        assert torch.equal(result, rows * 2)


def test_a_request_whose_rows_break_the_forward_fails_alone():
    batcher = SessionBatcher()
    held = HeldForward(doubled, lambda rows: len(rows))
    bad = torch.tensor([[1.0, float("nan")]])
    requests = [torch.ones(1, 2), torch.full((2, 2), 3.0), bad, torch.full((1, 2), 4.0)]
    results = lined_up(lambda: batcher, held, lambda: batcher.run((requests[0],), held, "key"),
                       [lambda rows=rows: batcher.run((rows,), held, "key") for rows in requests[1:]])
    assert held.rows == [1, 4, 2, 1, 1]  # the merged forward failed: each of its requests again alone
    assert isinstance(results[2], BadInputError)
    for index in (0, 1, 3):
        assert torch.equal(results[index], requests[index] * 2)


def test_out_of_memory_fails_the_whole_forward_with_a_typed_error_and_the_next_forward_runs():
    batcher = SessionBatcher(max_rows=3)

    def forward(rows: torch.Tensor) -> torch.Tensor:
        if len(rows) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (made up)")
        return rows * 2

    held = HeldForward(forward, lambda rows: len(rows))
    requests = [torch.ones(1, 2), torch.full((1, 2), 2.0), torch.full((2, 2), 3.0), torch.full((1, 2), 4.0)]
    results = lined_up(lambda: batcher, held, lambda: batcher.run((requests[0],), held, "key"),
                       [lambda rows=rows: batcher.run((rows,), held, "key") for rows in requests[1:]])
    assert held.rows == [1, 3, 1]
    assert isinstance(results[1], GpuOutOfMemoryError) and isinstance(results[2], GpuOutOfMemoryError)
    assert results[1] is not results[2]  # each thread raises its own
    assert torch.equal(results[0], requests[0] * 2) and torch.equal(results[3], requests[3] * 2)


# Wired into the local backend: the hot dog, ImageNet and sentiment stand-ins -------------------------------------


def test_hot_dog_requests_queued_during_a_forward_share_one_and_each_gets_its_own_probabilities(manager, monkeypatch):
    model = manager.get(MODELS["hotdog"], allow_standin=True)
    assert model.accel.batch_sessions
    alone = [classify.classify_images(model, [p]) for p in PICTURES]
    held = HeldForward(classify._forward, lambda module, inputs, accel: len(inputs["pixel_values"]))
    monkeypatch.setattr(classify, "_forward", held)
    asks = [lambda p=p: manager.classify_images(model, [p]) for p in PICTURES[:4]] + [lambda: manager.classify_images(model, PICTURES[4:])]
    runs = lined_up(existing_batcher(model.obj.model), held, asks[0], asks[1:])
    assert held.rows == [1, 5]
    expected = alone[:4] + [classify.classify_images(model, PICTURES[4:])]
    differences = [largest_difference(run, solo) for run, solo in zip(runs, expected, strict=True)]
    assert max(differences) <= PROBABILITY_TOLERANCE, differences


def test_imagenet_requests_with_their_own_top_k_share_a_forward(manager, monkeypatch):
    model = manager.get(MODELS["resnet50"], allow_standin=True)
    alone = [imagenet.classify(model, [p], top_k=k) for k, p in enumerate(PICTURES[:4], start=1)]
    held = HeldForward(imagenet._forward, lambda module, batch, accel: len(batch))
    monkeypatch.setattr(imagenet, "_forward", held)
    asks = [lambda k=k, p=p: manager.classify(model, [p], k) for k, p in enumerate(PICTURES[:4], start=1)]
    runs = lined_up(existing_batcher(model.obj), held, asks[0], asks[1:])
    assert held.rows == [1, 3]
    assert [len(run.results[0].scores) for run in runs] == [1, 2, 3, 4]
    differences = [largest_difference(run, solo) for run, solo in zip(runs, alone, strict=True)]
    assert max(differences) <= PROBABILITY_TOLERANCE, differences


@pytest.fixture()
def sentiment_model(manager):
    return sentiment_with_spread_weights(manager)


SHORT_TEXTS = [["good"], ["the film was ok", "I loved this movie, the cast was great"], ["awful, boring and too long. I hated it!"], ["meh"]]


def test_texts_of_different_lengths_scored_together_equal_each_request_alone(manager, sentiment_model, monkeypatch):
    model = sentiment_model
    long_text = ["a long review " * 20]  # another length class: it never pads the short ones
    requests = [["fine"], *SHORT_TEXTS, long_text]
    alone = [sentiment.score_texts(model, texts) for texts in requests]
    held = HeldForward(sentiment._forward, lambda module, input_ids, attention_mask: len(input_ids))
    monkeypatch.setattr(sentiment, "_forward", held)
    padded_lengths = []
    original_merge = sentiment.padded_to_longest

    def noted_merge(pad_id):
        merge = original_merge(pad_id)
        return lambda parts: (padded_lengths.append(sorted(ids.shape[1] for ids, _ in parts)), merge(parts))[1]

    monkeypatch.setattr(sentiment, "padded_to_longest", noted_merge)
    asks = [lambda texts=texts: manager.score_texts(model, texts) for texts in requests]
    results = lined_up(existing_batcher(model.obj.model), held, asks[0], asks[1:])
    assert held.rows == [1, 5, 1]  # "fine"; the four short requests' five texts together; the long text alone
    assert len(padded_lengths) == 1 and len(set(padded_lengths[0])) >= 3, padded_lengths  # different lengths, re-padded
    largest = 0.0
    for texts, together, solo in zip(requests, results, alone, strict=True):
        assert together.labels == solo.labels and len(together) == len(texts)
        assert np.array_equal(together.token_counts, solo.token_counts) and np.array_equal(together.truncated, solo.truncated)
        largest = max(largest, float(np.abs(together.probabilities - solo.probabilities).max()))
    assert largest <= PROBABILITY_TOLERANCE, largest


def test_many_texts_or_a_job_keep_their_own_length_sorted_batches(manager, sentiment_model, monkeypatch):
    model = sentiment_model
    monkeypatch.setattr(cross_session, "batcher_for", lambda *args: pytest.fail("a large request or a job went to the batcher"))
    many = [f"text number {i}" for i in range(sentiment.SHARED_TEXTS_AT_MOST + 1)]
    assert len(manager.score_texts(model, many)) == len(many)
    job = Job(held_for_the_run(manager, MODELS["sentiment"], True, lambda held, context: manager.score_texts(held, ["good"], context)), "test")
    assert job.wait(WAIT_S) and job.snapshot().state is JobState.DONE


def test_with_the_setting_off_each_request_runs_its_own_forward(standin_dir, monkeypatch):
    settings = Settings.from_env({"DASH_BATCH_SESSIONS": "0", "DASH_STANDIN_DIR": str(standin_dir), "DASH_COMPILE": "0", "DASH_CPU_BF16": "0"})
    backend = LocalBackend(settings)
    model = backend.get(MODELS["hotdog"], allow_standin=True)
    assert not model.accel.batch_sessions
    monkeypatch.setattr(cross_session, "batcher_for", lambda *args: pytest.fail("the batcher was used with the setting off"))
    backend.classify_images(model, PICTURES[:1])  # in this thread, so that a batcher used fails here and at once
    held = HeldForward(classify._forward, lambda module, inputs, accel: len(inputs["pixel_values"]))
    monkeypatch.setattr(classify, "_forward", held)
    threads = Threads()
    threads.start(lambda: backend.classify_images(model, PICTURES[:1]))
    assert held.entered.wait(WAIT_S)
    others = [backend.classify_images(model, [p]) for p in PICTURES[1:3]]  # done while the first forward is held
    held.release.set()
    (first,) = threads.join()
    assert held.rows == [1, 1, 1] and len(others) == 2 and first.results[0].name == "0.png"  # the held one, then the others


def test_the_settings_reach_each_model_and_its_batcher(standin_dir):
    backend = LocalBackend(Settings(standin_dir=standin_dir, compile=False, cpu_bf16=False, batch_window_ms=7.5))
    model = backend.get(MODELS["hotdog"], allow_standin=True)
    assert model.accel.batch_sessions and model.accel.batch_window_ms == 7.5
    backend.classify_images(model, PICTURES[:1])
    batcher = existing_batcher(model.obj.model)()
    assert batcher.window_s == 0.0075 and batcher.max_rows == classify.MAX_BATCH


@pytest.mark.parametrize(("device", "cuda_graphs", "shared"), [("cpu", True, True), ("cuda", False, True), ("cuda", True, False)])
def test_image_classifiers_share_forwards_except_on_a_gpu_with_cuda_graphs(manager, monkeypatch, device, cuda_graphs, shared):
    model = manager.get(MODELS["hotdog"], allow_standin=True)
    on = replace(model, device=torch.device(device), accel=replace(model.accel, batch_sessions=True, cuda_graphs=cuda_graphs))
    asked = []
    monkeypatch.setattr(classify, "classify_images", lambda model, images, across_sessions: asked.append(across_sessions))
    monkeypatch.setattr(imagenet, "classify", lambda model, images, top_k, across_sessions: asked.append(across_sessions))
    LocalBackend.classify_images(manager, on, PICTURES[:1])
    LocalBackend.classify(manager, on, PICTURES[:1], 5)
    assert asked == [shared, shared]
