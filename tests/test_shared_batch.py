"""core.shared_batch on the tiny stand-in SD pipeline (64x64, a few steps) on the CPU, in float32.

Requests are made to start together with `SharedDenoiser.held()`, and to join or cancel at a chosen step from their
own progress callback (which runs on the worker between steps): no test waits on time.
"""
from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from core.accel import Acceleration
from core.errors import GpuOutOfMemoryError
from core.gpu.queue import queue_for
from core.models.registry import MODELS
from core.tasks import generation, sd_pipeline, sd_settings, shared_batch
from core.tasks.generation import StepReporter
from core.tasks.jobs import JobCancelled
from core.tasks.sd_settings import GenerationSettings
from core.tasks.shared_batch import DenoiseRequest, SharedDenoiser

CPU = torch.device("cpu")
WAIT_S = 120
# Batching changes the UNet's GEMM and convolution shapes, and fp32 kernels on the CPU may then add in another order:
# an image may move by one level of 255 in a pixel (measured: 0 or 1, see docs/BATCHING.md). Any real difference in
# what a request computes (another noise, timestep, prompt or guidance) moves pixels by tens of levels.
PIXEL_TOLERANCE = 1

RED = DenoiseRequest("a red bicycle", seeds=(1,), steps=5, guidance_scale=7.5, scheduler="PNDM", width=64, height=64)
BOAT = DenoiseRequest("a blue boat", "blurry", seeds=(2,), steps=4, guidance_scale=3.0, scheduler="DDIM", width=64, height=64)
TREE = DenoiseRequest("a green tree", seeds=(3,), steps=4, guidance_scale=1.0, scheduler="Euler a", width=64, height=64)
CATS = DenoiseRequest("two cats", seeds=(4, 5), steps=5, guidance_scale=9.0, scheduler="DPM++ 2M Karras", width=64, height=64)


@pytest.fixture()
def sd(manager):
    return manager.get(MODELS["sd15"], allow_standin=True)


@pytest.fixture()
def denoiser(sd):
    return SharedDenoiser(sd.obj, sd.device, collect_window_s=0)


@pytest.fixture()
def unpadded(sd):
    """A denoiser that calls the UNet on the real rows only: the tests that count rows see each request's."""
    return SharedDenoiser(sd.obj, sd.device, collect_window_s=0, buckets=())


@pytest.fixture()
def unet_rows(sd):
    """The sample shape of every UNet call, as the UNet saw it (after padding)."""
    shapes: list[tuple[int, ...]] = []
    handle = sd.obj.unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    yield shapes
    handle.remove()


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def largest_difference(first, second) -> int:
    """The largest pixel difference between two results' images, in levels of 255."""
    assert len(first.images) == len(second.images)
    return max(int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(first.images, second.images, strict=True))


def alone(denoiser: SharedDenoiser, request: DenoiseRequest):
    return denoiser.submit(request).result(WAIT_S)


def together(denoiser: SharedDenoiser, *requests: DenoiseRequest) -> list:
    with denoiser.held():
        futures = [denoiser.submit(request) for request in requests]
    return [future.result(WAIT_S) for future in futures]


def diffusers_images(sd, request: DenoiseRequest) -> list:
    """The same run through diffusers' own StableDiffusionPipeline call, seeded as generation.generate seeds it."""
    pipe = StableDiffusionPipeline(**sd.obj.components, requires_safety_checker=False)
    pipe.scheduler = sd_pipeline.build_scheduler(sd.obj, request.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        request.prompt, negative_prompt=request.negative_prompt or None, num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
        width=request.width, height=request.height, num_images_per_prompt=len(request.seeds),
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in request.seeds],
    ).images


