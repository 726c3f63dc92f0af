"""The description of a live model (core.models.info) and the bytes its tensors hold, read once at load."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from core.models.info import Component, ModelInfo


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def module_bytes(obj: Any) -> int:
    """Bytes held by the parameters and buffers of every torch module inside a model object."""
    modules = list(_modules_of(obj))
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def _modules_of(obj: Any) -> Iterator[torch.nn.Module]:
    if isinstance(obj, torch.nn.Module):
        yield obj
    elif hasattr(obj, "components"):  # diffusers pipeline
        yield from (c for c in obj.components.values() if isinstance(c, torch.nn.Module))
    elif isinstance(getattr(obj, "model", None), torch.nn.Module):  # transformers pipeline
        yield obj.model


def describe(obj: Any, dtype: torch.dtype) -> ModelInfo:
    """The description of a loaded transformers pipeline, torchvision module or diffusers pipeline."""
    tokenizer = getattr(obj, "tokenizer", None)
    config = getattr(getattr(obj, "model", None), "config", None)  # a transformers pipeline's model
    labels: tuple[str, ...] = ()
    if config is not None and getattr(config, "id2label", None):
        labels = tuple(str(config.id2label[i]) for i in range(len(config.id2label)))
    max_tokens = None
    if config is not None and tokenizer is not None:
        limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
        max_tokens = min(int(limit) for limit in limits if limit and limit < 1_000_000)
    components: tuple[Component, ...] = ()
    if isinstance(getattr(obj, "components", None), dict):  # diffusers
        components = tuple(
            Component(name, module_bytes(module), dtype_name(getattr(module, "dtype", dtype)))
            for name, module in obj.components.items() if isinstance(module, torch.nn.Module)
        )
    return ModelInfo(
        dtype_name=dtype_name(dtype), labels=labels, max_tokens=max_tokens, tokenizer=tokenizer, components=components,
        has_safety_checker=getattr(obj, "safety_checker", None) is not None,
    )
