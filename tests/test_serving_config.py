"""Choosing the backend and reading the Ray Serve deployment options (core.config, core.backends.ray_config); no Ray needed."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.backends.ray_config import DEFAULTS, load_deployment_options
from core.config import PROJECT_ROOT, Settings, describe
from core.errors import SettingsError
from core.models.registry import MODELS

EXAMPLE = PROJECT_ROOT / "deploy" / "ray-cluster.example.toml"


def from_env(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env(env, secrets_file=tmp_path / "missing.toml")


def test_the_local_backend_is_the_default(tmp_path: Path):
    settings = from_env(tmp_path)
    assert (settings.backend, settings.ray_address, settings.ray_deployments) == ("local", None, None)
    assert "local (every model in this process)" in describe(settings)


def test_the_ray_backend_with_a_cluster_address_and_options(tmp_path: Path):
    settings = from_env(tmp_path, DASH_BACKEND="Ray", DASH_RAY_ADDRESS=" ray://head:10001 ", DASH_RAY_DEPLOYMENTS=str(EXAMPLE))
    assert (settings.backend, settings.ray_address, settings.ray_deployments) == ("ray", "ray://head:10001", EXAMPLE)
    assert f"ray (Serve deployments on ray://head:10001; options from {EXAMPLE})" in describe(settings)


def test_an_unknown_backend_is_refused_with_its_value(tmp_path: Path):
    with pytest.raises(SettingsError, match="DASH_BACKEND must be local or ray, not 'kubernetes'"):
        from_env(tmp_path, DASH_BACKEND="kubernetes")


def test_the_example_file_sets_what_it_says():
    options = load_deployment_options(EXAMPLE)
    sd15, sd14, ddpm = (options.for_spec(MODELS[key]) for key in ("sd15", "sd14", "ddpm-butterflies"))
    assert (sd14.num_gpus, sd14.min_replicas, sd14.max_replicas, sd14.max_ongoing_requests) == (1, 1, 6, 4)
    assert (sd15.num_gpus, sd15.min_replicas) == (1, 2)  # [models.sd15] starts from [generation]
    assert ddpm.num_gpus == 0.25
    assert options.for_spec(MODELS["hotdog"]) == options.for_spec(MODELS["resnet50"])  # both are classifiers
    assert options.for_spec(MODELS["sentiment"]).max_batch_size == 64


def test_no_file_gives_the_defaults():
    options = load_deployment_options(None)
    assert options.for_spec(MODELS["sd15"]) == DEFAULTS["generation"] and options.for_spec(MODELS["hotdog"]) == DEFAULTS["classifier"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[generaton]\nnum_gpus = 1\n", r"unknown table\(s\) 'generaton'"),
        ("[classifier]\nnum_gpu = 1\n", r"\[classifier\] has unknown option\(s\) 'num_gpu'"),
        ("[classifier]\nnum_gpus = -1\n", r"\[classifier\] num_gpus must be a number of 0 or more, not -1"),
        ("[classifier]\nmax_replicas = 1.5\n", r"max_replicas must be a whole number of 0 or more, not 1.5"),
        ("[sentiment]\nmin_replicas = 3\nmax_replicas = 2\n", r"needs 1 <= min_replicas <= max_replicas, not 3 and 2"),
        ("[models.sd99]\nmin_replicas = 1\n", r"\[models.sd99\] names no model"),
        ("[classifier\n", "is not valid TOML"),
    ],
)
def test_a_bad_options_file_stops_the_start_naming_what_is_wrong(tmp_path: Path, text: str, message: str):
    path = tmp_path / "deployments.toml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=message):
        from_env(tmp_path, DASH_BACKEND="ray", DASH_RAY_DEPLOYMENTS=str(path))


def test_a_missing_options_file_is_named(tmp_path: Path):
    with pytest.raises(SettingsError, match="cannot read .*nowhere.toml"):
        from_env(tmp_path, DASH_RAY_DEPLOYMENTS=str(tmp_path / "nowhere.toml"))
