"""Browser: log in through a real OpenID Connect provider (tests/oidc_provider.py) and see the VRAM monitor's admin
actions as an admin, the reason they are missing as anyone else, and them there with login off on localhost."""
from __future__ import annotations

import importlib.util

import pytest

from core.access import auth_toml
from tests.conftest import running_app
from tests.helpers import screenshot, wait_for_app_idle
from tests.oidc_provider import OidcProvider, ProviderUser, auth_section

pytestmark = pytest.mark.browser

ADMIN = ProviderUser("ada@example.org", "Ada Admin")
NOT_ADMIN = ProviderUser("bob@example.org", "Bob User")
ACTION_BUTTONS = ("Unload…", "Unload all…", "Empty cache", "Reset peak")


@pytest.fixture(scope="module")
def provider():
    with OidcProvider(ADMIN) as running:
        yield running


@pytest.fixture(scope="module")
def login_app_url(tmp_path_factory, standin_dir, provider):
    """The app as `make run` starts it (bound to 127.0.0.1), with login through `provider` and ADMIN in DASH_ADMINS.
    Streamlit reads the [auth] section from the file that `secrets.files` names, here through its variable."""
    if importlib.util.find_spec("authlib") is None:
        pytest.fail("st.login needs Authlib, pinned in requirements.txt: pip install -r requirements.txt")
    folder = tmp_path_factory.mktemp("login-app")
    secrets = folder / "secrets.toml"
    secrets.write_text(auth_toml(auth_section(provider.metadata_url, "http://127.0.0.1:{port}/oauth2callback")))
    with running_app(
        folder / "streamlit.log", STREAMLIT_SECRETS_FILES=str(secrets), DASH_ADMINS=ADMIN.email,
        DASH_STANDIN_DIR=str(standin_dir), DASH_STANDIN_FALLBACK="1",
    ) as url:
        yield url


def log_in(tab, url: str) -> None:
    """Open Home, press Log in, and come back from the provider logged in."""
    tab.goto(url)
    wait_for_app_idle(tab)
    tab.get_by_role("button", name="Log in").click()
    tab.get_by_text("Logged in as").wait_for(timeout=60_000)
    wait_for_app_idle(tab)


def open_vram(tab, url: str) -> None:
    """Open the VRAM page and wait for its end: the action buttons, or the caption that says why they are missing."""
    tab.goto(f"{url}/vram")
    tab.get_by_role("button", name="Empty cache").or_(tab.get_by_text("Only admins can")).wait_for(timeout=60_000)
    wait_for_app_idle(tab)


def visible_actions(tab) -> list[str]:
    return [name for name in ACTION_BUTTONS if tab.get_by_role("button", name=name, exact=True).count()]


def test_an_admin_logs_in_sees_the_unload_buttons_and_logs_out(browser, provider, login_app_url):
    tab = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    provider.user = ADMIN
    requests_before = provider.token_requests
    open_vram(tab, login_app_url)
    assert visible_actions(tab) == []
    assert tab.get_by_text("log in (sidebar) with an address listed in DASH_ADMINS").count() == 1

    log_in(tab, login_app_url)
    assert provider.token_requests == requests_before + 1  # the code went through the provider's token endpoint
    assert tab.get_by_text(f"Logged in as {ADMIN.email} (admin)").count() == 1
    open_vram(tab, login_app_url)
    assert visible_actions(tab) == list(ACTION_BUTTONS)
    screenshot(tab, "login-admin-vram")

    tab.get_by_role("button", name="Log out").click()
    tab.get_by_role("button", name="Log in").wait_for(timeout=60_000)
    tab.context.close()


def test_someone_not_in_the_admin_list_sees_why_the_buttons_are_missing(browser, provider, login_app_url):
    tab = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    provider.user = NOT_ADMIN
    log_in(tab, login_app_url)
    assert tab.get_by_text(f"Logged in as {NOT_ADMIN.email} (not an admin)").count() == 1
    open_vram(tab, login_app_url)
    assert visible_actions(tab) == []
    assert tab.get_by_text(f"you are logged in as {NOT_ADMIN.email}, which is not in DASH_ADMINS").count() == 1
    screenshot(tab, "login-not-admin-vram")
    tab.context.close()


def test_with_login_off_on_localhost_the_buttons_are_there(page, app_url):
    open_vram(page, app_url)
    assert visible_actions(page) == list(ACTION_BUTTONS)
    assert page.get_by_role("button", name="Log in").count() == 0
    screenshot(page, "login-off-localhost-vram")
