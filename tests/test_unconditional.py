"""core.tasks.unconditional on the stand-in DDPM model (32x32) on the CPU: grid, seeds, progress, cancel, queue."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from core.config import Settings
from core.errors import BadInputError
from core.gpu.queue import queue_for
from core.models.registry import MODELS
from core.tasks import unconditional
from core.tasks.jobs import Job, JobState
from core.tasks.unconditional import UnconditionalSettings
from helpers import DeviceHolder

CPU = torch.device("cpu")
SMALL = UnconditionalSettings(num_images=4, steps=5, seed=42)
WAIT_S = 60


@pytest.fixture()
def ddpm(manager):
    return manager.get(MODELS["ddpm-butterflies"], allow_standin=True)


def test_a_run_makes_a_grid_of_the_images_asked_for(ddpm):
    result = unconditional.generate(ddpm, SMALL)
    assert [image.image.size for image in result.images] == [(32, 32)] * 4
    assert [image.seed for image in result.images] == [42, 43, 44, 45]
    assert result.grid.size == (64, 64)  # 2 x 2
    np.testing.assert_array_equal(np.asarray(result.grid)[:32, 32:], np.asarray(result.images[1].image))
    assert result.is_standin and result.seconds > 0 and result.peak_memory_bytes is None
    assert np.asarray(result.images[0].image).std() > 0


def test_same_seed_same_images_and_image_i_alone(ddpm):
    batch = unconditional.generate(ddpm, SMALL)
    again = unconditional.generate(ddpm, SMALL)
    third_alone = unconditional.generate(ddpm, replace(SMALL, num_images=1, seed=44))
    for a, b in zip(batch.images, again.images, strict=True):
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    np.testing.assert_array_equal(np.asarray(batch.images[2].image), np.asarray(third_alone.images[0].image))
    assert not np.array_equal(np.asarray(batch.images[0].image), np.asarray(batch.images[1].image))


def test_no_seed_draws_one_and_reports_it(ddpm):
    result = unconditional.generate(ddpm, replace(SMALL, seed=None))
    assert result.settings.seed is not None and result.images[0].seed == result.settings.seed


def test_progress_and_a_preview_of_the_grid(ddpm):
    job = Job(lambda context: unconditional.generate(ddpm, SMALL, context), "ddpm")
    assert job.wait(WAIT_S)
    snapshot = job.snapshot()
    assert snapshot.state is JobState.DONE and snapshot.done == snapshot.total == 5
    assert snapshot.detail.startswith("step 5 of 5 · ") and snapshot.preview.size == (64, 64)


def test_cancel_mid_run_drops_the_images_and_frees_the_device(ddpm):
    checks = []

    def cancel_at_third_check() -> bool:
        checks.append(1)
        if len(checks) == 3:
            job.cancel()
        return False

    job = Job(lambda context: unconditional.generate(ddpm, replace(SMALL, steps=50), context, abandoned=cancel_at_third_check), "ddpm")
    assert job.wait(WAIT_S)
    assert job.snapshot().state is JobState.CANCELLED and job.result is None and job.snapshot().done < 50
    assert len(queue_for(CPU)) == 0


def test_it_takes_turns_with_other_generations_on_the_device(ddpm):
    holder = DeviceHolder(WAIT_S)
    first = Job(lambda context: unconditional.generate(ddpm, SMALL, context, abandoned=holder.abandoned), "first")
    assert holder.running.wait(WAIT_S)
    second = Job(lambda context: unconditional.generate(ddpm, SMALL, context), "second")
    while "next in line" not in second.snapshot().detail:
        assert not second.wait(0.01)
    holder.release.set()
    assert first.wait(WAIT_S) and second.wait(WAIT_S) and second.snapshot().state is JobState.DONE


@pytest.mark.parametrize(
    ("change", "message"),
    [({"num_images": 0}, "`num_images` has to be between 1 and 64 but is 0"),
     ({"steps": 1001}, "`steps` has to be between 1 and 1000 but is 1001"),
     ({"steps": 2.5}, "`steps` has to be a whole number"),
     ({"seed": -1}, "`seed` has to be between")],
)
def test_bad_inputs_are_refused(ddpm, change, message):
    with pytest.raises(BadInputError) as caught:
        unconditional.generate(ddpm, replace(SMALL, **change))
    assert message in str(caught.value)


@pytest.mark.parametrize(("choice", "custom", "key"), [("ddpm-cifar10", "", "ddpm-cifar10"), ("custom", "someone/ddpm-x", "ddpm-butterflies@someone/ddpm-x")])
def test_model_choice(choice, custom, key):
    assert unconditional.model_spec_for(choice, custom, Settings()).key == key
    assert MODELS["ddpm-cifar10"].repo_id == "google/ddpm-cifar10-32"


@pytest.mark.parametrize("custom", ["", "../x", "/no/such/folder"])
def test_a_bad_custom_model_is_refused(custom, tmp_path):
    with pytest.raises(BadInputError):
        unconditional.model_spec_for("custom", custom, Settings(models_root=tmp_path))
