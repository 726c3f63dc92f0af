"""Many users, one GPU: text-to-image runs of the same model, size and precision share their UNet calls.

On a shared card each run used to hold the GPU alone, though a UNet call on 8 rows costs little more than on 2
(SD 1.5 at 512x512 on an H100: 4 images per run took 0.275 s each against 0.381 s for one). A `SharedDenoiser` (one
per loaded SD pipeline) owns a worker thread that holds the device's queue slot while it has work and, at every step
boundary, admits the waiting requests that fit the running batch, makes one UNet call over every active request's
rows (per-row prompts and timesteps; [negative, positive] rows per request with classifier-free guidance), then gives
each request its own rows back for its own guidance scale and its own scheduler's step. A request joins at a step
boundary and leaves when its own step count is done (decoded alone) or when it is cancelled (dropped at once).

Each request computes exactly what diffusers' StableDiffusionPipeline.__call__ computes for text to image (the same
prompt encoding, seeded noise, scheduler calls, guidance and decode); only the UNet's batch changes, so an image
matches the same run made alone within the rounding of a GEMM of another shape (tests/test_shared_batch.py measures it).
See docs/BATCHING.md.
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from core.accel import EAGER, Acceleration, cuda_graphs
from core.errors import GpuOutOfMemoryError
from core.gpu.queue import SlotAbandoned, queue_for
from core.models.info import ModelInfo
from core.models.manager import LoadedModel
from core.models.memory import out_of_memory_guard
from core.tasks import generation
from core.tasks.generation import StepReporter
from core.tasks.jobs import JobCancelled, JobContext
from core.tasks.lora import LoraChoice
from core.tasks.sd_pipeline import build_scheduler, keep_timesteps_on_the_cpu, run_pipeline, set_memory_mode, set_precision
from core.tasks.sd_settings import (
    DEFAULT_SCHEDULER,
    GeneratedImage,
    GenerationResult,
    GenerationSettings,
    MemoryMode,
    Mode,
    Precision,
    estimate_memory,
    memory_remedy,
)

log = logging.getLogger(__name__)

# A batch is padded up to the next of these row counts (dummy rows, results dropped) so that on a GPU a CUDA graph
# per bucket replays, rather than one capture per row count. Larger batches run unpadded.
BATCH_BUCKETS = (1, 2, 4, 8, 16)
# The UNet rows of one call: 8 single-image requests with guidance. SD 1.5 at 512x512 in fp16 needs about 3 GB of
# activations for 16 rows; past that the GPU is busy anyway and more rows only lengthen every user's step.
MAX_BATCH_ROWS = 16
# How long the worker waits, before a batch's first step, for requests sent at the same moment (several users who
# press Generate within a few milliseconds of each other then start together). A lone request pays it once: 2 ms is
# 1 % of a 25-step image on an H100, and a request that misses it joins at the next step anyway. 0 starts at once.
COLLECT_WINDOW_S = 0.002


def _no_progress(done: int, preview: Callable[[], Image.Image]) -> None:
    pass


def _no_place(place: int) -> None:
    pass


def _never() -> bool:
    return False


@dataclass(frozen=True)
class DenoiseRequest:
    """One user's text-to-image run. The callbacks run on the denoiser's worker thread and must be quick."""

    prompt: str = ""
    negative_prompt: str = ""
    seeds: tuple[int, ...] = (0,)  # one image per seed, each from its own CPU generator (as generation.generate)
    steps: int = 25
    guidance_scale: float = 7.5  # above 1: classifier-free guidance, two UNet rows per image
    scheduler: str = DEFAULT_SCHEDULER  # a name in SCHEDULERS; each request builds its own
    width: int = 512
    height: int = 512
    precision: Precision = Precision.AUTO
    # (positive, negative) embeddings of one row per image, already encoded (negative None without guidance);
    # None: the worker encodes `prompt` and `negative_prompt` as diffusers does.
    prompt_embeds: tuple[torch.Tensor, torch.Tensor | None] | None = None
    on_step: Callable[[int, Callable[[], Image.Image]], None] = _no_progress  # StepReporter.step: (done, preview); JobCancelled stops
    on_wait: Callable[[int], None] = _no_place  # the place in line while waiting: 1 is next
    cancelled: Callable[[], bool] = _never  # polled at every step boundary: true drops the request before its next step

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1  # diffusers' do_classifier_free_guidance for SD 1.x (no guidance embedding)

    @property
    def rows(self) -> int:
        return len(self.seeds) * (2 if self.guided else 1)

    @property
    def batch_key(self) -> tuple[int, int, Precision]:
        """Requests share UNet calls only with equal keys: the latents' shape and the weights' dtype."""
        return (self.width, self.height, self.precision)


@dataclass(frozen=True)
class DenoiseResult:
    images: tuple[Image.Image, ...]
    nsfw: tuple[bool, ...]  # the model's safety checker blacked the image out (all False without a checker)
    seconds: float  # from joining a batch to the decoded images
    unet_path: str  # how the batch's UNet calls ran: "eager", "CUDA graph", ... (core.accel.cuda_graphs)
    peak_memory_bytes: int | None  # torch's peak allocation during the batch (shared with the others); None on the CPU


@dataclass
class _Waiting:
    request: DenoiseRequest
    future: Future[DenoiseResult]
    place: int = 0  # the last place told to the request


@dataclass
class _Active:
    """A request inside a batch: its own scheduler, latents and generators, as diffusers' loop keeps them."""

    request: DenoiseRequest
    future: Future[DenoiseResult]
    scheduler: Any
    embeds: torch.Tensor  # [negative rows, positive rows] with guidance, else the positive rows
    latents: torch.Tensor
    generators: list[torch.Generator]
    step_kwargs: dict[str, Any]
    started: float
    index: int = 0  # the next of the scheduler's timesteps

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.index]

    @property
    def finished(self) -> bool:
        return self.index == len(self.scheduler.timesteps)

    def model_input(self) -> torch.Tensor:
        latents = torch.cat([self.latents] * 2) if self.request.guided else self.latents
        return self.scheduler.scale_model_input(latents, self.timestep)

    def advance(self, noise_pred: torch.Tensor) -> None:
        """Guidance and one scheduler step with this request's rows of the UNet's output, then progress and preview."""
        if self.request.guided:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + self.request.guidance_scale * (noise_text - noise_uncond)
        self.latents = self.scheduler.step(noise_pred, self.timestep, self.latents, **self.step_kwargs, return_dict=False)[0]
        self.index += 1
        # The steps the user asked for, as StepReporter counts them (PNDM runs one extra model call).
        done = max(1, round(self.index * self.request.steps / len(self.scheduler.timesteps)))
        latents = self.latents
        self.request.on_step(done, lambda: generation.latent_preview(latents))


