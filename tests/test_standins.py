from __future__ import annotations

import pytest
import torch

from core.models import standins
from core.models.registry import MODELS


@pytest.mark.parametrize("key", sorted(MODELS))
def test_every_registered_model_has_a_standin_that_loads(key, manager):
    model = manager.get(MODELS[key], allow_standin=True)
    assert model.is_standin
    assert (standins.ensure_built(MODELS[key], manager.settings.standin_dir) / ".complete").exists()


def test_standin_labels_copy_the_real_label_set(manager):
    pipe = manager.get(MODELS["hotdog"], allow_standin=True).obj
    assert list(pipe.model.config.id2label.values()) == ["hot dog", "not hot dog"]


def test_standin_weights_are_the_same_on_every_build(tmp_path):
    first = standins.ensure_built(MODELS["sentiment"], tmp_path / "a")
    second = standins.ensure_built(MODELS["sentiment"], tmp_path / "b")
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