def test_requests_made_together_match_their_solo_runs_and_diffusers_own_pipeline(sd, denoiser, unet_rows):
    requests = (RED, BOAT, TREE, CATS)
    solo = [alone(denoiser, request) for request in requests]
    unet_rows.clear()
    shared = together(denoiser, *requests)
    # 2 + 2 + 1 + 4 rows (the tree runs without guidance) in one call, padded to the 16-row bucket, while all four run
    assert unet_rows[0][0] == 16 and len(unet_rows) == 6  # PNDM's 6 model calls for 5 steps set the length
    for request, one, many in zip(requests, solo, shared, strict=True):
        assert largest_difference(one, many) <= PIXEL_TOLERANCE, request.scheduler
        reference = diffusers_images(sd, request)
        assert max(int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(one.images, reference, strict=True)) == 0, request.scheduler
        assert pixels(many.images[0]).std() > 10  # a picture, not a flat fill
    assert len({pixels(result.images[0]).tobytes() for result in shared}) == 4  # each request its own image


def test_a_request_that_joins_at_a_later_step_gets_its_solo_image(unpadded, unet_rows):
    denoiser = unpadded
    solo_red, solo_boat = alone(denoiser, RED), alone(denoiser, BOAT)
    unet_rows.clear()
    joined: list = []

    def join_after_step_two(done, preview):
        if done == 2 and not joined:
            joined.append(denoiser.submit(BOAT))

    red = denoiser.submit(replace(RED, on_step=join_after_step_two)).result(WAIT_S)
    boat = joined[0].result(WAIT_S)
    # PNDM makes 6 model calls for 5 steps (done counts 1, 2, 2, 3, 4, 5): the boat joined at call 3 and its 4 steps
    # ended with the bicycle's
    assert [shape[0] for shape in unet_rows] == [2, 2, 4, 4, 4, 4]
    assert largest_difference(solo_red, red) <= PIXEL_TOLERANCE
    assert largest_difference(solo_boat, boat) <= PIXEL_TOLERANCE


def test_cancelling_one_request_leaves_the_others_images_unchanged(unpadded, unet_rows):
    denoiser = unpadded
    solo_red, solo_cats = alone(denoiser, RED), alone(denoiser, CATS)
    unet_rows.clear()
    stop, boat_steps = threading.Event(), []

    def cancel_after_step_two(done, preview):
        boat_steps.append(done)
        if done == 2:
            stop.set()  # the user presses Cancel while the batch runs

    boat = replace(BOAT, steps=20, on_step=cancel_after_step_two, cancelled=stop.is_set)
    with denoiser.held():
        futures = [denoiser.submit(request) for request in (RED, boat, CATS)]
    with pytest.raises(JobCancelled):
        futures[1].result(WAIT_S)
    red, cats = futures[0].result(WAIT_S), futures[2].result(WAIT_S)
    assert boat_steps == [1, 2]  # dropped at the next step boundary, 18 steps before its end
    # 2 + 2 + 4 rows, then the boat's 2 are gone; the cats' 5 steps end before the bicycle's 6 PNDM calls
    assert [shape[0] for shape in unet_rows] == [8, 8, 6, 6, 6, 2]
    assert largest_difference(solo_red, red) <= PIXEL_TOLERANCE
    assert largest_difference(solo_cats, cats) <= PIXEL_TOLERANCE


def test_a_progress_callback_that_raises_job_cancelled_ends_only_its_request(denoiser):
    def stop_at_first_step(done, preview):  # what StepReporter.step does when its job is cancelled
        raise JobCancelled

    with denoiser.held():
        futures = [denoiser.submit(replace(BOAT, on_step=stop_at_first_step)), denoiser.submit(TREE)]
    with pytest.raises(JobCancelled):
        futures[0].result(WAIT_S)
    assert futures[1].result(WAIT_S).images


