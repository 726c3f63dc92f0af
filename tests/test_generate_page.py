"""The image generation page through AppTest, on the stand-in SD pipeline (64x64, a few steps)."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app_pages.common import literal
from core.app_state import get_job_board
from core.tasks import generation, pnginfo, sd_settings
from core.tasks.sd_settings import GenerationSettings
from helpers import wait_for_generation_runs

HOME = str(Path(__file__).resolve().parent.parent / "Home.py")
WAIT_S = 60


def key(name: str) -> str:
    return f"generate:{name}"


def open_page(**form) -> AppTest:
    """The page with a small, fast run set up in the form (the seed fixed unless `random_seed` is given)."""
    at = AppTest.from_file(HOME, default_timeout=WAIT_S).run()
    at.switch_page("app_pages/generate.py").run()
    assert not at.exception, at.exception
    at.toggle(key=key("random_seed")).set_value("seed" not in form).run()  # a fixed seed's box is enabled once it is off
    for name, value in {"width": 64, "height": 64, "steps": 3, **form}.items():
        if name in ("prompt", "negative"):
            at.text_area(key=key(name)).input(value)
        else:
            at.number_input(key=key(name)).set_value(value)
    return at.run()


def generate(at: AppTest) -> AppTest:
    """Press Generate, let the background job end, and rerun as the page's fragment does when it sees the end."""
    at.button(key=key("start")).click().run()
    wait_for_generation_runs(at, WAIT_S)
    return at.run()


def texts(at: AppTest) -> str:
    return " ".join(str(element.value) for kind in ("success", "warning", "info", "error", "caption", "markdown") for element in getattr(at, kind))


def test_a_run_shows_the_image_its_seed_and_writes_the_settings_into_the_png(app_env):
    at = generate(open_page(prompt="a lighthouse at dawn", negative="fog", seed=42))
    assert not at.exception and not at.error
    assert "1 image in" in at.success[0].value and "seed 42" in at.success[0].value
    images = at.get("image")
    assert len(images) == 2  # the latest result, and its entry in the gallery
    assert all("Seed 42" in str(image.proto) for image in images)
    gallery = at.session_state[key("gallery")]
    assert len(gallery) == 1 and [image.seed for image in gallery[0].result.images] == [42]
    text = pnginfo.read_parameters(gallery[0].pngs[0])
    assert text.startswith("a lighthouse at dawn\nNegative prompt: fog\n")
    assert "Steps: 3" in text and "Seed: 42" in text and "Size: 64x64" in text and "Sampler: PLMS" in text
    assert [button.proto.label for button in at.get("download_button")] == ["Download all (zip)", "PNG"]
    assert "stand-in model" in texts(at)
    assert "steps: eager" in texts(at)  # which path served the run (on a GPU: "compiled + CUDA graph" once compiled)


def test_random_seed_is_shown_and_reuse_fills_the_form(app_env):
    at = generate(open_page(prompt="a cat"))
    seed = at.session_state[key("gallery")][0].result.settings.seed
    assert f"seed {seed}" in at.success[0].value
    at.button(key=key("reuse:1:0")).click().run()
    assert at.toggle(key=key("random_seed")).value is False
    assert at.number_input(key=key("seed")).value == seed and at.text_area(key=key("prompt")).value == "a cat"


def test_the_gallery_keeps_runs_newest_first(app_env):
    at = generate(open_page(prompt="first", seed=1))
    at.text_area(key=key("prompt")).input("second")
    at.number_input(key=key("num_images")).set_value(2)
    at = generate(at.run())
    gallery = at.session_state[key("gallery")]
    assert [entry.result.settings.prompt for entry in gallery] == ["second", "first"]
    assert [entry.number for entry in gallery] == [2, 1] and len(gallery[0].pngs) == 2


