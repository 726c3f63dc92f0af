"""Models: where each comes from, loading, stand-ins, the local model table and its memory policy."""
