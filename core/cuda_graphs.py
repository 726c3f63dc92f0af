"""CUDA-graph replay for fixed-shape forwards, where eager PyTorch is bound by kernel launches.

A ResNet50 or ViT-base forward of one image launches a few hundred kernels, an SD UNet step over a thousand; on a
fast GPU the CPU cannot issue them as quickly as the GPU runs them. A CUDA graph records the launches once and
replays them in one call: the same kernels on the same data, so results match eager exactly. Graphs have fixed input
and output buffers, so each replay holds a lock, and a call that has no graph runs eagerly.

A graph also records the addresses of the weights it reads. The UNet's graphs are therefore tied to where its weights
were when they were captured, and dropped when a cast or an offload moved them.
"""
from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Shapes worth a graph: single images (the interactive case). Larger batches keep the GPU busy on their own.
GRAPHED_BATCH_SIZES = (1,)
WARMUP_RUNS = 3  # cuDNN autotuning and lazy initialisation must happen before capture, not inside it


class _Graph:
    """One captured call of `forward(*inputs)`; the callable is not kept, so a graph never keeps its model alive."""

    def __init__(self, forward: Callable[..., torch.Tensor], examples: tuple[torch.Tensor, ...]) -> None:
        self.lock = threading.Lock()
        self.static_inputs = tuple(example.clone() for example in examples)
        device = examples[0].device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(WARMUP_RUNS):
                forward(*self.static_inputs)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other sessions may keep launching eager work on the GPU while this graph is recorded.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), torch.inference_mode():
            self.static_output = forward(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        with self.lock:
            for static, given in zip(self.static_inputs, inputs, strict=True):
                static.copy_(given)
            self.graph.replay()
            return self.static_output.clone()


_graphs: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, _Graph | None]] = weakref.WeakKeyDictionary()
_graphs_lock = threading.Lock()


_enabled = True


def set_enabled(enabled: bool) -> None:
    """Switch graph replay on or off for the process (DASH_CUDA_GRAPHS); off, every call runs eagerly."""
    global _enabled
    _enabled = enabled


def graphed_forward(module: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """`forward(inputs)`, replayed from a CUDA graph when `inputs` is on CUDA and of a graphed batch size."""
    if not _enabled or inputs.device.type != "cuda" or inputs.shape[0] not in GRAPHED_BATCH_SIZES:
        with torch.inference_mode():
            return forward(inputs)
    key = (tuple(inputs.shape), inputs.dtype, inputs.device, inputs.is_contiguous(memory_format=torch.channels_last))
    with _graphs_lock:
        per_module = _graphs.setdefault(module, {})
        capture = key not in per_module
        if capture:
            per_module[key] = None  # being captured; concurrent calls run eagerly meanwhile
        graph = per_module[key]
    if capture:
        try:
            graph = _Graph(forward, (inputs,))
        except RuntimeError:
            graph = None  # a model that cannot be captured stays eager for good
        with _graphs_lock:
            per_module[key] = graph
    if graph is None:
        with torch.inference_mode():
            return forward(inputs)
    return graph(inputs)


# A UNet keeps the graphs of its last few call shapes (size x images per run); each holds a pool of activation memory.
UNET_GRAPHS_KEPT = 4
_UNET_EXTRAS_ALLOWED = {"timestep_cond", "attention_mask", "cross_attention_kwargs", "added_cond_kwargs", "down_block_additional_residuals",
                        "mid_block_additional_residual", "down_intrablock_additional_residuals", "encoder_attention_mask"}


@dataclass
class UNetCalls:
    """How a run's UNet calls were served: what the page tells the user."""

    graphed: int = 0
    eager: int = 0

    @property
    def path(self) -> str:
        if not self.graphed:
            return "eager"
        return "CUDA graph" if not self.eager else f"CUDA graph ({self.graphed} of {self.graphed + self.eager} UNet calls)"


@dataclass
class _UNetGraphs:
    weights_at: tuple[int, ...]
    graphs: OrderedDict[tuple, _Graph | None]


_unet_graphs: weakref.WeakKeyDictionary[torch.nn.Module, _UNetGraphs] = weakref.WeakKeyDictionary()


def _weight_addresses(module: torch.nn.Module) -> tuple[int, ...]:
    return tuple(tensor.data_ptr() for tensor in itertools.chain(module.parameters(), module.buffers()))


def _graphs_for(unet: torch.nn.Module) -> _UNetGraphs:
    addresses = _weight_addresses(unet)
    cache = _unet_graphs.get(unet)
    if cache is None or cache.weights_at != addresses:
        cache = _unet_graphs[unet] = _UNetGraphs(addresses, OrderedDict())
    return cache


@contextmanager
def graphed_unet(unet: torch.nn.Module, allowed: bool = True) -> Iterator[UNetCalls]:
    """Within: the diffusers UNet's plain calls (`return_dict=False`, no extra conditioning) replay CUDA graphs.

    For one run holding the device's slot: the UNet's `forward` is swapped for the run and put back after, and nothing
    else may move its weights meanwhile. The first call of a shape captures its graph (a few eager warm-up calls
    first); a call the graph cannot serve runs eagerly and is counted as such.
    """
    calls = UNetCalls()
    device = next(unet.parameters()).device
    if not (_enabled and allowed and device.type == "cuda"):
        yield calls  # every call eager, uncounted
        return
    cache = _graphs_for(unet)
    eager_forward = unet.forward

    def forward(sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        extras = set(kwargs) - {"return_dict"}
        plain = not args and kwargs.get("return_dict") is False and extras <= _UNET_EXTRAS_ALLOWED and all(kwargs[k] is None for k in extras)
        if not plain:
            calls.eager += 1
            return eager_forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        timestep = torch.as_tensor(timestep, device=sample.device)
        key = tuple((tuple(t.shape), t.dtype, t.stride()) for t in (sample, timestep, encoder_hidden_states))
        if key not in cache.graphs:
            cache.graphs[key] = _capture(lambda s, t, e: eager_forward(s, t, e, return_dict=False)[0], (sample, timestep, encoder_hidden_states))
            while len(cache.graphs) > UNET_GRAPHS_KEPT:
                cache.graphs.popitem(last=False)
        cache.graphs.move_to_end(key)
        graph = cache.graphs[key]
        if graph is None:
            calls.eager += 1
            return eager_forward(sample, timestep, encoder_hidden_states, return_dict=False)
        calls.graphed += 1
        return (graph(sample, timestep, encoder_hidden_states),)

    unet.forward = forward
    try:
        yield calls
    finally:
        del unet.forward  # the class's own forward again


def _capture(forward: Callable[..., torch.Tensor], examples: tuple[torch.Tensor, ...]) -> _Graph | None:
    try:
        return _Graph(forward, examples)
    except torch.OutOfMemoryError:
        raise  # the run's own failure, reported as such
    except RuntimeError:
        log.warning("A UNet call could not be captured as a CUDA graph; that shape runs eagerly.", exc_info=True)
        return None
