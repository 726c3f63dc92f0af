"""Hot dog (ViT-base) and ResNet50: the naive tutorial way against the app's core path, in one process.

    python -m bench.bench_classifiers [--quick]

Full-size architectures with random weights: ViT-base from ../shared/models/hotdog-not-hotdog (saved in Hub layout and
loaded through the core's loader, as the real repo would be), ResNet50 from torchvision.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from bench.common import SHARED_MODELS, emit, environment, median_seconds, settled
from core.config import Settings
from core.models.manager import ModelManager
from core.models.registry import MODELS
from core.tasks import imagenet
from core.tasks.classify import _forward as classify_forward
from core.tasks.classify import classify_images
from core.tasks.classify import preprocess as classify_preprocess
from core.tasks.images import DecodedImage


def photos(count: int) -> list[DecodedImage]:
    rng = np.random.default_rng(0)
    return [DecodedImage(f"{i}.png", Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)), ()) for i in range(count)]


def full_size_hotdog(models_root: Path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    folder = models_root / MODELS["hotdog"].repo_id
    ViTForImageClassification(ViTConfig.from_pretrained(SHARED_MODELS / "hotdog-not-hotdog")).save_pretrained(folder)
    shutil.copy(SHARED_MODELS / "hotdog-not-hotdog" / "preprocessor_config.json", folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller batches, for a CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats, batch = (3, 16) if args.quick else (20, 256)
    print(json.dumps({"environment": environment(device)}), flush=True)
    root = Path(tempfile.mkdtemp())
    hotdog_folder = full_size_hotdog(root / "models")
    manager = ModelManager(Settings(models_root=root / "models", standin_dir=root / "standins", standin_fallback=True))
    one, many = photos(1), photos(batch)
    bench_hotdog(manager, hotdog_folder, device, one, many, repeats)
    bench_resnet(manager, device, one, batch, repeats)


def bench_hotdog(manager: ModelManager, hotdog_folder: Path, device: torch.device, one: list[DecodedImage], many: list[DecodedImage], repeats: int) -> None:
    """The tutorial calls the fp32 pipeline once per image; the core batches on the manager's dtype."""
    from transformers import pipeline

    batch = len(many)
    naive_pipe = pipeline("image-classification", model=str(hotdog_folder), device=device)
    naive = median_seconds(lambda: naive_pipe(one[0].image), device, repeats=repeats)
    hotdog = manager.get(MODELS["hotdog"])
    ours = median_seconds(settled(lambda: classify_images(hotdog, one)), device, repeats=repeats)
    emit("hot dog ViT-base, one image", naive * 1000, ours * 1000, "ms", False, dtype=str(hotdog.dtype))
    naive_batch = median_seconds(lambda: [naive_pipe(p.image) for p in many], device, warmup=1, repeats=max(repeats // 4, 1))
    ours_batch = median_seconds(settled(lambda: classify_images(hotdog, many)), device, warmup=1, repeats=max(repeats // 4, 1))
    emit(f"hot dog ViT-base, {batch} images", batch / naive_batch, batch / ours_batch, "images/s", True)
    # The model alone on one preprocessed 224² image: the tutorial's fp32 eager forward against the core's _forward.
    pixels = classify_preprocess(hotdog.obj, one)
    naive_inputs = {name: tensor.float() for name, tensor in pixels.items()}
    with torch.no_grad():
        naive_forward = median_seconds(lambda: naive_pipe.model(**naive_inputs).logits, device, repeats=repeats)
    ours_forward = median_seconds(settled(lambda: classify_forward(hotdog.obj.model, pixels)), device, repeats=repeats)
    emit("hot dog ViT-base, one 224² image, forward only", naive_forward * 1000, ours_forward * 1000, "ms", False)
    manager.unload("hotdog")


def bench_resnet(manager: ModelManager, device: torch.device, one: list[DecodedImage], batch: int, repeats: int) -> None:
    """The tutorial's fp32 eager model, one preprocessed image per call, against the core's fp16 channels-last path."""
    weights = torchvision.models.ResNet50_Weights.DEFAULT
    transform = weights.transforms()
    naive_model = torchvision.models.resnet50().to(device).eval()

    def naive_resnet(images: list[DecodedImage]) -> None:
        with torch.no_grad():
            for decoded in images:
                naive_model(transform(decoded.image).unsqueeze(0).to(device)).softmax(-1).cpu()

    resnet = manager.get(MODELS["resnet50"])  # full-size torchvision architecture, random weights
    naive = median_seconds(lambda: naive_resnet(one), device, repeats=repeats)
    ours = median_seconds(settled(lambda: imagenet.classify(resnet, one)), device, repeats=repeats)
    emit("ResNet50, one image (preprocessing included)", naive * 1000, ours * 1000, "ms", False, dtype=str(resnet.dtype))
    tensor_batch = torch.randn(batch, 3, 224, 224, device=device)
    # Our side gets its input as preprocess() hands it over (fp16 on CUDA, channels-last), prepared outside the timing.
    prepared = tensor_batch.to(resnet.dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # the tutorial's own guard, so the naive side builds no autograd graph either
        naive_forward = median_seconds(lambda: naive_model(tensor_batch[:1]), device, repeats=repeats)
        naive_throughput = median_seconds(lambda: naive_model(tensor_batch), device, warmup=1, repeats=max(repeats // 4, 1))
    ours_forward = median_seconds(settled(lambda: imagenet._forward(resnet.obj, prepared[:1])), device, repeats=repeats)
    emit("ResNet50, one 224² tensor, forward only", naive_forward * 1000, ours_forward * 1000, "ms", False)
    ours_throughput = median_seconds(settled(lambda: imagenet._forward(resnet.obj, prepared)), device, warmup=1, repeats=max(repeats // 4, 1))
    emit(f"ResNet50, batch of {batch}, forward only", batch / naive_throughput, batch / ours_throughput, "images/s", True)


if __name__ == "__main__":
    main()
