"""core.tasks.generation on the tiny stand-in SD pipeline (64x64, a few steps) on the CPU."""
from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from core.config import Settings
from core.errors import BadInputError, GpuOutOfMemoryError, InsufficientMemoryError
from core.formatting import human_bytes
from core.gpu.queue import queue_for
from core.models.describe import module_bytes
from core.models.registry import MODELS
from core.tasks import generation, sd_pipeline, sd_settings
from core.tasks.jobs import Job, JobState
from core.tasks.sd_settings import GenerationSettings, MemoryMode, Mode, Precision, SourceImages
from helpers import DeviceHolder

CPU = torch.device("cpu")
SMALL = GenerationSettings(prompt="a red bicycle", width=64, height=64, steps=3, seed=1234)
WAIT_S = 60


@pytest.fixture()
def sd(manager):
    return manager.get(MODELS["sd15"], allow_standin=True)


def pixels(result, index: int = 0) -> np.ndarray:
    return np.asarray(result.images[index].image)


def wait_until(job: Job, condition) -> None:
    """Follow a job's snapshots until `condition(snapshot)` (the job's own event paces the loop)."""
    while not condition(job.snapshot()):
        assert not job.wait(0.01) or condition(job.snapshot()), f"job ended first: {job.snapshot()}"


def test_a_run_makes_the_images_asked_for(sd):
    result = generation.generate(sd, replace(SMALL, num_images=2))
    assert [image.image.size for image in result.images] == [(64, 64), (64, 64)]
    assert [image.seed for image in result.images] == [1234, 1235]
    assert result.is_standin and result.model_name == MODELS["sd15"].repo_id
    assert result.seconds > 0 and result.steps_per_s > 0 and result.peak_memory_bytes is None
    assert not any(image.blacked_out for image in result.images) and result.notes == ()
    assert pixels(result, 0).std() > 0  # a picture, not a flat fill


def test_same_seed_same_image_and_image_i_of_a_batch_alone(sd):
    batch = generation.generate(sd, replace(SMALL, num_images=2))
    again = generation.generate(sd, SMALL)
    second_alone = generation.generate(sd, batch.settings_for(1))
    other_seed = generation.generate(sd, replace(SMALL, seed=99))
    # The same seed's noise whether alone or in a batch. A batch of two runs other GEMM shapes than one image, and on
    # some CPUs (oneDNN's blocking) that rounds a pixel one level apart: 1 of 255 at most, never a different image.
    assert np.abs(pixels(batch, 0).astype(int) - pixels(again)).max() <= 1
    assert np.abs(pixels(batch, 1).astype(int) - pixels(second_alone)).max() <= 1
    assert np.abs(pixels(again).astype(int) - pixels(other_seed)).max() > 64


def test_no_seed_draws_one_and_reports_it(sd):
    first = generation.generate(sd, replace(SMALL, seed=None))
    second = generation.generate(sd, replace(SMALL, seed=None))
    assert first.settings.seed is not None and first.images[0].seed == first.settings.seed
    assert first.settings.seed != second.settings.seed
    np.testing.assert_array_equal(pixels(first), pixels(generation.generate(sd, first.settings_for(0))))


def test_scheduler_switch_needs_no_reload_and_leaves_the_shared_pipeline_alone(manager, sd):
    shared_scheduler = sd.obj.scheduler
    images = {}
    for name in sd_settings.available_schedulers():
        images[name] = pixels(generation.generate(sd, replace(SMALL, scheduler=name)))
        assert manager.get(MODELS["sd15"]) is sd  # the same loaded model: nothing reloaded
        assert sd.obj.scheduler is shared_scheduler  # each run had its own scheduler
    assert {"PNDM", "DDIM", "Euler", "Euler a", "DPM++ 2M Karras", "UniPC"} <= set(images)
    assert not np.array_equal(images["PNDM"], images["Euler a"])
    np.testing.assert_array_equal(images["PNDM"], pixels(generation.generate(sd, SMALL)))


