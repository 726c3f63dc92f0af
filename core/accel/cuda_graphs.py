"""CUDA-graph replay for fixed-shape forwards, where eager PyTorch is bound by kernel launches.

A ResNet50 or ViT-base forward of one image launches a few hundred kernels, an SD UNet step over a thousand; on a
fast GPU the CPU cannot issue them as quickly as the GPU runs them. A CUDA graph records the launches once and
replays them in one call: the same kernels on the same data, so results match eager exactly. Graphs have fixed input
and output buffers, so each replay holds a lock, and a call that has no graph runs eagerly. Once core.accel.compiled has
compiled a shape in the background, its graph is captured again from the compiled function (fewer, fused kernels).

A graph records the addresses of the weights it reads, so a module's graphs (and compiles) are tied to where its
weights were when they were captured, and dropped when a cast, an offload or an eviction moved them.

Forward functions are "steps": module-level functions of (module, *tensors), see core.accel.compiled.
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

from core.accel import Acceleration, compiled

log = logging.getLogger(__name__)

# Shapes worth a graph for classifiers: single images (the interactive case). Larger batches keep the GPU busy alone.
GRAPHED_BATCH_SIZES = (1,)
# Batch sizes compiled (others padded up to the next); larger batches run eagerly: the GPU is busy with them anyway.
COMPILED_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# A module keeps the graphs of its last few call shapes (an SD size x images per run); each holds an activation pool.
GRAPHS_KEPT = 4
WARMUP_RUNS = 3  # cuDNN autotuning and lazy initialisation must happen before capture, not inside it

Step = Callable[..., torch.Tensor]


class _Graph:
    """One captured call of `forward(*inputs)`; the callable is not kept, so a graph never keeps its model alive."""

    def __init__(self, forward: Callable[..., torch.Tensor], examples: tuple[torch.Tensor, ...]) -> None:
        self.lock = threading.Lock()
        self.static_inputs = tuple(example.clone() for example in examples)
        device = examples[0].device
        stream = _warmup_stream(device)
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


_warmup_streams: dict[torch.device, torch.cuda.Stream] = {}


def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU for every capture's warm-up: cuBLAS keeps a workspace (32 MiB on an H100) for each
    stream it has seen, so a new stream per capture grew the GPU memory by that much at every capture."""
    with _graphs_lock:
        if device not in _warmup_streams:
            _warmup_streams[device] = torch.cuda.Stream(device)
        return _warmup_streams[device]


_CAPTURING = object()  # a graph being recorded: other callers of that shape run without it meanwhile


# Every 16th weight tensor stands for all: a cast, an offload or an eviction moves every one of them, and checking a
# sample costs microseconds on each call where checking all of ResNet50's 320 cost a fifth of a millisecond.
SENTINEL_EVERY = 16


@dataclass
class _ModuleGraphs:
    sentinels: tuple[torch.Tensor, ...]  # the same Parameter objects stay; `.to()` changes the storage they point at
    weights_at: tuple[int, ...]
    graphs: OrderedDict[tuple, _Graph | object | None]  # None: that call could not be captured, it stays ungraphed

    def weights_moved(self) -> bool:
        return tuple(tensor.data_ptr() for tensor in self.sentinels) != self.weights_at


_graphs: weakref.WeakKeyDictionary[torch.nn.Module, _ModuleGraphs] = weakref.WeakKeyDictionary()
_graphs_lock = threading.Lock()
def _graphs_for(module: torch.nn.Module) -> _ModuleGraphs:
    """The module's graphs, emptied (with its compiles) when its weights are no longer where they were captured."""
    with _graphs_lock:
        entry = _graphs.get(module)
        if entry is None or entry.weights_moved():
            tensors = list(itertools.chain(module.parameters(), module.buffers()))
            sentinels = tuple(tensors[::SENTINEL_EVERY]) + tuple(tensors[-1:])
            entry = _graphs[module] = _ModuleGraphs(sentinels, tuple(t.data_ptr() for t in sentinels), OrderedDict())
            compiled.forget(module)
    return entry


