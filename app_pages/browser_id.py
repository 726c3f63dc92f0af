"""A random id per browser, kept in its localStorage: whose image history an anonymous visitor sees.

Streamlit 1.67 reads cookies (`st.context.cookies`) but cannot set them, and its session id changes on every reload.
A custom component (`st.components.v2`, inline JavaScript in the app's own page, no iframe, nothing to build) reads
the id from localStorage, makes one with the browser's CSPRNG the first time, and reports it to Python as component
state. The first run of a session has no id yet: `browser_id()` returns None then, and the component's report
reruns the script with it.

The id is a bearer secret (whoever sends it sees that browser's images), so it is 128 random bits, never shown,
never put in a URL, and checked here against its format: the browser is a client like any other.
"""
from __future__ import annotations

import re

import streamlit as st

STORAGE_KEY = "model-dashboard.browser-id"
_BROWSER_ID = re.compile(r"^[0-9a-f]{32}$")
# Where localStorage is refused (some private modes, storage blocked for the site), the id lives as long as the page:
# the history then lasts for the visit and is not shared with anyone.
_JS = """
export default function ({ data, setStateValue }) {
    const key = data.storage_key;
    const valid = (id) => /^[0-9a-f]{32}$/.test(id || "");
    const fresh = () => Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
    let id = null;
    try {
        id = window.localStorage.getItem(key);
        if (!valid(id)) {
            id = fresh();
            window.localStorage.setItem(key, id);
        }
    } catch (refused) {
        window.__dashboardBrowserId = window.__dashboardBrowserId || fresh();
        id = window.__dashboardBrowserId;
    }
    setStateValue("browser_id", id);
}
"""
_component = st.components.v2.component("model_dashboard_browser_id", js=_JS)


def browser_id() -> str | None:
    """This browser's id, or None on the session's first run (before the browser has answered) or for a bad value."""
    result = _component(key="model_dashboard_browser_id", data={"storage_key": STORAGE_KEY}, height=0, on_browser_id_change=lambda: None)
    value = result.get("browser_id")
    return value if isinstance(value, str) and _BROWSER_ID.match(value) else None
