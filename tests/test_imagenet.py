from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from core import imagenet
from core.errors import BadInputError
from core.images import decode_image
from core.registry import MODELS


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, size=(300, 400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return decode_image(buffer.getvalue(), "noise.png")


@pytest.fixture()
def resnet(manager):
    return manager.get(MODELS["resnet50"], allow_standin=True)


def test_the_model_list_comes_from_torchvision():
    names = imagenet.classifier_names()
    assert "resnet50" in names and "vit_b_16" in names and len(names) == len(torchvision.models.list_models(module=torchvision.models))
    assert "fasterrcnn_resnet50_fpn" not in names  # detection models are not ImageNet classifiers


def test_spec_for_another_model_uses_its_own_weights():
    spec = imagenet.spec_for("mobilenet_v3_small")
    assert spec.hub_entry == "mobilenet_v3_small" and spec.hub_weights.startswith("MobileNet_V3_Small_Weights.")
    assert imagenet.spec_for("resnet50") is MODELS["resnet50"]
    with pytest.raises(BadInputError, match="'no_such_net'"):
        imagenet.spec_for("no_such_net")


def test_preprocessing_equals_the_weights_own_transforms(resnet, photo):
    ours = imagenet.preprocess(resnet, [photo])
    theirs = torchvision.models.ResNet50_Weights.DEFAULT.transforms()(photo.image).unsqueeze(0)
    assert ours.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours.float().cpu(), theirs, rtol=0, atol=1e-6)


def test_top_k_labels_are_imagenet_categories(resnet, photo):
    run = imagenet.classify(resnet, [photo, photo], top_k=7)
    categories = torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"]
    assert len(run.results) == 2 and all(len(r.scores) == 7 for r in run.results)
    assert all(score.label in categories for score in run.results[0].scores)
    assert run.results[0] == run.results[1].__class__(run.results[0].name, run.results[1].scores)  # same image, same answer


def test_top_k_out_of_range_is_refused(resnet, photo):
    with pytest.raises(BadInputError, match="`top_k` must be between 1 and 1000, not 0"):
        imagenet.classify(resnet, [photo], top_k=0)


def test_grad_cam_is_a_normalised_map_over_the_crop(resnet, photo):
    top = imagenet.classify(resnet, [photo], top_k=1).results[0].top
    categories = list(torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"])
    saliency = imagenet.grad_cam(resnet, photo, class_index=categories.index(top.label))
    assert saliency.heatmap.shape == (224, 224) and saliency.heatmap.dtype == np.float32
    assert saliency.heatmap.min() == 0.0 and saliency.heatmap.max() == pytest.approx(1.0) and not saliency.is_empty
    assert saliency.overlay.size == (224, 224) and saliency.class_label == top.label
    assert all(p.grad is None for p in resnet.obj.parameters())  # nothing accumulates on the shared model
    assert not resnet.obj.layer4._forward_hooks  # the hook is gone


def test_grad_cam_depends_on_the_class(resnet, photo):
    first = imagenet.grad_cam(resnet, photo, 1).heatmap
    second = imagenet.grad_cam(resnet, photo, 500).heatmap
    assert not np.allclose(first, second)


def test_grad_cam_ignores_other_sessions_forward_passes(resnet, photo):
    """A classify() in another thread while the hook is installed must not replace this thread's activations."""
    other_started = threading.Event()
    results = []

    def other_session():
        other_started.set()
        for _ in range(3):
            results.append(imagenet.classify(resnet, [photo]))

    thread = threading.Thread(target=other_session)
    thread.start()
    other_started.wait(10)
    saliency = imagenet.grad_cam(resnet, photo, 1)
    thread.join(30)
    alone = imagenet.grad_cam(resnet, photo, 1)
    np.testing.assert_allclose(saliency.heatmap, alone.heatmap, atol=1e-5)
    assert len(results) == 3


def test_bad_class_index_is_refused(resnet, photo):
    with pytest.raises(BadInputError, match="not 1000"):
        imagenet.grad_cam(resnet, photo, 1000)




@pytest.mark.gpu
@pytest.mark.parametrize("architecture", ["vit-base", "resnet50"])
def test_fp16_agrees_with_fp32_on_full_size_models(architecture):
    """Same random weights, fp16 vs fp32 on the GPU.

    Tolerance: logits within 1% of the largest logit magnitude, and the same top-1 class for every image.
    (Random-weight ResNet50 logits are large and its softmax saturates, so logits, not probabilities, are compared.)
    """
    from transformers import ViTConfig, ViTForImageClassification

    from bench.common import SHARED_MODELS

    torch.manual_seed(0)
    if architecture == "vit-base":
        model = ViTForImageClassification(ViTConfig.from_dict(json.loads((SHARED_MODELS / "hotdog-not-hotdog" / "config.json").read_text())))
    else:
        model = torchvision.models.resnet50()
    model = model.cuda().eval()
    batch = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        logits32 = model(batch)
        logits16 = model.half()(batch.half())
    logits32 = getattr(logits32, "logits", logits32).float()
    logits16 = getattr(logits16, "logits", logits16).float()
    scale = logits32.abs().max().item()
    error = (logits32 - logits16).abs().max().item()
    print(json.dumps({"architecture": architecture, "max_abs_logit_error": error, "max_abs_logit": scale}))
    assert error <= 0.01 * scale
    assert torch.equal(logits32.argmax(-1), logits16.argmax(-1))
