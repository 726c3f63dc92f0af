"""The GPU memory policy: a budget per card, and which idle models make room for a new one.

Plain arithmetic over what the manager reports (no torch calls), so every rule is tested without a GPU:
- each GPU has a budget: `DASH_VRAM_BUDGET` (a size or a share of the card), else the card less a margin;
- a model counts at its measured footprint once it has loaded, at its estimate before that;
- when a model does not fit, idle models on that GPU leave, least recently used first; a busy one never does;
- with several GPUs the model goes where it fits with the least eviction (then the most headroom);
- evicted models are unloaded, or moved to CPU RAM with `DASH_EVICT_TO=cpu` (faster to bring back, costs RAM).
"""
from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from core.config import EvictTo, Settings, VramBudget
from core.errors import GpuOutOfMemoryError
from core.formatting import human_bytes
from core.gpu.nvml import allocator_stats, host_memory

# Room left outside the budget for the CUDA context (300-500 MiB) and each run's activations (SD 1.5 at 512²
# in fp16 peaks about 1.2 GiB above its weights): 10 % of the card, at least 2 GiB.
MARGIN_FRACTION = 0.10
MIN_MARGIN_BYTES = 2 * 2**30


@dataclass(frozen=True)
class MemoryPolicy:
    budget: VramBudget | None = None  # None: the card less the margin
    evict_to: EvictTo = EvictTo.UNLOAD

    @classmethod
    def from_settings(cls, settings: Settings) -> MemoryPolicy:
        return cls(budget=settings.vram_budget, evict_to=settings.evict_to)

    def budget_bytes(self, card_total_bytes: int) -> int:
        """What the models may hold on a card of `card_total_bytes`."""
        if self.budget is not None:
            return self.budget.limit_bytes(card_total_bytes)
        margin_bytes = max(int(card_total_bytes * MARGIN_FRACTION), MIN_MARGIN_BYTES)
        return max(card_total_bytes - margin_bytes, 0)


@dataclass(frozen=True)
class Resident:
    """A model holding (or about to hold) memory on a GPU, as the planner sees it."""

    key: str
    title: str
    gpu_index: int
    size_bytes: int
    last_used_seq: int  # larger is more recent; ordering only
    busy: bool  # running, or still loading: never evicted


@dataclass(frozen=True)
class Placement:
    gpu_index: int
    evict: tuple[Resident, ...]  # in the order they should leave

    @property
    def evicted_bytes(self) -> int:
        return sum(r.size_bytes for r in self.evict)


class DoesNotFitError(GpuOutOfMemoryError):
    """A model does not fit in the VRAM budget, even after every idle model has left."""

    remedy = "Try again when the running models finish, unload models on the VRAM monitor page, or raise DASH_VRAM_BUDGET."


def plan_placement(
    title: str, need_bytes: int, budgets_bytes: Mapping[int, int], residents: Sequence[Resident], gpu_index: int | None = None
) -> Placement:
    """Where a model of `need_bytes` goes and who leaves for it; raises DoesNotFitError when no GPU can take it.

    `budgets_bytes` maps each GPU index to its budget; `gpu_index` pins the choice to one GPU.
    """
    if gpu_index is not None and gpu_index not in budgets_bytes:
        raise DoesNotFitError(f"{title}: there is no GPU {gpu_index} (GPUs: {', '.join(map(str, budgets_bytes)) or 'none'}).")
    candidates = [gpu_index] if gpu_index is not None else sorted(budgets_bytes)
    plans: list[tuple[tuple[int, int, int], Placement]] = []
    for index in candidates:
        on_gpu = [r for r in residents if r.gpu_index == index]
        free_bytes = budgets_bytes[index] - sum(r.size_bytes for r in on_gpu)
        victims: list[Resident] = []
        for resident in sorted((r for r in on_gpu if not r.busy), key=lambda r: r.last_used_seq):
            if free_bytes >= need_bytes:
                break
            victims.append(resident)
            free_bytes += resident.size_bytes
        if free_bytes >= need_bytes:
            placement = Placement(index, tuple(victims))
            # Least evicted first; then the most room left after the load, so models spread over the cards.
            plans.append(((placement.evicted_bytes, -(free_bytes - need_bytes), index), placement))
    if plans:
        return min(plans, key=lambda plan: plan[0])[1]
    raise DoesNotFitError(_why_not(title, need_bytes, budgets_bytes, residents, candidates))


