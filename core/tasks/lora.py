"""LoRA adapters for the shared Stable Diffusion pipeline, owned by the session that chose them.

A session reads an adapter once (from an uploaded file, a local folder or the Hub; safetensors only, because a
pickled checkpoint can run code when it is loaded) and keeps its tensors on the CPU. A run puts its adapters on the
shared pipeline only while it holds the device's queue slot (`apply`), and takes them off again before it lets go
(`remove`, which restores the base weights exactly), so one session's LoRA never reaches another session's images.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.checks import check_number
from core.config import Settings
from core.errors import BadInputError
from core.models.registry import custom_spec, folder_in_models_root, is_typed_folder, is_valid_repo_id, repo_folder_in_models_root

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' training scripts and save_lora_weights use
MAX_WEIGHT = 4.0  # beyond this a LoRA only burns the image; negative weights steer away from its concept


@dataclass(frozen=True)
class LoraAdapter:
    name: str  # what the user sees, and what PNG metadata records
    source: str  # the uploaded file's name, the folder or the repo id it came from
    state_dict: Mapping[str, torch.Tensor] = field(repr=False, compare=False)  # on the CPU

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict.values())


@dataclass(frozen=True)
class LoraChoice:
    adapter: LoraAdapter
    weight: float = 1.0


def read_upload(file_name: str, data: bytes) -> LoraAdapter:
    """An adapter from an uploaded `.safetensors` file."""
    from safetensors.torch import load

    if not file_name.lower().endswith(".safetensors"):
        raise BadInputError(f"`{file_name}` is not a .safetensors file.", remedy=_SAFETENSORS_ONLY)
    try:
        state_dict = load(data)
    except Exception as exc:  # safetensors raises its own error types for every kind of broken header
        raise BadInputError(f"`{file_name}` is not a readable safetensors file: its header or tensors are damaged.", remedy=_SAFETENSORS_ONLY) from exc
    return _adapter(Path(file_name).stem, file_name, state_dict)


def read_source(text: str, settings: Settings) -> LoraAdapter:
    """An adapter from a folder inside the models root (starting with /, ~ or .; see
    `core.models.registry.folder_in_models_root`) or a Hub repo id; `<models_root>/<repo id>` wins over the Hub."""
    text = text.strip()
    if is_typed_folder(text):
        return _from_folder(folder_in_models_root(text, settings.models_root, "LoRA"), text)
    if not is_valid_repo_id(text):
        raise BadInputError(f"`LoRA` {text!r} is neither a Hub repo id (owner/name) nor a local folder (starting with /, ~ or .).")
    folder = repo_folder_in_models_root(text, settings.models_root, "LoRA")
    if folder is not None:
        return _from_folder(folder, text)
    return _from_hub(text, settings)


def _from_folder(folder: Path, source: str) -> LoraAdapter:
    """The adapter in a folder already checked to lie inside the models root."""
    from safetensors.torch import load_file

    candidates = sorted(folder.glob("*.safetensors"), key=lambda path: (path.name != LORA_FILE, path.name))
    if not candidates:
        raise BadInputError(f"The folder {source} has no .safetensors file.", remedy=_SAFETENSORS_ONLY)
    try:
        state_dict = load_file(candidates[0])
    except Exception as exc:  # safetensors raises its own error types for every kind of broken header
        raise BadInputError(f"`{candidates[0].name}` in {source} is not a readable safetensors file: its header or tensors are damaged.", remedy=_SAFETENSORS_ONLY) from exc
    return _adapter(Path(source).name or folder.name, source, state_dict)


def _from_hub(repo_id: str, settings: Settings) -> LoraAdapter:
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    from core.models.loading import ModelSource, classify_load_error
    from core.models.reachability import hub_reachable

    try:
        # Only the cache while the Hub does not answer: the client's own retries take 23 s to give up.
        path = hf_hub_download(repo_id, LORA_FILE, token=settings.hf_token, local_files_only=not hub_reachable())
    except Exception as exc:  # the Hub client's zoo of errors, classified once as for models
        spec = custom_spec("sd15", repo_id)
        raise classify_load_error(spec, ModelSource(repo_id, is_local=False), exc, token=settings.hf_token) from exc
    return _adapter(repo_id.split("/")[-1], repo_id, load_file(path))


def _adapter(name: str, source: str, state_dict: dict[str, torch.Tensor]) -> LoraAdapter:
    if not any("lora" in key for key in state_dict):
        raise BadInputError(f"`{source}` holds no LoRA weights (no lora_A / lora_down tensors): it may be a whole model.")
    return LoraAdapter(name, source, state_dict)


def check_choices(choices: tuple[LoraChoice, ...]) -> None:
    for choice in choices:
        check_number(f"weight of LoRA {choice.adapter.name!r}", choice.weight, -MAX_WEIGHT, MAX_WEIGHT)


def apply(pipe: Any, choices: tuple[LoraChoice, ...]) -> None:
    """Put the run's adapters on the shared pipeline with their weights. Hold the device's slot, plain pipeline.

    An adapter that does not fit (trained for another base model) is refused and the pipeline left as it was.
    """
    names = [f"run_lora_{i}" for i in range(len(choices))]
    for name, choice in zip(names, choices, strict=True):
        try:
            pipe.load_lora_weights(dict(choice.adapter.state_dict), adapter_name=name)
        except Exception as exc:  # peft / diffusers report shape and key mismatches in several ways
            remove(pipe)
            raise BadInputError(
                f"LoRA {choice.adapter.name!r} does not fit this model: {str(exc).splitlines()[0][:200] if str(exc) else 'its tensors do not match the model'}",
                remedy=_OTHER_BASE,
            ) from exc
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            remove(pipe)
            raise BadInputError(f"LoRA {choice.adapter.name!r} matches no layer of this model.", remedy=_OTHER_BASE)
    pipe.set_adapters(names, adapter_weights=[choice.weight for choice in choices])


def remove(pipe: Any) -> None:
    """Take every adapter off the shared pipeline: the base weights are back exactly (peft keeps them untouched)."""
    pipe.unload_lora_weights()


_SAFETENSORS_ONLY = "LoRA weights load only from .safetensors files: a .ckpt, .pt or .bin file is a pickle, which can run code when it is loaded."
_OTHER_BASE = "Use a LoRA trained for Stable Diffusion 1.x: one for SDXL or SD 2.x has other layers. Nothing was changed."
