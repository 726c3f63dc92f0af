from __future__ import annotations

from pathlib import Path

import pytest

from core.config import Settings


def test_defaults_without_environment(tmp_path: Path):
    settings = Settings.from_env({}, secrets_file=tmp_path / "missing.toml")
    assert settings.models_root is None
    assert settings.standin_fallback is False
    assert settings.device == "auto"
    assert settings.hf_token is None


def test_environment_overrides(tmp_path: Path):
    settings = Settings.from_env(
        {"DASH_MODELS_ROOT": str(tmp_path), "DASH_STANDIN_FALLBACK": "yes", "DASH_DEVICE": "CPU", "HF_TOKEN": "hf_env"},
        secrets_file=tmp_path / "missing.toml",
    )
    assert settings.models_root == tmp_path
    assert settings.standin_fallback is True
    assert settings.device == "cpu"
    assert settings.hf_token == "hf_env"


def test_token_from_secrets_file_and_never_in_repr(tmp_path: Path):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('HF_TOKEN = "hf_secret_value_123"\n')
    settings = Settings.from_env({}, secrets_file=secrets)
    assert settings.hf_token == "hf_secret_value_123"
    assert "hf_secret_value_123" not in repr(settings)
    assert "hf_secret_value_123" not in str(settings)


def test_bad_device_is_refused_with_its_value(tmp_path: Path):
    with pytest.raises(ValueError, match="'tpu'"):
        Settings.from_env({"DASH_DEVICE": "tpu"}, secrets_file=tmp_path / "missing.toml")
