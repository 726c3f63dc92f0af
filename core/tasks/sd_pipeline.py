"""The shared SD pipeline's device-side state for one run: its precision, memory mode and scheduler, set while the run
holds the device's slot and undone after it; and the mode's throw-away diffusers pipeline over the shared modules.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from core.tasks.sd_settings import PRECISION_DTYPES, SCHEDULERS, MemoryMode, Mode, Precision

_DTYPES = {precision: getattr(torch, name) for precision, name in PRECISION_DTYPES.items()}


# Each mode's diffusers pipeline, built over the loaded model's components (see run_pipeline): nothing loads twice.
PIPELINE_CLASSES = {
    Mode.TEXT_TO_IMAGE: "StableDiffusionPipeline",
    Mode.IMAGE_TO_IMAGE: "StableDiffusionImg2ImgPipeline",
    Mode.INPAINT: "StableDiffusionInpaintPipeline",
}


def build_scheduler(pipe: Any, name: str) -> Any:
    """A fresh scheduler for one run, from the model's own scheduler config: switching costs no reload."""
    import diffusers

    choice = SCHEDULERS[name]
    return getattr(diffusers, choice.class_name).from_config(pipe.scheduler.config, **dict(choice.overrides))


# Device-side state of each shared pipeline that runs change: which memory mode and dtype it is in, and what to
# restore. Only touched while holding the device's queue slot.
@dataclass
class _PipelineState:
    loaded_dtype: torch.dtype
    memory_mode: MemoryMode = MemoryMode.NONE
    attn_processors: dict[str, Any] | None = None  # the UNet's processors before attention slicing replaced them
    weights_backup: dict[str, dict[str, torch.Tensor]] | None = None  # CPU copy of the loaded weights, for lossy casts
    run_tokenizer: Any = None  # the runs' own copy of the tokenizer (see prompt_length)


_states: weakref.WeakKeyDictionary[Any, _PipelineState] = weakref.WeakKeyDictionary()


def pipeline_state(pipe: Any) -> _PipelineState:
    state = _states.get(pipe)
    if state is None:
        state = _states[pipe] = _PipelineState(loaded_dtype=pipe.unet.dtype)
    return state


def run_dtype(pipe: Any, precision: Precision) -> torch.dtype:
    return pipeline_state(pipe).loaded_dtype if precision is Precision.AUTO else _DTYPES[precision]


def torch_modules(pipe: Any) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def restore_plain(pipe: Any, device: torch.device) -> None:
    """Undo any memory mode: no offload hooks, default VAE decoding, the UNet's own attention, every weight on `device`."""
    state = pipeline_state(pipe)
    pipe.remove_all_hooks()
    if state.attn_processors is not None:
        pipe.unet.set_attn_processor(state.attn_processors)
        state.attn_processors = None
    pipe.vae.disable_slicing()
    pipe.vae.disable_tiling()
    pipe.to(device)
    state.memory_mode = MemoryMode.NONE


def set_memory_mode(pipe: Any, mode: MemoryMode, device: torch.device) -> None:
    """Put the shared pipeline in `mode`, from whatever mode it was in. Hold the device's queue slot."""
    state = pipeline_state(pipe)
    if mode is state.memory_mode:
        return
    restore_plain(pipe, device)
    if mode is MemoryMode.ATTENTION_SLICING:
        state.attn_processors = dict(pipe.unet.attn_processors)
        pipe.enable_attention_slicing()
    elif mode is MemoryMode.VAE_SLICING:
        pipe.vae.enable_slicing()
    elif mode is MemoryMode.VAE_TILING:
        pipe.vae.enable_tiling()
    elif mode is MemoryMode.MODEL_OFFLOAD:
        pipe.enable_model_cpu_offload(device=device)
    elif mode is MemoryMode.SEQUENTIAL_OFFLOAD:
        pipe.enable_sequential_cpu_offload(device=device)
    state.memory_mode = mode


def set_precision(pipe: Any, precision: Precision, device: torch.device) -> None:
    """Cast the shared pipeline's weights to the run's dtype. Hold the slot, with no memory mode on.

    Widening the loaded dtype (fp16 -> fp32) and back is exact. A lossy cast (fp16 -> bf16) first keeps a CPU copy
    of the loaded weights, and going back restores them from it, so one user's bf16 run never degrades the next one's.
    """
    state = pipeline_state(pipe)
    target = run_dtype(pipe, precision)
    if pipe.unet.dtype == target:
        return
    modules = torch_modules(pipe)
    lossy = torch.finfo(target).bits < torch.finfo(state.loaded_dtype).bits or {target, state.loaded_dtype} == {torch.float16, torch.bfloat16}
    if lossy and state.weights_backup is None:
        state.weights_backup = {name: {k: v.to("cpu", copy=True) for k, v in m.state_dict().items()} for name, m in modules.items()}
    for module in modules.values():
        module.to(dtype=target)
    if target == state.loaded_dtype and state.weights_backup is not None:
        for name, module in modules.items():
            module.load_state_dict(state.weights_backup[name])
        state.weights_backup = None


def run_pipeline(pipe: Any, mode: Mode, scheduler: str) -> Any:
    """A pipeline for one run of `mode` over the loaded model's own modules (nothing copied, cast or loaded twice),
    with the run's own scheduler and the runs' own tokenizer.

    Built as `from_pipe` builds it, but not with `from_pipe`: that casts the shared modules to float32 unless it is
    given a dtype, which would silently double every later run's memory. The scheduler is set after construction,
    so the constructor's legacy-config checks never rewrite it.
    """
    import diffusers

    state = pipeline_state(pipe)
    if state.run_tokenizer is None:
        state.run_tokenizer = copy.deepcopy(pipe.tokenizer)
    components = {**pipe.components, "tokenizer": state.run_tokenizer}
    run_pipe = getattr(diffusers, PIPELINE_CLASSES[mode])(**components, requires_safety_checker=False)
    run_pipe.scheduler = keep_timesteps_on_the_cpu(build_scheduler(pipe, scheduler))
    run_pipe.set_progress_bar_config(disable=True)
    return run_pipe


def keep_timesteps_on_the_cpu(scheduler: Any) -> Any:
    """The scheduler keeps its timesteps on the CPU whatever device the pipeline asks for.

    With GPU timesteps, each PNDM or DDIM step reads a CPU table at a GPU timestep and compares one with 0: each read
    waits for the GPU to finish the step's UNet call, so the CPU cannot queue the next step while the GPU works, and
    the GPU idles through every step's Python. The values are the same on either device, and so are the images; the
    UNet gets its timestep on the GPU from core.accel.cuda_graphs without a copy.
    """
    set_timesteps = scheduler.set_timesteps

    def on_the_cpu(*args: Any, device: Any = None, **kwargs: Any) -> Any:
        return set_timesteps(*args, **kwargs)

    scheduler.set_timesteps = on_the_cpu
    return scheduler
