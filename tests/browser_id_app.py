"""Test-only app for tests/test_browser_id.py: shows this browser's id, which the real pages never do."""
import streamlit as st

from app_pages.browser_id import browser_id

current_id = browser_id()
if current_id is None:
    st.stop()  # the browser answers with its id and the script reruns
st.markdown(f"browser id: `{current_id}`")
