"""Acceleration: torch.compile in the background and CUDA-graph replay."""
