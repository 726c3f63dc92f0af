"""Backends: where models run (this process, or Ray Serve replicas), behind one interface."""
