"""Requests of different sessions that reach one model together share its forward (issue 20.4).

Each browser session runs its request in its own thread; without this, 16 sessions asking for one image each make 16
forwards of one row. A `SessionBatcher` (one per model, `batcher_for`) merges their preprocessed rows instead:

- Each caller preprocesses its own inputs in its own thread (the CPU work stays parallel), inside
  `with batcher.joining() as seat:`, then hands its rows to `seat.run(...)`.
- Leader and followers, no thread of our own: a request that finds the model idle runs at once, alone unless other
  requests announced themselves (entered `joining()`) and are still preprocessing; only then does it wait for them, at
  most the collection window. A lone request therefore never waits. Requests that arrive while a forward runs queue;
  when it ends, the first of them leads the next forward with every queued request of the same key, up to `max_rows`.
- Each request gets exactly its own rows of the output. Requests with different keys (row shape, dtype, device,
  acceleration; the caller decides) never share a forward.
- Failures: out of memory fails every request of the forward with `GpuOutOfMemoryError` (memory released); any other
  error of a merged forward makes each request run again alone, so that only the one at fault fails.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from core.accel import Acceleration
from core.errors import DashboardError, GpuOutOfMemoryError
from core.models.memory import out_of_memory_guard

Inputs = tuple[torch.Tensor, ...]  # one request's tensors, rows first, each with the same number of rows
Forward = Callable[..., torch.Tensor]  # forward(*inputs) -> one output row per input row
Merge = Callable[[list[Inputs]], Inputs]  # several requests' inputs -> one batch's, rows in request order


class SharedForwardInterruptedError(DashboardError):
    """The forward this request shared with other sessions stopped without a result for it."""

    remedy = "Run it again."


def concatenated(parts: list[Inputs]) -> Inputs:
    """The requests' rows one after another, tensor by tensor (fixed-shape inputs such as images)."""
    merged = []
    for tensors in zip(*parts, strict=True):
        batch = torch.cat(tensors)
        if _is_channels_last(tensors[0]):  # kept, so that the batch runs on the kernels (and compiles) of its layout
            batch = batch.contiguous(memory_format=torch.channels_last)
        merged.append(batch)
    return tuple(merged)


def row_layout(inputs: Inputs) -> tuple:
    """What must be equal for rows to be concatenated: each tensor's row shape, dtype, device and memory layout."""
    return tuple((tuple(t.shape[1:]), t.dtype, t.device, _is_channels_last(t)) for t in inputs)


