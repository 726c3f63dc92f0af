"""The local backend: every model in this process (core.models.manager), every task run here by core/tasks."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from core.accel import compiled
from core.models.manager import LoadedModel, ModelManager
from core.tasks import classify, generation, imagenet, sentiment, unconditional
from core.tasks.classify import ClassificationRun
from core.tasks.imagenet import Saliency
from core.tasks.images import DecodedImage
from core.tasks.jobs import JobContext
from core.tasks.lora import LoraChoice
from core.tasks.sd_settings import GenerationResult, GenerationSettings, SourceImages
from core.tasks.sentiment import Attributions, SentimentScores
from core.tasks.unconditional import UnconditionalResult, UnconditionalSettings


class LocalBackend(ModelManager):
    """The model manager of this process, with each task run directly on its models (the `Backend` protocol).

    Sentiment and (see `images_across_sessions`) classifier requests of different sessions share forwards here when the
    model's `accel.batch_sessions` is on (core.tasks.cross_session); a Ray replica's manager calls the tasks without
    it, as Serve batches its requests itself."""

    def classify_images(self, model: LoadedModel, images: Sequence[DecodedImage]) -> ClassificationRun:
        return classify.classify_images(model, list(images), across_sessions=images_across_sessions(model))

    def classify(self, model: LoadedModel, images: Sequence[DecodedImage], top_k: int) -> ClassificationRun:
        return imagenet.classify(model, list(images), top_k, across_sessions=images_across_sessions(model))

    def grad_cam(self, model: LoadedModel, image: DecodedImage, class_index: int) -> Saliency:
        return imagenet.grad_cam(model, image, class_index)

    def score_texts(self, model: LoadedModel, texts: Sequence[str], context: JobContext | None = None) -> SentimentScores:
        return sentiment.score_texts(model, texts, context, across_sessions=model.accel.batch_sessions)

    def explain(self, model: LoadedModel, text: str, method: str, steps: int, label: str | None) -> Attributions:
        return sentiment.explain(model, text, method, steps, label)

    def check_memory(self, model: LoadedModel, settings: GenerationSettings) -> None:
        generation.check_memory(model, settings)

    def generate(
        self, model: LoadedModel, settings: GenerationSettings, context: JobContext | None = None,
        abandoned: Callable[[], bool] = lambda: False, source: SourceImages | None = None, loras: tuple[LoraChoice, ...] = (),
    ) -> GenerationResult:
        return generation.generate(model, settings, context, abandoned, source, loras)

    def generate_unconditional(
        self, model: LoadedModel, settings: UnconditionalSettings, context: JobContext | None = None, abandoned: Callable[[], bool] = lambda: False,
    ) -> UnconditionalResult:
        return unconditional.generate(model, settings, context, abandoned)

    def wait_for_compiles(self, model: LoadedModel, timeout_s: float) -> bool:
        return compiled.wait_until_settled(timeout_s)


def images_across_sessions(model: LoadedModel) -> bool:
    """Whether an image classifier's requests share forwards across sessions: where `batch_sessions` is on, except on
    a GPU with CUDA graphs. There a lone image replays a graph in about a millisecond and each session's preprocessing
    on the CPU is the limit: on the H100, 16 hot dog sessions made 516 images/s each alone, and 7 to 283 merged while
    the merged batches' new sizes compiled in the background (docs/BATCHING.md). Sentiment is not graphed and gains
    there (1.98 times the texts/s)."""
    return model.accel.batch_sessions and not (model.device.type == "cuda" and model.accel.cuda_graphs)