def test_each_scheduler_is_built_from_the_models_config(sd):
    for name in sd_settings.available_schedulers():
        scheduler = sd_pipeline.build_scheduler(sd.obj, name)
        assert type(scheduler).__name__ == sd_settings.SCHEDULERS[name].class_name
        assert scheduler.config.beta_schedule == sd.obj.scheduler.config.beta_schedule == "scaled_linear"
    assert sd_pipeline.build_scheduler(sd.obj, "DPM++ 2M Karras").config.use_karras_sigmas is True


def test_every_runs_scheduler_keeps_its_timesteps_on_the_cpu_whatever_device_is_asked(sd):
    for name in sd_settings.available_schedulers():
        scheduler = generation.run_pipeline(sd.obj, Mode.TEXT_TO_IMAGE, name).scheduler
        plain = sd_pipeline.build_scheduler(sd.obj, name)
        scheduler.set_timesteps(10, device="cuda")  # what the pipeline asks on a GPU (here it would fail: no CUDA)
        plain.set_timesteps(10, device="cpu")
        assert scheduler.timesteps.device == CPU, name
        assert torch.equal(scheduler.timesteps, plain.timesteps), name


def test_cancel_mid_run_drops_the_partial_result_and_frees_the_device(sd):
    ready = threading.Event()

    def cancel_at_third_step() -> bool:  # the user presses Cancel once step 3 is reported, while step 4 runs
        if job.snapshot().done == 3:
            job.cancel()
        return False

    def work(context):
        ready.wait(WAIT_S)
        return generation.generate(sd, replace(SMALL, steps=20), context, abandoned=cancel_at_third_step)

    job = Job(work, "generate")
    ready.set()
    assert job.wait(WAIT_S)
    snapshot = job.snapshot()
    assert snapshot.state is JobState.CANCELLED and job.result is None
    assert snapshot.done == 3 and snapshot.total == 20  # stopped at the next step, long before the end
    assert len(queue_for(CPU)) == 0
    assert generation.generate(sd, SMALL).images  # the device serves the next run


def test_progress_reports_steps_rate_and_a_latent_preview(sd):
    job = Job(lambda context: generation.generate(sd, replace(SMALL, num_images=2), context), "generate")
    assert job.wait(WAIT_S)
    snapshot = job.snapshot()
    assert snapshot.state is JobState.DONE and snapshot.done == snapshot.total == 3  # the steps asked for, not PNDM's 4 calls
    assert snapshot.detail.startswith("step 3 of 3 · ") and "it/s" in snapshot.detail
    latent_px = 64 // sd.obj.vae_scale_factor
    assert snapshot.preview.size == (2 * latent_px, latent_px)  # both images, side by side, at latent size


def test_two_concurrent_runs_take_turns_on_the_device(sd):
    holder = DeviceHolder(WAIT_S)
    first = Job(lambda context: generation.generate(sd, SMALL, context, abandoned=holder.abandoned), "first")
    assert holder.running.wait(WAIT_S)
    second = Job(lambda context: generation.generate(sd, replace(SMALL, seed=7), context), "second")
    wait_until(second, lambda s: "next in line" in s.detail)
    assert second.snapshot().done == 0  # it has not touched the pipeline
    holder.release.set()
    assert first.wait(WAIT_S) and second.wait(WAIT_S)
    assert first.snapshot().state is second.snapshot().state is JobState.DONE
    np.testing.assert_array_equal(pixels(second.result), pixels(generation.generate(sd, replace(SMALL, seed=7))))


def test_a_run_whose_session_left_gives_up_its_place_in_the_queue(sd):
    holder, gone = DeviceHolder(WAIT_S), threading.Event()
    first = Job(lambda context: generation.generate(sd, SMALL, context, abandoned=holder.abandoned), "first")
    assert holder.running.wait(WAIT_S)
    leaver = Job(lambda context: generation.generate(sd, SMALL, context, abandoned=gone.is_set), "leaver")
    wait_until(leaver, lambda s: "next in line" in s.detail)
    gone.set()  # the browser tab closed
    assert leaver.wait(WAIT_S) and leaver.snapshot().state is JobState.CANCELLED
    assert len(queue_for(CPU)) == 1  # only the run on the device is left
    holder.release.set()
    assert first.wait(WAIT_S) and first.snapshot().state is JobState.DONE