def _served(module: torch.nn.Module, entry: _ModuleGraphs, step: Step, inputs: tuple[torch.Tensor, ...], accel: Acceleration) -> tuple[torch.Tensor, str]:
    """`step(module, *inputs)` from a graph where one can serve it, and the path that served it."""
    fast = compiled.ready(module, step, inputs, accel.compile)
    forward = fast or step
    key = (compiled.shape_key(inputs), fast is not None)
    with _graphs_lock:
        graph = entry.graphs.get(key)
        if key not in entry.graphs:
            graph = entry.graphs[key] = _CAPTURING
            if fast is not None:
                entry.graphs.pop((key[0], False), None)  # the compiled graph replaces the eager one of that shape
            while len(entry.graphs) > GRAPHS_KEPT:
                entry.graphs.popitem(last=False)
            capture = True
        else:
            entry.graphs.move_to_end(key)
            capture = False
    if capture:
        graph = _capture(lambda *tensors: forward(module, *tensors), inputs)
        with _graphs_lock:
            entry.graphs[key] = graph
    if isinstance(graph, _Graph):
        return graph(*inputs), "compiled + CUDA graph" if fast is not None else "CUDA graph"
    with torch.inference_mode():
        return forward(module, *inputs), "compiled" if fast is not None else "eager"


def _capture(forward: Callable[..., torch.Tensor], examples: tuple[torch.Tensor, ...]) -> _Graph | None:
    try:
        return _Graph(forward, examples)
    except torch.OutOfMemoryError:
        raise  # the caller's own failure, reported as such
    except RuntimeError:
        log.warning("A call could not be captured as a CUDA graph; that shape runs without one.", exc_info=True)
        return None


def graphed_forward(module: torch.nn.Module, step: Step, inputs: torch.Tensor, accel: Acceleration) -> torch.Tensor:
    """`step(module, inputs)` for a classifier: a single image from a graph, a batch compiled once that is ready.

    Batches are compiled at COMPILED_BATCH_SIZES only, a batch of another size padded up to the next one (rows are
    independent in inference): Serve's dynamic batching, or uploads of any count, then ask for a handful of compiles
    rather than one per size, each of which would hold the GIL for a quarter of a minute.
    """
    count = inputs.shape[0]
    if accel.cuda_graphs and inputs.is_cuda and count in GRAPHED_BATCH_SIZES:
        return _served(module, _graphs_for(module), step, (inputs,), accel)[0]
    with torch.inference_mode():
        bucket = next((size for size in COMPILED_BATCH_SIZES if size >= count), None)
        if bucket is None or not compiled.applies_to(inputs, accel.compile):
            return step(module, inputs)
        padded = inputs if bucket == count else _padded(inputs, bucket)
        fast = compiled.ready(module, step, (padded,), accel.compile)
        return step(module, inputs) if fast is None else fast(module, padded)[:count]


