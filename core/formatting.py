"""Human-readable units, kept apart from the values (which stay in bytes and seconds)."""
from __future__ import annotations


def human_bytes(count: int | float) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


_PRECISIONS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def precision_label(dtype: object) -> str:
    """The precision a model computes in, as every page writes it ("fp32", "fp16", "bf16"), from a torch dtype or its
    name ("torch.bfloat16", "bfloat16"); another dtype keeps its own name."""
    name = str(dtype).removeprefix("torch.")
    return _PRECISIONS.get(name, name)