def test_out_of_memory_is_caught_released_and_the_app_keeps_working(sd, monkeypatch):
    released = []
    monkeypatch.setattr("core.models.memory.release_memory", lambda: released.append(True))

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(sd.obj.unet, "forward", no_memory)
        with pytest.raises(GpuOutOfMemoryError) as caught:
            generation.generate(sd, replace(SMALL, num_images=4))
    assert "4 image(s) of 64x64" in str(caught.value) and "memory mode" in caught.value.remedy
    assert released == [True] and len(queue_for(CPU)) == 0
    assert generation.generate(sd, SMALL).images


@pytest.mark.parametrize("mode", [m for m in MemoryMode if m is not MemoryMode.NONE])
def test_memory_mode_on_then_off_restores_the_plain_pipeline(sd, mode):
    pipe = sd.obj
    processors = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    before = pixels(generation.generate(sd, SMALL))
    if mode in sd_settings.memory_modes_for(CPU.type):
        difference = np.abs(pixels(generation.generate(sd, replace(SMALL, memory_mode=mode))).astype(int) - before)
        if mode is MemoryMode.VAE_TILING:  # tiles are decoded apart and blended at the seams: close, not equal
            assert difference.mean() < 8
        else:  # the same image, up to the rounding of a different order of work
            assert difference.max() <= 2
    else:  # offload modes need a GPU to run; their hooks still go on and come off here
        generation.set_memory_mode(pipe, mode, CPU)
        assert any(hasattr(module, "_hf_hook") for module in pipe.unet.modules())
    after = pixels(generation.generate(sd, SMALL))
    np.testing.assert_array_equal(before, after)
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == processors
    assert not pipe.vae.use_slicing and not pipe.vae.use_tiling
    assert not any(hasattr(module, "_hf_hook") for component in (pipe.unet, pipe.vae, pipe.text_encoder) for module in component.modules())
    assert {p.device for p in pipe.unet.parameters()} == {CPU}


def test_a_lossy_precision_round_trip_restores_the_loaded_weights(sd):
    pipe = sd.obj
    loaded = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    generation.set_precision(pipe, Precision.BF16, CPU)
    assert pipe.unet.dtype == torch.bfloat16
    generation.set_precision(pipe, Precision.AUTO, CPU)
    assert pipe.unet.dtype == torch.float32
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(value, loaded[name]), name


def test_a_plain_prompt_gives_exactly_what_diffusers_makes_from_the_text(sd):
    result = generation.generate(sd, replace(SMALL, negative_prompt="blurry"))
    run_pipe = generation.run_pipeline(sd.obj, Mode.TEXT_TO_IMAGE, SMALL.scheduler)
    theirs = run_pipe(prompt=SMALL.prompt, negative_prompt="blurry", num_inference_steps=SMALL.steps, guidance_scale=SMALL.guidance_scale,
                      width=64, height=64, generator=[torch.Generator("cpu").manual_seed(SMALL.seed)])
    np.testing.assert_array_equal(pixels(result), np.asarray(theirs.images[0]))


def test_a_weighted_prompt_changes_the_image_and_weight_one_is_the_plain_prompt(sd):
    plain = generation.generate(sd, SMALL)
    weighted = generation.generate(sd, replace(SMALL, prompt="a (red:1.5) bicycle"))
    assert np.abs(pixels(weighted).astype(int) - pixels(plain)).max() > 0 and pixels(weighted).std() > 0  # a picture, not black
    long_weighted = generation.generate(sd, replace(SMALL, prompt="a [red] " + "bicycle, " * 30 + "BREAK (road:1.2)"))
    assert pixels(long_weighted).std() > 0  # the stand-in's centred text encoder made the kept mean inf once
    np.testing.assert_array_equal(pixels(generation.generate(sd, replace(SMALL, prompt="a (red:1.0) bicycle"))), pixels(plain))
    assert weighted.settings.prompt == "a (red:1.5) bicycle"  # written to the PNG as typed, as AUTOMATIC1111 does


