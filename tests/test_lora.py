"""core.tasks.lora on the stand-in SD pipeline: adapters change a run's images, only that run's, and leave no trace."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import BadInputError, ModelUnavailableError
from core.models.registry import MODELS
from core.tasks import generation, lora
from core.tasks.jobs import Job, JobState
from core.tasks.lora import LoraChoice
from core.tasks.sd_settings import GenerationSettings
from helpers import DeviceHolder, make_standin_lora

SMALL = GenerationSettings(prompt="a red bicycle", width=64, height=64, steps=3, seed=1234)
WAIT_S = 60


@pytest.fixture()
def settings(settings, tmp_path: Path):
    """The shared settings with this test's folder as the models root: a typed LoRA folder must lie inside it."""
    return replace(settings, models_root=tmp_path)


@pytest.fixture()
def sd(manager):
    return manager.get(MODELS["sd15"], allow_standin=True)


@pytest.fixture()
def adapter(sd, settings, tmp_path: Path) -> lora.LoraAdapter:
    make_standin_lora(Path(sd.source.location), tmp_path / "my-lora")
    return lora.read_source(str(tmp_path / "my-lora"), settings)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image)


def test_a_lora_changes_the_image_and_unloading_restores_the_base_exactly(sd, adapter):
    weights_before = {k: v.clone() for k, v in sd.obj.unet.state_dict().items()}
    base = pixels(generation.generate(sd, SMALL))
    with_lora = generation.generate(sd, SMALL, loras=(LoraChoice(adapter, 1.0),))
    half = generation.generate(sd, SMALL, loras=(LoraChoice(adapter, 0.5),))
    assert not np.array_equal(pixels(with_lora), base)
    assert not np.array_equal(pixels(half), pixels(with_lora))  # the weight is applied
    assert with_lora.settings.loras == (("my-lora", 1.0),)
    np.testing.assert_array_equal(pixels(generation.generate(sd, SMALL)), base)
    assert sd.obj.get_list_adapters() == {}
    assert sd.obj.unet.state_dict().keys() == weights_before.keys()
    for name, value in sd.obj.unet.state_dict().items():
        assert torch.equal(value, weights_before[name]), name


def test_one_sessions_lora_never_reaches_another_sessions_images(sd, adapter):
    base = pixels(generation.generate(sd, SMALL))
    lora_image = pixels(generation.generate(sd, SMALL, loras=(LoraChoice(adapter),)))
    holder = DeviceHolder(WAIT_S)  # session A is mid-run with its LoRA on the shared pipeline
    session_a = Job(lambda context: generation.generate(sd, SMALL, context, abandoned=holder.abandoned, loras=(LoraChoice(adapter),)), "A")
    assert holder.running.wait(WAIT_S)
    session_b = Job(lambda context: generation.generate(sd, SMALL, context), "B")  # no LoRA, waits for the device
    holder.release.set()
    assert session_a.wait(WAIT_S) and session_b.wait(WAIT_S)
    assert session_a.snapshot().state is session_b.snapshot().state is JobState.DONE
    np.testing.assert_array_equal(pixels(session_a.result), lora_image)
    np.testing.assert_array_equal(pixels(session_b.result), base)


def test_a_prompts_lora_tag_sets_the_session_adapters_weight_for_the_run(sd, adapter):
    tagged = generation.generate(sd, replace(SMALL, prompt="a red bicycle<lora:my-lora:0.5>"), loras=(LoraChoice(adapter, 0.0),))
    half = generation.generate(sd, SMALL, loras=(LoraChoice(adapter, 0.5),))
    np.testing.assert_array_equal(pixels(tagged), pixels(half))  # the tag's text is not encoded; its weight is used
    assert not np.array_equal(pixels(tagged), pixels(generation.generate(sd, SMALL, loras=(LoraChoice(adapter, 0.0),))))
    assert tagged.settings.loras == (("my-lora", 0.5),) and tagged.settings.prompt == "a red bicycle<lora:my-lora:0.5>"  # the PNG keeps it as typed


