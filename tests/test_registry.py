from __future__ import annotations

import pytest

from core.models.registry import MODELS, Family, custom_spec, is_valid_repo_id


def test_the_five_pages_models_are_registered():
    assert MODELS["hotdog"].repo_id == "julien-c/hotdog-not-hotdog"
    assert MODELS["resnet50"].family is Family.TORCH_HUB and MODELS["resnet50"].hub_entry == "resnet50"
    assert MODELS["sentiment"].repo_id.endswith("distilbert-base-uncased-finetuned-sst-2-english")
    assert {MODELS[k].repo_id for k in ("sd15", "sd14", "mr-potato-head")} == {
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "CompVis/stable-diffusion-v1-4", "sd-dreambooth-library/mr-potato-head",
    }
    assert MODELS["ddpm-butterflies"].pipeline_class == "DDPMPipeline"


def test_estimate_scales_with_dtype():
    spec = MODELS["sd15"]
    assert spec.estimate_bytes(2) * 2 == pytest.approx(spec.estimate_bytes(4), rel=1e-6)
    assert 2.0e9 < spec.estimate_bytes(2) < 3.0e9  # SD1.5 fp16 weights are about 2.1 GB


@pytest.mark.parametrize("repo_id", ["julien-c/hotdog-not-hotdog", "CompVis/stable-diffusion-v1-4", "a/b", "user_1/model.v2"])
def test_valid_repo_ids(repo_id):
    assert is_valid_repo_id(repo_id)


@pytest.mark.parametrize("repo_id", ["", "noslash", "a/b/c", "../etc/passwd", "a/..", "/abs/path", "a b/c", "-a/b", "a/b-", "a/b..c"])
def test_invalid_repo_ids(repo_id):
    assert not is_valid_repo_id(repo_id)


def test_custom_spec_keeps_the_kind_and_gets_its_own_key():
    spec = custom_spec("sd15", "someone/my-sd-model")
    assert spec.key == "sd15@someone/my-sd-model"
    assert spec.repo_id == "someone/my-sd-model" and spec.family is Family.DIFFUSERS
