from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from core.errors import BadInputError
from core.models.registry import MODELS
from core.tasks import imagenet
from core.tasks.images import decode_image


def png_bytes(colour, size=(300, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


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
    assert run.results[0].scores == run.results[1].scores  # same image, same answer
    assert run.is_standin and run.model_title == MODELS["resnet50"].title and run.seconds > 0


def test_top_k_out_of_range_is_refused(resnet, photo):
    with pytest.raises(BadInputError, match="`top_k` must be between 1 and 1000, not 0"):
        imagenet.classify(resnet, [photo], top_k=0)
    with pytest.raises(BadInputError, match="No image"):
        imagenet.classify(resnet, [])


def test_batches_larger_than_max_batch_keep_order_and_results(resnet, photo, monkeypatch):
    images = [photo, decode_image(png_bytes((10, 200, 30)), "green.png"), photo]
    together = imagenet.classify(resnet, images, top_k=3).results
    monkeypatch.setattr("core.tasks.classify.MAX_BATCH", 2)
    chunked = imagenet.classify(resnet, images, top_k=3).results
    assert [r.name for r in chunked] == ["noise.png", "green.png", "noise.png"]
    for a, b in zip(together, chunked, strict=True):
        assert [s.label for s in a.scores] == [s.label for s in b.scores]
        assert [s.score for s in a.scores] == pytest.approx([s.score for s in b.scores], abs=1e-4)


def test_grad_cam_is_a_normalised_map_over_the_crop(resnet, photo):
    top = imagenet.classify(resnet, [photo], top_k=1).results[0].top
    saliency = imagenet.grad_cam(resnet, photo, class_index=imagenet.categories(resnet.spec).index(top.label))
    assert saliency.heatmap.shape == (224, 224) and saliency.heatmap.dtype == np.float32
    assert saliency.heatmap.min() == 0.0 and saliency.heatmap.max() == pytest.approx(1.0) and not saliency.is_empty
    assert saliency.overlay.size == (224, 224) and saliency.class_label == top.label and saliency.layer == "layer4"
    assert all(p.grad is None for p in resnet.obj.parameters())  # nothing accumulates on the shared model
    assert not any(module._forward_hooks for module in resnet.obj.modules())  # every hook is gone


def test_grad_cam_equals_a_hand_computed_one_on_layer4(resnet, photo):
    """Reference: split ResNet50 at layer4 by hand and differentiate the class logit with respect to its output."""
    net, class_index = resnet.obj, 321
    trunk = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    batch = torchvision.models.ResNet50_Weights.DEFAULT.transforms()(photo.image).unsqueeze(0)
    with torch.enable_grad():
        features = trunk(batch).detach().requires_grad_(True)
        logit = net.fc(torch.flatten(net.avgpool(features), 1))[0, class_index]
        (gradient,) = torch.autograd.grad(logit, features)
    cam = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * features.detach()).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=(224, 224), mode="bilinear", align_corners=False)[0, 0]
    expected = ((cam - cam.min()) / (cam - cam.min()).max()).numpy()
    np.testing.assert_allclose(imagenet.grad_cam(resnet, photo, class_index).heatmap, expected, atol=1e-4)


@pytest.mark.parametrize(("name", "layer"), [("mobilenet_v3_small", "features"), ("vit_b_16", "conv_proj")])
def test_grad_cam_finds_the_feature_map_of_other_architectures(manager, photo, name, layer):
    model = manager.get(imagenet.spec_for(name), allow_standin=True)
    saliency = imagenet.grad_cam(model, photo, 7)
    assert saliency.layer == layer and saliency.heatmap.shape == (224, 224) and saliency.heatmap.max() <= 1.0


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
