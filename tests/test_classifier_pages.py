"""AppTest of the two classifier pages with stand-in models."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

HOME = str(Path(__file__).resolve().parent.parent / "Home.py")


def png(colour=(200, 30, 30), size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def open_page(path: str) -> AppTest:
    at = AppTest.from_file(HOME, default_timeout=120).run()
    at.switch_page(path).run()
    assert not at.exception
    return at


def test_hotdog_asks_for_an_image_first(app_env):
    at = open_page("app_pages/hotdog.py")
    assert at.title[0].value == "🌭 Hot Dog? Or Not?"
    assert "Upload one or more images" in at.info[0].value


def test_hotdog_sample_shows_verdict_bars_and_standin_label(app_env):
    at = open_page("app_pages/hotdog.py")
    at.radio(key="hotdog:source").set_value("Samples").run()
    assert not at.exception
    assert at.subheader[0].value in {"🌭 Hot dog!", "🚫 Not hot dog"}
    assert len(at.get("progress")) == 2  # one bar per label of the model's config
    assert "random weights" in at.warning[0].value
    assert any("1 image(s) in" in caption.value for caption in at.caption)


def test_hotdog_batch_table_download_and_a_bad_file_that_does_not_stop_the_rest(app_env):
    at = open_page("app_pages/hotdog.py")
    uploader = at.file_uploader(key="hotdog:upload")
    uploader.upload("red.png", png(), "image/png")
    uploader.upload("broken.png", b"\x89PNG not really", "image/png")
    uploader.upload("green.png", png((20, 200, 20)), "image/png")
    at.run()
    assert not at.exception
    assert "broken.png is not an image" in at.error[0].value
    table = at.dataframe[0].value
    assert list(table["file"]) == ["red.png", "green.png"]
    assert set(table["label"]) <= {"hot dog", "not hot dog"} and table["score"].between(0.5, 1).all()
    assert at.get("download_button")[0].proto.label == "Download results (CSV)"


def test_imagenet_topk_labels_from_the_weights_and_model_switch(app_env):
    import torchvision

    at = open_page("app_pages/imagenet.py")
    at.number_input(key="imagenet:top_k").set_value(3)
    at.radio(key="imagenet:source").set_value("Samples").run()
    assert not at.exception
    categories = set(torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"])
    first_label = at.subheader[0].value
    assert first_label in categories
    at.selectbox(key="imagenet:model").set_value("mobilenet_v3_small").run()
    assert not at.exception
    assert "mobilenet_v3_small" in at.caption[0].value
    assert at.subheader[0].value in categories  # the same image re-ran through the new model
    assert len(at.metric) == 2  # compare tab: this model and the hot dog model side by side


@pytest.mark.parametrize("page", ["app_pages/hotdog.py", "app_pages/imagenet.py"])
def test_empty_upload_gets_a_message_not_a_traceback(app_env, page):
    at = open_page(page)
    prefix = Path(page).stem
    at.file_uploader(key=f"{prefix}:upload").upload("empty.png", b"", "image/png").run()
    assert not at.exception
    assert "empty.png is empty" in at.error[0].value
