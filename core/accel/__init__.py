"""Acceleration: torch.compile in the background and CUDA-graph replay, each switched per call by `Acceleration`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Acceleration:
    """Which speed-ups a model's calls may use (DASH_CUDA_GRAPHS, DASH_COMPILE: GPU only; DASH_BATCH_SESSIONS: any device).

    Carried by each `LoadedModel` from the settings it was loaded under and passed to every accelerated call, so
    that no module-level switch decides it."""

    cuda_graphs: bool = True  # exact replay of fixed-shape calls (core.accel.cuda_graphs)
    compile: bool = False  # background torch.compile per input shape (core.accel.compiled), served once ready
    # Text-to-image runs of different sessions share UNet calls (core.tasks.shared_batch; DASH_SHARED_BATCH).
    shared_batches: bool = False
    # Classifier and sentiment requests of different sessions that meet share one forward (core.tasks.cross_session;
    # DASH_BATCH_SESSIONS); a request waits for others only while they are still preprocessing, at most the window.
    batch_sessions: bool = True
    batch_window_ms: float = 2.0  # DASH_BATCH_WINDOW_MS


EAGER = Acceleration(cuda_graphs=False, compile=False, shared_batches=False, batch_sessions=False)
