"""One ModelManager per process: loads each model once, shares it between sessions, unloads on request.

Thread-safety: `_lock` guards the table of entries; each entry has its own lock so that two sessions asking
for the same model wait for one load, while different models load side by side.
"""
from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from core import loading, standins
from core.config import Settings
from core.devices import pick_device, pick_dtype
from core.errors import DashboardError, ModelUnavailableError
from core.registry import MODELS, ModelSpec


class ModelState(StrEnum):
    NOT_LOADED = "not loaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class LoadedModel:
    """A live model: the object only core inference functions touch, and how it was loaded."""

    spec: ModelSpec
    obj: Any
    device: torch.device
    dtype: torch.dtype
    source: loading.ModelSource
    memory_bytes: int
    load_s: float

    @property
    def is_standin(self) -> bool:
        return self.source.is_standin


@dataclass(frozen=True)
class ModelStatus:
    """What Home and the VRAM monitor show for one model."""

    key: str
    title: str
    state: ModelState
    device: str | None
    dtype: str | None
    memory_bytes: int | None
    estimate_bytes: int
    load_s: float | None
    is_standin: bool
    source: str | None
    error: str | None
    busy: int
    last_used: float | None  # time.time() of the last use


class _Entry:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.load_lock = threading.Lock()
        self.state = ModelState.NOT_LOADED
        self.model: LoadedModel | None = None
        self.error: DashboardError | None = None
        self.busy = 0
        self.last_used: float | None = None


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


Loader = Callable[[ModelSpec, loading.ModelSource, torch.device, torch.dtype, Settings], Any]


class ModelManager:
    def __init__(self, settings: Settings, loader: Loader = loading.load) -> None:
        self.settings = settings
        self.device = pick_device(settings)
        self.dtype = pick_dtype(self.device)
        self._loader = loader
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def _entry(self, spec: ModelSpec) -> _Entry:
        with self._lock:
            entry = self._entries.get(spec.key)
            if entry is None:
                entry = self._entries[spec.key] = _Entry(spec)
            return entry

    def get(self, spec: ModelSpec, *, allow_standin: bool = False) -> LoadedModel:
        """The loaded model, loading it first if needed. A stand-in is used only when allowed and the real one fails."""
        entry = self._entry(spec)
        with entry.load_lock:
            if entry.model is not None:
                return entry.model
            entry.state, entry.error = ModelState.LOADING, None
            try:
                entry.model = self._load_real_or_standin(spec, allow_standin or self.settings.standin_fallback)
            except DashboardError as exc:
                entry.state, entry.error = ModelState.FAILED, exc
                raise
            except BaseException:
                entry.state = ModelState.NOT_LOADED
                raise
            entry.state = ModelState.READY
            return entry.model

    def _load_real_or_standin(self, spec: ModelSpec, allow_standin: bool) -> LoadedModel:
        try:
            return self._load_from(spec, loading.resolve_source(spec, self.settings))
        except ModelUnavailableError:
            if not allow_standin:
                raise
        folder = standins.ensure_built(spec, self.settings.standin_dir)
        return self._load_from(spec, loading.ModelSource(str(folder), is_local=True, is_standin=True))

    def _load_from(self, spec: ModelSpec, source: loading.ModelSource) -> LoadedModel:
        started = time.perf_counter()
        obj = self._loader(spec, source, self.device, self.dtype, self.settings)
        load_s = time.perf_counter() - started
        return LoadedModel(spec, obj, self.device, self.dtype, source, module_bytes(obj), load_s)

    @contextmanager
    def use(self, spec: ModelSpec, *, allow_standin: bool = False) -> Iterator[LoadedModel]:
        """The model for one inference: counted as busy (never evicted) and stamped as used."""
        model = self.get(spec, allow_standin=allow_standin)
        entry = self._entry(spec)
        with self._lock:
            entry.busy += 1
            entry.last_used = time.time()
        try:
            yield model
        finally:
            with self._lock:
                entry.busy -= 1

    def unload(self, key: str) -> int:
        """Drop a model and give its memory back. Returns the bytes its tensors held (0 if it was not loaded)."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return 0
        with entry.load_lock:
            freed = entry.model.memory_bytes if entry.model is not None else 0
            entry.model, entry.error, entry.state = None, None, ModelState.NOT_LOADED
        release_memory()
        return freed

    def unload_all(self) -> int:
        with self._lock:
            keys = list(self._entries)
        return sum(self.unload(key) for key in keys)

    def status(self, specs: list[ModelSpec] | None = None) -> list[ModelStatus]:
        """One row per registered model, plus any custom model that was asked for."""
        with self._lock:
            wanted = {spec.key: spec for spec in (specs or MODELS.values())}
            wanted.update({key: entry.spec for key, entry in self._entries.items()})
            entries = {key: self._entries.get(key) for key in wanted}
        dtype_bytes = torch.finfo(self.dtype).bits // 8
        return [self._status_row(spec, entries[key], dtype_bytes) for key, spec in wanted.items()]

    def _status_row(self, spec: ModelSpec, entry: _Entry | None, dtype_bytes: int) -> ModelStatus:
        model = entry.model if entry else None
        return ModelStatus(
            key=spec.key,
            title=spec.title,
            state=entry.state if entry else ModelState.NOT_LOADED,
            device=str(model.device) if model else None,
            dtype=str(model.dtype).removeprefix("torch.") if model else None,
            memory_bytes=model.memory_bytes if model else None,
            estimate_bytes=spec.estimate_bytes(dtype_bytes),
            load_s=model.load_s if model else None,
            is_standin=model.is_standin if model else False,
            source=model.source.label if model else None,
            error=str(entry.error) if entry and entry.error else None,
            busy=entry.busy if entry else 0,
            last_used=entry.last_used if entry else None,
        )


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