def _is_channels_last(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


class _Request:
    def __init__(self, inputs: Inputs, forward: Forward, key: Hashable) -> None:
        self.inputs, self.forward, self.key = inputs, forward, key
        self.rows = int(inputs[0].shape[0])
        self.output: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.leads = False  # handed the next forward
        self.done = False

    def result(self) -> torch.Tensor:
        if self.error is not None:
            raise self.error
        assert self.output is not None
        return self.output


@dataclass(frozen=True)
class BatcherCounts:
    """What a batcher has run so far: benchmarks read requests per forward from it."""

    forwards: int  # merged forwards, each counted once (a failed one's solo retries are not counted again)
    requests: int


class Seat:
    """A request announced to its batcher (`SessionBatcher.joining`): a leader waits a little for it."""

    def __init__(self, batcher: SessionBatcher) -> None:
        self._batcher = batcher
        self.submitted = False

    def run(self, inputs: Inputs, forward: Forward, key: Hashable) -> torch.Tensor:
        """`forward(*inputs)`, possibly as part of a larger batch; this request's own rows of the output.

        `key`: only requests with equal keys share a forward, and the batch runs its first request's `forward`, so the
        key must hold everything that makes the forwards differ (for fixed-shape inputs: `row_layout(inputs)`)."""
        if self.submitted:
            raise RuntimeError("a seat runs one request; join again for another")
        self.submitted = True
        return self._batcher._run(_Request(inputs, forward, key))


class SessionBatcher:
    """One model's forwards, shared by the requests of different threads that meet (see the module's docstring)."""

    def __init__(self, merge: Merge = concatenated, max_rows: int = 64, window_s: float = 0.002) -> None:
        if max_rows < 1 or window_s < 0:
            raise ValueError(f"`max_rows` must be at least 1 and `window_s` at least 0, not {max_rows} and {window_s}")
        self.merge, self.max_rows, self.window_s = merge, max_rows, window_s
        self._changed = threading.Condition()
        self._queue: list[_Request] = []  # submitted, not yet taken into a forward
        self._busy = False  # a leader is collecting or running a forward
        self._preparing = 0  # requests inside joining() that have not submitted yet
        self._counts = BatcherCounts(0, 0)

    @contextmanager
    def joining(self) -> Iterator[Seat]:
        """Within: this request counts as coming (a leader waits for it, at most the window); `seat.run` submits it."""
        seat = Seat(self)
        with self._changed:
            self._preparing += 1
        try:
            yield seat
        finally:
            if not seat.submitted:  # it failed before submitting (bad input): nobody waits for it any more
                with self._changed:
                    self._preparing -= 1
                    self._changed.notify_all()

    def run(self, inputs: Inputs, forward: Forward, key: Hashable) -> torch.Tensor:
        """`seat.run` without announcing first: for inputs already prepared."""
        with self.joining() as seat:
            return seat.run(inputs, forward, key)

    def counts(self) -> BatcherCounts:
        with self._changed:
            return self._counts

    def wait_until_queued(self, count: int, timeout_s: float) -> bool:
        """Whether `count` requests came to wait for the running forward within `timeout_s`: tests and benchmarks line
        requests up with it instead of sleeping."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._queue) >= count, timeout_s)

    def _run(self, request: _Request) -> torch.Tensor:
        with self._changed:
            self._preparing -= 1
            self._queue.append(request)
            self._changed.notify_all()  # a leader collecting hears the arrival
            if self._busy:
                while not (request.done or request.leads):
                    self._changed.wait()
                if request.done:
                    return request.result()
            else:
                self._busy = True
            batch = self._collect(request)
        try:
            self._execute(batch)
        finally:
            self._finish(batch)
        return request.result()

    def _collect(self, leader: _Request) -> list[_Request]:
        """(Holding the lock.) The leader and the queued requests of its key that fit, after waiting for announced ones."""
        deadline = time.monotonic() + self.window_s
        while self._preparing > 0 and self._queued_rows(leader.key) < self.max_rows:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                break
            self._changed.wait(remaining_s)
        batch, rows = [leader], leader.rows
        for request in self._queue:
            if request is not leader and request.key == leader.key and rows + request.rows <= self.max_rows:
                batch.append(request)
                rows += request.rows
        self._queue = [request for request in self._queue if all(request is not taken for taken in batch)]
        return batch

    def _queued_rows(self, key: Hashable) -> int:
        return sum(request.rows for request in self._queue if request.key == key)

    def _execute(self, batch: list[_Request]) -> None:
        """Outside the lock: one forward for the batch, each request's rows set as its output (or its error)."""
        try:
            with out_of_memory_guard(f"running {sum(r.rows for r in batch)} rows of {len(batch)} sessions' requests together"):
                if len(batch) == 1:
                    output = batch[0].forward(*batch[0].inputs)
                else:
                    output = batch[0].forward(*self.merge([request.inputs for request in batch]))
        except GpuOutOfMemoryError as error:
            for request in batch:  # one exception object per thread that raises it
                request.error = GpuOutOfMemoryError(str(error), remedy=error.remedy)
            return
        except Exception as error:  # any error of one request's input: found by running each request alone
            if len(batch) == 1:
                batch[0].error = error
                return
            for request in batch:
                self._execute([request])
            return
        start = 0
        for request in batch:
            request.output = output[start : start + request.rows]
            start += request.rows

    def _finish(self, batch: list[_Request]) -> None:
        """The batch's requests done, and the next forward handed to the first queued request."""
        with self._changed:
            self._counts = BatcherCounts(self._counts.forwards + 1, self._counts.requests + len(batch))
            for request in batch:
                if request.output is None and request.error is None:  # the leader was interrupted (KeyboardInterrupt)
                    request.error = SharedForwardInterruptedError("The forward shared with other sessions was interrupted.")
                request.done = True
            self._busy = bool(self._queue)
            if self._queue:
                self._queue[0].leads = True
            self._changed.notify_all()


_batchers: weakref.WeakKeyDictionary[torch.nn.Module, SessionBatcher] = weakref.WeakKeyDictionary()
_batchers_lock = threading.Lock()


def batcher_for(module: torch.nn.Module, make: Callable[[], SessionBatcher]) -> SessionBatcher:
    """The module's batcher, made by `make` at its first use (it keeps that row limit and window); an evicted model's
    batcher goes with it."""
    with _batchers_lock:
        batcher = _batchers.get(module)
        if batcher is None:
            batcher = _batchers[module] = make()
        return batcher


def forward_images(
    module: torch.nn.Module, accel: Acceleration, max_rows: int, prepare: Callable[[], torch.Tensor], forward: Forward, *, across_sessions: bool,
) -> torch.Tensor:
    """`forward(prepare())` for a fixed-shape batch (images); `across_sessions`: sharing the forward with other
    sessions' requests that reach `module` meanwhile, `prepare` run in this thread, announced to the batcher."""
    if not across_sessions:
        return forward(prepare())
    batcher = batcher_for(module, lambda: SessionBatcher(concatenated, max_rows, accel.batch_window_ms / 1000))
    with batcher.joining() as seat:
        batch = prepare()
        return seat.run((batch,), forward, (row_layout((batch,)), accel))