@pytest.mark.parametrize(
    ("form", "message"),
    [({"width": 500}, "`width` has to be a multiple of 8 but is 500"), ({"height": 100}, "`height` has to be a multiple of 8 but is 100")],
)
def test_bad_settings_get_a_message_and_no_run(app_env, form, message):
    at = open_page(**form)
    at.button(key=key("start")).click().run()
    assert not at.session_state[key("runs")]
    assert any(literal(message) in error.value for error in at.error)


def test_cancel_while_waiting_drops_the_run_and_says_so(app_env, monkeypatch):
    release = threading.Event()
    real_generate = generation.generate

    def held(*args, **kwargs):  # the run waits here, as behind another session's run in the GPU queue
        release.wait(WAIT_S)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", held)
    at = open_page(prompt="never finished", seed=3)
    at.button(key=key("start")).click().run()
    assert at.get("progress") and not at.button(key=key("start")).disabled  # more runs may be added meanwhile
    (job_id,) = at.session_state[key("runs")]
    at.button(key=key(f"cancel:{job_id}")).click().run()
    release.set()
    assert get_job_board().wait(job_id, WAIT_S)
    at.run()
    assert any("Cancelled" in info.value for info in at.info)
    assert key("gallery") not in at.session_state and not at.session_state[key("runs")]


def test_dropping_a_png_fills_the_form_with_its_settings(app_env):
    settings = GenerationSettings(prompt="from a png", negative_prompt="no text", steps=7, guidance_scale=5.5, width=72, height=96,
                                  seed=123456, scheduler="Euler a")
    png = pnginfo.png_bytes(generation.latent_preview(__import__("torch").zeros(1, 4, 8, 8)), settings, "CompVis/stable-diffusion-v1-4", is_standin=False)
    at = AppTest.from_file(HOME, default_timeout=WAIT_S).run()
    at.switch_page("app_pages/generate.py").run()
    at.file_uploader(key=key("png")).upload("earlier.png", png, "image/png").run()
    assert not at.exception
    assert at.text_area(key=key("prompt")).value == "from a png" and at.text_area(key=key("negative")).value == "no text"
    assert at.number_input(key=key("steps")).value == 7 and at.number_input(key=key("guidance")).value == 5.5
    assert (at.number_input(key=key("width")).value, at.number_input(key=key("height")).value) == (72, 96)
    assert at.number_input(key=key("seed")).value == 123456 and at.toggle(key=key("random_seed")).value is False
    assert at.selectbox(key=key("scheduler")).value == "Euler a" and at.selectbox(key=key("model")).value == "sd14"


def test_a_png_without_settings_gets_a_message(app_env):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    at = AppTest.from_file(HOME, default_timeout=WAIT_S).run()
    at.switch_page("app_pages/generate.py").run()
    at.file_uploader(key=key("png")).upload("plain.png", buffer.getvalue(), "image/png").run()
    assert any("carries no generation settings" in error.value for error in at.error)


def test_a_bad_custom_model_id_is_refused_with_a_message(app_env):
    at = AppTest.from_file(HOME, default_timeout=WAIT_S).run()
    at.switch_page("app_pages/generate.py").run()
    at.selectbox(key=key("model")).select("custom").run()
    at.text_input(key=key("custom")).input("not a repo id").run()
    assert any("is not a Hub repo id" in error.value for error in at.error)


# Image to image, inpaint, LoRA, DreamBooth, DDPM -------------------------------------------------------------