class SharedDenoiser:
    """Runs text-to-image requests on one SD pipeline, every step's UNet call shared by all the requests in flight.

    Thread-safe: any thread may `submit`. The worker thread lives while there is work, holding the device's queue
    slot for each batch (so solo runs, other models and precision changes take turns with whole batches); a batch
    lasts while compatible requests keep it busy. Waiting requests are served first come, first served: a request
    that cannot join the running batch (another size or precision) is never overtaken by a later one.
    """

    def __init__(
        self,
        pipe: Any,
        device: torch.device,
        accel: Acceleration = EAGER,
        max_batch_rows: int = MAX_BATCH_ROWS,
        collect_window_s: float = COLLECT_WINDOW_S,
        buckets: tuple[int, ...] = BATCH_BUCKETS,
        info: ModelInfo | None = None,
    ) -> None:
        self._pipe = weakref.ref(pipe)  # the model manager may evict the model: a denoiser never keeps it loaded
        self.info = info  # the model's components: with it, a batch takes only the rows the device's memory holds
        self.device = device
        self.accel = accel  # the model's: CUDA graphs per batch-size bucket where on
        self.max_batch_rows = max_batch_rows
        self.collect_window_s = collect_window_s
        self.buckets = buckets
        self._changed = threading.Condition()
        self._waiting: deque[_Waiting] = deque()
        self._holds = 0
        self._worker: threading.Thread | None = None

    def submit(self, request: DenoiseRequest) -> Future[DenoiseResult]:
        """Queue `request`; the future gives its images, or raises JobCancelled, GpuOutOfMemoryError or its own failure."""
        future: Future[DenoiseResult] = Future()
        with self._changed:
            self._waiting.append(_Waiting(request, future))
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name=f"shared-denoiser-{self.device}", daemon=True)
                self._worker.start()
            self._changed.notify_all()
        return future

    @contextmanager
    def held(self) -> Iterator[None]:
        """No batch starts within the block: requests submitted in it start together (benchmarks and tests)."""
        with self._changed:
            self._holds += 1
        try:
            yield
        finally:
            with self._changed:
                self._holds -= 1
                self._changed.notify_all()

    # The worker

    def _serve(self) -> None:
        while self._next_batch_ready():
            try:
                with queue_for(self.device).slot(on_wait=self._tell_places, cancelled=self._all_waiting_cancelled):
                    self._run_batch()
            except SlotAbandoned:
                pass  # every waiting request was cancelled while the device was busy; each has been told

    def _next_batch_ready(self) -> bool:
        """Wait out holds and the collection window; False (and the worker ends) when nothing is waiting."""
        with self._changed:
            self._changed.wait_for(lambda: not self._holds)
            deadline = time.monotonic() + self.collect_window_s
            while self._waiting and self._waiting_rows() < self.max_batch_rows and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            if not self._waiting:
                self._worker = None
                return False
            return True

    def _waiting_rows(self) -> int:
        key = self._waiting[0].request.batch_key
        return sum(w.request.rows for w in self._waiting if w.request.batch_key == key)

    def _tell_places(self, queue_place: int) -> None:
        """While the batch waits for the device: its requests hear the GPU queue's place, later batches theirs after it."""
        with self._changed:
            waiting = list(self._waiting)
        batches_ahead, key = 0, waiting[0].request.batch_key if waiting else None
        for entry in waiting:
            if entry.request.batch_key != key:
                batches_ahead, key = batches_ahead + 1, entry.request.batch_key
            self._tell_place(entry, queue_place + batches_ahead)

    @staticmethod
    def _tell_place(entry: _Waiting, place: int) -> None:
        if place != entry.place:
            entry.place = place
            entry.request.on_wait(place)

    def _all_waiting_cancelled(self) -> bool:
        with self._changed:
            for entry in [w for w in self._waiting if w.request.cancelled()]:
                self._waiting.remove(entry)
                entry.future.set_exception(JobCancelled())
            return not self._waiting

    def _rows_that_fit(self, pipe: Any, key: tuple[int, int, Precision]) -> int:
        """The batch's row limit: `max_batch_rows`, halved while the memory available now could not hold that many rows
        by the run estimate admission control uses (generation.check_memory), so that on a small card a batch never runs
        out where each of its runs alone would not. Never below one guided image's rows."""
        if self.info is None:
            return self.max_batch_rows
        width, height, precision = key
        available = generation.memory_available_bytes(pipe, self.device)
        rows = self.max_batch_rows
        while rows > 2 and estimate_memory(self.info, GenerationSettings(width=width, height=height, num_images=rows // 2, precision=precision)).total_bytes > available:
            rows //= 2
        return rows

    def _admit(self, key: tuple, rows_in_use: int, row_limit: int) -> list[_Waiting]:
        """The waiting requests, from the front, that share `key` and fit; the rest hear their new place in line.

        None once another run waits for the device (an image to image run, another model): the batch then ends with
        the requests it has, and the ones that came later wait for the next, so a stream of them never starves it.
        """
        admitted = []
        others_wait = len(queue_for(self.device)) > 1  # the first ticket is this batch's
        with self._changed:
            while not others_wait and self._waiting and self._waiting[0].request.batch_key == key:
                rows = self._waiting[0].request.rows
                if rows_in_use and rows_in_use + rows > row_limit:  # a request over the limit runs, alone
                    break
                admitted.append(self._waiting.popleft())
                rows_in_use += rows
            waiting = list(self._waiting)
        for place, entry in enumerate(waiting, start=1):
            self._tell_place(entry, place)
        return admitted

    def _run_batch(self) -> None:
        """While the device's slot is held: step every admitted request until none is left."""
        pipe = self._pipe()
        with self._changed:
            key = self._waiting[0].request.batch_key if self._waiting else None
        if key is None:
            return
        active: list[_Active] = []
        try:
            with out_of_memory_guard(f"in a shared batch at {key[0]}x{key[1]}", remedy=memory_remedy(on_gpu=True)):
                if pipe is None:
                    raise RuntimeError("the model was unloaded while requests waited for it")
                # The shared pipeline as a plain run of this precision needs it; then every module stays put for the batch.
                set_memory_mode(pipe, MemoryMode.NONE, self.device)
                set_precision(pipe, key[2], self.device)
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                helper = run_pipeline(pipe, Mode.TEXT_TO_IMAGE, DEFAULT_SCHEDULER)  # encode, decode
                row_limit = self._rows_that_fit(pipe, key)
                with (
                    torch.no_grad(),
                    cuda_graphs.graphed_unet(pipe.unet, self.accel) as unet_calls,
                    cuda_graphs.graphed_text_encoder(pipe.text_encoder, self.accel),
                    cuda_graphs.compiled_vae_decode(pipe.vae, self.accel),
                ):
                    embeds = _BatchEmbeds()
                    while True:
                        active = [entry for entry in active if not _dropped_if_cancelled(entry)]
                        for entry in self._admit(key, sum(a.request.rows for a in active), row_limit):
                            started = _started(pipe, helper, entry)
                            if started is not None:
                                active.append(started)
                        if not active:
                            return
                        self._step(pipe.unet, active, embeds)
                        for entry in [a for a in active if a.finished and not a.future.done()]:
                            _finish(helper, entry, unet_calls.path, self.device)
                        active = [a for a in active if not a.future.done()]
        except GpuOutOfMemoryError as error:  # memory already given back by the guard
            _fail_all([a.future for a in active], error)
        except Exception as error:  # a failure of the whole batch (the model, the UNet): each request in it is told
            log.exception("a shared batch failed")
            # Those waiting for this batch too: the same failure would come back at once.
            _fail_all([a.future for a in active] + self._take_waiting(key), error)

    def _take_waiting(self, key: tuple) -> list[Future[DenoiseResult]]:
        """The waiting requests at the front that share `key`, out of the queue."""
        with self._changed:
            taken = []
            while self._waiting and self._waiting[0].request.batch_key == key:
                taken.append(self._waiting.popleft().future)
            return taken

    def _step(self, unet: torch.nn.Module, active: list[_Active], embeds: _BatchEmbeds) -> None:
        """One UNet call over every active request's rows (padded to a bucket), then each request's own step."""
        inputs = [entry.model_input() for entry in active]
        rows = [len(x) for x in inputs]
        timesteps = torch.tensor([float(entry.timestep) for entry, n in zip(active, rows, strict=True) for _ in range(n)])
        bucket = next((size for size in self.buckets if size >= sum(rows)), sum(rows))
        sample = _padded_rows(_joined(inputs), bucket)
        timestep = _padded_rows(_on_device(timesteps, self.device), bucket)
        noise_pred = unet(sample, timestep, encoder_hidden_states=embeds.for_batch(active, bucket), return_dict=False)[0]
        for entry, rows_out in zip(active, noise_pred[: sum(rows)].split(rows), strict=True):
            _guarded(entry.future, entry.advance, rows_out)


class _BatchEmbeds:
    """The batch's prompt rows, joined and padded once per change of the requests in it, not at every step: they
    change only when a request joins or leaves, and a lone request then costs no copy beyond its solo run's."""

    def __init__(self) -> None:
        self._members: tuple[_Active, ...] = ()  # held, so that no other request can take one's place unnoticed
        self._bucket = 0
        self._embeds: torch.Tensor | None = None

    def for_batch(self, active: list[_Active], bucket: int) -> torch.Tensor:
        if self._embeds is None or bucket != self._bucket or len(active) != len(self._members) or any(
            a is not b for a, b in zip(active, self._members, strict=True)
        ):
            self._members, self._bucket = tuple(active), bucket
            self._embeds = _padded_rows(_joined([entry.embeds for entry in active]), bucket)
        return self._embeds


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _guarded(future: Future[DenoiseResult], action: Callable[..., Any], *args: Any) -> Any:
    """`action(*args)` for one request: its cancel or its own failure (a scheduler, a callback) ends that request alone,
    the others go on; running out of memory fails the batch. None when it failed."""
    try:
        return action(*args)
    except torch.OutOfMemoryError:
        raise
    except JobCancelled:
        future.set_exception(JobCancelled())
    except Exception as error:
        log.exception("a request of a shared batch failed")
        future.set_exception(error)
    return None


def _padded_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with copies of its first row up to `rows`: dummy rows whose results are dropped (rows are independent)."""
    if len(tensor) == rows:
        return tensor
    return torch.cat([tensor, tensor[:1].expand(rows - len(tensor), *tensor.shape[1:])])


def _on_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU values on `device` without making the CPU wait for the GPU's queue (generation.keep_timesteps_on_the_cpu)."""
    if device.type != "cuda":
        return values
    return values.pin_memory().to(device, non_blocking=True)  # pinned memory is kept until the copy is done


def _dropped_if_cancelled(entry: _Active) -> bool:
    if entry.request.cancelled():
        entry.future.set_exception(JobCancelled())
        return True
    return False


def _fail_all(futures: list[Future[DenoiseResult]], error: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    """What diffusers' prepare_extra_step_kwargs passes: eta 0 (DDIM) and the generators (ancestral samplers)."""
    accepted = inspect.signature(scheduler.step).parameters
    return {name: value for name, value in (("eta", 0.0), ("generator", generators)) if name in accepted}


def _started(pipe: Any, helper: Any, waiting: _Waiting) -> _Active | None:
    """Steps 3 to 6 of diffusers' __call__ for one request: its prompts, timesteps, noise and step arguments.

    None when the request cannot start (its future then says why); running out of memory fails the batch.
    """
    if waiting.request.cancelled():
        waiting.future.set_exception(JobCancelled())
        return None
    return _guarded(waiting.future, _prepared, pipe, helper, waiting)


def _prepared(pipe: Any, helper: Any, waiting: _Waiting) -> _Active:
    from diffusers.utils.torch_utils import randn_tensor

    request, device = waiting.request, helper.unet.device
    if request.prompt_embeds is None:
        positive, negative = helper.encode_prompt(request.prompt, device, len(request.seeds), request.guided, request.negative_prompt or None)
    else:
        positive, negative = request.prompt_embeds
    embeds = torch.cat([negative, positive]) if request.guided else positive
    # From the loaded pipeline's own scheduler config, as a solo run builds it (the helper's is another class's).
    scheduler = keep_timesteps_on_the_cpu(build_scheduler(pipe, request.scheduler))
    scheduler.set_timesteps(request.steps)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in request.seeds]
    factor = helper.vae_scale_factor
    shape = (len(request.seeds), helper.unet.config.in_channels, request.height // factor, request.width // factor)
    latents = randn_tensor(shape, generator=generators, device=device, dtype=embeds.dtype) * scheduler.init_noise_sigma
    return _Active(request, waiting.future, scheduler, embeds, latents, generators, _step_kwargs(scheduler, generators), time.perf_counter())


def _finish(helper: Any, entry: _Active, unet_path: str, device: torch.device) -> None:
    """Step 8 of diffusers' __call__ for one request: decode its latents alone (as its solo run), safety check, PIL images."""
    _guarded(entry.future, lambda: entry.future.set_result(_decoded(helper, entry, unet_path, device)))


def _decoded(helper: Any, entry: _Active, unet_path: str, device: torch.device) -> DenoiseResult:
    image = helper.vae.decode(entry.latents / helper.vae.config.scaling_factor, return_dict=False, generator=entry.generators)[0]
    image, nsfw = helper.run_safety_checker(image, device, entry.embeds.dtype)
    flags = tuple(bool(flag) for flag in nsfw) if nsfw is not None else (False,) * len(entry.latents)
    images = helper.image_processor.postprocess(image, output_type="pil", do_denormalize=[not flag for flag in flags])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return DenoiseResult(tuple(images), flags, time.perf_counter() - entry.started, unet_path, peak)


# One denoiser per loaded pipeline, dropped with it.
_denoisers: weakref.WeakKeyDictionary[Any, SharedDenoiser] = weakref.WeakKeyDictionary()
_denoisers_lock = threading.Lock()


def denoiser_for(model: LoadedModel) -> SharedDenoiser:
    with _denoisers_lock:
        denoiser = _denoisers.get(model.obj)
        if denoiser is None:
            denoiser = _denoisers[model.obj] = SharedDenoiser(model.obj, model.device, model.accel, info=model.info)
        return denoiser


def shares_batches(settings: GenerationSettings, loras: tuple[LoraChoice, ...]) -> bool:
    """Whether a run can share UNet calls: text to image on the plain pipeline (adapters and memory modes change it),
    from its seeds' own noise (no variation) in one pass (no hires fix)."""
    return settings.mode is Mode.TEXT_TO_IMAGE and not loras and settings.memory_mode is MemoryMode.NONE and not settings.varied and not settings.hires


def generate_together(
    model: LoadedModel, settings: GenerationSettings, context: JobContext | None, reporter: StepReporter, notes: tuple[str, ...]
) -> GenerationResult:
    """generation.generate's text-to-image run through the model's shared denoiser, for settings that `shares_batches`.

    `settings` are checked and carry their seed; progress, preview, cancel and the place in line go through `reporter`
    and `context` as in a solo run. Raises JobCancelled, or GpuOutOfMemoryError when the shared batch ran out.
    """
    request = DenoiseRequest(
        prompt=settings.prompt, negative_prompt=settings.negative_prompt, seeds=settings.seeds(), steps=settings.steps,
        guidance_scale=settings.guidance_scale, scheduler=settings.scheduler, width=settings.width, height=settings.height,
        precision=settings.precision, on_step=reporter.step, cancelled=reporter.stop_requested,
        on_wait=lambda place: generation.report(context, f"waiting for the GPU: {generation.ordinal_place(place)}"),
    )
    generation.report(context, "waiting for the device")
    outcome = denoiser_for(model).submit(request).result()
    images = tuple(GeneratedImage(image, seed, flag) for image, seed, flag in zip(outcome.images, settings.seeds(), outcome.nsfw, strict=True))
    blacked = [str(i + 1) for i, image in enumerate(images) if image.blacked_out]
    if blacked:
        notes += (f"The model's safety checker judged image {', '.join(blacked)} not safe for work and blacked it out; try another seed or prompt.",)
    return GenerationResult(
        images=images, settings=settings, model_name=model.spec.repo_id, model_title=model.spec.title,
        is_standin=model.is_standin, device=str(model.device), dtype=str(model.obj.unet.dtype).removeprefix("torch."),
        seconds=outcome.seconds, steps_per_s=settings.steps / outcome.seconds if outcome.seconds > 0 else 0.0,
        peak_memory_bytes=outcome.peak_memory_bytes, notes=notes, unet_path=outcome.unet_path,
    )
