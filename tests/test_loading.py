from __future__ import annotations

import urllib.error
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import errors as hub_errors

from core.config import Settings
from core.errors import GatedModelError, ModelUnavailableError
from core.models import loading
from core.models.registry import MODELS, custom_spec


def _hub_response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x/y"))


HUB = loading.ModelSource("julien-c/hotdog-not-hotdog", is_local=False)


def test_gated_repo_becomes_gated_error_with_token_remedy():
    cause = hub_errors.GatedRepoError("401 gated", response=_hub_response(401))
    # transformers wraps the Hub's error in an OSError; the cause decides.
    wrapped = OSError("You are trying to access a gated repo")
    wrapped.__cause__ = cause
    classified = loading.classify_load_error(MODELS["hotdog"], HUB, wrapped)
    assert isinstance(classified, GatedModelError)
    assert "HF_TOKEN" in classified.remedy


def test_other_os_errors_stay_plain_unavailable_with_their_message():
    classified = loading.classify_load_error(MODELS["hotdog"], HUB, OSError("Error no file named model.safetensors"))
    assert type(classified) is ModelUnavailableError
    assert "model.safetensors" in str(classified)


def test_unknown_repo_names_the_repo_id():
    spec = custom_spec("hotdog", "nobody/no-such-model")
    cause = hub_errors.RepositoryNotFoundError("404", response=_hub_response(404))
    classified = loading.classify_load_error(spec, HUB, cause)
    assert type(classified) is ModelUnavailableError
    assert "nobody/no-such-model" in str(classified) and "spelling" in classified.remedy


@pytest.mark.parametrize("cause", [
    TimeoutError("read timed out"), urllib.error.URLError("no route"), ConnectionError("refused"),
    httpx2.ConnectError("[Errno -2] Name or service not known"), httpx2.ReadTimeout("timed out"),
])
def test_network_failures_say_the_hub_could_not_be_reached(cause):
    classified = loading.classify_load_error(MODELS["sentiment"], HUB, cause)
    assert "could not be reached" in str(classified)


def test_offline_without_cache_is_unavailable_with_a_reason(settings):
    with pytest.raises(ModelUnavailableError, match="not in the local cache"):
        loading.load(MODELS["hotdog"], HUB, torch.device("cpu"), torch.float32, settings)


def test_source_order_env_folder_then_models_root_then_hub(tmp_path: Path):
    spec = MODELS["hotdog"]
    root = tmp_path / "models"
    (root / spec.repo_id).mkdir(parents=True)
    settings = Settings(models_root=root)
    assert loading.resolve_source(spec, Settings()) == loading.ModelSource(spec.repo_id, is_local=False)
    assert loading.resolve_source(spec, settings).location == str(root / spec.repo_id)
    override = tmp_path / "mine"
    chosen = loading.resolve_source(spec, Settings.from_env({"DASH_MODELS_ROOT": str(root), "DASH_MODEL_HOTDOG": str(override)}))
    assert chosen == loading.ModelSource(str(override), is_local=True)


def test_missing_local_folder_is_reported(settings, tmp_path: Path):
    source = loading.ModelSource(str(tmp_path / "absent"), is_local=True)
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        loading.load(MODELS["hotdog"], source, torch.device("cpu"), torch.float32, settings)


def test_a_token_quoted_by_a_library_never_reaches_the_message():
    token = "hf_abcdefSECRET123"
    leaked = OSError(f"401 for url with Authorization: Bearer {token}")
    classified = loading.classify_load_error(MODELS["hotdog"], HUB, leaked, token=token)
    assert token not in str(classified) and "[token hidden]" in str(classified)


def _with_random_statistics(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # a fresh BatchNorm is the identity: folding it would prove nothing
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model.eval()


def test_batchnorm_folding_keeps_resnet50s_function_and_module_tree():
    import torchvision

    from core.models.loading import fold_batch_norms

    model = _with_random_statistics(torchvision.models.resnet50())
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(images)
        assert fold_batch_norms(model) == 53
        actual = model(images)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())
    assert isinstance(model.layer4, torch.nn.Sequential)  # Grad-CAM hooks the same modules as before
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_batchnorm_folding_leaves_a_norm_that_is_not_a_convs_only_consumer():
    from core.models.loading import fold_batch_norms

    class Branching(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.norm = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            features = self.conv(x)
            return self.norm(features) + features  # the conv's raw output is used too: folding would change it

    model = _with_random_statistics(Branching())
    assert fold_batch_norms(model) == 0 and isinstance(model.norm, torch.nn.BatchNorm2d)
