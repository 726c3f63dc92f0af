"""ImageNet classification with torchvision models loaded through torch.hub, with Grad-CAM saliency."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import torch
import torchvision
from PIL import Image

from core.classify import Classification, scores_from_logits
from core.cuda_graphs import graphed_forward
from core.errors import BadInputError, GpuOutOfMemoryError
from core.images import DecodedImage
from core.manager import LoadedModel, release_memory
from core.registry import MODELS, ModelSpec

DEFAULT_TOP_K = 5


@cache
def classifier_names() -> tuple[str, ...]:
    """Every ImageNet classifier torchvision ships, from torchvision itself."""
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def spec_for(name: str) -> ModelSpec:
    """The registry's ResNet50 spec, or one like it for another torchvision classifier."""
    if name not in classifier_names():
        raise BadInputError(f"torchvision has no classification model named {name!r}.")
    if name == MODELS["resnet50"].hub_entry:
        return MODELS["resnet50"]
    weights = torchvision.models.get_model_weights(name).DEFAULT
    return replace(
        MODELS["resnet50"], key=f"torchvision:{name}", title=f"ImageNet classifier ({name})", hub_entry=name,
        hub_weights=f"{type(weights).__name__}.{weights.name}", param_count=int(weights.meta["num_params"]),
    )


def weights_of(spec: ModelSpec) -> torchvision.models.WeightsEnum:
    return torchvision.models.get_weight(spec.hub_weights)


@dataclass(frozen=True)
class ImageNetRun:
    results: tuple[Classification, ...]
    seconds: float
    device: str
    dtype: str
    model_title: str
    is_standin: bool


def preprocess(model: LoadedModel, images: list[DecodedImage]) -> torch.Tensor:
    """Exactly the weights' own transforms (resize 256, centre crop 224, ImageNet mean/std for ResNet50)."""
    transform = weights_of(model.spec).transforms()
    batch = torch.stack([transform(decoded.image) for decoded in images])
    batch = batch.to(model.device, dtype=model.dtype)
    return batch.contiguous(memory_format=torch.channels_last) if model.device.type == "cuda" else batch


def _forward(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return graphed_forward(module, module, batch)


def postprocess(logits: torch.Tensor, categories: list[str], images: list[DecodedImage], top_k: int) -> list[Classification]:
    return [Classification(d.name, scores) for d, scores in zip(images, scores_from_logits(logits, categories, top_k), strict=True)]


def classify(model: LoadedModel, images: list[DecodedImage], top_k: int = DEFAULT_TOP_K) -> ImageNetRun:
    if not images:
        raise BadInputError("No image to classify.", remedy="Upload an image or pick a sample.")
    if not 1 <= top_k <= 1000:
        raise BadInputError(f"`top_k` must be between 1 and 1000, not {top_k}.")
    categories = list(weights_of(model.spec).meta["categories"])
    started = time.perf_counter()
    try:
        logits = _forward(model.obj, preprocess(model, images))
        results = postprocess(logits, categories, images, top_k)
    except torch.OutOfMemoryError as exc:
        release_memory()
        raise GpuOutOfMemoryError(f"The GPU ran out of memory classifying {len(images)} images.") from exc
    return ImageNetRun(tuple(results), time.perf_counter() - started, str(model.device), str(model.dtype).removeprefix("torch."),
                       model.spec.title, model.is_standin)


@dataclass(frozen=True)
class Saliency:
    class_label: str
    heatmap: np.ndarray  # float32 in [0, 1], the model's input size (224×224 for ResNet50)
    overlay: Image.Image  # the centre crop the model saw, with the heat map over it

    @property
    def is_empty(self) -> bool:
        """No region raised the class score (every weighted activation was negative): there is nothing to show."""
        return not self.heatmap.any()


def _last_conv_block(module: torch.nn.Module) -> torch.nn.Module:
    """The block whose output Grad-CAM explains: ResNet's layer4, else the parent of the last Conv2d."""
    if isinstance(getattr(module, "layer4", None), torch.nn.Module):
        return module.layer4
    parents = {id(child): parent for parent in module.modules() for child in parent.children()}
    last_conv = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    return parents.get(id(last_conv), last_conv)


def grad_cam(model: LoadedModel, image: DecodedImage, class_index: int) -> Saliency:
    """Grad-CAM for `class_index`: ReLU of the activations weighted by their spatially pooled gradients.

    The hooks sit on a model every session shares, so they record only the calling thread's pass.
    """
    categories = list(weights_of(model.spec).meta["categories"])
    if not 0 <= class_index < len(categories):
        raise BadInputError(f"`class_index` must be between 0 and {len(categories) - 1}, not {class_index}.")
    block, owner, captured = _last_conv_block(model.obj), threading.get_ident(), {}

    def keep_activation(_module, _inputs, output):
        if threading.get_ident() == owner:
            captured["activation"] = output
            output.register_hook(lambda grad: captured.__setitem__("gradient", grad))

    handle = block.register_forward_hook(keep_activation)
    try:
        batch = preprocess(model, [image]).requires_grad_(True)
        with torch.enable_grad():
            logits = model.obj(batch)
            logits[0, class_index].backward()
    finally:
        handle.remove()
    activation, gradient = captured["activation"].detach().float(), captured["gradient"].float()
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=batch.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    heatmap = (cam / cam.max() if cam.max() > 0 else cam).cpu().numpy().astype(np.float32)
    return Saliency(categories[class_index], heatmap, overlay_heatmap(model_view(model, image), heatmap))


def model_view(model: LoadedModel, image: DecodedImage) -> Image.Image:
    """The image as the model sees it (resized and centre-cropped), without normalisation, for display."""
    transform = weights_of(model.spec).transforms()
    resized = torchvision.transforms.functional.resize(image.image, transform.resize_size, interpolation=transform.interpolation)
    return torchvision.transforms.functional.center_crop(resized, transform.crop_size)


def overlay_heatmap(base: Image.Image, heatmap: np.ndarray, opacity: float = 0.5) -> Image.Image:
    """Red-to-yellow heat over the image: red where the class score is most sensitive."""
    heat = np.zeros((*heatmap.shape, 3), dtype=np.float32)
    heat[..., 0] = 255.0
    heat[..., 1] = 255.0 * heatmap
    alpha = (opacity * heatmap)[..., None]
    blended = np.asarray(base.convert("RGB").resize(heatmap.shape[::-1]), dtype=np.float32) * (1 - alpha) + heat * alpha
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8))
