"""Image classification with a transformers pipeline (the hot dog model): preprocess -> _forward -> postprocess."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from core.cuda_graphs import graphed_forward
from core.errors import BadInputError, GpuOutOfMemoryError
from core.images import DecodedImage
from core.manager import LoadedModel, release_memory

# One forward pass holds at most this many images: bounds activation memory for a large multi-file upload.
MAX_BATCH = 64


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float  # probability in [0, 1]


@dataclass(frozen=True)
class Classification:
    name: str  # the file (or sample) the image came from
    scores: tuple[LabelScore, ...]  # highest first

    @property
    def top(self) -> LabelScore:
        return self.scores[0]


@dataclass(frozen=True)
class ClassificationRun:
    results: tuple[Classification, ...]
    seconds: float  # preprocessing, forward and postprocessing of the whole batch
    device: str
    dtype: str
    model_title: str
    is_standin: bool


def scores_from_logits(logits: torch.Tensor, labels: list[str], top_k: int | None = None) -> list[tuple[LabelScore, ...]]:
    """Softmax in fp32 (fp16 logits lose small probabilities), sorted highest first, per row."""
    probabilities = logits.float().softmax(dim=-1).cpu()
    k = probabilities.shape[-1] if top_k is None else min(top_k, probabilities.shape[-1])
    values, indices = probabilities.topk(k, dim=-1)
    return [
        tuple(LabelScore(labels[int(i)], float(v)) for v, i in zip(row_values, row_indices, strict=True))
        for row_values, row_indices in zip(values, indices, strict=True)
    ]


def preprocess(pipe: Any, images: list[DecodedImage]) -> dict[str, torch.Tensor]:
    inputs = pipe.image_processor([decoded.image for decoded in images], return_tensors="pt")
    return {name: tensor.to(pipe.device, dtype=pipe.model.dtype) for name, tensor in inputs.items()}


def _forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return graphed_forward(model, lambda pixel_values: model(pixel_values=pixel_values).logits, inputs["pixel_values"])


def postprocess(logits: torch.Tensor, id2label: dict[int, str], images: list[DecodedImage]) -> list[Classification]:
    labels = [id2label[i] for i in range(len(id2label))]
    return [Classification(decoded.name, scores) for decoded, scores in zip(images, scores_from_logits(logits, labels), strict=True)]


def classify_images(model: LoadedModel, images: list[DecodedImage]) -> ClassificationRun:
    """Every image through the model, in batches of MAX_BATCH; probabilities for every label, highest first."""
    if not images:
        raise BadInputError("No image to classify.", remedy="Upload an image, take a photo or pick a sample.")
    pipe = model.obj
    started = time.perf_counter()
    results: list[Classification] = []
    try:
        for start in range(0, len(images), MAX_BATCH):
            chunk = images[start : start + MAX_BATCH]
            logits = _forward(pipe.model, preprocess(pipe, chunk))
            results.extend(postprocess(logits, pipe.model.config.id2label, chunk))
    except torch.OutOfMemoryError as exc:
        release_memory()
        raise GpuOutOfMemoryError(f"The GPU ran out of memory classifying {len(images)} images.") from exc
    return ClassificationRun(
        tuple(results), time.perf_counter() - started, str(model.device), str(model.dtype).removeprefix("torch."),
        model.spec.title, model.is_standin,
    )
