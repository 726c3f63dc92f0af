"""Who may run the actions that change what every session has (unload models, empty the cache): plain values in,
a decision out. The page side reads the login (`st.user`), the `[auth]` secrets and `server.address`, and asks here.

Admins are the e-mail addresses in DASH_ADMINS, logged in through the app's OpenID Connect login (`st.login`). With
login off, the only way to tell people apart is the network: an app bound to this machine's loopback address is one
person's, who is then admin; one that listens beyond it with no login has no admin at all, since anyone who can
reach the port would be one.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

ADMINS_VARIABLE = "DASH_ADMINS"


@dataclass(frozen=True)
class Access:
    """The decision for one browser session: admin or not, and for a non-admin what would make them one."""

    is_admin: bool
    remedy: str = ""  # empty for an admin; otherwise one sentence a page can show as it is


def is_loopback(server_address: str | None) -> bool:
    """True when Streamlit listens on this machine only: 127.0.0.0/8, ::1 or localhost. Unset (None or empty)
    means every interface, as Streamlit binds it."""
    host = (server_address or "").strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # empty (every interface), or a host name other than localhost
        return False


@dataclass(frozen=True)
class Login:
    """A logged-in session as the OpenID provider describes it."""

    email: str | None  # None when the provider sent none (a Hugging Face login without the `email` scope)
    # The provider's claim of that name: an address it has not verified (False) is not trusted, since whoever typed it
    # may not own it; None (no such claim) is trusted.
    email_verified: bool | None = None


def decide_access(login_configured: bool, login: Login | None, admins: tuple[str, ...], server_address: str | None) -> Access:
    """Admin or not, for a session logged in as `login` (None: not logged in) under these settings.

    `admins` are lower-case addresses (core.config.parse_admins); an e-mail matches whatever its case.
    `server_address` is Streamlit's `server.address` (None: every interface).
    """
    if not login_configured:
        if is_loopback(server_address):
            return Access(True)
        listening_on = f"on {server_address}" if server_address else "on every network interface"
        return Access(False, (
            f"this app listens {listening_on} without login, so nobody is an admin; configure login ([auth] in "
            f".streamlit/secrets.toml) and list admins in {ADMINS_VARIABLE}, or bind it to 127.0.0.1"
        ))
    if not admins:
        return Access(False, f"no admins are configured; the operator lists their e-mail addresses in {ADMINS_VARIABLE}")
    if login is None:
        return Access(False, f"log in (sidebar) with an address listed in {ADMINS_VARIABLE}")
    if not login.email:
        return Access(False, (
            "your login carries no e-mail address; the provider must grant the `email` scope "
            "(on a Hugging Face Space, `hf_oauth_scopes: [email]` in the README front matter)"
        ))
    if login.email_verified is False:
        return Access(False, f"your provider has not verified {login.email}; verify it there, then log in again")
    if login.email.strip().lower() in admins:
        return Access(True)
    return Access(False, f"you are logged in as {login.email}, which is not in {ADMINS_VARIABLE}; log in as an admin, or ask the operator to add you")
