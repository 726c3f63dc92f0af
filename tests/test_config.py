from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from core.config import PAGE_KEYS, PROJECT_ROOT, STREAMLIT_CONFIG_FILE, Settings, VramBudget, parse_vram_budget
from core.errors import SettingsError


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


def test_defaults_of_the_operator_settings(tmp_path: Path):
    settings = Settings.from_env({}, secrets_file=tmp_path / "missing.toml", streamlit_config=tmp_path / "missing.toml")
    assert settings.vram_budget is None
    assert settings.enabled_pages == PAGE_KEYS
    assert settings.max_upload_mb == 200  # Streamlit's own default when nothing sets it


@pytest.mark.parametrize(
    ("text", "size_bytes", "fraction"),
    [("20GiB", 20 * 2**30, None), ("512 MiB", 512 * 2**20, None), ("8GB", 8 * 10**9, None), ("1.5gib", int(1.5 * 2**30), None),
     ("0.8", None, 0.8), ("80%", None, 0.8), ("1", None, 1.0)],
)
def test_vram_budget_as_a_size_or_a_share(text: str, size_bytes: int | None, fraction: float | None):
    assert parse_vram_budget(text) == VramBudget(size_bytes=size_bytes, fraction=fraction)


def test_vram_budget_in_bytes_on_a_card():
    card = 24 * 2**30
    assert VramBudget(fraction=0.5).limit_bytes(card) == 12 * 2**30
    assert VramBudget(size_bytes=20 * 2**30).limit_bytes(card) == 20 * 2**30
    assert VramBudget(size_bytes=80 * 2**30).limit_bytes(card) == card  # never more than the card has


@pytest.mark.parametrize("text", ["20", "0", "-1", "150%", "20G", "twenty GiB", "0GiB"])
def test_bad_vram_budget_names_the_variable_and_value(tmp_path: Path, text: str):
    with pytest.raises(SettingsError, match=f"DASH_VRAM_BUDGET .*{re.escape(repr(text))}"):
        Settings.from_env({"DASH_VRAM_BUDGET": text}, secrets_file=tmp_path / "missing.toml")


def test_pages_on_and_off(tmp_path: Path):
    settings = Settings.from_env({"DASH_PAGES": " VRAM, hotdog "}, secrets_file=tmp_path / "missing.toml")
    assert settings.enabled_pages == ("hotdog", "vram")  # menu order, not the order typed
    assert Settings.from_env({"DASH_PAGES": "all"}, secrets_file=tmp_path / "missing.toml").enabled_pages == PAGE_KEYS
    with pytest.raises(SettingsError, match="'chat'.*choose from all, hotdog"):
        Settings.from_env({"DASH_PAGES": "hotdog,chat"}, secrets_file=tmp_path / "missing.toml")


def test_page_keys_are_the_task_pages_url_paths():
    from app_pages.common import TASK_PAGES

    assert PAGE_KEYS == tuple(url_path for _path, _title, _icon, url_path in TASK_PAGES)


def test_upload_limit_from_streamlit_variable_then_project_config(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text("[server]\nmaxUploadSize = 50\n")
    missing = tmp_path / "missing.toml"
    assert Settings.from_env({}, secrets_file=missing, streamlit_config=config).max_upload_mb == 50
    env = {"STREAMLIT_SERVER_MAX_UPLOAD_SIZE": "75"}
    assert Settings.from_env(env, secrets_file=missing, streamlit_config=config).max_upload_mb == 75
    with pytest.raises(SettingsError, match="STREAMLIT_SERVER_MAX_UPLOAD_SIZE .*'1e3'"):
        Settings.from_env({"STREAMLIT_SERVER_MAX_UPLOAD_SIZE": "1e3"}, secrets_file=missing, streamlit_config=config)


def test_project_config_upload_limit_is_read(tmp_path: Path):
    with STREAMLIT_CONFIG_FILE.open("rb") as handle:
        configured = tomllib.load(handle)["server"]["maxUploadSize"]
    assert Settings.from_env({}, secrets_file=tmp_path / "missing.toml").max_upload_mb == configured


def test_every_bad_setting_is_reported_at_once(tmp_path: Path):
    env = {"DASH_MODELS_ROOT": str(tmp_path / "absent"), "DASH_DEVICE": "tpu", "DASH_STANDIN_FALLBACK": "maybe", "DASH_PAGES": "x"}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env, secrets_file=tmp_path / "missing.toml")
    lines = str(caught.value).splitlines()
    assert [line.split()[0] for line in lines] == ["DASH_MODELS_ROOT", "DASH_DEVICE", "DASH_PAGES", "DASH_STANDIN_FALLBACK"]
    assert str(tmp_path / "absent") in lines[0] and "'maybe'" in lines[3]


