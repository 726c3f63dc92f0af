"""Device smoke check: every stand-in loads through the core on CUDA in fp16 and runs one forward."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from core.config import Settings
from core.manager import ModelManager
from core.registry import MODELS

manager = ModelManager(Settings(standin_dir=Path(tempfile.mkdtemp()), standin_fallback=True))
for key, spec in MODELS.items():
    model = manager.get(spec)
    print(json.dumps({"key": key, "device": str(model.device), "dtype": str(model.dtype), "load_s": round(model.load_s, 3),
                      "memory_bytes": model.memory_bytes, "standin": model.is_standin}))
print(json.dumps({"cuda_allocated_bytes": torch.cuda.memory_allocated(), "gpu": torch.cuda.get_device_name(0)}))
