"""AppTest of the ImageNet page with the stand-in hub repo (full torchvision architectures, random weights)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torchvision
from PIL import Image
from streamlit.testing.v1 import AppTest

from core.tasks import imagenet

HOME = str(Path(__file__).resolve().parent.parent / "Home.py")
CATEGORIES = set(torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"])


def png(colour=(200, 30, 30), size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def open_page() -> AppTest:
    at = AppTest.from_file(HOME, default_timeout=120).run()
    at.switch_page("app_pages/imagenet.py").run()
    assert not at.exception
    return at


def open_tab(at: AppTest, label: str) -> None:
    at.session_state["imagenet:view"] = label  # what clicking the tab does: the tabs track state and rerun
    at.run()
    assert not at.exception


@pytest.fixture()
def counted(monkeypatch):
    """How often the page ran each core function."""
    calls = {"classify": 0, "grad_cam": 0}
    for name in calls:
        original = getattr(imagenet, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(imagenet, name, counting)
    return calls


def test_top_k_labels_from_the_weights_and_a_model_switch_reruns_the_image(app_env):
    at = open_page()
    at.number_input(key="imagenet:top_k").set_value(3)
    at.radio(key="imagenet:source").set_value("Samples").run()
    assert not at.exception
    bars = [bar.proto.text.strip("*").rsplit(":", 1)[0] for bar in at.get("progress")]
    assert len(bars) == 3 and set(bars) <= CATEGORIES and at.subheader[0].value == bars[0]
    assert "random weights" in at.warning[0].value
    at.selectbox(key="imagenet:model").set_value("mobilenet_v3_small").run()
    assert not at.exception
    assert "'mobilenet_v3_small'" in at.caption[0].value and "MobileNet_V3_Small_Weights" in at.caption[0].value
    assert any("ImageNet classifier (mobilenet_v3_small)" in caption.value for caption in at.caption)  # re-ran on the new model
    assert at.subheader[0].value in CATEGORIES


def test_grad_cam_tab_explains_a_chosen_class_without_reclassifying(app_env, counted):
    at = open_page()
    at.radio(key="imagenet:source").set_value("Samples").run()
    assert counted == {"classify": 1, "grad_cam": 0}  # hidden tabs cost nothing
    open_tab(at, "Why? (Grad-CAM)")
    captions = [image.proto.imgs[0].caption for image in at.get("image")]
    top_label = at.selectbox(key="imagenet:cam_class").value
    assert captions == ["What the model sees (resize, centre crop)", f"Grad-CAM on `layer4` for “{top_label}”: red marks what raised its score"]
    second = at.selectbox(key="imagenet:cam_class").options[1]
    at.selectbox(key="imagenet:cam_class").set_value(second).run()
    assert not at.exception
    assert f"for “{second}”" in at.get("image")[1].proto.imgs[0].caption
    assert counted == {"classify": 1, "grad_cam": 2}  # remembered: a new class does not re-run the classifier


def test_compare_tab_shows_both_models_with_their_times(app_env):
    at = open_page()
    at.radio(key="imagenet:source").set_value("Samples").run()
    open_tab(at, "Compare with the hot dog model")
    metrics = {metric.label: metric for metric in at.metric}
    assert set(metrics) == {"ImageNet classifier (ResNet50)", "Hot dog or not (ViT-base)"}
    assert metrics["ImageNet classifier (ResNet50)"].value in CATEGORIES
    assert metrics["Hot dog or not (ViT-base)"].value in {"hot dog", "not hot dog"}
    assert all(" ms" in metric.proto.delta for metric in at.metric)


def test_a_bad_file_is_refused_by_name_and_the_rest_still_runs(app_env):
    at = open_page()
    uploader = at.file_uploader(key="imagenet:upload")
    uploader.upload("red.png", png(), "image/png")
    uploader.upload("notes.png", b"text, not pixels", "image/png")
    uploader.upload("empty.png", b"", "image/png")
    at.run()
    assert not at.exception
    assert [error.value.split(" ", 1)[0] for error in at.error] == ["notes.png", "empty.png"]
    assert len(at.subheader) == 1 and at.subheader[0].value in CATEGORIES
    assert any("1 image(s) in" in caption.value for caption in at.caption)
