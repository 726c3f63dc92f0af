"""The session's identity and role for pages: login state from `st.user`, the `[auth]` secrets, `server.address`,
decided by `core.access`. Also the sidebar's Log in / Log out."""
from __future__ import annotations

import streamlit as st

from app_pages import browser_id
from core.api import Access, Login, browser_owner, decide_access, user_owner
from core.app_state import get_settings


def login_configured() -> bool:
    """True when secrets hold an `[auth]` section, which is what `st.login` reads."""
    try:
        return "auth" in st.secrets
    except FileNotFoundError:  # no secrets file at all (Streamlit's StreamlitSecretNotFoundError)
        return False


def current_login() -> Login | None:
    """This session's login, from the identity token Streamlit keeps in its cookie; None when nobody is logged in."""
    if not st.user.get("is_logged_in"):
        return None
    return Login(st.user.get("email"), st.user.get("email_verified"))


def session_owner() -> str | None:
    """Whose images and runs these are: the logged-in user's e-mail, else this browser's id (drawn here as a
    zero-height component); None on a session's first run, before the browser has answered."""
    login = current_login() if login_configured() else None
    if login is not None and login.email:
        return user_owner(login.email)
    browser = browser_id.browser_id()
    return browser_owner(browser) if browser else None


def session_access() -> Access:
    configured = login_configured()
    login = current_login() if configured else None
    return decide_access(configured, login, get_settings().admins, st.get_option("server.address"))


def sidebar_login() -> None:
    """Log in, or who is logged in (and as what) and Log out; nothing when login is not configured."""
    if not login_configured():
        return
    login = current_login()
    if login is None:
        st.sidebar.button("Log in", key="identity:login", on_click=st.login, icon="🔑")
        return
    role = "admin" if session_access().is_admin else "not an admin"
    st.sidebar.caption(f"Logged in as **{login.email or st.user.get('name') or 'an account with no e-mail address'}** ({role})")
    st.sidebar.button("Log out", key="identity:logout", on_click=st.logout)
