"""The replica side of the ray backend: one Serve deployment per model (`ModelServer`), which loads the model as the
local backend does and runs the same core/tasks functions on it, and what travels back to the front end (answers,
streamed progress, the replicas' reports on the `ReplicaBoard`). The front end is core.backends.ray_client.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch
from ray import serve

from core.accel import compiled
from core.config import Settings, read_token
from core.errors import DashboardError
from core.gpu.nvml import GpuMonitor, GpuSnapshot, allocator_stats, load_nvml
from core.models import loading
from core.models.info import ModelInfo
from core.models.manager import LoadedModel, Loader, ModelManager, ModelState
from core.models.registry import ModelSpec
from core.tasks.jobs import JobCancelled, JobContext

log = logging.getLogger(__name__)

NAMESPACE = "model-dashboard"
BOARD_NAME = "replica-board"
# A replica's report older than this is from a replica that is gone (it reports at every health check).
REPORT_STALE_S = 60.0


# --- what travels between the front end and the replicas ------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A replica's answer: the value, a typed error for the page, or the news that the run was cancelled."""

    value: Any = None
    error: DashboardError | None = None
    cancelled: bool = False

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        if self.cancelled:
            raise JobCancelled
        return self.value


@dataclass(frozen=True)
class Progress:
    """One `JobContext.report` of a run on a replica, streamed to the caller."""

    done: int
    total: int
    detail: str
    preview: Any


@dataclass(frozen=True)
class ReplicaModel:
    """What the front end needs of a replica's loaded model without its weights: its `LoadedModel` less `obj`."""

    device: str
    dtype: str
    source: loading.ModelSource
    memory_bytes: int
    load_s: float
    info: ModelInfo


@dataclass(frozen=True)
class ReplicaReport:
    """One replica as it reports itself to the ReplicaBoard."""

    app: str
    key: str  # the model's registry key
    title: str
    replica_id: str
    node_ip: str
    pid: int
    state: ModelState
    device: str | None
    dtype: str | None
    memory_bytes: int | None  # the model's weights
    is_standin: bool
    source: str | None
    error: str | None
    load_s: float | None
    busy: int  # requests running on it now
    last_used: float | None  # time.time()
    gpu: GpuSnapshot | None  # its card, as NVML on its node sees it
    torch_allocated_bytes: int | None
    torch_reserved_bytes: int | None
    steps_after_cancel: tuple[int, ...]  # per cancelled run: steps it still reported after the cancel reached it
    reported_at: float


@ray.remote(num_cpus=0)
class ReplicaBoard:
    """The latest report of every replica, by replica id: the cluster-wide view of the VRAM monitor."""

    def __init__(self) -> None:
        self._reports: dict[str, ReplicaReport] = {}

    def put(self, report: ReplicaReport) -> None:
        self._reports[report.replica_id] = report

    def forget_app(self, app: str) -> None:
        self._reports = {rid: r for rid, r in self._reports.items() if r.app != app}

    def reports(self) -> list[ReplicaReport]:
        now = time.time()
        return [r for r in self._reports.values() if now - r.reported_at < REPORT_STALE_S]


def board() -> Any:
    """The cluster's one ReplicaBoard (created by `connect`, before any deployment)."""
    return ray.get_actor(BOARD_NAME, namespace=NAMESPACE)


# --- the replica --------------------------------------------------------------------------------------------------


class _RelayContext:
    """The `JobContext` a run on a replica sees: its reports go into the response stream, its cancel flag is set
    when the caller cancels the response (or goes away)."""

    def __init__(self, send: Callable[[Progress], None], stop: threading.Event) -> None:
        self._send, self._stop = send, stop
        self.last_done = 0
        self.done_at_stop: int | None = None

    def report(self, done: int, total: int, detail: str = "", preview: Any = None) -> None:
        self.last_done = done
        self._send(Progress(done, total, detail, preview))

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def check_cancelled(self) -> None:
        if self.cancelled:
            raise JobCancelled

    def stop(self) -> None:
        if not self._stop.is_set():
            self.done_at_stop = self.last_done
            self._stop.set()


def _run_to_outcome(work: Callable[[], Any], what: str) -> Outcome:
    try:
        return Outcome(value=work())
    except JobCancelled:
        return Outcome(cancelled=True)
    except DashboardError as error:
        return Outcome(error=error)
    except Exception:  # the caller must get an answer, never a hung stream: the trace stays in the replica log
        log.exception("%s failed on a replica", what)
        return Outcome(error=DashboardError(
            f"{what} failed unexpectedly on a Ray Serve replica.",
            remedy="Try again; if it keeps failing, the replica's log (Ray dashboard) has the details.",
        ))


