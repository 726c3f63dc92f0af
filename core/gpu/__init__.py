"""The GPU: NVML readings, the per-GPU run queue, the memory history."""
