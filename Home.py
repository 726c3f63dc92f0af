"""Entry point: `streamlit run Home.py`. Page config and navigation over the files in `pages/`."""
from __future__ import annotations

import streamlit as st

from pages.common import TASK_PAGES

st.set_page_config(page_title="Model dashboard", page_icon="🧪", layout="wide")

navigation = st.navigation(
    [st.Page("pages/home.py", title="Home", icon="🏠", default=True)]
    + [st.Page(path, title=title, icon=icon, url_path=url_path) for path, title, icon, url_path in TASK_PAGES]
)
st.sidebar.caption("Models are shared by every session of this app; the VRAM monitor shows what they hold.")
navigation.run()
