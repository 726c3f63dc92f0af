"""ImageNet classification with torchvision models loaded through torch.hub, with Grad-CAM saliency."""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import torch
import torchvision
from PIL import Image

from core.accel import Acceleration
from core.accel.cuda_graphs import graphed_forward
from core.errors import BadInputError
from core.models.manager import LoadedModel
from core.models.memory import out_of_memory_guard
from core.models.registry import MODELS, ModelSpec
from core.tasks import cross_session
from core.tasks.classify import MAX_BATCH, Classification, ClassificationRun, run_batched, scores_from_logits
from core.tasks.images import DecodedImage

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


def categories(spec: ModelSpec) -> list[str]:
    """The class names in the order of the model's outputs, from the weights' own metadata."""
    return list(weights_of(spec).meta["categories"])


def preprocess(model: LoadedModel, images: list[DecodedImage]) -> torch.Tensor:
    """Exactly the weights' own transforms (resize 256, centre crop 224, ImageNet mean/std for ResNet50)."""
    transform = weights_of(model.spec).transforms()
    batch = torch.stack([transform(decoded.image) for decoded in images])
    batch = batch.to(model.device, dtype=model.dtype)
    return batch.contiguous(memory_format=torch.channels_last)  # as the model's weights (core.models.loading)


def _logits(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return module(batch)


def _forward(module: torch.nn.Module, batch: torch.Tensor, accel: Acceleration) -> torch.Tensor:
    return graphed_forward(module, _logits, batch, accel)


def postprocess(logits: torch.Tensor, categories: list[str], images: list[DecodedImage], top_k: int) -> list[Classification]:
    return [Classification(d.name, scores) for d, scores in zip(images, scores_from_logits(logits, categories, top_k), strict=True)]


def classify(model: LoadedModel, images: list[DecodedImage], top_k: int = DEFAULT_TOP_K, across_sessions: bool = False) -> ClassificationRun:
    """The `top_k` most likely ImageNet classes of every image, batched, highest first.

    `across_sessions`: the forward may be shared with other threads' requests that meet it (core.tasks.cross_session)."""
    names = categories(model.spec)
    if not 1 <= top_k <= len(names):
        raise BadInputError(f"`top_k` must be between 1 and {len(names)}, not {top_k}.")

    def logits(chunk: list[DecodedImage]) -> torch.Tensor:
        return cross_session.forward_images(
            model.obj, model.accel, MAX_BATCH, lambda: preprocess(model, chunk), lambda batch: _forward(model.obj, batch, model.accel),
            across_sessions=across_sessions,
        )

    return run_batched(model, images, lambda chunk: postprocess(logits(chunk), names, chunk, top_k))


@dataclass(frozen=True)
class Saliency:
    class_label: str
    layer: str  # the module whose feature map is explained, e.g. "layer4" for ResNet50
    heatmap: np.ndarray  # float32 in [0, 1], the model's input size (224×224 for ResNet50)
    overlay: Image.Image  # the centre crop the model saw, with the heat map over it

    @property
    def is_empty(self) -> bool:
        """No region raised the class score (every weighted activation was negative): there is nothing to show."""
        return not self.heatmap.any()


_POOLING = (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool2d, torch.nn.AvgPool2d, torch.nn.MaxPool2d)


def _is_feature_map(module: torch.nn.Module, output: object) -> bool:
    # N×C×H×W with a spatial extent: pooling to 1×1 (and the classifier after it) has nothing left to localise.
    return isinstance(output, torch.Tensor) and output.ndim == 4 and min(output.shape[-2:]) > 1 and not isinstance(module, _POOLING)


def grad_cam(model: LoadedModel, image: DecodedImage, class_index: int) -> Saliency:
    """Grad-CAM for `class_index`: ReLU of the last conv block's activations weighted by their pooled gradients.

    Forward hooks find the last block to finish with a spatial feature map (ResNet's layer4, a MobileNet's
    features, a ViT's patch embedding); the hooks sit on a model every session shares, so they record only
    the calling thread's pass and are removed before returning. No parameter gradient is accumulated.
    """
    names = categories(model.spec)
    if not 0 <= class_index < len(names):
        raise BadInputError(f"`class_index` must be between 0 and {len(names) - 1}, not {class_index}.")
    owner, last = threading.get_ident(), {}
    module_names = {module: name for name, module in model.obj.named_modules()}

    def keep_feature_map(module: torch.nn.Module, _inputs: object, output: object) -> None:
        if threading.get_ident() == owner and _is_feature_map(module, output):
            last["layer"], last["activation"] = module_names[module], output

    handles = [module.register_forward_hook(keep_feature_map) for module in module_names]
    try:
        with out_of_memory_guard(f"computing Grad-CAM with {model.spec.title}"), torch.enable_grad():
            batch = preprocess(model, [image]).requires_grad_(True)  # weights are frozen: the graph hangs on the input
            logits = model.obj(batch)
            if "activation" not in last:
                raise BadInputError(f"{model.spec.hub_entry} has no spatial feature map to explain with Grad-CAM.")
            (gradient,) = torch.autograd.grad(logits[0, class_index], last["activation"])
    finally:
        for handle in handles:
            handle.remove()
    activation, gradient = last["activation"].detach().float(), gradient.float()
    cam = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=batch.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    heatmap = (cam / cam.max() if cam.max() > 0 else cam).cpu().numpy().astype(np.float32)
    return Saliency(names[class_index], last["layer"], heatmap, overlay_heatmap(model_view(model, image), heatmap))


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