def test_a_prompt_past_75_tokens_is_read_whole(sd):
    cut = generation.generate(sd, replace(SMALL, prompt="b" * 75))  # the stand-in's tokenizer makes one token per character
    long = generation.generate(sd, replace(SMALL, prompt="b" * 75 + "xyz"))
    assert long.notes == () and np.abs(pixels(long).astype(int) - pixels(cut)).max() > 0  # the last 3 tokens count
    usage = generation.prompt_usage(sd.info, "b" * 75 + "xyz")
    assert (usage.tokens, usage.chunks, usage.caption) == (78, 2, "78 tokens, 2 chunks")


def test_bad_prompt_syntax_is_refused_before_any_work_quoting_it(sd):
    with pytest.raises(BadInputError, match=r"In the negative prompt: The weight '1\.2\.3' in the emphasis `:1\.2\.3\)`"):
        generation.generate(sd, replace(SMALL, negative_prompt="(dust:1.2.3)"))
    with pytest.raises(BadInputError, match="In the prompt: The LoRA tag `<lora:x:1:2>`"):
        generation.check_inputs(replace(SMALL, prompt="a cat <lora:x:1:2>"), "cpu")


def test_an_empty_prompt_is_allowed(sd):
    assert generation.generate(sd, replace(SMALL, prompt="")).images


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 500}, "`width` has to be a multiple of 8 but is 500"),
        ({"height": 100}, "`height` has to be a multiple of 8 but is 100"),
        ({"steps": 0}, "`steps` has to be between 1 and 150 but is 0"),
        ({"width": 100_000}, "`width` has to be between 64 and 2048 pixels but is 100000"),
        ({"height": 8}, "`height` has to be between 64 and 2048 pixels but is 8"),
        ({"num_images": 0}, "`num_images` has to be between 1 and 8 but is 0"),
        ({"guidance_scale": float("nan")}, "`guidance_scale` has to be between 0 and 30 but is nan"),
        ({"seed": -1}, "`seed` has to be between"),
        ({"scheduler": "Heun"}, "`scheduler` 'Heun' is not one of"),
        ({"precision": Precision.FP16}, "`precision` fp16 needs a GPU"),
        ({"memory_mode": MemoryMode.SEQUENTIAL_OFFLOAD}, "`memory_mode` 'sequential CPU offload'"),
        ({"steps": 2.5}, "`steps` has to be a whole number but is 2.5"),
    ],
)
def test_bad_inputs_are_refused_before_any_work_with_the_argument_and_value(sd, change, message):
    with pytest.raises(BadInputError, match=None) as caught:
        generation.generate(sd, replace(SMALL, **change))
    assert message in str(caught.value)
    assert len(queue_for(CPU)) == 0


def test_lms_is_offered_only_with_scipy():
    import importlib.util

    assert ("LMS" in sd_settings.available_schedulers()) == (importlib.util.find_spec("scipy") is not None)


def test_a_blacked_out_image_gets_a_note(sd, monkeypatch):
    def flag_first(self, image, device, dtype):
        return torch.zeros_like(image), [True] + [False] * (len(image) - 1)

    monkeypatch.setattr(StableDiffusionPipeline, "run_safety_checker", flag_first)
    result = generation.generate(sd, replace(SMALL, num_images=2))
    assert [image.blacked_out for image in result.images] == [True, False]
    assert any("blacked it out" in note and "image 1" in note for note in result.notes)


def test_memory_estimate_grows_with_size_and_shrinks_with_memory_modes(sd):
    def total(**change):
        return generation.estimate_memory(sd.info, GenerationSettings(**change)).total_bytes

    assert total(width=1024, height=1024) > total() > total(width=256, height=256)
    assert total(num_images=4, memory_mode=MemoryMode.VAE_SLICING) < total(num_images=4)
    assert total(width=2048, height=2048, memory_mode=MemoryMode.VAE_TILING) < total(width=2048, height=2048)
    assert total(memory_mode=MemoryMode.SEQUENTIAL_OFFLOAD) < total(memory_mode=MemoryMode.MODEL_OFFLOAD) < total()


@pytest.mark.parametrize(
    ("choice", "custom", "key"),
    [("sd14", "", "sd14"), ("custom", "someone/my-sd-model", "sd15@someone/my-sd-model")],
)
def test_model_choice(choice, custom, key):
    assert sd_settings.model_spec_for(choice, custom, Settings()).key == key