def _why_not(title: str, need_bytes: int, budgets_bytes: Mapping[int, int], residents: Sequence[Resident], candidates: list[int]) -> str:
    largest_bytes = max((budgets_bytes[i] for i in candidates), default=0)
    if need_bytes > largest_bytes:
        return (
            f"{title} needs about {human_bytes(need_bytes)} of GPU memory, more than the VRAM budget of "
            f"{human_bytes(largest_bytes)} per GPU (DASH_VRAM_BUDGET, default: the card less a margin)."
        )
    busy = [r for r in residents if r.busy and r.gpu_index in candidates]
    held = ", ".join(f"{r.title} ({human_bytes(r.size_bytes)} on GPU {r.gpu_index})" for r in busy) or "nothing"
    return f"{title} needs about {human_bytes(need_bytes)} of GPU memory; the models in use or loading hold the rest: {held}."


def move_model(obj: Any, device: torch.device) -> None:
    """Move a loaded model object to `device` in place: a diffusers or transformers pipeline, or a torch module."""
    if hasattr(obj, "components"):  # diffusers pipeline: moves every component
        obj.to(device)
    elif isinstance(getattr(obj, "model", None), torch.nn.Module):  # transformers pipeline: inputs follow pipe.device
        obj.model.to(device)
        obj.device = device
    elif isinstance(obj, torch.nn.Module):
        obj.to(device)
    else:
        raise TypeError(f"cannot move a {type(obj).__name__} between devices")


@dataclass(frozen=True)
class Freed:
    """What an action gave back: the models' own bytes, and what torch and the process report before minus after."""

    model_bytes: int
    allocated_bytes: int  # torch: live tensors, all GPUs
    reserved_bytes: int  # torch: the caching allocator's pool, all GPUs (this is what NVML sees go)
    process_rss_bytes: int  # host RAM of this process (the C allocator may keep freed pages, so often less)


def measure_freed(action: Callable[[], int]) -> Freed:
    """Run `action` (which returns the model bytes it released) and measure what left."""
    before_stats, before_host = allocator_stats(), host_memory()
    model_bytes = action()
    after_stats, after_host = allocator_stats(), host_memory()
    return Freed(
        model_bytes=model_bytes,
        allocated_bytes=sum(s.allocated_bytes for s in before_stats) - sum(s.allocated_bytes for s in after_stats),
        reserved_bytes=sum(s.reserved_bytes for s in before_stats) - sum(s.reserved_bytes for s in after_stats),
        process_rss_bytes=before_host.process_rss_bytes - after_host.process_rss_bytes,
    )


def release_memory() -> None:
    """What unloaded models and failed runs held, back to the driver. cuBLAS's workspaces stay: every CUDA graph that
    made a matrix product recorded its stream's workspace address, and a replay after they were cleared read freed
    memory (an illegal memory access on the H100 that ended the process's CUDA context: one unload broke every other
    loaded model's graphs). They are one per stream, 32 MiB each on an H100, and graph warm-ups share one stream."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def out_of_memory_guard(doing: str, remedy: str | None = None) -> Iterator[None]:
    """Within: torch's out-of-memory error becomes GpuOutOfMemoryError ("The GPU ran out of memory <doing>"), after
    what the failed work held is given back. Released after the except block, whose traceback would pin the tensors."""
    failed = False
    try:
        yield
    except torch.OutOfMemoryError:
        failed = True
    if failed:
        release_memory()
        raise GpuOutOfMemoryError(f"The GPU ran out of memory {doing}; what it held is released.", remedy=remedy)
