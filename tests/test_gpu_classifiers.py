"""fp16 against fp32 through the core's own path, on full-size architectures with the same random weights.

Run on a CUDA machine: `python -m pytest -m gpu tests/test_gpu_classifiers.py`. ViT-base is built from the real
hot dog repo's config (../shared/models/hotdog-not-hotdog, or SHARED_MODELS_DIR), ResNet50 from torchvision.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import Settings
from core.models import loading
from core.models.describe import describe
from core.models.manager import LoadedModel
from core.models.registry import MODELS, ModelSpec
from core.tasks import classify, imagenet
from core.tasks.images import DecodedImage

pytestmark = pytest.mark.gpu

# Stated tolerance: fp16 logits within 1% of the largest fp32 logit magnitude; the top class may differ only where
# fp32's own margin between its two best classes is within twice the observed error (a genuine near-tie).
RELATIVE_LOGIT_TOLERANCE = 0.01


def photos(count: int) -> list[DecodedImage]:
    rng = np.random.default_rng(0)
    return [DecodedImage(f"{i}.png", Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)), ()) for i in range(count)]


def load_both(spec: ModelSpec, source: loading.ModelSource) -> tuple[LoadedModel, LoadedModel]:
    """The same weights loaded twice by the core's loader: fp32 and fp16 on the GPU."""
    settings, device = Settings(), torch.device("cuda")
    models = []
    for dtype in (torch.float32, torch.float16):
        obj = loading.load(spec, source, device, dtype, settings)
        models.append(LoadedModel(spec, obj, device, dtype, source, 0, 0.0, describe(obj, dtype)))
    return models[0], models[1]


def assert_fp16_agrees(logits32: torch.Tensor, logits16: torch.Tensor, architecture: str) -> None:
    logits32, logits16 = logits32.float().cpu(), logits16.float().cpu()
    error = (logits32 - logits16).abs().max().item()
    scale = logits32.abs().max().item()
    top2 = logits32.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * error
    print(json.dumps({"architecture": architecture, "max_abs_logit_error": error, "max_abs_logit": scale, "clear_top1": int(clear.sum())}))
    assert error <= RELATIVE_LOGIT_TOLERANCE * scale
    assert torch.equal(logits32.argmax(-1)[clear], logits16.argmax(-1)[clear])


@pytest.mark.parametrize("count", [1, 8])  # one image replays a CUDA graph, eight run eagerly
def test_vit_base_hotdog_fp16_agrees_with_fp32(tmp_path: Path, count: int):
    from transformers import ViTConfig, ViTForImageClassification

    from bench.common import SHARED_MODELS

    torch.manual_seed(0)
    folder = tmp_path / "hotdog"
    ViTForImageClassification(ViTConfig.from_pretrained(SHARED_MODELS / "hotdog-not-hotdog")).save_pretrained(folder)
    shutil.copy(SHARED_MODELS / "hotdog-not-hotdog" / "preprocessor_config.json", folder)
    fp32, fp16 = load_both(MODELS["hotdog"], loading.ModelSource(str(folder), is_local=True))
    images = photos(count)
    logits = [classify._forward(m.obj.model, classify.preprocess(m.obj, images), m.accel) for m in (fp32, fp16)]
    assert_fp16_agrees(*logits, "vit-base")
    runs = [classify.classify_images(m, images) for m in (fp32, fp16)]
    assert runs[1].dtype == "float16"
    for a, b in zip(runs[0].results, runs[1].results, strict=True):
        assert [s.score for s in sorted(a.scores, key=lambda s: s.label)] == pytest.approx(
            [s.score for s in sorted(b.scores, key=lambda s: s.label)], abs=0.01
        )


@pytest.mark.parametrize("count", [1, 8])
def test_resnet50_fp16_agrees_with_fp32(tmp_path: Path, count: int):
    from core.models import standins

    spec = MODELS["resnet50"]
    # The stand-in hub repo: torchvision's full ResNet50 with seeded random weights, through torch.hub's local loader.
    folder = standins.ensure_built(spec, tmp_path)
    fp32, fp16 = load_both(spec, loading.ModelSource(str(folder), is_local=True, is_standin=True))  # no checkpoint to look for
    torch.testing.assert_close(fp16.obj.conv1.weight.float(), fp32.obj.conv1.weight, rtol=1e-2, atol=1e-4)  # same weights, rounded
    images = photos(count)
    logits = [imagenet._forward(m.obj, imagenet.preprocess(m, images), m.accel) for m in (fp32, fp16)]
    assert_fp16_agrees(*logits, "resnet50")
    top = int(logits[0][0].argmax())
    saliency32, saliency16 = (imagenet.grad_cam(m, images[0], top).heatmap for m in (fp32, fp16))
    # Normalised to [0, 1]; bfloat16 on the CPU (coarser than fp16) differed by at most 0.015 here.
    assert saliency32.max() == pytest.approx(1.0) and np.abs(saliency32 - saliency16).max() <= 0.05