@pytest.mark.parametrize("custom", ["", "not a repo id", "/no/such/folder"])
def test_a_bad_custom_model_is_refused(custom, tmp_path):
    with pytest.raises(BadInputError):
        sd_settings.model_spec_for("custom", custom, Settings(models_root=tmp_path))


# Image to image and inpaint ------------------------------------------------------------------------------------

def picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def half_mask(width: int = 64, height: int = 64) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return mask


IMG2IMG = replace(SMALL, mode=Mode.IMAGE_TO_IMAGE, steps=4, strength=0.5)
INPAINT = replace(SMALL, mode=Mode.INPAINT, steps=4, strength=1.0)


def test_image_to_image_shares_the_loaded_model_and_is_reproducible(manager, sd):
    source = SourceImages(picture())
    first = generation.generate(sd, IMG2IMG, source=source)
    assert manager.get(MODELS["sd15"]) is sd and type(sd.obj).__name__ == "StableDiffusionPipeline"  # from_pipe: no second load
    np.testing.assert_array_equal(pixels(first), pixels(generation.generate(sd, IMG2IMG, source=source)))
    assert not np.array_equal(pixels(first), pixels(generation.generate(sd, IMG2IMG, source=SourceImages(picture(seed=1)))))
    assert not np.array_equal(pixels(first), pixels(generation.generate(sd, replace(IMG2IMG, strength=1.0), source=source)))
    assert not np.array_equal(pixels(first), pixels(generation.generate(sd, replace(IMG2IMG, mode=Mode.TEXT_TO_IMAGE))))
    assert first.notes == ()


def test_image_to_image_runs_strength_times_steps_and_says_so_in_progress(sd):
    job = Job(lambda context: generation.generate(sd, replace(IMG2IMG, steps=10, strength=0.3), context, source=SourceImages(picture())), "img2img")
    assert job.wait(WAIT_S)
    snapshot = job.snapshot()
    assert snapshot.state is JobState.DONE and snapshot.done == snapshot.total == 3
    assert snapshot.detail.startswith("step 3 of 3")


def test_an_input_of_another_size_is_resized_and_said(sd):
    result = generation.generate(sd, IMG2IMG, source=SourceImages(picture(100, 60)))
    assert result.images[0].image.size == (64, 64)
    assert result.notes == ("The input image is 100x60 pixels; it was resized to 64x64, the size of this run.",)


def test_inpaint_keeps_the_sources_pixels_outside_the_mask_and_blends_its_edge(sd):
    source = SourceImages(picture(), half_mask())  # the left half repainted
    made = pixels(generation.generate(sd, INPAINT, source=source)).astype(np.int16)
    original = np.asarray(source.image, dtype=np.int16)
    edge = generation.MASK_BLUR_PX * 3  # the blur's reach
    assert np.array_equal(made[:, 32 + edge:], original[:, 32 + edge:])  # kept: exactly the source, as AUTOMATIC1111 pastes it back
    repainted = np.abs(made[:, : 32 - edge] - original[:, : 32 - edge]).mean()
    blended = np.abs(made[:, 32 : 32 + edge] - original[:, 32 : 32 + edge]).mean()  # kept side, within the blur
    assert repainted > 20 and 0 < blended < repainted / 2  # the repainted area fades into the kept pixels