def test_a_lora_tag_naming_no_adapter_of_the_session_is_refused_with_the_ones_it_has(sd, adapter):
    with pytest.raises(BadInputError, match=r"LoRA `film-grain`.* no adapter of that name; its adapters: `my-lora`\."):
        generation.generate(sd, replace(SMALL, prompt="a fox <lora:film-grain:0.6>"), loras=(LoraChoice(adapter),))
    with pytest.raises(BadInputError, match="its adapters: none"):
        generation.generate(sd, replace(SMALL, prompt="a fox <lora:film-grain>"))


def test_a_lora_for_another_base_model_is_refused_and_changes_nothing(sd, settings, tmp_path: Path):
    make_standin_lora(Path(sd.source.location), tmp_path / "sdxl-like", cross_attention_dim=64)
    wrong = lora.read_source(str(tmp_path / "sdxl-like"), settings)
    base = pixels(generation.generate(sd, SMALL))
    with pytest.raises(BadInputError, match="does not fit this model") as caught:
        generation.generate(sd, SMALL, loras=(LoraChoice(wrong),))
    assert "Nothing was changed" in caught.value.remedy
    assert sd.obj.get_list_adapters() == {}
    np.testing.assert_array_equal(pixels(generation.generate(sd, SMALL)), base)


def test_a_cancelled_lora_run_leaves_no_adapter(sd, adapter):
    job = Job(lambda context: generation.generate(sd, replace(SMALL, steps=10), context, abandoned=lambda: job.cancel() or False,
                                                 loras=(LoraChoice(adapter),)), "cancelled")
    assert job.wait(WAIT_S) and job.snapshot().state is JobState.CANCELLED
    assert sd.obj.get_list_adapters() == {}


def test_uploads_load_only_from_safetensors(sd, adapter, settings, tmp_path: Path):
    from safetensors.torch import save

    data = save(dict(adapter.state_dict))
    uploaded = lora.read_upload("style.safetensors", data)
    assert uploaded.name == "style" and uploaded.size_bytes == adapter.size_bytes
    with pytest.raises(BadInputError, match="not a .safetensors file") as caught:
        lora.read_upload("style.ckpt", data)
    assert "pickle" in caught.value.remedy
    with pytest.raises(BadInputError, match="not a readable safetensors file"):
        lora.read_upload("broken.safetensors", b"\x00" * 100)
    with pytest.raises(BadInputError, match="holds no LoRA weights"):
        lora.read_upload("model.safetensors", save({"unet.conv_in.weight": torch.zeros(2)}))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_lora_weights.bin").write_bytes(b"not loaded")
    with pytest.raises(BadInputError, match="no .safetensors file"):
        lora.read_source(str(tmp_path / "pickled"), settings)


@pytest.mark.parametrize("text", ["not a repo", "../../etc", "/no/such/folder"])
def test_a_bad_lora_source_is_refused(text, settings):
    with pytest.raises(BadInputError):
        lora.read_source(text, settings)


def test_a_hub_lora_offline_says_the_hub_cannot_be_reached(settings):
    with pytest.raises(ModelUnavailableError, match="cannot be reached|could not be reached"):
        lora.read_source("someone/some-lora", settings)


@pytest.mark.parametrize("weight", [5.0, -4.5, float("nan")])
def test_a_weight_out_of_range_is_refused_before_any_work(sd, adapter, weight):
    with pytest.raises(BadInputError, match="weight of LoRA 'my-lora'"):
        generation.generate(sd, SMALL, loras=(LoraChoice(adapter, weight),))


def test_two_adapters_with_their_own_weights_combine(sd, adapter, settings, tmp_path: Path):
    make_standin_lora(Path(sd.source.location), tmp_path / "second", seed=1)
    second = lora.read_source(str(tmp_path / "second"), settings)
    base = pixels(generation.generate(sd, SMALL))
    first_only = pixels(generation.generate(sd, SMALL, loras=(LoraChoice(adapter, 1.0),)))
    second_only = pixels(generation.generate(sd, SMALL, loras=(LoraChoice(second, 1.0),)))
    both = generation.generate(sd, SMALL, loras=(LoraChoice(adapter, 1.0), LoraChoice(second, 0.5)))
    assert both.settings.loras == (("my-lora", 1.0), ("second", 0.5))
    assert not any(np.array_equal(pixels(both), other) for other in (base, first_only, second_only))
    assert sd.obj.get_list_adapters() == {}
    np.testing.assert_array_equal(pixels(generation.generate(sd, SMALL)), base)
