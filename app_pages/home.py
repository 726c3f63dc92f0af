"""Home: what the dashboard is, the machine it runs on, and every model's state."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app_pages.common import TASK_PAGES
from core.api import human_bytes, machine_info, precision_label
from core.app_state import get_backend, get_settings

st.title("🧪 Model dashboard")
st.write(
    "Five models on one shared GPU: image classifiers, sentiment and image generation, "
    "each on its own page, all served by one model core shared by every browser session."
)

machine = machine_info()
st.subheader("Machine")
columns = st.columns(4)
columns[0].metric("Accelerator", machine.summary)
columns[1].metric("CUDA (torch build)", machine.cuda_version or "none")
columns[2].metric("torch", machine.torch_version)
columns[3].metric("CPU cores", machine.cpu_count)
if not machine.cuda_available:
    st.info("No CUDA GPU found: models run on the CPU, each in the precision the table below gives once it is loaded. Image generation works but is slow.")

st.subheader("Models")
rows = [
    {
        "Model": row.title,
        "State": row.state.value + (" (stand-in, random weights)" if row.is_standin else ""),
        "Device": row.device or "—",
        "Precision": precision_label(row.dtype) if row.dtype else "—",
        "Memory": human_bytes(row.memory_bytes) if row.memory_bytes is not None else f"~{human_bytes(row.estimate_bytes)} (estimate)",
        "Load time": f"{row.load_s:.1f} s" if row.load_s is not None else "—",
        "Note": row.error or "",
    }
    for row in get_backend().status()
]
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="model_table")

st.subheader("Pages")
for path, title, icon, url_path in TASK_PAGES:
    if url_path in get_settings().enabled_pages:
        st.page_link(path, label=title, icon=icon)
