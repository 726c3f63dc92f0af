"""One interface for where models run: this process (`core.backends.local`) or Ray Serve replicas
(`core.backends.ray_client`). Pages and the facade (`core.api`) hold a `Backend` and never ask which one it is.

A backend loads and tracks models (`get`, `use`, `status`, `unload` ...) and runs every task on a model it handed out.
Each task method takes the `LoadedModel` and returns the same frozen dataclass on every backend.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from core.config import Settings
    from core.models.manager import Eviction, GpuBudget, LoadedModel, ModelStatus
    from core.models.registry import ModelSpec
    from core.tasks.classify import ClassificationRun
    from core.tasks.imagenet import Saliency
    from core.tasks.images import DecodedImage
    from core.tasks.jobs import JobContext
    from core.tasks.lora import LoraChoice
    from core.tasks.sd_settings import GenerationResult, GenerationSettings, SourceImages
    from core.tasks.sentiment import Attributions, SentimentScores
    from core.tasks.unconditional import UnconditionalResult, UnconditionalSettings


class Backend(Protocol):
    settings: Settings
    device: torch.device  # where generation runs: the page's defaults and limits follow it

    # Models ------------------------------------------------------------------------------------------------------
    def get(self, spec: ModelSpec, *, allow_standin: bool = False, gpu: int | None = None) -> LoadedModel: ...
    def use(self, spec: ModelSpec, *, allow_standin: bool = False, gpu: int | None = None) -> AbstractContextManager[LoadedModel]: ...
    def status(self, specs: list[ModelSpec] | None = None) -> list[ModelStatus]: ...
    def unload(self, key: str) -> int: ...
    def unload_all(self) -> int: ...
    def gpu_budgets(self) -> tuple[GpuBudget, ...]: ...
    def evictions(self) -> tuple[Eviction, ...]: ...

    # Tasks -------------------------------------------------------------------------------------------------------
    def classify_images(self, model: LoadedModel, images: Sequence[DecodedImage]) -> ClassificationRun: ...
    def classify(self, model: LoadedModel, images: Sequence[DecodedImage], top_k: int) -> ClassificationRun: ...
    def grad_cam(self, model: LoadedModel, image: DecodedImage, class_index: int) -> Saliency: ...
    def score_texts(self, model: LoadedModel, texts: Sequence[str], context: JobContext | None = None) -> SentimentScores: ...
    def explain(self, model: LoadedModel, text: str, method: str, steps: int, label: str | None) -> Attributions: ...
    def check_memory(self, model: LoadedModel, settings: GenerationSettings) -> None: ...
    def generate(
        self, model: LoadedModel, settings: GenerationSettings, context: JobContext | None = None,
        abandoned: Callable[[], bool] = ..., source: SourceImages | None = None, loras: tuple[LoraChoice, ...] = (),
    ) -> GenerationResult: ...
    def generate_unconditional(
        self, model: LoadedModel, settings: UnconditionalSettings, context: JobContext | None = None, abandoned: Callable[[], bool] = ...,
    ) -> UnconditionalResult: ...
    def wait_for_compiles(self, model: LoadedModel, timeout_s: float) -> bool: ...


def held_for_the_run(backend: Backend, spec: ModelSpec, allow_standin: bool, run: Callable[[LoadedModel, JobContext], Any]) -> Callable[[JobContext], Any]:
    """Work for a `core.tasks.jobs.Job`: the model is held busy (never evicted) for the whole run."""

    def work(context: JobContext) -> Any:
        with backend.use(spec, allow_standin=allow_standin) as model:
            return run(model, context)

    return work
