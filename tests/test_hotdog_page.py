"""AppTest of the hot dog page with the stand-in ViT: samples, uploads, camera, batches and every bad input."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from streamlit.testing.v1 import AppTest

HOME = str(Path(__file__).resolve().parent.parent / "Home.py")


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def open_page(path: str) -> AppTest:
    at = AppTest.from_file(HOME, default_timeout=120).run()
    at.switch_page(path).run()
    assert not at.exception
    return at


def standin_labels(standin_dir: Path) -> set[str]:
    config = json.loads((standin_dir / "transformers-image-classification" / "config.json").read_text())
    return set(config["id2label"].values())


def bar_texts(at: AppTest) -> list[str]:
    return [bar.proto.text for bar in at.get("progress")]


def test_hotdog_asks_for_an_image_first(app_env):
    at = open_page("app_pages/hotdog.py")
    assert at.title[0].value == "🌭 Hot Dog? Or Not?"
    assert "Upload one or more images" in at.info[0].value


def test_sample_shows_verdict_a_bar_per_config_label_and_the_standin_warning(app_env, standin_dir):
    at = open_page("app_pages/hotdog.py")
    at.radio(key="hotdog:source").set_value("Samples").run()
    assert not at.exception
    labels = standin_labels(standin_dir)
    texts = bar_texts(at)
    assert {text.strip("*").rsplit(":", 1)[0] for text in texts} == labels  # one bar per label of the model's config
    winner = texts[0].strip("*").rsplit(":", 1)[0]
    assert texts[0].startswith("**") and not any(text.startswith("**") for text in texts[1:])  # the winner in bold
    assert at.subheader[0].value == ("🌭 Hot dog!" if winner == "hot dog" else f"🚫 {winner.capitalize()}")
    assert "random weights" in at.warning[0].value
    assert any("1 image(s) in" in caption.value and "(fp32)" in caption.value for caption in at.caption)


def test_camera_photo_is_classified(app_env):
    at = open_page("app_pages/hotdog.py")
    at.radio(key="hotdog:source").set_value("Camera").run()
    at.camera_input(key="hotdog:camera").upload("photo.jpg", encode(Image.new("RGB", (64, 48), (200, 90, 40)), "JPEG"), "image/jpeg").run()
    assert not at.exception
    assert len(bar_texts(at)) == 2 and at.subheader[0].value in {"🌭 Hot dog!", "🚫 Not hot dog"}


def every_input_of_the_issue() -> tuple[list[tuple[str, bytes]], list[str]]:
    """Files to upload in one batch, and the names of those that must be refused."""
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "green", "blue")]
    rotated = Image.Exif()
    rotated[0x0112] = 6
    photo = encode(Image.effect_noise((120, 90), 60).convert("RGB"), "JPEG")
    good = [
        ("red.png", encode(Image.new("RGB", (64, 48), (200, 30, 30)))),
        ("deep.png", encode(Image.fromarray((np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)))),
        ("print.jpg", encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG")),
        ("logo.png", encode(Image.new("RGBA", (40, 40), (0, 0, 255, 100)))),
        ("grey.png", encode(Image.new("L", (40, 40), 90))),
        ("palette.png", encode(Image.new("RGB", (40, 40), (10, 200, 30)).convert("P"))),
        ("anim.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:])),
        ("phone.jpg", encode(Image.new("RGB", (60, 30), "white"), "JPEG", exif=rotated.tobytes())),
    ]
    bad = [
        ("notes.png", b"hello, I am text"),
        ("empty.png", b""),
        ("cut.jpg", photo[: len(photo) // 2]),
        ("bomb.png", encode(Image.new("1", (20_000, 20_000)))),
    ]
    return good[:4] + bad + good[4:], [name for name, _ in bad]


def test_one_batch_with_every_bad_input_refuses_each_by_name_and_classifies_the_rest(app_env, standin_dir):
    files, refused = every_input_of_the_issue()
    at = open_page("app_pages/hotdog.py")
    uploader = at.file_uploader(key="hotdog:upload")
    for name, data in files:
        uploader.upload(name, data, "image/png")
    at.run()
    assert not at.exception
    errors = [error.value for error in at.error]
    assert len(errors) == len(refused) and all(any(name in error for error in errors) for name in refused)
    table = at.dataframe[0].value
    assert list(table["file"]) == [name for name, _ in files if name not in refused]  # the rest ran, in order
    assert set(table["label"]) <= standin_labels(standin_dir) and table["score"].between(0.5, 1).all()
    assert list(table.columns) == ["thumbnail", "file", "label", "score"]
    assert all(str(url).startswith("data:image/png;base64,") for url in table["thumbnail"])
    assert at.get("download_button")[0].proto.label == "Download results (CSV)"
    assert any("8 image(s) in" in caption.value and "one batched call" in caption.value for caption in at.caption)
    assert len(at.subheader) == 1 + 8  # "All images", then one verdict per classified image
    captions = [image.proto.imgs[0].caption for image in at.get("image")]
    assert "anim.gif (first frame of 3)" in captions and "phone.jpg (turned upright from its EXIF orientation)" in captions


def test_empty_upload_gets_a_message_not_a_traceback(app_env):
    at = open_page("app_pages/hotdog.py")
    at.file_uploader(key="hotdog:upload").upload("empty.png", b"", "image/png").run()
    assert not at.exception
    assert "empty.png is empty" in at.error[0].value and "non-empty image" in at.error[0].value