def test_each_request_hears_its_own_progress_and_a_preview_of_its_own_latents(denoiser):
    heard: dict[str, list[int]] = {"boat": [], "tree": []}
    previews: dict[str, list] = {"boat": [], "tree": []}

    def listener(name: str):
        def on_step(done, preview):
            heard[name].append(done)
            previews[name].append(preview())
        return on_step

    together(denoiser, replace(BOAT, steps=3, on_step=listener("boat")), replace(TREE, steps=5, on_step=listener("tree")))
    assert heard == {"boat": [1, 2, 3], "tree": [1, 2, 3, 4, 5]}
    # generation.latent_preview of one 32x32 latent image (the stand-in's VAE halves the side)
    assert previews["boat"][-1].size == (32, 32) and previews["tree"][-1].size == (32, 32)
    assert pixels(previews["boat"][-1]).tobytes() != pixels(previews["tree"][-1]).tobytes()


def test_requests_of_another_size_never_share_a_unet_call(denoiser, unet_rows):
    small = replace(BOAT, width=48, height=48, steps=3)
    results = together(denoiser, replace(RED, steps=3), replace(TREE, steps=3), small)
    sizes = [shape[2:] for shape in unet_rows]
    assert set(sizes) == {(32, 32), (24, 24)}
    # the bicycle and the tree (2 + 1 rows, padded to 4) share their calls, then PNDM's extra call; the small boat
    # runs after them, alone
    assert [shape[0] for shape, size in zip(unet_rows, sizes, strict=True) if size == (32, 32)] == [4, 4, 4, 2]
    assert [shape[0] for shape, size in zip(unet_rows, sizes, strict=True) if size == (24, 24)] == [2, 2, 2]
    assert results[2].images[0].size == (48, 48)


def test_padding_to_a_bucket_leaves_the_real_rows_unchanged(denoiser, unpadded, unet_rows):
    padded = denoiser
    requests = (replace(RED, steps=3), replace(TREE, steps=3))
    with_padding = together(padded, *requests)
    assert [shape[0] for shape in unet_rows] == [4, 4, 4, 2]  # 3 real rows and a dummy, then the bicycle's PNDM call
    unet_rows.clear()
    without = together(unpadded, *requests)
    assert [shape[0] for shape in unet_rows] == [3, 3, 3, 2]
    for first, second in zip(with_padding, without, strict=True):
        assert largest_difference(first, second) <= PIXEL_TOLERANCE


def test_a_batch_over_the_row_limit_waits_for_a_free_place(sd, unet_rows):
    denoiser = SharedDenoiser(sd.obj, sd.device, collect_window_s=0, max_batch_rows=4)
    places = []
    together(denoiser, replace(RED, steps=2), replace(BOAT, steps=2), replace(CATS, steps=2, on_wait=places.append))
    # 2 + 2 rows fill the batch; the cats' 4 rows start when both are done, and heard they were next in line
    assert [shape[0] for shape in unet_rows] == [4, 4, 2, 4, 4]
    assert places == [1]


def test_a_batch_takes_only_the_rows_the_available_memory_holds(sd, unet_rows, monkeypatch):
    four_rows = sd_settings.estimate_memory(sd.info, GenerationSettings(width=RED.width, height=RED.height, num_images=2)).total_bytes
    monkeypatch.setattr(generation, "memory_available_bytes", lambda pipe, device: four_rows)
    denoiser = SharedDenoiser(sd.obj, sd.device, collect_window_s=0, info=sd.info)
    together(denoiser, replace(RED, steps=2), replace(BOAT, steps=2), replace(CATS, steps=2))
    assert [shape[0] for shape in unet_rows] == [4, 4, 2, 4, 4]  # as with a limit of 4 rows set by hand (above)


def test_a_waiting_request_hears_its_place_in_the_gpu_queue(sd, denoiser):
    told, places = threading.Event(), []

    def on_wait(place):
        places.append(place)
        told.set()

    with queue_for(CPU).slot():  # another run holds the device
        future = denoiser.submit(replace(RED, steps=2, on_wait=on_wait))
        assert told.wait(WAIT_S)
    assert future.result(WAIT_S).images and places == [1]


