"""Who is admin (core.access), the DASH_ADMINS setting, and the sidebar's Log in / Log out (AppTest of Home)."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.access import Login, decide_access, is_loopback
from core.access import main as access_main
from core.config import Settings, describe, parse_admins
from core.errors import SettingsError
from tests.oidc_provider import UNREACHED_AUTH_SECRETS

HOME = str(Path(__file__).resolve().parent.parent / "Home.py")
ADMINS = ("admin@example.org", "second@example.org")


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.1.1", "localhost", "LOCALHOST", "::1", "[::1]", " 127.0.0.1 "])
def test_loopback_addresses(address):
    assert is_loopback(address)


@pytest.mark.parametrize("address", [None, "", "0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "dashboard.example.org", "localhost.example.org"])
def test_addresses_beyond_this_machine_and_unset_are_not_loopback(address):
    assert not is_loopback(address)


def test_without_login_a_localhost_bound_app_makes_everyone_admin():
    assert decide_access(False, None, (), "127.0.0.1").is_admin
    assert decide_access(False, None, ADMINS, "::1").is_admin


@pytest.mark.parametrize(("address", "where"), [(None, "on every network interface"), ("0.0.0.0", "on 0.0.0.0"), ("10.0.0.5", "on 10.0.0.5")])
def test_without_login_an_app_reachable_from_the_network_has_no_admin(address, where):
    access = decide_access(False, None, ADMINS, address)
    assert not access.is_admin
    assert access.remedy.startswith(f"this app listens {where} without login, so nobody is an admin")
    assert "[auth] in .streamlit/secrets.toml" in access.remedy and "DASH_ADMINS" in access.remedy


@pytest.mark.parametrize("address", [None, "0.0.0.0", "127.0.0.1"])
def test_with_login_only_listed_verified_addresses_are_admin_wherever_the_app_listens(address):
    assert decide_access(True, Login("admin@example.org", True), ADMINS, address).is_admin
    assert decide_access(True, Login("Second@Example.ORG"), ADMINS, address).is_admin  # case, and no verified claim
    assert not decide_access(True, Login("someone@example.org", True), ADMINS, address).is_admin
    assert not decide_access(True, None, ADMINS, address).is_admin  # not logged in, even on localhost


@pytest.mark.parametrize(("login", "admins", "remedy"), [
    (None, ADMINS, "log in (sidebar) with an address listed in DASH_ADMINS"),
    (Login("someone@example.org"), ADMINS, "you are logged in as someone@example.org, which is not in DASH_ADMINS"),
    (Login("admin@example.org", False), ADMINS, "your provider has not verified admin@example.org"),
    (Login(None), ADMINS, "your login carries no e-mail address"),
    (Login("admin@example.org", True), (), "no admins are configured; the operator lists their e-mail addresses in DASH_ADMINS"),
])
def test_each_refusal_says_what_to_do(login, admins, remedy):
    access = decide_access(True, login, admins, "0.0.0.0")
    assert not access.is_admin and access.remedy.startswith(remedy)


def test_admins_setting_is_read_lower_cased_and_checked():
    assert parse_admins(" A@Example.org, b@example.org,,a@example.org ") == ("a@example.org", "b@example.org")
    assert parse_admins("") == ()
    settings = Settings.from_env({"DASH_ADMINS": "Admin@Example.org"})
    assert settings.admins == ("admin@example.org",)
    assert "admins:           admin@example.org" in describe(settings)
    assert Settings.from_env({}).admins == ()
    with pytest.raises(SettingsError, match=r"DASH_ADMINS must be e-mail addresses .* not 'admin', 'a b@example.org'"):
        Settings.from_env({"DASH_ADMINS": "admin, a b@example.org, ok@example.org"})




def home(user: dict, secrets: dict) -> AppTest:
    at = AppTest.from_file(HOME, default_timeout=60)
    at.user = user
    at.secrets.update(secrets)
    at.run()
    assert not at.exception, at.exception
    return at


def sidebar_buttons(at: AppTest) -> list[str]:
    return [button.label for button in at.sidebar.button]


def test_sidebar_has_no_login_when_login_is_not_configured(app_env):
    at = home({}, {})
    assert sidebar_buttons(at) == []


def test_sidebar_offers_log_in_when_login_is_configured(app_env):
    at = home({"is_logged_in": False}, UNREACHED_AUTH_SECRETS)
    assert sidebar_buttons(at) == ["Log in"]


def test_sidebar_says_who_is_logged_in_and_whether_admin(app_env, monkeypatch):
    monkeypatch.setenv("DASH_ADMINS", "admin@example.org")
    at = home({"is_logged_in": True, "email": "admin@example.org"}, UNREACHED_AUTH_SECRETS)
    assert sidebar_buttons(at) == ["Log out"]
    assert any(c.value == "Logged in as **admin@example.org** (admin)" for c in at.sidebar.caption)
    at = home({"is_logged_in": True, "email": "someone@example.org"}, UNREACHED_AUTH_SECRETS)
    assert any(c.value == "Logged in as **someone@example.org** (not an admin)" for c in at.sidebar.caption)


SPACE = {"OAUTH_CLIENT_ID": "abc-123", "OAUTH_CLIENT_SECRET": "s3cret", "OPENID_PROVIDER_URL": "https://huggingface.co/", "SPACE_HOST": "me-dashboard.hf.space"}


def test_a_space_with_oauth_gets_an_auth_table_for_hugging_face(tmp_path, monkeypatch, capsys):
    for name, value in SPACE.items():
        monkeypatch.setenv(name, value)
    secrets_file = tmp_path / "home" / ".streamlit" / "secrets.toml"
    assert access_main([str(secrets_file)]) == 0
    with secrets_file.open("rb") as handle:
        auth = tomllib.load(handle)["auth"]
    assert auth == {
        "redirect_uri": "https://me-dashboard.hf.space/oauth2callback",
        "cookie_secret": auth["cookie_secret"],
        "client_id": "abc-123",
        "client_secret": "s3cret",
        "server_metadata_url": "https://huggingface.co/.well-known/openid-configuration",
    }
    assert len(auth["cookie_secret"]) >= 32 and secrets_file.stat().st_mode & 0o777 == 0o600
    assert "s3cret" not in capsys.readouterr().out


def test_outside_a_space_nothing_is_written(tmp_path, monkeypatch):
    for name in SPACE:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OAUTH_CLIENT_ID", "abc-123")  # one variable alone is not a Space with OAuth
    assert access_main([str(tmp_path / "secrets.toml")]) == 0
    assert not (tmp_path / "secrets.toml").exists()


def test_the_image_entry_point_writes_the_login_then_becomes_streamlit(tmp_path, monkeypatch):
    for name, value in SPACE.items():
        monkeypatch.setenv(name, value)
    became: list[list[str]] = []
    monkeypatch.setattr("os.execvp", lambda file, args: became.append([file, *args]))
    secrets_file = tmp_path / "secrets.toml"
    assert access_main([str(secrets_file), "--", "streamlit", "run", "Home.py"]) == 0
    assert became == [["streamlit", "streamlit", "run", "Home.py"]]
    assert "[auth]" in secrets_file.read_text()


def test_the_entry_point_without_a_command_after_the_separator_is_refused(tmp_path):
    assert access_main([str(tmp_path / "secrets.toml"), "--"]) == 2
