"""The generation page's inpaint input (issue 19.2) through AppTest: a painted mask and an extended canvas reach the
run, the extended canvas sets the run's size, and switching between the mask options loses nothing."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from test_generate_page import generate, key, open_page, picture, png_of

from app_pages import mask_painter
from helpers import wait_for_generation_runs


def inpaint_page(**form):
    at = open_page(**form)
    at.radio(key=key("mode")).set_value("inpaint").run()
    at.file_uploader(key=key("source_upload")).upload("photo.png", png_of(picture(64, 64)), "image/png").run()
    assert not at.exception and not at.error
    return at


def painted_payload(size: tuple[int, int]) -> str:
    """What the painter's browser side reports: a PNG data URL whose alpha is the mask (here its left half)."""
    canvas = Image.new("RGBA", size, (0, 0, 0, 0))
    canvas.paste((255, 0, 0, 255), (0, 0, size[0] // 2, size[1]))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def test_a_painted_mask_is_the_runs_mask(app_env, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(mask_painter, "_component", lambda **_arguments: {"mask": painted_payload((64, 64))})
    at = inpaint_page(prompt="a red door", seed=9)
    at.radio(key=key("mask_origin")).set_value("Paint").run()
    at.button(key=key("start")).click().run()
    assert not at.error and wait_for_generation_runs(at, 60)  # the painted mask was accepted: the run was queued
    at = at.run()
    assert not at.exception and not at.error
    assert at.session_state[key("gallery")][0].result.settings.mode.value == "inpaint"


def test_nothing_painted_is_refused_as_no_mask(app_env, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(mask_painter, "_component", lambda **_arguments: {})
    at = inpaint_page(prompt="a red door", seed=9)
    at.radio(key=key("mask_origin")).set_value("Paint").run()
    at.button(key=key("start")).click().run()
    assert not at.session_state[key("runs")] and any("Inpaint needs a mask" in error.value for error in at.error)


def test_extending_the_canvas_sets_the_runs_size_and_repaints_the_new_area(app_env):
    at = inpaint_page(prompt="a wide beach", seed=4)
    at.radio(key=key("mask_origin")).set_value("Extend the canvas").run()
    at.number_input(key=key("outpaint_right")).set_value(64).run()
    assert not at.exception and not at.error
    assert at.number_input(key=key("width")).value == 128 and at.number_input(key=key("height")).value == 64
    assert any("128×64 · red is repainted" in str(image.proto) for image in at.get("image"))
    at = generate(at)
    assert not at.exception and not at.error and not any("resized" in warning.value for warning in at.warning)
    result = at.session_state[key("gallery")][0].result
    assert result.images[0].image.size == (128, 64) and result.settings.mode.value == "inpaint"


def test_amounts_that_extend_nothing_or_not_by_eights_get_one_message(app_env):
    at = inpaint_page(prompt="x", seed=4)
    at.radio(key=key("mask_origin")).set_value("Extend the canvas").run()
    assert [error.value.split("\n\n")[0] for error in at.error] == ["Nothing to outpaint: \\`left\\`, \\`right\\`, \\`top\\` and \\`bottom\\` are all 0."]
    at.button(key=key("start")).click().run()
    assert not at.session_state[key("runs")] and not at.exception


def test_switching_mask_options_and_modes_loses_nothing(app_env, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(mask_painter, "_component", lambda **_arguments: {})
    at = inpaint_page(prompt="kept", seed=4)
    at.selectbox(key=key("mask_shape")).set_value("ellipse")
    at.slider(key=key("mask_x")).set_value((10, 40)).run()
    at.radio(key=key("mask_origin")).set_value("Extend the canvas").run()
    at.number_input(key=key("outpaint_top")).set_value(32)
    at.selectbox(key=key("outpaint_fill")).set_value("noise")
    at.number_input(key=key("outpaint_overlap")).set_value(8).run()
    for option in ("Paint", "Upload a mask", "Draw a shape"):
        at.radio(key=key("mask_origin")).set_value(option).run()
    assert at.selectbox(key=key("mask_shape")).value == "ellipse" and at.slider(key=key("mask_x")).value == (10, 40)
    at.radio(key=key("mode")).set_value("text to image").run()
    at.radio(key=key("mode")).set_value("inpaint").run()
    assert at.session_state[key("outpaint_top")] == 32  # kept through a run without the picture (an upload is not)
    at.file_uploader(key=key("source_upload")).upload("photo.png", png_of(picture(64, 64)), "image/png").run()
    assert not at.exception and at.radio(key=key("mask_origin")).value == "Draw a shape"
    assert at.selectbox(key=key("mask_shape")).value == "ellipse" and at.slider(key=key("mask_x")).value == (10, 40)
    at.radio(key=key("mask_origin")).set_value("Extend the canvas").run()
    assert (at.number_input(key=key("outpaint_top")).value, at.selectbox(key=key("outpaint_fill")).value, at.number_input(key=key("outpaint_overlap")).value) == (32, "noise", 8)
    assert at.text_area(key=key("prompt")).value == "kept"