def test_inpaint_repaints_under_the_mask_and_is_reproducible(sd):
    source = SourceImages(picture(), half_mask())
    first = generation.generate(sd, INPAINT, source=source)
    assert first.images[0].image.size == (64, 64)
    np.testing.assert_array_equal(pixels(first), pixels(generation.generate(sd, INPAINT, source=source)))
    other_mask = SourceImages(picture(), half_mask().transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert not np.array_equal(pixels(first), pixels(generation.generate(sd, INPAINT, source=other_mask)))
    assert not np.array_equal(pixels(first), pixels(generation.generate(sd, replace(INPAINT, mode=Mode.IMAGE_TO_IMAGE), source=source)))


@pytest.mark.parametrize(
    ("run_settings", "source", "message"),
    [
        (IMG2IMG, None, "Image to image needs an input image"),
        (INPAINT, SourceImages(picture()), "Inpaint needs a mask"),
        (INPAINT, SourceImages(picture(), half_mask(32, 32)), "The mask is 32x32 pixels but the image is 64x64"),
        (replace(IMG2IMG, strength=0.0), SourceImages(picture()), "`strength` has to be between 0.01 and 1 but is 0"),
        (replace(IMG2IMG, strength=1.5), SourceImages(picture()), "`strength` has to be between 0.01 and 1 but is 1.5"),
        (replace(IMG2IMG, steps=2, strength=0.2), SourceImages(picture()), "`strength` 0.2 of 2 steps leaves no step to run"),
    ],
)
def test_bad_image_inputs_are_refused_before_any_work(sd, run_settings, source, message):
    with pytest.raises(BadInputError) as caught:
        generation.generate(sd, run_settings, source=source)
    assert message in str(caught.value)
    assert len(queue_for(CPU)) == 0


@pytest.mark.parametrize("mode", list(Mode))
def test_each_modes_pipeline_shares_the_loaded_modules_without_casting_them(manager, sd, mode):
    pipe = sd.obj
    pipe.to(dtype=torch.bfloat16)  # as a GPU model in half precision; from_pipe would cast it back to float32
    try:
        run_pipe = generation.run_pipeline(pipe, mode, "Euler")
        assert type(run_pipe).__name__ == sd_pipeline.PIPELINE_CLASSES[mode]
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                assert getattr(run_pipe, name) is module and module.dtype == torch.bfloat16, name
        assert run_pipe.scheduler is not pipe.scheduler and type(run_pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    finally:
        manager.unload_all()  # the next test loads the stand-in afresh, in float32


def test_counting_a_prompt_never_changes_how_a_running_run_encodes_its_prompts(sd):
    """Found under load: counting a prompt on the shared tokenizer switched its padding off under a run encoding with
    padding to 77, which then failed in torch.cat. Counting runs beside encoding here, with thread switches forced."""
    import sys

    tokenizer = generation.run_pipeline(sd.obj, Mode.TEXT_TO_IMAGE, "PNDM").tokenizer  # what a run encodes with
    assert tokenizer is not sd.obj.tokenizer  # the one the page counts with
    assert tokenizer is generation.run_pipeline(sd.obj, Mode.INPAINT, "DDIM").tokenizer  # one copy per pipeline, not per run
    stop, counted = threading.Event(), []
    expected = generation.prompt_usage(sd.info, "a lighthouse at dawn").tokens

    def count() -> None:
        while not stop.is_set():
            counted.append(generation.prompt_usage(sd.info, "a lighthouse at dawn").tokens)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    counters = [threading.Thread(target=count) for _ in range(3)]
    try:
        for thread in counters:
            thread.start()
        lengths = {len(tokenizer([""], padding="max_length", max_length=77, truncation=True).input_ids[0]) for _ in range(3000)}
    finally:
        stop.set()
        for thread in counters:
            thread.join()
        sys.setswitchinterval(interval)
    assert lengths == {77} and counted and set(counted) == {expected}


def test_a_run_estimated_over_the_available_memory_is_refused_before_it_starts_with_the_figures(sd, monkeypatch):
    from core.gpu.nvml import HostMemory

    monkeypatch.setattr(generation, "host_memory", lambda: HostMemory(24 * 2**30, 2**30, 0))  # 1 GiB of RAM left
    monkeypatch.setattr(generation, "device_slot", lambda *args: pytest.fail("the refused run reached the queue"))
    large = replace(SMALL, width=1024, height=1024, num_images=2)
    estimate = generation.estimate_memory(sd.info, large)
    with pytest.raises(InsufficientMemoryError) as refused:
        generation.generate(sd, large)
    message = str(refused.value)
    assert "2 image(s) of 1024x1024" in message and human_bytes(estimate.total_bytes) in message
    assert "RAM" in message and "available" in message
    # What is free plus the weights the loaded model already holds (the estimate counts them)
    assert human_bytes(2**30 + module_bytes(sd.obj)) in message
    assert "smaller size" in refused.value.remedy and "VAE tiling" in refused.value.remedy
    assert generation.estimate_memory(sd.info, SMALL).total_bytes < 2**30
    generation.check_memory(sd, SMALL)  # a run that fits is not refused