def png_of(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(width: int = 64, height: int = 64):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels_of(at: AppTest, run: int = 0):
    import numpy as np

    return np.asarray(at.session_state[key("gallery")][run].result.images[0].image)


def test_image_to_image_from_the_gallery_records_mode_and_strength(app_env):
    at = generate(open_page(prompt="a boat", seed=5))
    at.radio(key=key("mode")).set_value("image to image").run()
    at.radio(key=key("source_origin")).set_value("From the gallery").run()
    assert at.selectbox(key=key("source_gallery")).value == "Run 1 · seed 5"
    at.slider(key=key("strength")).set_value(0.5)
    at = generate(at.run())
    assert not at.exception and not at.error
    entry = at.session_state[key("gallery")][0]
    assert entry.result.settings.mode.value == "image to image" and entry.result.settings.strength == 0.5
    text = pnginfo.read_parameters(entry.pngs[0])
    assert "Mode: image to image" in text and "Denoising strength: 0.5" in text
    assert "image to image" in texts(at) and at.text_area(key=key("prompt")).value == "a boat"


def test_image_to_image_needs_an_image_and_says_so(app_env):
    at = open_page(prompt="x", seed=1)
    at.radio(key=key("mode")).set_value("image to image").run()
    at.button(key=key("start")).click().run()
    assert any("needs an input image" in error.value for error in at.error) and not at.session_state[key("runs")]


def test_inpaint_with_an_uploaded_image_of_another_size_and_a_drawn_mask(app_env):
    at = open_page(prompt="a red door", seed=9)
    at.radio(key=key("mode")).set_value("inpaint").run()
    at.file_uploader(key=key("source_upload")).upload("photo.png", png_of(picture(100, 80)), "image/png").run()
    assert any("red is repainted" in str(image.proto) for image in at.get("image"))
    at = generate(at)
    assert not at.exception and not at.error
    result = at.session_state[key("gallery")][0].result
    assert result.settings.mode.value == "inpaint" and result.images[0].image.size == (64, 64)
    assert any("resized to 64x64" in warning.value for warning in at.warning)


def test_inpaint_with_a_mask_of_the_wrong_size_gets_a_message_and_keeps_the_gallery(app_env):
    at = generate(open_page(prompt="first", seed=2))
    at.radio(key=key("mode")).set_value("inpaint").run()
    at.file_uploader(key=key("source_upload")).upload("photo.png", png_of(picture(64, 64)), "image/png").run()
    at.radio(key=key("mask_origin")).set_value("Upload a mask").run()
    at.file_uploader(key=key("mask_upload")).upload("mask.png", png_of(picture(32, 32)), "image/png").run()
    at.button(key=key("start")).click().run()
    assert any("The mask is 32x32 pixels but the image is 64x64" in error.value for error in at.error)
    assert not at.session_state[key("runs")] and len(at.session_state[key("gallery")]) == 1


def test_a_lora_changes_only_this_sessions_images(app_env, standin_dir, tmp_path, monkeypatch):
    from core.models import standins
    from core.models.registry import MODELS
    from helpers import make_standin_lora

    monkeypatch.setenv("DASH_MODELS_ROOT", str(tmp_path))  # a typed LoRA folder must lie inside the models root
    make_standin_lora(standins.ensure_built(MODELS["sd15"], standin_dir), tmp_path / "my-style")
    mine = generate(open_page(prompt="a hill", seed=42))
    base = pixels_of(mine)
    mine.text_input(key=key("lora_source")).input(str(tmp_path / "my-style"))
    mine.button(key=key("lora_add")).click().run()
    assert not mine.error and "my-style" in texts(mine)
    mine = generate(mine)
    assert mine.session_state[key("gallery")][0].result.settings.loras == (("my-style", 1.0),)
    assert (pixels_of(mine) != base).any()
    assert 'LoRA: "my-style:1"' in pnginfo.read_parameters(mine.session_state[key("gallery")][0].pngs[0])
    other_session = generate(open_page(prompt="a hill", seed=42))
    assert (pixels_of(other_session) == base).all()  # the same model, without this session's adapter


def test_a_lora_that_is_not_safetensors_is_refused_with_a_message(app_env):
    at = open_page(prompt="x")
    at.file_uploader(key=key("lora_upload")).upload("style.ckpt", b"pickled", "application/octet-stream").run()
    assert any("not a .safetensors file" in error.value for error in at.error)
    assert key("loras") not in at.session_state or at.session_state[key("loras")] == []


def test_a_dreambooth_models_trigger_phrase_is_shown_and_added_to_the_prompt(app_env, standin_dir, tmp_path, monkeypatch):
    import shutil

    from core.models import standins
    from core.models.registry import MODELS

    monkeypatch.setenv("DASH_MODELS_ROOT", str(tmp_path))  # a typed model folder must lie inside the models root
    folder = tmp_path / "potato"
    shutil.copytree(standins.ensure_built(MODELS["sd15"], standin_dir), folder)
    (folder / "README.md").write_text("It can be used by modifying the `instance_prompt`: **sks mr potato head**\n")
    at = open_page(prompt="on a beach")
    at.selectbox(key=key("model")).select("custom").run()
    at.text_input(key=key("custom")).input(str(folder)).run()
    assert any("sks mr potato head" in info.value for info in at.info)
    at.button(key=key("add_phrase")).click().run()
    assert at.text_area(key=key("prompt")).value == "sks mr potato head, on a beach"


def test_unconditional_ddpm_makes_a_grid_into_the_gallery(app_env):
    at = open_page(prompt="kept", seed=7)
    at.radio(key=key("mode")).set_value("unconditional (DDPM)").run()
    at.number_input(key=key("ddpm_images")).set_value(4)
    at.number_input(key=key("ddpm_steps")).set_value(5)
    at = generate(at.run())
    assert not at.exception and not at.error
    result = at.session_state[key("gallery")][0].result
    assert [image.seed for image in result.images] == [7, 8, 9, 10] and result.grid.size == (64, 64)
    assert "Steps: 5, Seed: 7" in pnginfo.read_parameters(at.session_state[key("gallery")][0].pngs[0])
    assert "4 images in" in at.success[0].value
    at.radio(key=key("mode")).set_value("text to image").run()
    assert at.text_area(key=key("prompt")).value == "kept"  # switching modes loses nothing


def test_a_run_too_large_for_the_memory_is_refused_with_the_figures_and_never_starts(app_env):
    at = open_page(prompt="too large", seed=5, width=2048, height=2048, num_images=8)
    at.button(key=key("start")).click().run()
    assert not at.session_state[key("runs")]  # no job started
    assert len(at.error) == 1
    message = at.error[0].value
    assert "8 image(s) of 2048x2048" in message and "need about" in message and "GiB" in message and "available" in message
    assert "smaller size" in message and "fewer images per run" in message and "memory mode" in message


def test_on_the_cpu_the_form_starts_small_and_says_why_even_for_the_stand_in(app_env):
    at = AppTest.from_file(HOME, default_timeout=WAIT_S).run()
    at.switch_page("app_pages/generate.py").run()
    cpu = sd_settings.CPU_DEFAULTS
    assert (at.number_input(key=key("width")).value, at.number_input(key=key("steps")).value) == (cpu.width, cpu.steps)
    assert any("stand-in" in warning.value and "runs on the CPU" in warning.value and f"{cpu.width}×{cpu.height}" in warning.value for warning in at.warning)


def test_a_cancel_calls_the_device_free_only_when_no_other_run_holds_it(app_env):
    from core.gpu.queue import queue_for

    holding, release = threading.Event(), threading.Event()

    def other_session_run() -> None:
        with queue_for("cpu").slot():
            holding.set()
            release.wait(WAIT_S)

    other = threading.Thread(target=other_session_run)
    other.start()
    try:
        assert holding.wait(WAIT_S)
        at = open_page(prompt="behind another run", seed=4)
        at.button(key=key("start")).click().run()
        (job_id,) = at.session_state[key("runs")]
        at.button(key=key(f"cancel:{job_id}")).click().run()
        assert get_job_board().wait(job_id, WAIT_S)
        at.run()
        cancelled = [info.value for info in at.info if "Cancelled" in info.value]
        assert cancelled and "free" not in cancelled[0] and "went to the next run" in cancelled[0]
    finally:
        release.set()
        other.join(WAIT_S)
    at.button(key=key("start")).click().run()  # the device free again: a new run says so when cancelled
    (job_id,) = at.session_state[key("runs")]
    at.button(key=key(f"cancel:{job_id}")).click().run()
    assert get_job_board().wait(job_id, WAIT_S)
    assert any("is free" in info.value for info in at.run().info)
