"""Image classification with a transformers pipeline (the hot dog model): preprocess -> _forward -> postprocess."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from core.accel import Acceleration
from core.accel.cuda_graphs import graphed_forward
from core.errors import BadInputError
from core.models.manager import LoadedModel
from core.models.memory import out_of_memory_guard
from core.tasks import cross_session
from core.tasks.images import DecodedImage

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
    results: tuple[Classification, ...]  # one per image, in the order given
    seconds: float  # preprocessing, forward and postprocessing of every image
    device: str
    dtype: str
    model_title: str
    is_standin: bool  # random weights: the page must say the labels mean nothing


def run_batched(model: LoadedModel, images: list[DecodedImage], classify_chunk: Callable[[list[DecodedImage]], list[Classification]]) -> ClassificationRun:
    """`classify_chunk` over `images` in chunks of MAX_BATCH, timed as a whole."""
    if not images:
        raise BadInputError("No image to classify.", remedy="Upload an image, take a photo or pick a sample.")
    started = time.perf_counter()
    results: list[Classification] = []
    with out_of_memory_guard(f"classifying {len(images)} images with {model.spec.title}"):
        for start in range(0, len(images), MAX_BATCH):
            results.extend(classify_chunk(images[start : start + MAX_BATCH]))
    return ClassificationRun(
        tuple(results), time.perf_counter() - started, str(model.device), str(model.dtype).removeprefix("torch."),
        model.spec.title, model.is_standin,
    )


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


def _logits(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixel_values).logits


def _forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor], accel: Acceleration) -> torch.Tensor:
    return graphed_forward(model, _logits, inputs["pixel_values"], accel)


def postprocess(logits: torch.Tensor, id2label: dict[int, str], images: list[DecodedImage]) -> list[Classification]:
    labels = [id2label[i] for i in range(len(id2label))]
    return [Classification(decoded.name, scores) for decoded, scores in zip(images, scores_from_logits(logits, labels), strict=True)]


def classify_images(model: LoadedModel, images: list[DecodedImage], across_sessions: bool = False) -> ClassificationRun:
    """Every image through the pipeline's model, batched; probabilities for every label of its config, highest first.

    `across_sessions`: the forward may be shared with other threads' requests that meet it (core.tasks.cross_session)."""
    pipe = model.obj

    def logits(chunk: list[DecodedImage]) -> torch.Tensor:
        return cross_session.forward_images(
            pipe.model, model.accel, MAX_BATCH, lambda: preprocess(pipe, chunk)["pixel_values"],
            lambda pixel_values: _forward(pipe.model, {"pixel_values": pixel_values}, model.accel), across_sessions=across_sessions,
        )

    return run_batched(model, images, lambda chunk: postprocess(logits(chunk), pipe.model.config.id2label, chunk))