@serve.deployment
class ModelServer:
    """One replica of one model: loads it as the local backend does, and runs the core functions on it."""

    def __init__(self, spec: ModelSpec, settings: Settings, allow_standin: bool, loader: Loader | None = None) -> None:
        # The token is never shipped with the settings: each node reads its own HF_TOKEN.
        settings = replace(settings, hf_token=read_token(os.environ))
        self._spec = spec
        self._manager = ModelManager(settings, loader or loading.load)
        self._model: LoadedModel | None = None
        self._error: DashboardError | None = None
        self._busy = 0
        self._last_used: float | None = None
        self._steps_after_cancel: deque[int] = deque(maxlen=20)
        try:
            self._model = self._manager.get(spec, allow_standin=allow_standin)
        except DashboardError as error:  # typed: the page shows it; a restart would not help, so the replica stays up
            self._error = error
        context = serve.get_replica_context()
        self._app, self._replica_id = context.app_name, context.replica_id.unique_id
        self._gpu_monitor = GpuMonitor(load_nvml()) if self._on_gpu else None
        self._board = board()
        self._publish()

    @property
    def _on_gpu(self) -> bool:
        return self._model is not None and self._model.device.type == "cuda"

    def reconfigure(self, batching: dict[str, float]) -> None:
        """Serve's `user_config`: batch size and wait change on the running replicas, with no restart."""
        for batched in (self.classify_images, self.classify, self.score_texts):
            batched.set_max_batch_size(int(batching["max_batch_size"]))
            batched.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s: a replica whose CUDA context broke is replaced."""
        if self._on_gpu:
            torch.cuda.synchronize(self._model.device)
        self._publish()

    def describe(self) -> Outcome:
        if self._error is not None:
            return Outcome(error=self._error)
        model = self._model
        return Outcome(ReplicaModel(str(model.device), str(model.dtype).removeprefix("torch."), model.source, model.memory_bytes, model.load_s, model.info))

    async def wait_for_compiles(self, timeout_s: float) -> Outcome:
        """Until this replica's background compiles are done: what benchmarks wait for to measure the steady state."""
        return Outcome(await asyncio.to_thread(compiled.wait_until_settled, timeout_s))

    # Short requests: batched across sessions -----------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify_images(self, requests: list[list]) -> list[Outcome]:
        from core.tasks.classify import classify_images

        return await self._in_one_pass(requests, lambda images: classify_images(self._model, images), _split_classification)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify(self, requests: list[tuple[list, int]]) -> list[Outcome]:
        """ImageNet: requests with the same top_k share a pass."""
        from core.tasks import imagenet

        answers: list[Outcome | None] = [None] * len(requests)
        for top_k in {top_k for _, top_k in requests}:
            positions = [i for i, (_, k) in enumerate(requests) if k == top_k]
            outcomes = await self._in_one_pass(
                [requests[i][0] for i in positions], lambda images, k=top_k: imagenet.classify(self._model, images, k), _split_classification
            )
            for position, outcome in zip(positions, outcomes, strict=True):
                answers[position] = outcome
        return answers

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def score_texts(self, requests: list[list[str]]) -> list[Outcome]:
        from core.tasks import sentiment

        return await self._in_one_pass(requests, lambda texts: sentiment.score_texts(self._model, texts), _split_scores)

    async def _in_one_pass(self, requests: list[list], run: Callable[[list], Any], split: Callable[[Any, list[int]], list[Any]]) -> list[Outcome]:
        """Every request's items in one call of `run`, split back per request, so that each caller gets what the
        call would give it alone. An empty request, or a batch that fails with a typed error (one request's bad
        input), runs request by request instead, so that only its own caller gets the error."""
        if self._error is not None:
            return [Outcome(error=self._error)] * len(requests)
        answers: list[Outcome | None] = [None] * len(requests)
        together = [i for i, request in enumerate(requests) if request]
        if len(together) > 1:
            whole = await self._in_thread(lambda: _run_to_outcome(lambda: run([item for i in together for item in requests[i]]), "a batch"))
            if whole.error is None:
                for i, part in zip(together, split(whole.value, [len(requests[i]) for i in together]), strict=True):
                    answers[i] = Outcome(part)
        for i, answer in enumerate(answers):
            if answer is None:
                answers[i] = await self._in_thread(lambda request=requests[i]: _run_to_outcome(lambda: run(request), "a request"))
        return answers

    # Single requests -----------------------------------------------------------------------------------------------

    async def grad_cam(self, image: Any, class_index: int) -> Outcome:
        from core.tasks import imagenet

        return await self._answer(lambda: imagenet.grad_cam(self._model, image, class_index), "Grad-CAM")

    async def explain(self, text: str, method: str, steps: int, label: str | None) -> Outcome:
        from core.tasks import sentiment

        return await self._answer(lambda: sentiment.explain(self._model, text, method, steps, label), "word attributions")

    # Long runs: streamed -----------------------------------------------------------------------------------------

    async def score_texts_job(self, texts: list[str]):
        from core.tasks import sentiment

        async for event in self._stream(lambda context: sentiment.score_texts(self._model, texts, context), "scoring texts"):
            yield event

    async def generate(self, settings: Any, source: Any, loras: tuple):
        from core.tasks import generation

        work = lambda context: generation.generate(self._model, settings, context, source=source, loras=loras)  # noqa: E731
        async for event in self._stream(work, "image generation"):
            yield event

    async def generate_unconditional(self, settings: Any):
        from core.tasks import unconditional

        async for event in self._stream(lambda context: unconditional.generate(self._model, settings, context), "unconditional generation"):
            yield event

    async def _stream(self, work: Callable[[JobContext], Any], what: str):
        """Run `work` in a thread; yield its Progress events as they come, then its Outcome. When the caller cancels
        the response, Serve cancels this generator: the finally block sets the run's cancel flag."""
        if self._error is not None:
            yield Outcome(error=self._error)
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def send(event: Progress | Outcome) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        context = _RelayContext(send, threading.Event())

        def run() -> None:
            outcome = _run_to_outcome(lambda: work(context), what)  # type: ignore[arg-type]  # a JobContext in all but name
            if context.done_at_stop is not None:
                self._steps_after_cancel.append(context.last_done - context.done_at_stop)
            send(outcome)

        self._begin()
        worker = loop.run_in_executor(None, run)
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, Outcome):
                    break
        finally:
            context.stop()  # a no-op after the Outcome; on cancel, the run stops at its next step
            worker.add_done_callback(lambda _: self._end())

    async def _answer(self, work: Callable[[], Any], what: str) -> Outcome:
        if self._error is not None:
            return Outcome(error=self._error)
        return await self._in_thread(lambda: _run_to_outcome(work, what))

    async def _in_thread(self, work: Callable[[], Outcome]) -> Outcome:
        self._begin()
        try:
            return await asyncio.to_thread(work)
        finally:
            self._end()

    def _begin(self) -> None:
        self._busy += 1
        self._last_used = time.time()

    def _end(self) -> None:
        self._busy -= 1
        self._publish()

    def _publish(self) -> None:
        """Tell the board what this replica holds; fire and forget (a board that is gone costs nothing here)."""
        model = self._model
        gpu, allocated, reserved = None, None, None
        if self._gpu_monitor is not None:
            index = model.device.index or 0
            stats = next((s for s in allocator_stats() if s.device_index == index), None)
            allocated, reserved = (stats.allocated_bytes, stats.reserved_bytes) if stats else (None, None)
            uuid = stats.uuid if stats else None
            cards = self._gpu_monitor.snapshot().gpus
            gpu = next((card for card in cards if uuid and card.uuid == uuid), cards[index] if index < len(cards) else None)
        self._board.put.remote(ReplicaReport(
            app=self._app, key=self._spec.key, title=self._spec.title, replica_id=self._replica_id,
            node_ip=ray.util.get_node_ip_address(), pid=os.getpid(),
            state=ModelState.READY if model is not None else ModelState.FAILED,
            device=str(model.device) if model else None, dtype=str(model.dtype).removeprefix("torch.") if model else None,
            memory_bytes=model.memory_bytes if model else None, is_standin=model.is_standin if model else False,
            source=model.source.label if model else None, error=str(self._error) if self._error else None,
            load_s=model.load_s if model else None, busy=self._busy, last_used=self._last_used, gpu=gpu,
            torch_allocated_bytes=allocated, torch_reserved_bytes=reserved,
            steps_after_cancel=tuple(self._steps_after_cancel), reported_at=time.time(),
        ))


def _split_classification(run: Any, sizes: list[int]) -> list[Any]:
    parts, start = [], 0
    for size in sizes:
        parts.append(replace(run, results=run.results[start : start + size]))
        start += size
    return parts


def _split_scores(scores: Any, sizes: list[int]) -> list[Any]:
    parts, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        parts.append(replace(scores, probabilities=scores.probabilities[rows], token_counts=scores.token_counts[rows], truncated=scores.truncated[rows]))
        start += size
    return parts