def _padded(inputs: torch.Tensor, rows: int) -> torch.Tensor:
    """`inputs` with copies of its first row up to `rows`, in its memory format (a compile is made for one layout)."""
    channels_last = inputs.dim() == 4 and inputs.is_contiguous(memory_format=torch.channels_last)
    padded = torch.empty((rows, *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device,
                         memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    padded[: len(inputs)] = inputs
    padded[len(inputs):] = inputs[:1]
    return padded


@dataclass
class UNetCalls:
    """How a run's UNet calls were served: what the page tells the user."""

    paths: dict[str, int]

    @property
    def path(self) -> str:
        if len(self.paths) <= 1:
            return next(iter(self.paths), "eager")
        return ", ".join(f"{path} ({count} of {sum(self.paths.values())} UNet calls)" for path, count in self.paths.items())


_UNET_EXTRAS = {"timestep_cond", "attention_mask", "cross_attention_kwargs", "added_cond_kwargs", "down_block_additional_residuals",
                "mid_block_additional_residual", "down_intrablock_additional_residuals", "encoder_attention_mask"}


def unet_step(unet: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """One plain diffusers UNet call, through the class's own forward (graphed_unet swaps the instance's)."""
    return type(unet).forward(unet, sample, timestep, encoder_hidden_states, return_dict=False)[0]


def timestep_on(device: torch.device, timestep: torch.Tensor | float, rows: int) -> torch.Tensor:
    """The timestep as one float32 value per row on `device`, the form the UNet computes its embedding from (diffusers'
    `get_timestep_embedding` expands a scalar to the batch and takes `.float()`): a solo run's call then has the same
    shapes as a shared batch's of its row count (core.tasks.shared_batch), and both replay one graph.

    One from the CPU is filled in on the device, not copied: a copy from pageable host memory makes the CPU wait for the
    GPU to finish its queue (sd_pipeline.keep_timesteps_on_the_cpu)."""
    if isinstance(timestep, torch.Tensor) and timestep.device == device:
        return timestep.float().expand(rows).contiguous() if timestep.shape != (rows,) or timestep.dtype != torch.float32 else timestep
    value = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
    return torch.full((rows,), float(value), dtype=torch.float32, device=device)


@contextmanager
def graphed_unet(unet: torch.nn.Module, accel: Acceleration, allowed: bool = True) -> Iterator[UNetCalls]:
    """Within: the diffusers UNet's plain calls (`return_dict=False`, no extra conditioning) replay CUDA graphs.

    For one run holding the device's slot: the UNet's `forward` is swapped for the run and put back after, and nothing
    else may move its weights meanwhile. The first call of a shape captures its graph (a few warm-up calls first);
    a call a graph cannot serve runs eagerly, and each call is counted under the path that served it.
    """
    calls = UNetCalls({})
    device = next(unet.parameters()).device
    if not (allowed and device.type == "cuda" and (accel.cuda_graphs or accel.compile)):
        yield calls  # every call eager, uncounted
        return
    entry = _graphs_for(unet)

    def forward(sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        extras = set(kwargs) - {"return_dict"}
        plain = not args and kwargs.get("return_dict") is False and extras <= _UNET_EXTRAS and all(kwargs[k] is None for k in extras)
        if not plain:
            path, output = "eager", type(unet).forward(unet, sample, timestep, encoder_hidden_states, *args, **kwargs)
        else:
            inputs = (sample, timestep_on(sample.device, timestep, len(sample)), encoder_hidden_states)
            if accel.cuda_graphs:
                result, path = _served(unet, entry, unet_step, inputs, accel)
            elif (fast := compiled.ready(unet, unet_step, inputs, accel.compile)) is not None:
                with torch.inference_mode():  # as it was compiled: another grad mode would recompile here
                    result = fast(unet, *inputs)
                result, path = result.clone(), "compiled"  # a normal tensor again, for the scheduler's in-place steps
            else:
                result, path = unet_step(unet, *inputs), "eager"
            output = (result,)
        calls.paths[path] = calls.paths.get(path, 0) + 1
        return output

    unet.forward = forward
    try:
        yield calls
    finally:
        del unet.forward  # the class's own forward again


def text_encoder_step(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """One plain CLIP text-encoder call, its last hidden state (graphed_text_encoder swaps the instance's forward)."""
    return type(text_encoder).forward(text_encoder, input_ids)[0]


@contextmanager
def graphed_text_encoder(text_encoder: torch.nn.Module, accel: Acceleration, allowed: bool = True) -> Iterator[None]:
    """Within: the pipeline's plain prompt encodings (no attention mask, no hidden states asked for) replay graphs.

    A run encodes its prompt and its negative prompt: some two hundred small kernels each, 4.7 ms of launches for
    0.6 ms of GPU work on an H100 (docs/PERFORMANCE.md). As graphed_unet: one run holding the device's slot.
    """
    if not (allowed and accel.cuda_graphs and next(text_encoder.parameters()).is_cuda):
        yield
        return
    entry = _graphs_for(text_encoder)

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if attention_mask is not None or any(kwargs.values()) or not input_ids.is_cuda:
            return type(text_encoder).forward(text_encoder, input_ids, attention_mask=attention_mask, **kwargs)
        return (_served(text_encoder, entry, text_encoder_step, (input_ids,), accel)[0],)

    text_encoder.forward = forward
    try:
        yield
    finally:
        del text_encoder.forward


def vae_decode_step(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The diffusers VAE's plain decode, through the class's own method (compiled_vae_decode swaps the instance's)."""
    return type(vae).decode(vae, latents, return_dict=False)[0]


@contextmanager
def compiled_vae_decode(vae: torch.nn.Module, accel: Acceleration, allowed: bool = True) -> Iterator[None]:
    """Within: the VAE's plain decodes use its compiled decoder once core.accel.compiled has it (queued at the first one).

    Not graphed: the decoder is GPU-bound (21.6 of 22.7 ms at 512x512 on an H100) and a graph would keep its largest
    activations, over a GiB, reserved for good. Sliced and tiled decodes keep diffusers' own path.
    """
    if not (allowed and accel.compile and next(vae.parameters()).is_cuda):
        yield
        return

    def decode(latents: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None):
        fast = None if return_dict or vae.use_slicing or vae.use_tiling else compiled.ready(vae, vae_decode_step, (latents,), accel.compile)
        if fast is None:
            return type(vae).decode(vae, latents, return_dict=return_dict, generator=generator)
        with torch.inference_mode():  # as it was compiled: another grad mode would recompile here
            decoded = fast(vae, latents)
        return (decoded.clone(),)  # a normal tensor again, for the pipeline's post-processing

    vae.decode = decode
    try:
        yield
    finally:
        del vae.decode
