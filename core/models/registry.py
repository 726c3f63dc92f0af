"""The models the dashboard serves, as plain specs. Loading lives in `core.models.loading`."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import BadInputError

if TYPE_CHECKING:  # only a type here: core.config reads the options file that names these models
    from core.config import Settings


class Family(StrEnum):
    """Which public API loads the model; each has one loader and one stand-in builder."""

    TRANSFORMERS = "transformers"  # transformers.pipeline(task, model=...)
    TORCH_HUB = "torch.hub"  # torch.hub.load(repo, entry, weights=...)
    DIFFUSERS = "diffusers"  # DiffusionPipeline.from_pretrained(...)


@dataclass(frozen=True)
class ModelSpec:
    key: str
    title: str
    task: str  # the transformers / diffusers task name, e.g. "image-classification"
    family: Family
    repo_id: str  # Hub repo id, or the torch.hub GitHub repo ("owner/name:tag")
    param_count: int  # drives the memory estimate before the model is ever loaded
    revision: str = "main"
    hub_entry: str | None = None  # torch.hub entry point, e.g. "resnet50"
    hub_weights: str | None = None  # torchvision weights enum name, e.g. "ResNet50_Weights.DEFAULT"
    pipeline_class: str | None = None  # diffusers pipeline class name
    standin_labels: tuple[str, ...] = ()  # class names a stand-in copies from the real config

    def estimate_bytes(self, dtype_bytes: int) -> int:
        # Weights plus ~20% for buffers and the allocator's rounding: close enough to decide what fits.
        return int(self.param_count * dtype_bytes * 1.2)


# torchvision publishes a tag per release; pinning it keeps torch.hub from running newer hubconf code.
TORCHVISION_HUB_REPO = "pytorch/vision:v0.29.1"

MODELS: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in (
        ModelSpec(
            key="hotdog",
            title="Hot dog or not (ViT-base)",
            task="image-classification",
            family=Family.TRANSFORMERS,
            repo_id="julien-c/hotdog-not-hotdog",
            param_count=85_800_000,
            standin_labels=("hot dog", "not hot dog"),
        ),
        ModelSpec(
            key="resnet50",
            title="ImageNet classifier (ResNet50)",
            task="imagenet-classification",
            family=Family.TORCH_HUB,
            repo_id=TORCHVISION_HUB_REPO,
            param_count=25_600_000,
            hub_entry="resnet50",
            hub_weights="ResNet50_Weights.DEFAULT",
        ),
        ModelSpec(
            key="sentiment",
            title="Sentiment (DistilBERT SST-2)",
            task="text-classification",
            family=Family.TRANSFORMERS,
            repo_id="distilbert/distilbert-base-uncased-finetuned-sst-2-english",
            param_count=67_000_000,
            standin_labels=("NEGATIVE", "POSITIVE"),
        ),
        ModelSpec(
            key="sd15",
            title="Stable Diffusion 1.5",
            task="text-to-image",
            family=Family.DIFFUSERS,
            repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
            param_count=1_066_000_000,
            pipeline_class="StableDiffusionPipeline",
        ),
        ModelSpec(
            key="sd14",
            title="Stable Diffusion 1.4",
            task="text-to-image",
            family=Family.DIFFUSERS,
            repo_id="CompVis/stable-diffusion-v1-4",
            param_count=1_066_000_000,
            pipeline_class="StableDiffusionPipeline",
        ),
        ModelSpec(
            key="mr-potato-head",
            title="Mr. Potato Head (DreamBooth SD 1.x)",
            task="text-to-image",
            family=Family.DIFFUSERS,
            repo_id="sd-dreambooth-library/mr-potato-head",
            param_count=1_066_000_000,
            pipeline_class="StableDiffusionPipeline",
        ),
        ModelSpec(
            key="ddpm-butterflies",
            title="DDPM butterflies 32px (unconditional)",
            task="unconditional-image-generation",
            family=Family.DIFFUSERS,
            repo_id="johnowhitaker/ddpm-butterflies-32px",
            param_count=18_000_000,
            pipeline_class="DDPMPipeline",
        ),
        ModelSpec(
            key="ddpm-cifar10",
            title="DDPM CIFAR-10 32px (unconditional)",
            task="unconditional-image-generation",
            family=Family.DIFFUSERS,
            repo_id="google/ddpm-cifar10-32",
            param_count=35_700_000,
            pipeline_class="DDPMPipeline",
        ),
    )
}

# owner/name, as the Hub allows: letters, digits, '-', '_', '.', no '..' and no leading or trailing separator.
_REPO_ID = re.compile(r"^(?!.*\.\.)[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?$")


def is_valid_repo_id(repo_id: str) -> bool:
    return bool(_REPO_ID.match(repo_id))


def custom_spec(base_key: str, repo_id: str) -> ModelSpec:
    """A spec for a user-chosen repo of the same kind as `base_key` (another SD 1.x, another classifier)."""
    base = MODELS[base_key]
    return replace(base, key=f"{base_key}@{repo_id}", title=repo_id, repo_id=repo_id, standin_labels=base.standin_labels)


def spec_for_choice(choice: str, custom: str, known_keys: tuple[str, ...], base_key: str, example: str, settings: Settings) -> ModelSpec:
    """The spec of a listed model (`choice` in `known_keys`), or of the user's own repo id (owner/name) or folder
    inside the models root (`folder_in_models_root`), loaded like `base_key`. Refuses anything else, with an example."""
    if choice in known_keys:
        return MODELS[choice]
    text = custom.strip()
    if not text:
        raise BadInputError("Enter a Hub repo id (owner/name) or a folder inside the models root.", remedy=f"For example {example}.")
    if is_typed_folder(text):
        return custom_spec(base_key, str(folder_in_models_root(text, settings.models_root, "model")))
    if not is_valid_repo_id(text):
        raise BadInputError(f"`model` {text!r} is not a Hub repo id.", remedy=f"A repo id looks like owner/name, for example {example}.")
    return custom_spec(base_key, text)


# Typed local folders ---------------------------------------------------------------------------------------------

_NO_ROOT = (
    "An operator sets DASH_MODELS_ROOT to a folder of models; folders inside it can then be typed here. "
    "Or give a Hub repo id (owner/name)."
)
_INSIDE_ROOT = "Give a folder inside the models root (DASH_MODELS_ROOT), as ./<folder> or its full path, or a Hub repo id (owner/name)."


def is_typed_folder(text: str) -> bool:
    """A model or LoRA field names a local folder when its value starts with /, ~ or . (anything else is a repo id)."""
    return text.startswith(("/", "~", "."))


def folder_in_models_root(text: str, models_root: Path | None, field: str) -> Path:
    """The folder a user typed, resolved (symlinks followed), if it lies inside `models_root`; else BadInputError.

    `text` is a full path, `~/...`, or `./...` relative to the root. `..` is refused outright, and so is a full
    path that does not start with the root. A path outside the root gets one message whether or not it exists,
    so that the field cannot probe the server's disk. Without a models root, no typed folder is accepted.
    """
    if models_root is None:
        raise BadInputError(f"`{field}` {text!r}: local folders are off on this server (DASH_MODELS_ROOT is not set).", remedy=_NO_ROOT)
    path = Path(text).expanduser()
    outside = BadInputError(f"`{field}` {text!r} is not a folder inside the models root.", remedy=_INSIDE_ROOT)
    if ".." in path.parts:
        raise BadInputError(f"`{field}` {text!r} contains '..'.", remedy=_INSIDE_ROOT)
    root = models_root.resolve()
    if path.is_absolute() and not (path.is_relative_to(models_root.absolute()) or path.is_relative_to(root)):
        raise outside  # decided on the text alone: nothing outside the root is even looked at
    try:
        folder = (models_root / path).resolve()  # an absolute `path` replaces the root here
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL character
        raise outside from exc
    if not folder.is_relative_to(root):
        raise outside  # a symlink inside the root that leads out of it
    if not folder.is_dir():
        raise BadInputError(f"`{field}`: the models root has no folder {text!r}.", remedy=_INSIDE_ROOT)
    return folder


def repo_folder_in_models_root(repo_id: str, models_root: Path | None, field: str) -> Path | None:
    """`<models_root>/<repo_id>` for a repo id a user typed, when that folder exists; None when it does not (then the
    Hub). A folder there that resolves outside the root (a symlink) is refused, as a typed folder would be."""
    if models_root is None or not (models_root / repo_id).is_dir():
        return None
    return folder_in_models_root(repo_id, models_root, field)