def test_a_request_that_fails_to_start_fails_alone(denoiser):
    broken = replace(BOAT, scheduler="no such sampler")
    with denoiser.held():
        futures = [denoiser.submit(broken), denoiser.submit(replace(RED, steps=2))]
    with pytest.raises(KeyError):
        futures[0].result(WAIT_S)
    assert futures[1].result(WAIT_S).images


def test_out_of_memory_fails_the_batch_with_a_typed_error_and_the_next_batch_runs(sd, denoiser, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(sd.obj.unet, "forward", out_of_memory)
    with denoiser.held():
        futures = [denoiser.submit(replace(RED, steps=2)), denoiser.submit(replace(BOAT, steps=2))]
    for future in futures:
        with pytest.raises(GpuOutOfMemoryError, match="ran out of memory in a shared batch at 64x64"):
            future.result(WAIT_S)
    monkeypatch.undo()
    assert alone(denoiser, replace(RED, steps=2)).images


def test_generate_together_gives_the_solo_runs_result(sd):
    settings = GenerationSettings(prompt="a red bicycle", width=64, height=64, steps=3, seed=1234, num_images=2)
    solo = generation.generate(sd, settings)
    assert shared_batch.shares_batches(settings, ())
    shared = shared_batch.generate_together(sd, settings, None, StepReporter(None, lambda: False, settings.steps), ())
    assert [image.seed for image in shared.images] == [1234, 1235]
    assert max(int(np.abs(pixels(a.image) - pixels(b.image)).max()) for a, b in zip(solo.images, shared.images, strict=True)) <= PIXEL_TOLERANCE
    assert shared.settings == solo.settings and shared.unet_path == "eager" and shared.seconds > 0
    assert not shared_batch.shares_batches(replace(settings, mode=generation.Mode.IMAGE_TO_IMAGE), ())
    assert not shared_batch.shares_batches(replace(settings, memory_mode=sd_settings.MemoryMode.VAE_TILING), ())


def test_generate_sends_text_to_image_through_the_shared_denoiser_only_where_it_is_on(sd, monkeypatch):
    settings = GenerationSettings(prompt="a red bicycle", width=64, height=64, steps=3, seed=7)
    together = []
    original = shared_batch.generate_together
    monkeypatch.setattr(shared_batch, "generate_together", lambda *args: together.append(args[1].seed) or original(*args))
    assert not sd.accel.shared_batches  # on the CPU a solo run stops mid-step on cancel; shared batches only between steps
    solo = generation.generate(sd, settings)
    shared_on = replace(sd, accel=Acceleration(cuda_graphs=False, shared_batches=True))  # as the manager sets it on a GPU
    shared = generation.generate(shared_on, settings)
    image_to_image = generation.generate(shared_on, replace(settings, mode=sd_settings.Mode.IMAGE_TO_IMAGE, strength=0.5),
                                         source=sd_settings.SourceImages(solo.images[0].image))
    assert together == [7] and image_to_image.images  # text to image joined the shared denoiser; image to image ran alone
    assert int(np.abs(pixels(solo.images[0].image) - pixels(shared.images[0].image)).max()) <= PIXEL_TOLERANCE


def test_a_solo_run_waiting_for_the_device_ends_the_batch_before_later_requests_join(denoiser):
    order, queued = [], threading.Event()

    def solo_run() -> None:  # an image to image run, or another model, asks for the device while the batch runs
        with queue_for(CPU).slot(on_wait=lambda place: queued.set()):
            order.append("solo run")

    solo = threading.Thread(target=solo_run)
    later: list = []

    def on_red_step(done, preview):
        if done == 1 and not later:
            solo.start()
            assert queued.wait(WAIT_S)
            later.append(denoiser.submit(replace(BOAT, steps=2, on_step=lambda done, preview: order.append(f"boat step {done}"))))

    denoiser.submit(replace(RED, steps=3, on_step=on_red_step)).result(WAIT_S)
    later[0].result(WAIT_S)
    solo.join(WAIT_S)
    assert order == ["solo run", "boat step 1", "boat step 2"]
