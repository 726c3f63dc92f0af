"""The model core's public entry, for the pages and for scripts: one backend that loads models and runs every task,
and the plain types and helpers around it. Nothing here imports streamlit.

    from core import api

    backend = api.open_backend()  # settings from the environment: this process, or Ray Serve with DASH_BACKEND=ray
    photo = api.decode_image(open("dog.jpg", "rb").read(), "dog.jpg")
    with backend.use(api.MODELS["hotdog"], allow_standin=True) as model:
        run = backend.classify_images(model, [photo])
    print(run.results[0].scores)

The task namespaces (`api.generation`, `api.sentiment`, ...) hold each task's settings, limits, input checks and
result types; the inference itself is a backend method, so that it runs wherever the backend puts the model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from core.accel import compiled
from core.access import Access, Login, decide_access
from core.backends.base import Backend, held_for_the_run
from core.config import Settings
from core.errors import BadInputError, DashboardError, GatedModelError, GpuOutOfMemoryError, ModelUnavailableError, SettingsError
from core.formatting import human_bytes, precision_label
from core.gpu import nvml as gpu
from core.gpu.history import HistorySampler, Sample, take_sample
from core.gpu.nvml import GpuMonitor, GpuReport, GpuSnapshot
from core.gpu.queue import queue_for
from core.models import model_card
from core.models.devices import machine_info
from core.models.manager import LoadedModel, ModelState, ModelStatus
from core.models.memory import Freed, measure_freed
from core.models.registry import MODELS, ModelSpec
from core.tasks import imagenet, lora, outpaint, pnginfo, prompt_syntax, sentiment, sweeps, tables, unconditional
from core.tasks import sd_settings as generation
from core.tasks.classify import Classification, ClassificationRun, LabelScore
from core.tasks.image_history import HistoryEntry, ImageHistory, ImageRecord, browser_owner, user_owner
from core.tasks.images import DecodedImage, decode_image, mask_overlay, shape_mask
from core.tasks.job_board import BoardJob, JobBoard, NotYourJobError
from core.tasks.jobs import Job, JobContext, JobState
from core.tasks.lora import LoraAdapter, LoraChoice
from core.tasks.sd_settings import GenerationResult, GenerationSettings, HiresUpscaler, MemoryMode, Mode, Precision, SourceImages
from core.tasks.unconditional import UnconditionalResult, UnconditionalSettings

if TYPE_CHECKING:
    from core.backends.ray_client import ClusterGpuMonitor

__all__ = [
    # the backend and the models it serves
    "Backend", "open_backend", "open_gpu_monitor", "held_for_the_run", "Settings", "MODELS", "ModelSpec", "LoadedModel",
    "ModelState", "ModelStatus", "machine_info", "Freed", "measure_freed", "queue_for",
    # errors a page shows
    "DashboardError", "BadInputError", "ModelUnavailableError", "GatedModelError", "GpuOutOfMemoryError", "SettingsError",
    # who may do what
    "Access", "Login", "decide_access",
    # inputs, results and long runs
    "DecodedImage", "decode_image", "shape_mask", "mask_overlay", "Classification", "ClassificationRun", "LabelScore",
    "Job", "JobContext", "JobState", "LoraAdapter", "LoraChoice", "GenerationSettings", "GenerationResult", "MemoryMode",
    "Mode", "Precision", "SourceImages", "HiresUpscaler", "UnconditionalSettings", "UnconditionalResult",
    # every user's queued runs and kept images
    "JobBoard", "BoardJob", "NotYourJobError", "ImageHistory", "ImageRecord", "HistoryEntry", "user_owner", "browser_owner",
    # each task's settings, limits, checks and helpers
    "generation", "unconditional", "lora", "pnginfo", "prompt_syntax", "sweeps", "model_card", "outpaint", "sentiment", "tables", "imagenet",
    # the GPU as NVML and torch see it, the background compiles, formatting
    "gpu", "GpuMonitor", "GpuReport", "GpuSnapshot", "HistorySampler", "Sample", "take_sample", "compiled",
    "human_bytes", "precision_label",
]


def open_backend(settings: Settings | None = None) -> Backend:
    """The backend the settings choose (DASH_BACKEND): `local`, every model in this process, or `ray`, every model a
    Ray Serve deployment (Ray is imported only then). Settings default to the environment's."""
    settings = settings or Settings.from_env()
    if settings.backend == "ray":
        from core.backends.ray_client import RayManager

        return RayManager(settings)
    from core.backends.local import LocalBackend

    return LocalBackend(settings)


def open_gpu_monitor(backend: Backend) -> GpuMonitor | ClusterGpuMonitor:
    """NVML on this machine for the local backend; for the ray backend, every GPU that holds a replica, cluster-wide."""
    if backend.settings.backend == "ray":
        from core.backends.ray_client import ClusterGpuMonitor

        return ClusterGpuMonitor(backend)
    return GpuMonitor(gpu.load_nvml())
