"""Faults injected one at a time: each gives the session concerned one clear message, frees what it held, and leaves
the other models, the other sessions and the next request working (issue 10)."""
from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.errors import GpuOutOfMemoryError, ModelUnavailableError
from core.gpu.queue import queue_for
from core.models import standins
from core.models.manager import ModelManager, ModelState
from core.models.registry import MODELS
from core.tasks import generation
from core.tasks.sd_settings import GenerationSettings

HOME = str(Path(__file__).resolve().parent.parent / "Home.py")
SMALL = GenerationSettings(prompt="a red bicycle", width=64, height=64, steps=3, seed=1234)


def broken_copy(standin_dir: Path, tmp_path: Path, key: str, damage) -> Path:
    """A copy of `key`'s stand-in folder in Hub layout, damaged by `damage(folder)`."""
    folder = tmp_path / key
    shutil.copytree(standins.ensure_built(MODELS[key], standin_dir), folder)
    damage(folder)
    return folder


def corrupt(path: Path) -> None:
    path.write_bytes(b"\x00" * 64 + path.read_bytes()[64:])  # the safetensors header is gone


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "corrupt safetensors header": lambda folder: corrupt(next(folder.rglob("*.safetensors"))),
    "truncated safetensors": lambda folder: truncate(max(folder.rglob("*.safetensors"), key=lambda p: p.stat().st_size)),
    "missing weights file": lambda folder: next(folder.rglob("*.safetensors")).unlink(),
    "missing config": lambda folder: next(folder.rglob("config.json")).unlink(),
}


@pytest.mark.parametrize("key", ["hotdog", "sentiment", "sd15"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_load_that_fails_half_way_is_a_clear_failure_and_the_rest_keeps_working(settings, standin_dir, tmp_path, monkeypatch, key, damage):
    folder = broken_copy(standin_dir, tmp_path, key, DAMAGES[damage])
    manager = ModelManager(replace(settings, model_folders=((key.upper(), folder),)))  # DASH_MODEL_<KEY>=folder
    with pytest.raises(ModelUnavailableError) as caught:
        manager.get(MODELS[key])
    message = str(caught.value)
    assert MODELS[key].title in message and "Traceback" not in message and len(message) < 600
    status = {row.key: row for row in manager.status()}[key]
    assert status.state is ModelState.FAILED and status.error and status.memory_bytes in (None, 0)
    other = "sentiment" if key != "sentiment" else "hotdog"
    assert manager.get(MODELS[other], allow_standin=True).obj is not None  # another model still loads
    shutil.rmtree(folder)
    shutil.copytree(standins.ensure_built(MODELS[key], standin_dir), folder)  # the operator repairs the folder
    assert manager.get(MODELS[key]).obj is not None  # the next request works
    assert {row.key: row for row in manager.status()}[key].state is ModelState.READY


def test_a_broken_model_gives_one_message_on_its_page_and_the_stand_in_way_out_works(app_env, standin_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DASH_MODEL_HOTDOG", str(broken_copy(standin_dir, tmp_path, "hotdog", DAMAGES["truncated safetensors"])))
    monkeypatch.delenv("DASH_STANDIN_FALLBACK")  # the user has not asked for the stand-in
    at = AppTest.from_file(HOME, default_timeout=60).run()
    at.switch_page("app_pages/hotdog.py").run()
    at.radio(key="hotdog:source").set_value("Samples").run()
    assert not at.exception
    assert len(at.error) == 1 and "Hot dog or not" in at.error[0].value and "What to do:" in at.error[0].value
    at.button(key="standin_button:hotdog").click().run()  # the way out the message offers
    assert not at.exception and not at.error and "random weights" in at.warning[0].value
    at.switch_page("app_pages/sentiment.py").run()  # another page hears nothing of the hot dog's fault
    assert not at.exception and all("Hot dog" not in error.value for error in at.error)


def test_out_of_memory_mid_generation_on_the_page_keeps_the_gallery_and_the_next_run_works(app_env, monkeypatch):
    from test_generate_page import generate, key, open_page

    at = generate(open_page(prompt="first", seed=1))
    calls = []
    real_forward = torch.nn.Conv2d.forward

    def out_of_memory_at_the_second_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 40:  # some way into the run, not at its start
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.Conv2d, "forward", out_of_memory_at_the_second_step)
        at = generate(at)
    assert not at.exception
    assert any("ran out of memory" in error.value and "memory mode" in error.value for error in at.error)
    assert len(at.session_state[key("gallery")]) == 1  # what was shown is still there
    assert len(queue_for(torch.device("cpu"))) == 0
    at = generate(at)
    assert not at.error and len(at.session_state[key("gallery")]) == 2


def test_out_of_memory_in_one_run_does_not_touch_a_run_queued_behind_it(manager, monkeypatch):
    import threading

    from core.tasks.jobs import Job, JobState

    sd = manager.get(MODELS["sd15"], allow_standin=True)
    expected = np.asarray(generation.generate(sd, SMALL).images[0].image)
    inside, release = threading.Event(), threading.Event()
    real_forward = sd.obj.unet.forward

    def held_then_out_of_memory(*args, **kwargs):
        inside.set()
        assert release.wait(60)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(sd.obj.unet, "forward", held_then_out_of_memory)
    failing = Job(lambda context: generation.generate(sd, replace(SMALL, seed=5), context), "failing")
    assert inside.wait(60)  # the failing run is in its UNet call, holding the device
    queued = Job(lambda context: generation.generate(sd, SMALL, context), "queued")
    while "next in line" not in queued.snapshot().detail:
        assert not queued.wait(0.01)
    monkeypatch.setattr(sd.obj.unet, "forward", real_forward)  # the other run will have memory
    release.set()
    assert failing.wait(60) and queued.wait(60)
    assert failing.snapshot().state is JobState.FAILED and isinstance(failing.snapshot().error, GpuOutOfMemoryError)
    assert queued.snapshot().state is JobState.DONE
    np.testing.assert_array_equal(np.asarray(queued.result.images[0].image), expected)


@pytest.mark.parametrize(
    ("status", "expected"),
    [(401, r"token|private"), (403, r"gated|licence|token"), (404, r"no repo"), ("timeout", r"could not be reached")],
)
def test_hub_answers_are_clear_messages_on_the_page(app_env, monkeypatch, status, expected):
    import httpx2 as httpx  # huggingface_hub 2.x speaks HTTP through httpx2
    from huggingface_hub import errors as hub_errors

    def hub_fails(*args, **kwargs):
        if status == "timeout":
            raise httpx.ConnectTimeout("timed out")
        response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))
        error = {401: hub_errors.RepositoryNotFoundError, 403: hub_errors.GatedRepoError, 404: hub_errors.RepositoryNotFoundError}[status]
        raise error(f"{status} Client Error", response=response)

    from core.models import loading

    monkeypatch.setattr(loading, "_load_transformers", hub_fails)  # what transformers raises when the Hub answers so
    monkeypatch.delenv("DASH_STANDIN_FALLBACK")
    at = AppTest.from_file(HOME, default_timeout=60).run()
    at.switch_page("app_pages/sentiment.py").run()
    assert not at.exception and len(at.error) == 1
    assert re.search(expected, at.error[0].value, re.IGNORECASE), at.error[0].value
    at.switch_page("app_pages/imagenet.py").run()  # torch.hub models are untouched by the Hub's answer
    assert not at.exception
