"""Entry point: `streamlit run Home.py`. Settings check, page config and navigation over the files in `app_pages/`.

The folder is not called `pages/`: Streamlit treats a `pages/` folder as the legacy multipage layout on a
process's first run, so a deep link opened before Home ever ran would get the wrong navigation.
"""
from __future__ import annotations

import streamlit as st

from app_pages.common import TASK_PAGES, literal
from app_pages.identity import sidebar_login
from core.api import SettingsError
from core.app_state import get_settings

st.set_page_config(page_title="Model dashboard", page_icon="🧪", layout="wide")

try:
    settings = get_settings()
except SettingsError as error:
    st.error(f"The dashboard's settings are invalid, so it did not start:\n\n{literal(error)}\n\n**What to do:** fix these environment variables (see README, Configuration) and restart.")
    st.stop()

navigation = st.navigation(
    [st.Page("app_pages/home.py", title="Home", icon="🏠", default=True)]
    + [
        st.Page(path, title=title, icon=icon, url_path=url_path)
        for path, title, icon, url_path in TASK_PAGES
        if url_path in settings.enabled_pages
    ]
)
st.sidebar.caption("Models are shared by every session of this app; the VRAM monitor shows what they hold.")
sidebar_login()
navigation.run()
