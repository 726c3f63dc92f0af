"""Entry point: `streamlit run Home.py`. Page config and navigation over the files in `app_pages/`.

The folder is not called `pages/`: Streamlit treats a `pages/` folder as the legacy multipage layout on a
process's first run, so a deep link opened before Home ever ran would get the wrong navigation.
"""
from __future__ import annotations

import streamlit as st

from app_pages.common import TASK_PAGES

st.set_page_config(page_title="Model dashboard", page_icon="🧪", layout="wide")

navigation = st.navigation(
    [st.Page("app_pages/home.py", title="Home", icon="🏠", default=True)]
    + [st.Page(path, title=title, icon=icon, url_path=url_path) for path, title, icon, url_path in TASK_PAGES]
)
st.sidebar.caption("Models are shared by every session of this app; the VRAM monitor shows what they hold.")
navigation.run()
