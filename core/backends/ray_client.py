"""The ray backend: every model a Ray Serve deployment, behind the same core functions the pages call.

`RayManager` has the local `ModelManager`'s public face (get, use, status, unload). Its `get` deploys the model as
its own Serve application (`ModelServer`, with the replicas, resources and batching of `core.backends.ray_config`) and
returns a `LoadedModel` whose `obj` is a `ServedModel`: what pages read directly (config, tokenizer, component
sizes) plus one method per core function. The core functions (`classify_images`, `imagenet.classify`,
`sentiment.score_texts`, `generation.generate`, ...) see `model.is_remote` and hand the call to that method, which
runs the same function on a replica, where a local `ModelManager` holds the model.

What Serve gives and we use:
- dynamic batching (`@serve.batch`) of classifier and sentiment requests from every session into one forward pass;
- autoscaling on queue length (`autoscaling_config`), GPU/CPU resources per replica, one SD replica per GPU;
- health checks, and replacement of a replica that dies (while loading or later); calls that lost their replica
  are sent again here, so the page never sees it;
- streaming responses for long runs: progress and previews come back as they happen, and cancelling the response
  (Serve's request cancellation) sets the replica run's cancel flag, which the run checks at every step.

Replicas report what they hold (device, memory, their GPU as NVML sees it) to one small named actor, the
`ReplicaBoard`; the VRAM monitor reads it through `RayManager.status` and `ClusterGpuMonitor`.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import ReplicaUnavailableError, RequestCancelledError

from core.accel import compiled
from core.backends.ray_config import DeploymentOptions, ServingOptions, load_deployment_options
from core.config import PROJECT_ROOT, Settings, read_token
from core.errors import DashboardError, ModelUnavailableError
from core.gpu.nvml import SNAPSHOT_TTL_S, GpuMonitor, GpuProcess, GpuReport, GpuSnapshot, allocator_stats, load_nvml
from core.models import loading
from core.models.manager import (
    CountsUses,
    GpuBudget,
    LoadedModel,
    Loader,
    ModelEntry,
    ModelManager,
    ModelState,
    ModelStatus,
    RemoteModel,
    module_bytes,
)
from core.models.registry import MODELS, ModelSpec
from core.tasks.jobs import JobCancelled, JobContext

log = logging.getLogger(__name__)

NAMESPACE = "model-dashboard"
BOARD_NAME = "replica-board"
# A replica lost mid-call (killed, its node gone) is replaced by Serve; the call goes again, after a pause that
# gives the controller time to notice, up to this many times.
LOST_REPLICA_ATTEMPTS = 6
LOST_REPLICA_PAUSE_S = 0.5
# How often a streaming call looks at the caller's cancel flag while it waits for the replica's next event.
CANCEL_POLL_S = 0.05
# A replica's report older than this is from a replica that is gone (it reports at every health check).
REPORT_STALE_S = 60.0
# What the code on the cluster is: the repository, shipped to every node by Ray (large, local-only folders left out).
CODE_EXCLUDES = [".venv", ".git", "artifacts", ".raypack", ".whl", ".standins", "docs/screenshots", "**/__pycache__"]
_LOST_REPLICA = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)
# The front end's Hub switches go to the replicas too (an offline app has offline replicas, instead of each load
# waiting on an unreachable Hub first); the token does not: each node reads its own HF_TOKEN.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")


def connect(settings: Settings) -> None:
    """Join the cluster of `settings.ray_address` (or start a Ray in this process), start Serve without HTTP, and
    create the ReplicaBoard. Safe to call again and from any thread.

    Ray's connection belongs to the thread that opens it: once that thread has ended, calls to Ray's control store
    (named actors, for one) hang. A Streamlit script thread ends with its rerun, so the connection is opened on a
    thread of its own that lives as long as the process.
    """
    with _connection_lock:
        if ray.is_initialized():
            _start_serve()
            return
        opened, failures = threading.Event(), []

        def hold_connection() -> None:
            try:
                ray.init(address=settings.ray_address, namespace=NAMESPACE, log_to_driver=False, runtime_env=code_runtime_env())
                _start_serve()
            except BaseException as error:  # handed to the caller below
                failures.append(error)
            opened.set()
            if not failures:
                threading.Event().wait()  # keep this thread, and so the connection, alive

        threading.Thread(target=hold_connection, name="ray-connection", daemon=True).start()
        opened.wait()
        if failures:
            raise failures[0]


def _start_serve() -> None:
    serve.start(proxy_location="Disabled")  # pages call deployment handles; nothing is served over HTTP
    # Detached: it outlives this front end, so another one (or a restart) finds the replicas' reports.
    ReplicaBoard.options(name=BOARD_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote()


_connection_lock = threading.Lock()


def code_runtime_env() -> dict[str, Any]:
    """What every worker of the app gets: this repository as its working directory, and the Hub switches."""
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    return {"working_dir": str(PROJECT_ROOT), "excludes": CODE_EXCLUDES, "env_vars": env_vars}


def app_name(spec: ModelSpec) -> str:
    """One Serve application per model; custom keys hold '/' and '@', so they are spelled out and hashed."""
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", spec.key)[:40]
    return f"dash-{readable}-{hashlib.blake2b(spec.key.encode(), digest_size=4).hexdigest()}"


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
class ModelInfo:
    """What the front end needs of a loaded model without its weights (see ServedModel)."""

    device: str
    dtype: str
    source: loading.ModelSource
    memory_bytes: int
    load_s: float
    config: Any  # a transformers model's config (labels, limits), or None
    tokenizer: Any  # the tokenizer (sentiment, SD prompts), or None
    component_sizes: tuple[tuple[str, int, str], ...]  # diffusers: (component, bytes of its tensors, dtype)


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
        obj = model.obj
        config = getattr(getattr(obj, "model", None), "config", None)
        sizes = ()
        if hasattr(obj, "components"):  # diffusers: each module's size, so that memory estimates need no weights
            sizes = tuple(
                (name, module_bytes(m), str(getattr(m, "dtype", model.dtype)).removeprefix("torch."))
                for name, m in obj.components.items() if isinstance(m, torch.nn.Module)
            )
        return Outcome(ModelInfo(
            str(model.device), str(model.dtype).removeprefix("torch."), model.source, model.memory_bytes, model.load_s,
            config, getattr(obj, "tokenizer", None), sizes,
        ))

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


# --- the front end ------------------------------------------------------------------------------------------------


class _SizedModule(torch.nn.Module):
    """A diffusers component's size and dtype without its weights: one byte tensor of its size on the meta device
    (no memory), so that `module_bytes` and `generation.estimate_memory` count it as they count the real one."""

    def __init__(self, size_bytes: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weights = torch.nn.Parameter(torch.empty(size_bytes, dtype=torch.uint8, device="meta"), requires_grad=False)
        self._dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype


class _ConfigHolder:
    def __init__(self, config: Any) -> None:
        self.config = config


class ServedModel(RemoteModel):
    """`LoadedModel.obj` of the ray backend. Reads like the loaded object where pages read it (`.model.config`,
    `.tokenizer`, `.components`, `.unet.dtype`, `.safety_checker`), and has one method per core function, which
    runs that function on a replica of the model's deployment."""

    def __init__(self, handle: Any, info: ModelInfo) -> None:
        self._handle = handle
        self.model = _ConfigHolder(info.config) if info.config is not None else None
        self.tokenizer = info.tokenizer
        self.components = {name: _SizedModule(size, getattr(torch, dtype)) for name, size, dtype in info.component_sizes}
        self.unet = self.components.get("unet")
        self.safety_checker = self.components.get("safety_checker")

    # The core functions, by name (their hooks call these) -----------------------------------------------------

    def classify_images(self, images: list) -> Any:
        return self._call("classify_images", list(images))

    def classify(self, images: list, top_k: int) -> Any:
        return self._call("classify", (list(images), top_k))

    def grad_cam(self, image: Any, class_index: int) -> Any:
        return self._call("grad_cam", image, class_index)

    def score_texts(self, texts: Sequence[str], context: JobContext | None = None) -> Any:
        if context is None:
            return self._call("score_texts", list(texts))
        return self._stream("score_texts_job", (list(texts),), context, lambda: False)

    def explain(self, text: str, method: str, steps: int, label: str | None) -> Any:
        return self._call("explain", text, method, steps, label)

    def generate(self, settings: Any, context: JobContext | None, abandoned: Callable[[], bool], source: Any, loras: tuple) -> Any:
        return self._stream("generate", (settings, source, loras), context, abandoned)

    def generate_unconditional(self, settings: Any, context: JobContext | None, abandoned: Callable[[], bool]) -> Any:
        return self._stream("generate_unconditional", (settings,), context, abandoned)

    def wait_for_compiles(self, timeout_s: float) -> bool:
        """Until the background compiles of the replica this call reaches are done (False on time-out)."""
        return self._call("wait_for_compiles", timeout_s)

    # How calls travel ---------------------------------------------------------------------------------------------

    def _call(self, method: str, *args: Any) -> Any:
        """One request, sent again if its replica was lost (the calls are pure functions of their inputs)."""
        return _outside_event_loop(lambda: self._call_here(method, *args))

    def _call_here(self, method: str, *args: Any) -> Any:
        for attempt in range(1, LOST_REPLICA_ATTEMPTS + 1):
            try:
                return getattr(self._handle, method).remote(*args).result().unwrap()
            except _LOST_REPLICA as error:
                _pause_after_lost_replica(method, attempt, error)
        raise _replicas_lost_error(method)

    def _stream(self, method: str, args: tuple, context: JobContext | None, abandoned: Callable[[], bool]) -> Any:
        """A streamed run: progress and previews into `context`; cancel (or `abandoned()`) cancels the response.
        A run whose replica was lost starts again from its first step on another replica."""
        return _outside_event_loop(lambda: self._stream_here(method, args, context, abandoned))

    def _stream_here(self, method: str, args: tuple, context: JobContext | None, abandoned: Callable[[], bool]) -> Any:
        for attempt in range(1, LOST_REPLICA_ATTEMPTS + 1):
            response = getattr(self._handle.options(stream=True), method).remote(*args)
            finished = threading.Event()
            watcher = threading.Thread(target=_cancel_when_asked, args=(response, context, abandoned, finished), daemon=True)
            watcher.start()
            try:
                for event in response:
                    if isinstance(event, Outcome):
                        return event.unwrap()
                    if context is not None:
                        context.report(event.done, event.total, event.detail, event.preview)
            except RequestCancelledError:
                raise JobCancelled from None
            except _LOST_REPLICA as error:
                if context is not None:
                    context.report(0, 0, "the replica running this was lost; starting again on another")
                _pause_after_lost_replica(method, attempt, error)
            finally:
                finished.set()
            if (context is not None and context.cancelled) or abandoned():
                raise JobCancelled
        raise _replicas_lost_error(method)


