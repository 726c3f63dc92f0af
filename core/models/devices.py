"""Device and dtype choice, and a description of the machine. Never initialises CUDA at import."""
from __future__ import annotations

import functools
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import Settings
from core.models.registry import Family


def pick_device(settings: Settings) -> torch.device:
    if settings.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def pick_dtype(device: torch.device, family: Family | None = None, cpu_bf16: bool = False) -> torch.dtype:
    """fp16 on a GPU: half the memory, and the fast path on every CUDA GPU we target. On the CPU fp32, or bf16 for the
    transformers models (hot dog ViT, sentiment DistilBERT: matrix products, where native bf16 pays most) where the
    CPU computes it natively (DASH_CPU_BF16). ResNet50 stays fp32 on the CPU: its folded, channels-last convolutions
    already beat the naive path, and bf16 moved its peaked ImageNet probabilities by 2 points on the stand-in;
    diffusers' pipelines stay fp32 there, as the generation page says."""
    if device.type == "cuda":
        return torch.float16
    if cpu_bf16 and family is Family.TRANSFORMERS and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: there, ViT-base in bf16 took 55 ms instead of 204 ms in fp32 (2 cores); without them bf16
    is emulated and slower than fp32."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell here, so fp32
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    capability: str


@dataclass(frozen=True)
class MachineInfo:
    torch_version: str
    cuda_version: str | None  # the CUDA the torch build was made for
    cuda_available: bool
    gpus: tuple[GpuInfo, ...]
    python_version: str
    cpu_count: int

    @property
    def summary(self) -> str:
        if not self.gpus:
            return "CPU only"
        return ", ".join(f"{gpu.name} ({gpu.total_bytes / 2**30:.0f} GiB)" for gpu in self.gpus)


def machine_info() -> MachineInfo:
    import os

    gpus: list[GpuInfo] = []
    available = torch.cuda.is_available()
    if available:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(GpuInfo(index, props.name, props.total_memory, f"{props.major}.{props.minor}"))
    return MachineInfo(
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        cuda_available=available,
        gpus=tuple(gpus),
        python_version=platform.python_version(),
        cpu_count=os.cpu_count() or 1,
    )
