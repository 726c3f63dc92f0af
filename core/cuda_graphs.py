"""CUDA-graph replay for small fixed-shape forwards, where eager PyTorch is bound by kernel launches.

A ResNet50 or ViT-base forward of one image launches a few hundred kernels; on a fast GPU the CPU cannot issue them
as quickly as the GPU runs them. A CUDA graph records the launches once and replays them in one call: the same
kernels on the same data, so results match eager exactly. Graphs have fixed input and output buffers, so each
replay holds a lock, and a shape that has no graph runs eagerly.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch

# Shapes worth a graph: single images (the interactive case). Larger batches keep the GPU busy on their own.
GRAPHED_BATCH_SIZES = (1,)
WARMUP_RUNS = 3  # cuDNN autotuning and lazy initialisation must happen before capture, not inside it


class _Graph:
    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> None:
        self.lock = threading.Lock()
        self.static_input = example.clone()
        stream = torch.cuda.Stream(example.device)
        stream.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(WARMUP_RUNS):
                forward(self.static_input)
        torch.cuda.current_stream(example.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other sessions may keep launching eager work on the GPU while this graph is recorded.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), torch.inference_mode():
            self.static_output = forward(self.static_input)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.static_input.copy_(inputs)
            self.graph.replay()
            return self.static_output.clone()


_graphs: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, _Graph | None]] = weakref.WeakKeyDictionary()
_graphs_lock = threading.Lock()


def graphed_forward(module: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """`forward(inputs)`, replayed from a CUDA graph when `inputs` is on CUDA and of a graphed batch size."""
    if inputs.device.type != "cuda" or inputs.shape[0] not in GRAPHED_BATCH_SIZES:
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
            graph = _Graph(forward, inputs)
        except RuntimeError:
            graph = None  # a model that cannot be captured stays eager for good
        with _graphs_lock:
            per_module[key] = graph
    if graph is None:
        with torch.inference_mode():
            return forward(inputs)
    return graph(inputs)