def _outside_event_loop(work: Callable[[], Any]) -> Any:
    """`work()`, which blocks on Serve. Serve refuses blocking calls from a thread that runs an asyncio loop (an async
    caller; Playwright's sync API in the tests), so such a caller waits for it on a helper thread instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return work()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="serve-call") as pool:
        return pool.submit(work).result()


def _cancel_when_asked(response: Any, context: JobContext | None, abandoned: Callable[[], bool], finished: threading.Event) -> None:
    """Cancel a streamed response as soon as the user cancels, even while the replica is between two events."""
    while not finished.wait(CANCEL_POLL_S):
        if (context is not None and context.cancelled) or abandoned():
            response.cancel()
            return


def _pause_after_lost_replica(method: str, attempt: int, error: Exception) -> None:
    log.warning("%s lost its replica (attempt %d of %d): %s", method, attempt, LOST_REPLICA_ATTEMPTS, type(error).__name__)
    time.sleep(LOST_REPLICA_PAUSE_S * attempt)  # back-off while Serve replaces the replica


def _replicas_lost_error(method: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"{method} failed: {LOST_REPLICA_ATTEMPTS} Ray Serve replicas in a row were lost while running it.",
        remedy="Check the cluster (ray status, the Ray dashboard): nodes may be short of memory or leaving.",
    )


class RayManager(CountsUses):
    """The ray backend's model manager: the local ModelManager's public methods, over Serve deployments."""

    def __init__(self, settings: Settings, loader: Loader | None = None, *, options: ServingOptions | None = None) -> None:
        """`loader` replaces `core.models.loading.load` on the replicas (tests: a loader that fails once)."""
        self.settings = settings
        self.options = options or load_deployment_options(settings.ray_deployments)
        # Where generation runs, for the checks pages make before a run (precision, memory mode).
        self.device = torch.device("cuda" if self.options.kinds["generation"].num_gpus > 0 else "cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self._loader = loader
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}

    def _entry(self, spec: ModelSpec) -> ModelEntry:
        with self._lock:
            return self._entries.setdefault(spec.key, ModelEntry(spec))

    def get(self, spec: ModelSpec, *, allow_standin: bool = False, gpu: int | None = None) -> LoadedModel:
        """The model's deployment, started (and its replicas loaded) on first use. `gpu` is Ray's to choose here."""
        entry = self._entry(spec)
        allow = allow_standin or self.settings.standin_fallback
        with entry.load_lock:
            if entry.model is None:  # not deployed yet, or its deployment failed (perhaps now with a stand-in allowed)
                entry.state, entry.error = ModelState.LOADING, None
                try:
                    entry.model = _outside_event_loop(lambda: self._deploy(spec, allow))
                except DashboardError as error:
                    entry.state, entry.error, entry.model = ModelState.FAILED, error, None
                    raise
                except BaseException:
                    entry.state = ModelState.NOT_LOADED
                    raise
                entry.state = ModelState.READY
            with self._lock:
                entry.last_used = time.time()
            return entry.model

    def _deploy(self, spec: ModelSpec, allow_standin: bool) -> LoadedModel:
        connect(self.settings)
        options = self.options.for_spec(spec)
        started = time.perf_counter()
        application = ModelServer.options(
            ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
            max_ongoing_requests=options.max_ongoing_requests,
            health_check_period_s=options.health_check_period_s, health_check_timeout_s=options.health_check_timeout_s,
            user_config={"max_batch_size": options.max_batch_size, "batch_wait_timeout_s": options.batch_wait_timeout_s},
            **_replicas(options),
        ).bind(spec, self.settings, allow_standin, self._loader)  # replicas, resources and batching change without a reload
        try:
            handle = serve.run(application, name=app_name(spec), route_prefix=None)
        except RuntimeError as error:  # Serve gave up: every replica failed to start, again and again
            raise ModelUnavailableError(
                f"{spec.title}: its Ray Serve deployment failed to start ({error}).",
                remedy="Look at the replica logs (Ray dashboard); the nodes may lack the model files, memory or GPUs.",
            ) from error
        try:
            info = handle.describe.remote().result().unwrap()
        except DashboardError:
            serve.delete(app_name(spec))  # no replica could load it: free their resources
            raise
        log.info("deployed %s as %s in %.1f s", spec.key, app_name(spec), time.perf_counter() - started)
        return LoadedModel(spec, ServedModel(handle, info), torch.device(info.device), getattr(torch, info.dtype), info.source, info.memory_bytes, info.load_s)

    def unload(self, key: str) -> int:
        """Delete a model's deployment (every replica of it). `key` is a model key or a status row's replica key."""
        key = key.split("#", 1)[0]
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return 0

        def delete_deployment(model: LoadedModel) -> None:
            serve.delete(app_name(model.spec))
            board().forget_app.remote(app_name(model.spec))

        return entry.forget(delete_deployment)

    def unload_all(self) -> int:
        with self._lock:
            keys = list(self._entries)
        return sum(self.unload(key) for key in keys)

    def replicas(self) -> list[ReplicaReport]:
        """Every live replica's latest report, cluster-wide; [] before anything was deployed."""
        if not ray.is_initialized():
            return []
        return ray.get(board().reports.remote())

    def status(self, specs: list[ModelSpec] | None = None) -> list[ModelStatus]:
        """One row per replica of each deployed model (key `model#replica`), one per model not deployed."""
        with self._lock:
            wanted = {spec.key: spec for spec in (specs or MODELS.values())}
            wanted.update({key: entry.spec for key, entry in self._entries.items()})
            entries = {key: self._entries.get(key) for key in wanted}
        reports: dict[str, list[ReplicaReport]] = {}
        for report in self.replicas():
            reports.setdefault(report.key, []).append(report)
        rows = []
        for key, spec in wanted.items():
            entry = entries[key]
            replicas = sorted(reports.get(key, []), key=lambda r: (r.node_ip, r.replica_id)) if entry and entry.model else []
            if not replicas:
                rows.append(_model_row(spec, entry, self.dtype))
            rows.extend(_replica_row(spec, report, number, len(replicas)) for number, report in enumerate(replicas, start=1))
        return rows

    def gpu_budgets(self) -> tuple[GpuBudget, ...]:
        """(): on a cluster Ray places replicas by their GPU resources; each replica's card is in status and the monitor."""
        return ()

    def evictions(self) -> tuple:
        """(): replicas are never evicted; Serve scales them."""
        return ()


