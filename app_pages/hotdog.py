"""Hot dog or not: a ViT fine-tuned on hot dogs, through the transformers image-classification pipeline."""
from __future__ import annotations

import base64
import io

import pandas as pd
import streamlit as st

from app_pages.common import (
    STANDIN_FILE_SUFFIX,
    image_inputs,
    literal,
    model_in_use,
    require_model,
    show_classifications,
    show_error,
)
from core.api import MODELS, DashboardError, DecodedImage, precision_label, tables
from core.app_state import get_backend


def verdict(label: str) -> str:
    return "🌭 Hot dog!" if label.replace("_", " ").lower() == "hot dog" else f"🚫 {literal(label.capitalize())}"


def thumbnail_url(decoded: DecodedImage) -> str:
    thumb = decoded.image.copy()
    thumb.thumbnail((96, 96))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


st.title("🌭 Hot Dog? Or Not?")
st.caption(f"`{MODELS['hotdog'].repo_id}` through `transformers.pipeline('image-classification')`.")

images = image_inputs("hotdog", default_sample="hot-dog.png")
if not images:
    st.info("Upload one or more images, take a photo, or pick a sample.")
    st.stop()

require_model(MODELS["hotdog"])
try:
    with model_in_use(MODELS["hotdog"]) as model:
        run = get_backend().classify_images(model, images)
except DashboardError as error:
    show_error(error)
    st.stop()

st.caption(f"{len(run.results)} image(s) in {run.seconds * 1000:.0f} ms on {run.device} ({precision_label(run.dtype)}), one batched call.")

if len(run.results) > 1:
    st.subheader("All images")
    table = pd.DataFrame(
        {"file": [r.name for r in run.results], "label": [r.top.label for r in run.results], "score": [round(r.top.score, 4) for r in run.results]}
    )
    st.dataframe(
        table.assign(thumbnail=[thumbnail_url(d) for d in images])[["thumbnail", "file", "label", "score"]],
        column_config={
            "thumbnail": st.column_config.ImageColumn("image"),
            "score": st.column_config.ProgressColumn("score", min_value=0, max_value=1, format="percent"),
        },
        hide_index=True, key="hotdog:table",
    )
    # "ignore": downloading must not rerun the page (and the model) for results it already has.
    st.download_button(
        "Download results (CSV)", tables.to_csv_bytes(table), f"hotdog-results{STANDIN_FILE_SUFFIX if run.is_standin else ''}.csv", "text/csv",
        key="hotdog:csv", on_click="ignore",
    )

show_classifications(images, run.results, verdict)
