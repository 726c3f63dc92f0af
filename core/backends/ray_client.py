"""The ray backend's front end: every model a Ray Serve deployment, behind the same `Backend` interface as the local one.

`RayManager` implements core.backends.base.Backend. Its `get` deploys the model as its own Serve application
(`core.backends.ray_replica.ModelServer`, with the replicas, resources and batching of `core.backends.ray_config`) and
returns a `LoadedModel` whose `info` the replica described and whose `obj` is a `ServedModel`, the deployment's
handle. Each task method sends the call to a replica, which runs the same core/tasks function on its own local model.

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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import ray
import torch
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import ReplicaUnavailableError, RequestCancelledError

from core.backends.ray_config import DeploymentOptions, ServingOptions, load_deployment_options
from core.backends.ray_replica import BOARD_NAME, NAMESPACE, ModelServer, Outcome, ReplicaBoard, ReplicaReport, board
from core.config import PROJECT_ROOT, Settings
from core.errors import DashboardError, ModelUnavailableError
from core.gpu.nvml import SNAPSHOT_TTL_S, GpuProcess, GpuReport, GpuSnapshot
from core.models.manager import (
    CountsUses,
    GpuBudget,
    LoadedModel,
    Loader,
    ModelEntry,
    ModelState,
    ModelStatus,
)
from core.models.registry import MODELS, ModelSpec
from core.tasks.classify import ClassificationRun
from core.tasks.imagenet import Saliency
from core.tasks.images import DecodedImage
from core.tasks.jobs import JobCancelled, JobContext
from core.tasks.lora import LoraChoice
from core.tasks.sd_settings import GenerationResult, GenerationSettings, SourceImages
from core.tasks.sentiment import Attributions, SentimentScores
from core.tasks.unconditional import UnconditionalResult, UnconditionalSettings

log = logging.getLogger(__name__)

# A replica lost mid-call (killed, its node gone) is replaced by Serve; the call goes again, after a pause that
# gives the controller time to notice, up to this many times.
LOST_REPLICA_ATTEMPTS = 6
LOST_REPLICA_PAUSE_S = 0.5
# How often a streaming call looks at the caller's cancel flag while it waits for the replica's next event.
CANCEL_POLL_S = 0.05
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


# --- the front end ------------------------------------------------------------------------------------------------


class ServedModel:
    """`LoadedModel.obj` of the ray backend: the model's deployment handle, with one method per task, each of which
    runs that task's core function on a replica (sent again if its replica was lost)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

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
    """The ray backend (core.backends.base.Backend): models as Serve deployments, tasks run on their replicas."""

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
            served = handle.describe.remote().result().unwrap()
        except DashboardError:
            serve.delete(app_name(spec))  # no replica could load it: free their resources
            raise
        log.info("deployed %s as %s in %.1f s", spec.key, app_name(spec), time.perf_counter() - started)
        return LoadedModel(
            spec, ServedModel(handle), torch.device(served.device), getattr(torch, served.dtype), served.source, served.memory_bytes, served.load_s, served.info,
        )

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

    # Tasks: each runs on a replica of the model's deployment ---------------------------------------------------

    def classify_images(self, model: LoadedModel, images: Sequence[DecodedImage]) -> ClassificationRun:
        return model.obj.classify_images(images)

    def classify(self, model: LoadedModel, images: Sequence[DecodedImage], top_k: int) -> ClassificationRun:
        return model.obj.classify(images, top_k)

    def grad_cam(self, model: LoadedModel, image: DecodedImage, class_index: int) -> Saliency:
        return model.obj.grad_cam(image, class_index)

    def score_texts(self, model: LoadedModel, texts: Sequence[str], context: JobContext | None = None) -> SentimentScores:
        return model.obj.score_texts(texts, context)

    def explain(self, model: LoadedModel, text: str, method: str, steps: int, label: str | None) -> Attributions:
        return model.obj.explain(text, method, steps, label)

    def check_memory(self, model: LoadedModel, settings: GenerationSettings) -> None:
        """Nothing here: the replica checks its own device's memory when the run starts."""

    def generate(
        self, model: LoadedModel, settings: GenerationSettings, context: JobContext | None = None,
        abandoned: Callable[[], bool] = lambda: False, source: SourceImages | None = None, loras: tuple[LoraChoice, ...] = (),
    ) -> GenerationResult:
        return model.obj.generate(settings, context, abandoned, source, loras)

    def generate_unconditional(
        self, model: LoadedModel, settings: UnconditionalSettings, context: JobContext | None = None, abandoned: Callable[[], bool] = lambda: False,
    ) -> UnconditionalResult:
        return model.obj.generate_unconditional(settings, context, abandoned)

    def wait_for_compiles(self, model: LoadedModel, timeout_s: float) -> bool:
        return model.obj.wait_for_compiles(timeout_s)


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

