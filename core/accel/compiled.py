"""torch.compile in the background: a request never waits on a compile.

Compiling the SD UNet takes over a minute, ResNet50 about 20 s (H100, cold cache; docs/PERFORMANCE.md). So the first
call of a step function at a new input shape queues a compile of that shape on one worker thread and is served
eagerly; once the compile is done, calls of that shape get the compiled function (which core.accel.cuda_graphs then
captures in a graph). Inductor's on-disk caches (DASH_COMPILE_CACHE) make the next start's compiles much shorter.

Step functions take the module as their first argument and are module-level functions: a compiled function then
holds no model, so an unloaded model is freed as before.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# "default" fuses the pointwise work between cuDNN/cuBLAS calls; "max-autotune-no-cudagraphs" measured no faster on
# ResNet50 and the SD UNet (H100) and took 14 times as long to compile.
COMPILE_MODE = "default"

Step = Callable[..., torch.Tensor]


class CompileState(StrEnum):
    COMPILING = "compiling"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class CompileRecord:
    """One compiled shape, as the VRAM page lists it."""

    model: str
    shape: str
    state: CompileState
    seconds: float | None


@dataclass
class _Compile:
    state: CompileState
    shape: str
    seconds: float | None = None


def _on_gpu(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda  # inductor's CPU code needs a C++ toolchain and gains little here: CUDA only


def shape_key(inputs: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.stride(), t.device) for t in inputs)


# Inductor draws random numbers on the GPU while it compiles; if another thread is capturing a CUDA graph at that
# moment, the generator refuses and the compile fails with this (the text encoder's, in a Serve replica on the H100).
# Captures are short and compiles long, so the compile is simply run again; making captures wait for compiles instead
# left the first image after a start on the eager path, 86 s instead of 12 s (H100).
CAPTURE_CLASH = "Offset increment outside graph capture"
COMPILE_ATTEMPTS = 3

_compiler: Callable[[Step], Step] = lambda step: torch.compile(step, mode=COMPILE_MODE, dynamic=False)  # noqa: E731
_compiled_steps: dict[Step, Step] = {}
_compiles: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, _Compile]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_queue: queue.Queue[tuple[weakref.ref, Step, tuple[torch.Tensor, ...], tuple]] = queue.Queue()
_worker: threading.Thread | None = None


def use_cache_dir(cache_dir: Path) -> None:
    """Where inductor keeps its caches between starts (DASH_COMPILE_CACHE; an operator's own TORCHINDUCTOR_CACHE_DIR
    wins). A process-wide variable by nature: inductor reads it at each compile."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Importing diffusers or transformers already sets the variable to inductor's default (/tmp/torchinductor_<user>,
    # gone at a reboot): only a value an operator chose is kept. Inductor reads the variable at each compile.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)


def applies_to(inputs: torch.Tensor, enabled: bool) -> bool:
    """Whether calls on `inputs` are compiled at all: on for the caller (its model's Acceleration), and on the GPU."""
    return enabled and _on_gpu(inputs)


def ready(module: torch.nn.Module, step: Step, inputs: tuple[torch.Tensor, ...], enabled: bool) -> Step | None:
    """`step` compiled for `inputs`' shapes, or None while it is not (the first call of a shape queues its compile)."""
    if not applies_to(inputs[0], enabled):
        return None
    key = shape_key(inputs)
    with _lock:
        compiles = _compiles.setdefault(module, {})
        entry = compiles.get(key)
        if entry is None:
            compiles[key] = _Compile(CompileState.COMPILING, " + ".join("×".join(map(str, t.shape)) or "scalar" for t in inputs))
            _queue.put((weakref.ref(module), step, tuple(t.clone() for t in inputs), key))
            _start_worker()
            return None
        return _compiled_steps[step] if entry.state is CompileState.READY else None


def forget(module: torch.nn.Module) -> None:
    """The module's weights moved (a cast, an offload): its compiles are redone for the new weights when next asked."""
    with _lock:
        _compiles.pop(module, None)


def records() -> list[CompileRecord]:
    with _lock:
        return [
            CompileRecord(type(module).__name__, entry.shape, entry.state, entry.seconds)
            for module, compiles in _compiles.items() for entry in compiles.values()
        ]


def wait_until_settled(timeout_s: float) -> bool:
    """Block until no compile is queued or running (benchmarks and tests); False on time-out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with _lock:
            if all(entry.state is not CompileState.COMPILING for compiles in _compiles.values() for entry in compiles.values()):
                return True
        time.sleep(0.05)  # polling a condition with a deadline, not sleeping in place of it
    return False


def _start_worker() -> None:
    global _worker
    if _worker is None or not _worker.is_alive():
        _worker = threading.Thread(target=_work, name="torch-compile", daemon=True)
        _worker.start()


def _work() -> None:
    while True:
        module_ref, step, examples, key = _queue.get()
        module = module_ref()
        if module is None:  # unloaded while it waited
            continue
        started = time.perf_counter()
        state = CompileState.FAILED
        for attempt in range(1, COMPILE_ATTEMPTS + 1):
            try:
                with _lock:
                    compiled = _compiled_steps.get(step) or _compiled_steps.setdefault(step, _compiler(step))
                with torch.inference_mode():
                    compiled(module, *examples)  # compiles this shape, then runs it once
                state = CompileState.READY
                break
            except Exception as error:  # noqa: BLE001 - a compile can fail in many ways; the eager path keeps serving
                if attempt < COMPILE_ATTEMPTS and CAPTURE_CLASH in str(error):
                    log.info("torch.compile of %s met a CUDA-graph capture; compiling again.", type(module).__name__)
                    continue
                log.warning("torch.compile of %s failed; that shape stays on the eager path.", type(module).__name__, exc_info=True)
                break
        with _lock:
            entry = _compiles.get(module, {}).get(key)
            if entry is not None:  # not forgotten meanwhile
                entry.state, entry.seconds = state, time.perf_counter() - started
        del module, examples
