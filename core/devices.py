"""Device and dtype choice, and a description of the machine. Never initialises CUDA at import."""
from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from core.config import Settings


def pick_device(settings: Settings) -> torch.device:
    if settings.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def pick_dtype(device: torch.device) -> torch.dtype:
    # fp16 halves memory and is the fast path on every CUDA GPU we target; CPUs lack fast fp16 kernels.
    return torch.float16 if device.type == "cuda" else torch.float32


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
