"""What a caller may know of a loaded model without touching it: the same typed description on every backend.

The local manager describes the live object once, at load (core.models.describe); the ray backend's replicas send the same description to
the front end. Pages and the pre-run checks (token counts, memory estimates) read it, never the model object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Component:
    """One module of a diffusers pipeline: what its tensors hold, in the dtype they are loaded in."""

    name: str
    size_bytes: int
    dtype_name: str  # "float16", "float32", ... (torch's name without "torch.")


@dataclass(frozen=True)
class ModelInfo:
    dtype_name: str  # the precision the weights are loaded in
    labels: tuple[str, ...] = ()  # a transformers classifier's classes, in the order of its outputs
    max_tokens: int | None = None  # a text classifier's longest input (tokenizer limit, capped by the positions)
    # The tokenizer (sentiment, SD prompts), for counting tokens before a run: a plain CPU object, shipped by value.
    tokenizer: Any = None
    components: tuple[Component, ...] = ()  # a diffusers pipeline's modules
    has_safety_checker: bool = False

    def component_bytes(self) -> dict[str, int]:
        return {component.name: component.size_bytes for component in self.components}
