"""Device and dtype choice: fp16 on a GPU; on the CPU bf16 for the transformers models where the CPU has it natively."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from bench.bench_classifiers import photos
from core.config import Settings
from core.models import devices
from core.models.manager import ModelManager
from core.models.registry import MODELS, Family
from core.tasks import classify, sentiment

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_only_for_the_transformers_models_and_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    expected = torch.bfloat16 if native else torch.float32
    assert devices.pick_dtype(CPU, Family.TRANSFORMERS, cpu_bf16=True) is expected
    assert devices.pick_dtype(CPU, Family.TORCH_HUB, cpu_bf16=True) is torch.float32  # ResNet50
    assert devices.pick_dtype(CPU, Family.DIFFUSERS, cpu_bf16=True) is torch.float32  # the generation page offers fp32 on the CPU
    assert devices.pick_dtype(CPU, Family.TRANSFORMERS, cpu_bf16=False) is torch.float32
    assert devices.pick_dtype(CUDA, Family.DIFFUSERS, cpu_bf16=True) is torch.float16


def test_the_setting_is_on_by_default_and_dash_cpu_bf16_turns_it_off(tmp_path):
    assert Settings.from_env({}, secrets_file=tmp_path / "none.toml").cpu_bf16 is True
    assert Settings.from_env({"DASH_CPU_BF16": "0"}, secrets_file=tmp_path / "none.toml").cpu_bf16 is False


@pytest.mark.skipif(not devices.cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")
def test_bf16_on_this_cpu_answers_as_fp32_within_the_gpus_fp16_tolerance(settings):
    fp32 = ModelManager(replace(settings, device="cpu", cpu_bf16=False))
    bf16 = ModelManager(replace(settings, device="cpu", cpu_bf16=True))
    images = photos(3)
    texts = ["a wonderful, moving film", "dull and far too long", "it was fine"]

    def answers(manager: ModelManager) -> list[np.ndarray]:
        hotdog = manager.get(MODELS["hotdog"], allow_standin=True)
        resnet = manager.get(MODELS["resnet50"], allow_standin=True)
        sst2 = manager.get(MODELS["sentiment"], allow_standin=True)
        assert bf16 is not manager or (hotdog.dtype, sst2.dtype, resnet.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
        return [
            np.array([[s.score for s in sorted(r.scores, key=lambda s: s.label)] for r in classify.classify_images(hotdog, images).results]),
            sentiment.score_texts(sst2, texts).probabilities,
        ]

    for reference, reduced in zip(answers(fp32), answers(bf16), strict=True):
        assert reference.shape == reduced.shape
        print(f"largest probability difference bf16 - fp32: {np.abs(reference - reduced).max():.4f}")
        assert np.abs(reference - reduced).max() < 0.01
