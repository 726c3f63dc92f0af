"""Where models may come from: typed folders only inside the models root, torch.hub only from the allow-list,
torchvision checkpoints weights-only unless DASH_ALLOW_PICKLE says otherwise."""
from __future__ import annotations

import os
import urllib.error
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from streamlit.testing.v1 import AppTest

from core.config import Settings
from core.errors import BadInputError, ModelUnavailableError
from core.models import loading, reachability
from core.models.manager import ModelManager
from core.models.registry import MODELS, custom_spec, folder_in_models_root
from core.tasks import imagenet, lora, sd_settings, sentiment, unconditional
from helpers import make_standin_lora

HOME = str(Path(__file__).resolve().parent.parent / "Home.py")
CPU = torch.device("cpu")


# Typed local folders -------------------------------------------------------------------------------------------

@pytest.fixture()
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """A models root with one model folder, and a folder beside it (outside the root) that holds a model too."""
    root, outside = tmp_path / "models", tmp_path / "outside"
    for folder in (root / "mine", outside / "secret"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    return root, outside


def spec_readers(settings: Settings) -> dict[str, object]:
    """Each field that takes a typed folder, as a function of the text typed."""
    return {
        "sentiment": lambda text: sentiment.model_spec(text, settings),
        "generation": lambda text: sd_settings.model_spec_for("custom", text, settings),
        "unconditional": lambda text: unconditional.model_spec_for("custom", text, settings),
        "lora": lambda text: lora.read_source(text, settings),
    }


@pytest.mark.parametrize("field", ["sentiment", "generation", "unconditional"])
def test_a_folder_inside_the_root_is_accepted_by_full_path_or_relative_to_the_root(layout, field):
    root, _ = layout
    read = spec_readers(Settings(models_root=root))[field]
    for text in (str(root / "mine"), "./mine", f"{root}/mine/"):
        assert read(text).repo_id == str((root / "mine").resolve())


def test_a_lora_folder_inside_the_root_is_read(layout, standin_dir):
    from core.models.standins import ensure_built

    root, _ = layout
    make_standin_lora(ensure_built(MODELS["sd15"], standin_dir), root / "style")
    adapter = lora.read_source("./style", Settings(models_root=root))
    assert adapter.name == "style" and adapter.size_bytes > 0


@pytest.mark.parametrize("field", ["sentiment", "generation", "unconditional", "lora"])
def test_without_a_models_root_every_typed_folder_is_refused_and_the_setting_named(layout, field):
    root, _ = layout
    with pytest.raises(BadInputError, match="DASH_MODELS_ROOT is not set") as caught:
        spec_readers(Settings())[field](str(root / "mine"))
    assert "DASH_MODELS_ROOT" in caught.value.remedy


@pytest.mark.parametrize("field", ["sentiment", "generation", "unconditional", "lora"])
@pytest.mark.parametrize("text", ["./mine/../mine", "../outside/secret", "{root}/../outside/secret", "./.."])
def test_dot_dot_is_refused_even_where_it_would_stay_inside(layout, field, text):
    root, _ = layout
    with pytest.raises(BadInputError, match="contains '..'"):
        spec_readers(Settings(models_root=root))[field](text.format(root=root))


@pytest.mark.parametrize("field", ["sentiment", "generation", "unconditional", "lora"])
def test_a_full_path_outside_the_root_is_refused_alike_whether_it_exists_or_not(layout, field):
    root, outside = layout
    read = spec_readers(Settings(models_root=root))[field]
    messages = []
    for folder in (outside / "secret", outside / "absent", Path("/etc"), Path("/no/such/folder")):
        with pytest.raises(BadInputError, match="is not a folder inside the models root") as caught:
            read(str(folder))
        messages.append((str(caught.value).replace(str(folder), "<path>"), caught.value.remedy))
    assert len(set(messages)) == 1  # nothing tells an existing folder from a missing one


@pytest.mark.parametrize("field", ["sentiment", "generation", "unconditional", "lora"])
def test_a_symlink_in_the_root_that_leads_out_is_refused_like_an_outside_path(layout, field):
    root, outside = layout
    (root / "escape").symlink_to(outside / "secret", target_is_directory=True)
    (root / "dangling").symlink_to(outside / "absent", target_is_directory=True)
    (root / "nested").mkdir()
    (root / "nested" / "up").symlink_to(outside, target_is_directory=True)
    read = spec_readers(Settings(models_root=root))[field]
    messages = set()
    for text in ("./escape", str(root / "escape"), "./dangling", "./nested/up/secret"):
        with pytest.raises(BadInputError, match="is not a folder inside the models root") as caught:
            read(text)
        messages.add(str(caught.value).replace(text, "<path>"))
    assert len(messages) == 1


def test_a_symlink_that_stays_inside_the_root_is_followed(layout):
    root, _ = layout
    (root / "alias").symlink_to(root / "mine", target_is_directory=True)
    assert folder_in_models_root("./alias", root, "model") == (root / "mine").resolve()


def test_a_link_outside_the_root_into_it_is_still_a_path_elsewhere(layout, tmp_path):
    root, _ = layout
    (tmp_path / "shortcut").symlink_to(root / "mine", target_is_directory=True)
    with pytest.raises(BadInputError, match="is not a folder inside the models root"):
        folder_in_models_root(str(tmp_path / "shortcut"), root, "model")


def test_a_root_given_through_a_symlink_accepts_both_spellings(layout, tmp_path):
    root, _ = layout
    (tmp_path / "root-link").symlink_to(root, target_is_directory=True)
    for text in (str(tmp_path / "root-link" / "mine"), str(root / "mine"), "./mine"):
        assert folder_in_models_root(text, tmp_path / "root-link", "model") == (root / "mine").resolve()


def test_home_is_expanded_and_then_checked(layout, monkeypatch):
    root, outside = layout
    monkeypatch.setenv("HOME", str(root))
    assert folder_in_models_root("~/mine", root, "model") == (root / "mine").resolve()
    monkeypatch.setenv("HOME", str(outside))
    with pytest.raises(BadInputError, match="is not a folder inside the models root"):
        folder_in_models_root("~/secret", root, "model")


def test_a_symlink_loop_or_a_nul_character_gets_the_outside_message(layout):
    root, _ = layout
    (root / "loop").symlink_to(root / "loop")
    for text in ("./loop", "./bad\x00name"):
        with pytest.raises(BadInputError, match="is not a folder inside the models root"):
            folder_in_models_root(text, root, "model")


def test_a_missing_folder_inside_the_root_says_so(layout):
    root, _ = layout
    with pytest.raises(BadInputError, match="the models root has no folder './absent'"):
        folder_in_models_root("./absent", root, "model")


def test_a_typed_repo_id_whose_root_folder_leads_out_is_refused_not_loaded(layout):
    root, outside = layout
    (root / "someone").mkdir()
    (root / "someone" / "model").symlink_to(outside / "secret", target_is_directory=True)
    settings = Settings(models_root=root)
    with pytest.raises(BadInputError, match="is not a folder inside the models root"):
        loading.resolve_source(custom_spec("sentiment", "someone/model"), settings)
    with pytest.raises(BadInputError, match="is not a folder inside the models root"):
        lora.read_source("someone/model", settings)
    (root / "someone" / "inside").mkdir()
    source = loading.resolve_source(custom_spec("sentiment", "someone/inside"), settings)
    assert source == loading.ModelSource(str((root / "someone" / "inside").resolve()), is_local=True)


def test_a_custom_spec_for_a_folder_outside_the_root_is_refused_again_at_load(layout, settings):
    root, outside = layout
    spec = custom_spec("sentiment", str(outside / "secret"))  # made some other way than through a page's field
    for models_root in (None, root):
        manager = ModelManager(replace(settings, models_root=models_root))
        with pytest.raises(BadInputError):  # not ModelUnavailableError: no stand-in stands in for it either
            manager.get(spec, allow_standin=True)


def test_the_operators_own_folders_stay_as_set(layout):
    root, outside = layout
    spec = MODELS["sentiment"]
    chosen = loading.resolve_source(spec, Settings.from_env({"DASH_MODELS_ROOT": str(root), "DASH_MODEL_SENTIMENT": str(outside / "secret")}))
    assert chosen == loading.ModelSource(str(outside / "secret"), is_local=True)
    (root / "distilbert").mkdir()
    (root / spec.repo_id).symlink_to(outside / "secret", target_is_directory=True)  # the operator's link, for a listed model
    assert loading.resolve_source(spec, Settings(models_root=root)).location == str(root / spec.repo_id)


# torch.hub allow-list ------------------------------------------------------------------------------------------

@pytest.fixture()
def hub_calls(monkeypatch) -> list[tuple[tuple, dict]]:
    """Every torch.hub.load call, GitHub counted as reachable; each builds the entry with torchvision's own builder
    (no GitHub, no hubconf)."""
    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(reachability.SERVERS, "reachable", lambda url: url == loading.GITHUB)

    def load(repo_or_dir, entry, *args, **kwargs):
        calls.append(((repo_or_dir, entry, *args), kwargs))
        return torchvision.models.get_model(entry, weights=kwargs.get("weights"))

    monkeypatch.setattr(torch.hub, "load", load)
    return calls


def hub_spec(repo: str, entry: str = "squeezenet1_1", weights: str | None = None):
    return replace(imagenet.spec_for(entry), repo_id=repo, hub_weights=weights)


def test_a_torch_hub_repo_off_the_allow_list_is_refused_before_any_of_its_code_runs(settings, hub_calls):
    spec = hub_spec("someone/evil:main")
    with pytest.raises(loading.TorchHubRepoNotAllowedError, match="'someone/evil' is not allowed") as caught:
        loading.load(spec, loading.ModelSource(spec.repo_id, is_local=False), CPU, torch.float32, settings)
    assert "DASH_TORCH_HUB_ALLOW" in caught.value.remedy
    with pytest.raises(loading.TorchHubRepoNotAllowedError):  # a local copy of it is refused too
        loading.load(spec, loading.ModelSource(str(settings.standin_dir), is_local=True), CPU, torch.float32, settings)
    with pytest.raises(loading.TorchHubRepoNotAllowedError):  # and not replaced by a stand-in
        ModelManager(settings).get(spec, allow_standin=True)
    assert hub_calls == []


def test_an_allowed_repo_loads_with_trust_repo_written_out(settings, hub_calls):
    spec = hub_spec("Someone/Vision:v1")
    allowed = replace(settings, torch_hub_allow=("pytorch/vision", "someone/vision"))
    model = loading.load(spec, loading.ModelSource(spec.repo_id, is_local=False), CPU, torch.float32, allowed)
    assert isinstance(model, torch.nn.Module)
    assert hub_calls == [(("Someone/Vision:v1", "squeezenet1_1"), {"weights": None, "trust_repo": True})]
    assert settings.torch_hub_allow == ("pytorch/vision",)  # the default


# Weights-only loading of torchvision checkpoints --------------------------------------------------------------

WEIGHTS = "SqueezeNet1_1_Weights.IMAGENET1K_V1"


@pytest.fixture()
def hub_dir(monkeypatch, tmp_path: Path) -> Path:
    """An empty torch.hub cache (TORCH_HOME/hub) for this test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path / "hub"


@pytest.fixture()
def torch_loads(monkeypatch) -> list[object]:
    """The weights_only argument of every torch.load call (the real torch.load still runs)."""
    seen: list[object] = []
    real_load = torch.load

    def load(*args, **kwargs):
        seen.append(kwargs.get("weights_only", "not passed"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return seen


def cached_checkpoint(hub_dir: Path, state: object) -> Path:
    """`state` saved where torchvision looks for the weights' file before downloading it."""
    path = hub_dir / "checkpoints" / Path(torchvision.models.get_weight(WEIGHTS).url).name
    torch.save(state, path)
    return path


def local_hub_repo(tmp_path: Path) -> Path:
    """An operator's local torch.hub folder: its hubconf.py is torchvision's builder."""
    folder = tmp_path / "vision"
    folder.mkdir()
    (folder / "hubconf.py").write_text('dependencies = ["torch"]\nfrom torchvision.models import squeezenet1_1  # noqa: F401\n')
    return folder


class RunsCode:
    """Unpickling this calls os.makedirs(marker): what a tampered checkpoint could do with any function."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def assert_loaded(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_torchvision_weights_load_weights_only_from_a_local_hub_folder(settings, hub_dir, torch_loads, tmp_path):
    saved = torchvision.models.squeezenet1_1(weights=None).state_dict()
    cached_checkpoint(hub_dir, saved)
    spec = hub_spec("pytorch/vision:v0.29.1", weights=WEIGHTS)
    model = loading.load(spec, loading.ModelSource(str(local_hub_repo(tmp_path)), is_local=True), CPU, torch.float32, settings)
    assert torch_loads == [True]  # the real torch.hub.load ran the folder's hubconf.py, whose builder loaded the file
    assert_loaded(model, saved)


@pytest.mark.parametrize("github_reachable", [True, False])
def test_torchvision_weights_load_weights_only_from_github_or_torchvisions_copy(
    settings, hub_dir, torch_loads, hub_calls, monkeypatch, github_reachable
):
    saved = torchvision.models.squeezenet1_1(weights=None).state_dict()
    cached_checkpoint(hub_dir, saved)
    if not github_reachable:
        def unreachable(*args, **kwargs):
            raise urllib.error.URLError("GitHub unreachable")

        monkeypatch.setattr(torch.hub, "load", unreachable)
    spec = hub_spec("pytorch/vision:v0.29.1", weights=WEIGHTS)
    model = loading.load(spec, loading.ModelSource(spec.repo_id, is_local=False), CPU, torch.float32, settings)
    assert torch_loads == [True]
    assert_loaded(model, saved)
    assert [kwargs["trust_repo"] for _args, kwargs in hub_calls] == ([True] if github_reachable else [])


def test_the_builder_still_sets_the_architecture_up_from_the_weights(settings, hub_dir, torch_loads, hub_calls):
    """GoogLeNet's weights switch on its input transform and load into auxiliary heads it then drops: building the
    network without them and loading the file afterwards would give another model."""
    weights = torchvision.models.get_weight("GoogLeNet_Weights.IMAGENET1K_V1")
    saved = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True, init_weights=False).state_dict()
    torch.save(saved, hub_dir / "checkpoints" / Path(weights.url).name)
    spec = hub_spec("pytorch/vision:v0.29.1", entry="googlenet", weights="GoogLeNet_Weights.IMAGENET1K_V1")
    # BatchNorm folding off: this compares the loaded weights with the checkpoint's, tensor for tensor.
    model = loading.load(spec, loading.ModelSource(spec.repo_id, is_local=False), CPU, torch.float32, replace(settings, fold_batchnorm=False))
    assert torch_loads == [True]
    assert model.transform_input and model.aux1 is None
    assert_loaded(model, saved)


def test_a_loaded_classifier_has_its_batchnorms_folded_and_computes_the_same(settings, hub_dir, torch_loads, hub_calls):
    weights = torchvision.models.get_weight("GoogLeNet_Weights.IMAGENET1K_V1")
    saved = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True, init_weights=False).state_dict()
    torch.save(saved, hub_dir / "checkpoints" / Path(weights.url).name)
    spec = hub_spec("pytorch/vision:v0.29.1", entry="googlenet", weights="GoogLeNet_Weights.IMAGENET1K_V1")
    source = loading.ModelSource(spec.repo_id, is_local=False)
    folded = loading.load(spec, source, CPU, torch.float32, settings)
    plain = loading.load(spec, source, CPU, torch.float32, replace(settings, fold_batchnorm=False))
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = plain(images)
        torch.testing.assert_close(folded(images), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(settings, hub_dir, torch_loads, hub_calls, tmp_path):
    marker = tmp_path / "code-ran"
    cached_checkpoint(hub_dir, {"features.0.weight": RunsCode(marker)})
    spec = hub_spec("pytorch/vision:v0.29.1", weights=WEIGHTS)
    with pytest.raises(ModelUnavailableError, match="Weights only load failed"):
        loading.load(spec, loading.ModelSource(spec.repo_id, is_local=False), CPU, torch.float32, settings)
    assert torch_loads == [True] and not marker.exists()


def test_allow_pickle_lets_a_checkpoint_unpickle_fully(settings, hub_dir, torch_loads, hub_calls, tmp_path):
    marker = tmp_path / "code-ran"
    cached_checkpoint(hub_dir, {"features.0.weight": RunsCode(marker)})
    spec = hub_spec("pytorch/vision:v0.29.1", weights=WEIGHTS)
    with pytest.raises(ModelUnavailableError):  # the file's "weights" are not weights, but its code has run
        loading.load(spec, loading.ModelSource(spec.repo_id, is_local=False), CPU, torch.float32, replace(settings, allow_pickle=True))
    assert torch_loads == [False] and marker.is_dir()


def test_the_weights_enum_every_other_caller_sees_is_unchanged(settings, hub_dir, torch_loads, hub_calls):
    cached_checkpoint(hub_dir, torchvision.models.squeezenet1_1(weights=None).state_dict())
    spec = hub_spec("pytorch/vision:v0.29.1", weights=WEIGHTS)
    loading.load(spec, loading.ModelSource(spec.repo_id, is_local=False), CPU, torch.float32, settings)
    passed = hub_calls[0][1]["weights"]
    member = torchvision.models.get_weight(WEIGHTS)
    assert passed is not member and type(passed) is type(member) and passed.meta is member.meta
    assert "get_state_dict" not in vars(member)
    member.get_state_dict(progress=False)
    assert torch_loads[-1] is False  # torchvision's own default, for code outside the loader


@pytest.mark.parametrize(("value", "warned"), [("0", False), ("1", True)])
def test_the_imagenet_page_warns_only_when_full_pickle_is_allowed(app_env, monkeypatch, value, warned):
    monkeypatch.setenv("DASH_ALLOW_PICKLE", value)  # read when the page first asks for the settings
    at = AppTest.from_file(HOME, default_timeout=120).run()
    at.switch_page("app_pages/imagenet.py").run()
    assert not at.exception
    assert any("DASH_ALLOW_PICKLE is on" in warning.value for warning in at.warning) is warned
