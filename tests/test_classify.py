from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from core.errors import BadInputError, GpuOutOfMemoryError
from core.models.registry import MODELS
from core.tasks.classify import classify_images, scores_from_logits
from core.tasks.images import decode_image


def image(colour, name="x.png", size=(120, 90)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return decode_image(buffer.getvalue(), name)


def test_scores_are_probabilities_sorted_highest_first():
    rows = scores_from_logits(torch.tensor([[0.0, 2.0, 1.0]], dtype=torch.float16), ["a", "b", "c"])
    labels = [s.label for s in rows[0]]
    values = [s.score for s in rows[0]]
    assert labels == ["b", "c", "a"]
    assert sum(values) == pytest.approx(1.0, abs=1e-6) and values == sorted(values, reverse=True)


def test_top_k_keeps_k():
    rows = scores_from_logits(torch.randn(2, 10), [str(i) for i in range(10)], top_k=3)
    assert [len(r) for r in rows] == [3, 3]


def test_hotdog_labels_come_from_the_model_config(manager):
    model = manager.get(MODELS["hotdog"], allow_standin=True)
    run = classify_images(model, [image("red")])
    assert {s.label for s in run.results[0].scores} == set(model.obj.model.config.id2label.values())
    assert run.is_standin and run.seconds > 0 and run.dtype == "float32"


def test_batch_matches_one_by_one_and_keeps_order(manager):
    model = manager.get(MODELS["hotdog"], allow_standin=True)
    images = [image(c, f"{c}.png") for c in ("red", "green", "blue", "white")]
    together = classify_images(model, images).results
    alone = [classify_images(model, [i]).results[0] for i in images]
    assert [r.name for r in together] == ["red.png", "green.png", "blue.png", "white.png"]
    for batched, single in zip(together, alone, strict=True):
        assert batched.top.label == single.top.label
        assert batched.top.score == pytest.approx(single.top.score, abs=1e-5)


def test_more_images_than_one_batch(manager, monkeypatch):
    from core.tasks import classify

    monkeypatch.setattr("core.tasks.classify.MAX_BATCH", 2)
    batch_sizes = []
    forward = classify._forward

    def counting_forward(model, inputs, accel):
        batch_sizes.append(inputs["pixel_values"].shape[0])
        return forward(model, inputs, accel)

    monkeypatch.setattr("core.tasks.classify._forward", counting_forward)
    model = manager.get(MODELS["hotdog"], allow_standin=True)
    run = classify_images(model, [image("red", f"{i}.png") for i in range(5)])
    assert [r.name for r in run.results] == [f"{i}.png" for i in range(5)] and batch_sizes == [2, 2, 1]


def test_gpu_out_of_memory_becomes_a_typed_error(manager, monkeypatch):
    def out_of_memory(model, inputs, accel):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("core.tasks.classify._forward", out_of_memory)
    model = manager.get(MODELS["hotdog"], allow_standin=True)
    with pytest.raises(GpuOutOfMemoryError, match="classifying 3 images with Hot dog or not") as caught:
        classify_images(model, [image("red")] * 3)
    assert "unload other models" in caught.value.remedy


def test_no_images_is_bad_input(manager):
    with pytest.raises(BadInputError, match="No image"):
        classify_images(manager.get(MODELS["hotdog"], allow_standin=True), [])
