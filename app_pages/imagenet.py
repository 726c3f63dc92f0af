"""ImageNet classifier: ResNet50 (or any torchvision classifier) through torch.hub, with Grad-CAM and a comparison."""
from __future__ import annotations

import streamlit as st

from app_pages.common import image_inputs, require_model, show_error, show_scores
from core import imagenet
from core.classify import classify_images
from core.errors import DashboardError
from core.registry import MODELS

st.title("🖼️ ImageNet classifier")
names = imagenet.classifier_names()
settings_column, k_column = st.columns([3, 1])
name = settings_column.selectbox("Model (every torchvision ImageNet classifier)", names, index=names.index("resnet50"), key="imagenet:model")
top_k = k_column.number_input("Top k", min_value=1, max_value=20, value=imagenet.DEFAULT_TOP_K, key="imagenet:top_k")
spec = imagenet.spec_for(name)
st.caption(f"`torch.hub.load('{spec.repo_id}', '{spec.hub_entry}', weights='{spec.hub_weights}')`; labels and preprocessing from the weights.")

images = image_inputs("imagenet")
if not images:
    st.info("Upload one or more images, take a photo, or pick a sample.")
    st.stop()

model = require_model(spec)
try:
    run = imagenet.classify(model, images, int(top_k))
except DashboardError as error:
    show_error(error)
    st.stop()

top_tab, saliency_tab, compare_tab = st.tabs(["Top-k", "Why? (Grad-CAM)", "Compare with the hot dog model"])

with top_tab:
    st.caption(f"{len(images)} image(s) in {run.seconds * 1000:.0f} ms on {run.device} ({run.dtype}).")
    for decoded, result in zip(images, run.results, strict=True):
        image_column, score_column = st.columns([3, 2], gap="large")
        image_column.image(decoded.image, caption=decoded.name + (f" ({', '.join(decoded.notes)})" if decoded.notes else ""))
        with score_column:
            st.subheader(result.top.label)
            show_scores(result.scores)

with saliency_tab:
    choice = st.selectbox("Image", range(len(images)), format_func=lambda i: images[i].name, key="imagenet:cam_image")
    labels = [item.label for item in run.results[choice].scores]
    label = st.selectbox("Explain the class", labels, key="imagenet:cam_class")
    categories = list(imagenet.weights_of(spec).meta["categories"])
    try:
        saliency = imagenet.grad_cam(model, images[choice], categories.index(label))
    except DashboardError as error:
        show_error(error)
    else:
        if saliency.is_empty:
            st.info(f"No region of this image raised the score of “{saliency.class_label}”, so the heat map is empty.")
        crop_column, cam_column = st.columns(2)
        crop_column.image(imagenet.model_view(model, images[choice]), caption="What the model sees (resize, centre crop)", width="stretch")
        cam_column.image(saliency.overlay, caption=f"Grad-CAM for “{saliency.class_label}”: red marks what raised its score", width="stretch")

with compare_tab:
    hotdog = require_model(MODELS["hotdog"])
    try:
        hotdog_run = classify_images(hotdog, images)
    except DashboardError as error:
        show_error(error)
    else:
        for decoded, mine, theirs in zip(images, run.results, hotdog_run.results, strict=True):
            st.markdown(f"**{decoded.name}**")
            left, right = st.columns(2)
            left.metric(f"{run.model_title}", mine.top.label, f"{mine.top.score:.1%} · {run.seconds * 1000:.0f} ms", delta_color="off")
            right.metric(hotdog_run.model_title, theirs.top.label, f"{theirs.top.score:.1%} · {hotdog_run.seconds * 1000:.0f} ms", delta_color="off")
