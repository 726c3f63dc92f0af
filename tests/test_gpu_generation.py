"""Image generation on the GPU with SD 1.5's full-size architecture (random weights), through the core's own path.

Run on a CUDA machine: `python -m pytest -m gpu -s tests/test_gpu_generation.py`. Each run prints one JSON line with its
seconds and torch's peak allocated memory, per precision and per memory mode.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.bench_generation import build_full_size_ddpm, build_full_size_sd
from bench.profile_gpu import SYNC_CALLS
from core.accel import EAGER, Acceleration, compiled, cuda_graphs
from core.config import Settings
from core.errors import GpuOutOfMemoryError
from core.gpu.queue import queue_for
from core.models.manager import ModelManager
from core.models.registry import MODELS
from core.tasks import generation, lora, unconditional
from core.tasks.images import shape_mask
from core.tasks.lora import LoraChoice
from core.tasks.sd_settings import GenerationSettings, MemoryMode, Mode, Precision, SourceImages
from core.tasks.unconditional import UnconditionalSettings

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
BASE = GenerationSettings(prompt="a lighthouse at dawn", width=512, height=512, steps=20, num_images=2, seed=0)


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("full-size")
    build_full_size_sd(root / "models")
    # Compile off: a background compile finishing mid-test would change the path; test_compiled_steps turns it on.
    # Shared batches off: these tests are about the solo path (graph vs eager bit for bit); the shared test turns them on.
    manager = ModelManager(Settings(models_root=root / "models", standin_dir=root / "standins", compile=False, shared_batches=False,
                                    compile_cache_dir=root / "inductor"))
    model = manager.get(MODELS["sd15"])
    assert not model.is_standin and model.dtype == torch.float16 and model.device.type == "cuda"
    yield model
    manager.unload_all()


def run(sd, settings: GenerationSettings, label: str, source: SourceImages | None = None, loras: tuple[LoraChoice, ...] = ()):
    result = generation.generate(sd, settings, source=source, loras=loras)
    print(json.dumps({
        "run": label, "mode": str(settings.mode), "size": f"{settings.width}x{settings.height}", "images": settings.num_images, "steps": settings.steps,
        "precision": result.dtype, "memory_mode": str(settings.memory_mode), "seconds": round(result.seconds, 3),
        "s_per_image": round(result.seconds / settings.num_images, 3), "peak_allocated_bytes": result.peak_memory_bytes,
    }), flush=True)
    return result


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image.image, dtype=np.int16) for image in result.images])


def assert_plain(pipe) -> None:
    """No offload hook anywhere, every weight on the GPU, default VAE decoding."""
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            assert not any(hasattr(sub, "_hf_hook") for sub in module.modules()), name
            assert {p.device.type for p in module.parameters()} == {"cuda"}, name
    assert not pipe.vae.use_slicing and not pipe.vae.use_tiling


def test_fp16_run_at_512(sd):
    result = run(sd, BASE, "fp16")
    assert result.dtype == "float16" and [image.image.size for image in result.images] == [(512, 512)] * 2
    assert np.isfinite(pixels(result)).all() and pixels(result).std() > 0
    assert 0 < result.peak_memory_bytes < 8 * 2**30


def test_cuda_graph_steps_make_the_same_images_as_eager_steps_within_peak_memory(sd):
    graphed = run(sd, BASE, "fp16, CUDA graph")
    graphed_again = run(sd, BASE, "fp16, CUDA graph, captured")
    eager = run(dataclasses.replace(sd, accel=EAGER), BASE, "fp16, eager")
    assert graphed.unet_path == graphed_again.unet_path == "CUDA graph" and eager.unet_path == "eager"
    difference = np.abs(pixels(graphed) - pixels(eager)).max()
    print(json.dumps({"graph_vs_eager_max_pixel_difference": int(difference)}))
    assert difference == 0  # the same kernels on the same inputs
    assert np.array_equal(pixels(graphed), pixels(graphed_again))
    assert graphed_again.peak_memory_bytes <= eager.peak_memory_bytes + 64 * 2**20  # a graph's pool holds what eager steps allocate


@pytest.mark.parametrize("scheduler", ["PNDM", "DDIM", "DPM++ 2M Karras"])
def test_the_cpu_waits_for_the_gpu_no_more_often_in_a_longer_run(sd, scheduler):
    """Steps are queued while the GPU works: the CPU waits for it a fixed number of times per run (the prompt, the
    noise, the finished image), not at every step (diffusers' schedulers with their timesteps on the GPU did)."""
    from torch.profiler import ProfilerActivity, profile

    def waits(steps: int) -> int:
        settings = replace(BASE, num_images=1, steps=steps, scheduler=scheduler)
        generation.generate(sd, settings)  # graphs captured
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generation.generate(sd, settings)
        return sum(event.name in SYNC_CALLS for event in prof.events())

    short, long = waits(10), waits(30)
    print(json.dumps({"scheduler": scheduler, "cpu_waits_for_gpu": {"10 steps": short, "30 steps": long}}))
    assert long == short


def test_compiled_steps_agree_with_eager_ones_and_serve_runs_once_ready(sd, tmp_path):
    unet = sd.obj.unet
    sd = dataclasses.replace(sd, accel=Acceleration(cuda_graphs=True, compile=True))
    try:
        queued = run(sd, BASE, "fp16, compile queued in the background")
        assert "compiled" not in queued.unet_path  # the run did not wait for the compile
        assert compiled.wait_until_settled(600)
        print(json.dumps({"compiles": [dataclasses.asdict(record) for record in compiled.records()]}, default=str))
        served = run(sd, BASE, "fp16, compiled")
        assert served.unet_path == "compiled + CUDA graph"
        inputs = (torch.randn(4, 4, 64, 64, device=CUDA, dtype=torch.float16), torch.tensor(500, device=CUDA),
                  torch.randn(4, 77, 768, device=CUDA, dtype=torch.float16))
        with torch.inference_mode():
            eager = cuda_graphs.unet_step(unet, *inputs).float()
            fast = compiled.ready(unet, cuda_graphs.unet_step, inputs, True)(unet, *inputs).float()
            latents = torch.randn(2, 4, 64, 64, device=CUDA, dtype=torch.float16)
            eager_decoded = cuda_graphs.vae_decode_step(sd.obj.vae, latents).float()
            fast_decoded = compiled.ready(sd.obj.vae, cuda_graphs.vae_decode_step, (latents,), True)(sd.obj.vae, latents).float()
            ids = torch.randint(0, 49408, (1, 77), device=CUDA)
            eager_encoded = cuda_graphs.text_encoder_step(sd.obj.text_encoder, ids).float()
            fast_encoded = compiled.ready(sd.obj.text_encoder, cuda_graphs.text_encoder_step, (ids,), True)(sd.obj.text_encoder, ids).float()
        errors = {name: ((fast_out - eager_out).abs().max() / eager_out.abs().max()).item() for name, fast_out, eager_out in (
            ("unet_step", fast, eager), ("vae_decode", fast_decoded, eager_decoded), ("text_encoder", fast_encoded, eager_encoded))}
        print(json.dumps({"compiled_vs_eager_max_error_relative_to_largest": errors}))
        assert max(errors.values()) < 1e-2  # fused kernels round differently; a wrong kernel would be off by far more
    finally:
        compiled.wait_until_settled(600)  # no compile left running into the next test


def test_every_memory_mode_runs_lowers_its_peak_and_turns_off_cleanly(sd):
    baseline = run(sd, BASE, "none")
    peaks = {MemoryMode.NONE: baseline.peak_memory_bytes}
    for mode in MemoryMode:
        if mode is MemoryMode.NONE:
            continue
        result = run(sd, replace(BASE, memory_mode=mode), str(mode))
        peaks[mode] = result.peak_memory_bytes
        difference = np.abs(pixels(result) - pixels(baseline))
        assert difference.mean() < 3, f"{mode}: mean pixel difference {difference.mean():.2f}"  # same image, other kernels
        again = run(sd, BASE, f"none after {mode}")
        assert_plain(sd.obj)
        assert np.abs(pixels(again) - pixels(baseline)).mean() < 1
    print(json.dumps({"peak_allocated_bytes_per_mode": {str(mode): peak for mode, peak in peaks.items()}}), flush=True)
    assert peaks[MemoryMode.VAE_SLICING] < peaks[MemoryMode.NONE]
    assert peaks[MemoryMode.SEQUENTIAL_OFFLOAD] < peaks[MemoryMode.MODEL_OFFLOAD] < peaks[MemoryMode.NONE]


def test_fp32_and_bf16_runs_then_fp16_weights_come_back_exactly(sd):
    loaded = {k: v.clone() for k, v in sd.obj.unet.state_dict().items()}
    fp32 = run(sd, replace(BASE, precision=Precision.FP32), "fp32")
    bf16 = run(sd, replace(BASE, precision=Precision.BF16), "bf16")
    fp16 = run(sd, BASE, "fp16 after fp32 and bf16")
    assert (fp32.dtype, bf16.dtype, fp16.dtype) == ("float32", "bfloat16", "float16")
    assert fp32.peak_memory_bytes > fp16.peak_memory_bytes
    for name, value in sd.obj.unet.state_dict().items():
        assert value.dtype == torch.float16 and torch.equal(value, loaded[name]), name
    assert_plain(sd.obj)


def test_a_real_out_of_memory_is_reported_and_the_gpu_keeps_serving(sd, monkeypatch):
    # Admission control (issue 17.4) refuses this run before it starts; the out-of-memory path is what is tested here.
    monkeypatch.setattr(generation, "check_memory", lambda model, settings: None)
    before = torch.cuda.memory_allocated(CUDA)
    huge = replace(BASE, width=2048, height=2048, num_images=8, steps=1)
    try:
        run(sd, huge, "oom attempt")
    except GpuOutOfMemoryError as error:
        print(json.dumps({"oom": str(error)}), flush=True)
    else:
        pytest.skip("8 images of 2048x2048 fit on this card: no out-of-memory to observe")
    assert torch.cuda.memory_allocated(CUDA) <= before + 64 * 2**20  # what the run held is back
    assert len(queue_for(CUDA)) == 0
    assert run(sd, BASE, "after oom").images


# Issue 8's modes on the same full-size model ------------------------------------------------------------------

def source_images(mask: bool = False) -> SourceImages:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    return SourceImages(image, shape_mask((512, 512), (25, 25, 75, 75)) if mask else None)


def test_image_to_image_and_inpaint_at_512_share_the_loaded_model(sd):
    before = torch.cuda.memory_allocated(CUDA)
    img2img = replace(BASE, mode=Mode.IMAGE_TO_IMAGE, strength=0.6)
    first = run(sd, img2img, "image to image, strength 0.6", source_images())
    again = run(sd, img2img, "image to image again", source_images())
    assert np.abs(pixels(first) - pixels(again)).mean() < 1  # the same seed, the same images
    inpaint = run(sd, replace(BASE, mode=Mode.INPAINT, strength=1.0), "inpaint, strength 1", source_images(mask=True))
    assert [image.image.size for image in inpaint.images] == [(512, 512)] * 2 and pixels(inpaint).std() > 0
    assert torch.cuda.memory_allocated(CUDA) <= before + 64 * 2**20  # no second copy of the weights stayed behind
    assert_plain(sd.obj)


def test_a_full_size_lora_changes_the_run_and_comes_off_exactly(sd, tmp_path_factory):
    from helpers import make_standin_lora

    folder = tmp_path_factory.mktemp("lora")
    make_standin_lora(Path(sd.source.location), folder)
    adapter = lora.read_source(str(folder), Settings(models_root=folder.parent))
    loaded = {k: v.clone() for k, v in sd.obj.unet.state_dict().items()}
    base = run(sd, BASE, "base before LoRA")
    with_lora = run(sd, BASE, f"LoRA rank 4, {adapter.size_bytes / 2**20:.1f} MiB", loras=(LoraChoice(adapter, 1.0),))
    after = run(sd, BASE, "base after LoRA")
    assert np.abs(pixels(with_lora) - pixels(base)).mean() > 1
    assert np.abs(pixels(after) - pixels(base)).mean() < 1
    assert sd.obj.get_list_adapters() == {}
    for name, value in sd.obj.unet.state_dict().items():
        assert torch.equal(value, loaded[name]), name
    assert_plain(sd.obj)


def test_unconditional_ddpm_full_size_1000_steps(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddpm")
    build_full_size_ddpm(root / "models")
    manager = ModelManager(Settings(models_root=root / "models", standin_dir=root / "standins"))
    model = manager.get(MODELS["ddpm-butterflies"])
    assert not model.is_standin and model.device.type == "cuda"
    for images in (1, 16):
        result = unconditional.generate(model, UnconditionalSettings(num_images=images, steps=1000, seed=0))
        print(json.dumps({"run": f"DDPM butterflies 32px, {images} images", "steps": 1000, "precision": result.dtype,
                          "seconds": round(result.seconds, 3), "steps_per_s": round(result.steps_per_s, 1),
                          "peak_allocated_bytes": result.peak_memory_bytes}), flush=True)
        assert len(result.images) == images and np.asarray(result.grid).std() > 0
    manager.unload_all()


def test_runs_made_together_in_a_shared_batch_match_their_solo_runs_within_fp16_rounding(sd):
    """Issue 20: four sessions' text-to-image runs (other prompts, seeds, guidance, steps and schedulers) waiting at
    once share UNet calls; each image is the one its run makes alone, up to fp16 rounding of other GEMM shapes."""
    from bench.bench_shared_batch import at_once

    runs = [
        replace(BASE, num_images=1, prompt="a lighthouse at dawn", seed=1, scheduler="DPM++ 2M Karras", steps=25),
        replace(BASE, num_images=1, prompt="a bowl of ramen", seed=2, scheduler="PNDM", steps=20, guidance_scale=5.0),
        replace(BASE, num_images=1, prompt="a red fox in snow", seed=3, scheduler="Euler a", steps=15),
        replace(BASE, num_images=1, prompt="an old sailing ship", seed=4, scheduler="DDIM", steps=30, guidance_scale=9.0),
    ]
    alone = dataclasses.replace(sd, accel=dataclasses.replace(sd.accel, shared_batches=False))
    together = dataclasses.replace(sd, accel=dataclasses.replace(sd.accel, shared_batches=True))
    solo = [generation.generate(alone, settings) for settings in runs]
    at_once(lambda settings: generation.generate(together, settings), runs)  # warm-up: the batch buckets' graphs
    _, _, shared = at_once(lambda settings: generation.generate(together, settings), runs)
    differences = [np.abs(pixels(a).astype(np.int16) - pixels(b).astype(np.int16)) for a, b in zip(solo, shared, strict=True)]
    figures = {"max_pixel_difference": [int(d.max()) for d in differences], "mean_pixel_difference": [round(float(d.mean()), 4) for d in differences],
               "unet_path": shared[0].unet_path}
    print(json.dumps({"shared_batch_vs_solo_fp16": figures}))
    other_seed = np.abs(pixels(solo[0]).astype(np.int16) - pixels(solo[1]).astype(np.int16)).mean()
    assert max(figures["mean_pixel_difference"]) < 1.0 < other_seed  # rounding, not another image
