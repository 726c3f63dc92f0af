"""ImageNet classifier: ResNet50 (or any torchvision classifier) through torch.hub, with Grad-CAM and a comparison."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar

import streamlit as st

from app_pages.common import image_inputs, literal, model_in_use, require_model, show_classifications, show_error
from core.api import MODELS, DashboardError, DecodedImage, LoadedModel, imagenet, precision_label
from core.app_state import get_backend, get_settings

Value = TypeVar("Value")
TABS = ("Top-k", "Why? (Grad-CAM)", "Compare with the hot dog model")


def fingerprint(images: list[DecodedImage]) -> tuple[tuple[str, str], ...]:
    return tuple((decoded.name, hashlib.blake2b(decoded.image.tobytes(), digest_size=16).hexdigest()) for decoded in images)


def remembered(key: str, model: LoadedModel, inputs: tuple, compute: Callable[[], Value]) -> Value:
    """compute() once per model and inputs, kept across reruns: picking a Grad-CAM class must not re-classify."""
    identity = (model.spec.key, model.source.location, inputs)
    saved = st.session_state.get(key)
    if saved is None or saved[0] != identity:
        st.session_state[key] = saved = (identity, compute())
    return saved[1]


st.title("🖼️ ImageNet classifier")
names = imagenet.classifier_names()
settings_column, k_column = st.columns([3, 1])
name = settings_column.selectbox("Model (every torchvision ImageNet classifier)", names, index=names.index("resnet50"), key="imagenet:model")
top_k = int(k_column.number_input("Top k", min_value=1, max_value=20, value=imagenet.DEFAULT_TOP_K, key="imagenet:top_k"))
spec = imagenet.spec_for(name)
st.caption(f"`torch.hub.load('{spec.repo_id}', '{spec.hub_entry}', weights='{spec.hub_weights}')`; labels and preprocessing from the weights.")
if get_settings().allow_pickle:
    st.warning("DASH_ALLOW_PICKLE is on: torchvision weights load with full pickle, which would run code hidden in a tampered checkpoint file.", icon="⚠️")

images = image_inputs("imagenet")
if not images:
    st.info("Upload one or more images, take a photo, or pick a sample.")
    st.stop()
prints = fingerprint(images)

model = require_model(spec)
try:
    with model_in_use(spec) as current:
        run = remembered("imagenet:run", current, (prints, top_k), lambda: get_backend().classify(current, images, top_k))
except DashboardError as error:
    show_error(error)
    st.stop()

# Tabs that track their state run only when open: Grad-CAM and the hot dog model cost nothing until asked for.
top_tab, saliency_tab, compare_tab = st.tabs(TABS, key="imagenet:view", on_change="rerun")

if top_tab.open:
    with top_tab:
        st.caption(f"{len(images)} image(s) in {run.seconds * 1000:.0f} ms on {run.device} ({precision_label(run.dtype)}), {run.model_title}.")
        show_classifications(images, run.results, literal)

if saliency_tab.open:
    with saliency_tab:
        choice = st.selectbox("Image", range(len(images)), format_func=lambda i: images[i].name, key="imagenet:cam_image")
        label = st.selectbox("Explain the class", [item.label for item in run.results[choice].scores], key="imagenet:cam_class")
        class_index = imagenet.categories(spec).index(label)
        try:
            with model_in_use(spec) as current:
                saliency = remembered("imagenet:cam", current, (prints[choice], class_index), lambda: get_backend().grad_cam(current, images[choice], class_index))
        except DashboardError as error:
            show_error(error)
        else:
            if saliency.is_empty:
                st.info(f"No region of this image raised the score of “{literal(saliency.class_label)}”, so the heat map is empty.")
            crop_column, cam_column = st.columns(2)
            crop_column.image(imagenet.model_view(model, images[choice]), caption="What the model sees (resize, centre crop)", width="stretch")
            cam_column.image(
                saliency.overlay, width="stretch",
                caption=f"Grad-CAM on `{saliency.layer}` for “{literal(saliency.class_label)}”: red marks what raised its score",
            )

if compare_tab.open:
    with compare_tab:
        require_model(MODELS["hotdog"])
        try:
            with model_in_use(MODELS["hotdog"]) as current:
                hotdog_run = remembered("imagenet:hotdog", current, prints, lambda: get_backend().classify_images(current, images))
        except DashboardError as error:
            show_error(error)
        else:
            st.caption("Each model's time is for all the images in one batched call, as it was first computed.")
            for decoded, mine, theirs in zip(images, run.results, hotdog_run.results, strict=True):
                image_column, left, right = st.columns([1, 2, 2], vertical_alignment="center")
                image_column.image(decoded.image, caption=literal(decoded.name), width=140)
                left.metric(run.model_title, mine.top.label, f"{mine.top.score:.1%} · {run.seconds * 1000:.0f} ms", delta_color="off", delta_arrow="off")
                right.metric(hotdog_run.model_title, theirs.top.label, f"{theirs.top.score:.1%} · {hotdog_run.seconds * 1000:.0f} ms", delta_color="off", delta_arrow="off")
