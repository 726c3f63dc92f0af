"""Acceleration: torch.compile in the background and CUDA-graph replay, each switched per call by `Acceleration`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Acceleration:
    """Which GPU speed-ups a model's calls may use (DASH_CUDA_GRAPHS, DASH_COMPILE); on the CPU neither applies.

    Carried by each `LoadedModel` from the settings it was loaded under and passed to every accelerated call, so
    that no module-level switch decides it."""

    cuda_graphs: bool = True  # exact replay of fixed-shape calls (core.accel.cuda_graphs)
    compile: bool = False  # background torch.compile per input shape (core.accel.compiled), served once ready
    # Text-to-image runs of different sessions share UNet calls (core.tasks.shared_batch; DASH_SHARED_BATCH).
    shared_batches: bool = False


EAGER = Acceleration(cuda_graphs=False, compile=False, shared_batches=False)