def test_check_command_prints_settings_without_the_token(tmp_path: Path):
    env = {**os.environ, "HF_TOKEN": "hf_do_not_print_me", "DASH_VRAM_BUDGET": "80%", "DASH_PAGES": "hotdog"}
    done = subprocess.run([sys.executable, "-m", "core.config"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "80% of each card" in done.stdout and "HF token:         set" in done.stdout
    assert "hf_do_not_print_me" not in done.stdout + done.stderr


def test_check_command_fails_with_every_error(tmp_path: Path):
    env = {**os.environ, "DASH_VRAM_BUDGET": "20", "DASH_DEVICE": "tpu"}
    done = subprocess.run([sys.executable, "-m", "core.config"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "DASH_DEVICE" in done.stderr and "DASH_VRAM_BUDGET" in done.stderr


def test_torch_hub_allow_list_and_pickle_setting(tmp_path: Path):
    missing = tmp_path / "missing.toml"
    defaults = Settings.from_env({}, secrets_file=missing)
    assert defaults.torch_hub_allow == ("pytorch/vision",) and defaults.allow_pickle is False
    env = {"DASH_TORCH_HUB_ALLOW": " pytorch/vision, Someone/Models ", "DASH_ALLOW_PICKLE": "on"}
    settings = Settings.from_env(env, secrets_file=missing)
    assert settings.torch_hub_allow == ("pytorch/vision", "someone/models") and settings.allow_pickle is True
    bad = {"DASH_TORCH_HUB_ALLOW": "pytorch/vision:main, ok/repo, https://github.com/x/y", "DASH_ALLOW_PICKLE": "sometimes"}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(bad, secrets_file=missing)
    lines = str(caught.value).splitlines()
    assert [line.split()[0] for line in lines] == ["DASH_TORCH_HUB_ALLOW", "DASH_ALLOW_PICKLE"]
    assert "'pytorch/vision:main', 'https://github.com/x/y'" in lines[0] and "ok/repo" not in lines[0] and "'sometimes'" in lines[1]


def test_check_command_prints_the_torch_hub_and_pickle_settings():
    env = {**os.environ, "DASH_TORCH_HUB_ALLOW": "pytorch/vision,someone/models", "DASH_ALLOW_PICKLE": "1"}
    done = subprocess.run([sys.executable, "-m", "core.config"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "torch.hub repos:  pytorch/vision, someone/models" in done.stdout
    assert "full pickle:      ALLOWED (DASH_ALLOW_PICKLE)" in done.stdout


def test_session_batching_is_on_by_default_and_its_window_is_checked(tmp_path: Path):
    missing = tmp_path / "missing.toml"
    default = Settings.from_env({}, secrets_file=missing)
    assert default.batch_sessions is True and default.batch_window_ms == 2.0
    chosen = Settings.from_env({"DASH_BATCH_SESSIONS": "off", "DASH_BATCH_WINDOW_MS": "0.5"}, secrets_file=missing)
    assert chosen.batch_sessions is False and chosen.batch_window_ms == 0.5
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"DASH_BATCH_SESSIONS": "maybe", "DASH_BATCH_WINDOW_MS": "2s"}, secrets_file=missing)
    assert "DASH_BATCH_SESSIONS must be 1 or 0" in str(caught.value) and "DASH_BATCH_WINDOW_MS must be a number of milliseconds from 0 to 100, not '2s'" in str(caught.value)
    for text in ("-1", "250", "nan"):
        with pytest.raises(SettingsError, match=f"DASH_BATCH_WINDOW_MS .*{text!r}"):
            Settings.from_env({"DASH_BATCH_WINDOW_MS": text}, secrets_file=missing)