def _replicas(options: DeploymentOptions) -> dict[str, Any]:
    if options.min_replicas == options.max_replicas:
        return {"num_replicas": options.min_replicas}
    return {"autoscaling_config": {
        "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
        "target_ongoing_requests": options.target_ongoing_requests, "upscale_delay_s": options.upscale_delay_s,
        "downscale_delay_s": options.downscale_delay_s, "metrics_interval_s": options.metrics_interval_s,
        "look_back_period_s": options.look_back_period_s,
    }}


def _model_row(spec: ModelSpec, entry: ModelEntry | None, dtype: torch.dtype) -> ModelStatus:
    return ModelStatus(
        key=spec.key, title=spec.title, state=entry.state if entry else ModelState.NOT_LOADED, device=None, dtype=None,
        memory_bytes=None, estimate_bytes=spec.estimate_bytes(torch.finfo(dtype).bits // 8), load_s=None, is_standin=False,
        source=None, error=str(entry.error) if entry and entry.error else None, busy=entry.busy if entry else 0,
        last_used=entry.last_used if entry else None,
    )


def _replica_row(spec: ModelSpec, report: ReplicaReport, number: int, count: int) -> ModelStatus:
    gpu = f", {report.gpu.name}" if report.gpu else ""
    return ModelStatus(
        key=f"{spec.key}#{report.replica_id}", title=f"{spec.title} · replica {number} of {count} on {report.node_ip}",
        state=report.state, device=f"{report.device} @ {report.node_ip}{gpu}" if report.device else None, dtype=report.dtype,
        memory_bytes=report.memory_bytes, estimate_bytes=report.memory_bytes or 0, load_s=report.load_s, is_standin=report.is_standin,
        source=report.source, error=report.error, busy=report.busy, last_used=report.last_used, estimate_measured=True,
    )


class ClusterGpuMonitor:
    """`GpuMonitor.snapshot` for the ray backend: every GPU that holds a replica, on any node, with the replicas on it
    as its processes. Figures come from the replicas' latest reports (at most a health-check period old)."""

    def __init__(self, manager: RayManager, *, ttl_s: float = SNAPSHOT_TTL_S) -> None:
        self._manager = manager
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cached: tuple[float, GpuReport] | None = None

    def snapshot(self) -> GpuReport:
        """Every replica's card, at most `ttl_s` old (a page and the history sampler ask several times a second)."""
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self._ttl_s:
                self._cached = (now, self._read())
            return self._cached[1]

    def _read(self) -> GpuReport:
        cards: dict[tuple[str, str], GpuSnapshot] = {}
        for report in self._manager.replicas():
            if report.gpu is None:
                continue
            where = (report.node_ip, report.gpu.uuid or str(report.gpu.index))
            card = cards.get(where) or replace(report.gpu, name=f"{report.gpu.name} on {report.node_ip}", processes=())
            process = GpuProcess(report.pid, f"{report.title} (Serve replica {report.replica_id})", report.torch_reserved_bytes, is_this_process=True)
            cards[where] = replace(card, processes=(*card.processes, process))
        reason = None if cards else "no Ray Serve replica runs on a GPU (every deployment here is on CPUs, or none is deployed yet)"
        return GpuReport(gpus=tuple(cards.values()), driver_version=None, unavailable_reason=reason, taken_at=time.time())

