"""Who may run the actions that change what every session has (unload models, empty the cache): plain values in,
a decision out. The page side reads the login (`st.user`), the `[auth]` secrets and `server.address`, and asks here.

Admins are the e-mail addresses in DASH_ADMINS, logged in through the app's OpenID Connect login (`st.login`). With
login off, the only way to tell people apart is the network: an app bound to this machine's loopback address is one
person's, who is then admin; one that listens beyond it with no login has no admin at all, since anyone who can
reach the port would be one.
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

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


# A Hugging Face Space with `hf_oauth: true` in its README front matter gets these variables; st.login reads only
# secrets files, which Streamlit parses when its server starts, so the [auth] table is written before that.
SPACE_OAUTH_VARIABLES = ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OPENID_PROVIDER_URL", "SPACE_HOST")


def space_auth_section(environ: Mapping[str, str], cookie_secret: str) -> dict[str, str] | None:
    """The `[auth]` table for Hugging Face's OpenID provider from a Space's variables; None outside a Space with
    OAuth on. `cookie_secret` signs the login cookie: a fresh one at every start logs everyone out at a restart."""
    if not all(environ.get(name) for name in SPACE_OAUTH_VARIABLES):
        return None
    return {
        "redirect_uri": f"https://{environ['SPACE_HOST']}/oauth2callback",  # any path on the Space's host is allowed
        "cookie_secret": cookie_secret,
        "client_id": environ["OAUTH_CLIENT_ID"],
        "client_secret": environ["OAUTH_CLIENT_SECRET"],
        "server_metadata_url": f"{environ['OPENID_PROVIDER_URL'].rstrip('/')}/.well-known/openid-configuration",
    }


def auth_toml(section: Mapping[str, str]) -> str:
    """An `[auth]` table as secrets.toml text (TOML basic strings take JSON's escapes)."""
    return "[auth]\n" + "".join(f"{name} = {json.dumps(value)}\n" for name, value in section.items())


def main(argv: list[str]) -> int:
    """`python -m core.access SECRETS_FILE [-- COMMAND ...]`: on a Space with OAuth on, write its [auth] table there
    (private to the app's user); elsewhere write nothing. Then, given a command, become it (exec: the image's
    entry point, so that streamlit keeps the process and its signals)."""
    secrets_file, command = (argv[0], argv[2:]) if len(argv) >= 2 and argv[1] == "--" else (argv[0] if argv else None, [])
    if secrets_file is None or (len(argv) != 1 and not command):
        print("usage: python -m core.access SECRETS_FILE [-- COMMAND ...]   (for example ~/.streamlit/secrets.toml)", file=sys.stderr)
        return 2
    section = space_auth_section(os.environ, secrets.token_urlsafe(32))
    if section is None:
        print(f"Not a Space with OAuth on ({', '.join(SPACE_OAUTH_VARIABLES)} not all set): login stays as configured.")
    else:
        path = Path(secrets_file).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(auth_toml(section))
        print(f"Login through {section['server_metadata_url']} written to {path}.")
    if command:
        sys.stdout.flush()
        os.execvp(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
