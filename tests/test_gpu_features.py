"""Issue 19's six features on SD 1.5's full-size architecture (random weights) on the GPU, through the core's own path.

Run on a CUDA machine: `python -m pytest -m gpu -s tests/test_gpu_features.py`. Each run prints one JSON line with its
seconds, torch's peak allocated memory and the figures its test asserts on: prompt syntax and a LoRA tag, a painted
mask and outpainting, a 4x4 X/Y plot, variation seeds and the hires fix, the image history, the job queue.

With random weights nothing here is a picture, so the tests assert what the core guarantees whatever the weights
are: shapes, sizes, exact equalities where the code promises them, and where a change must show.
"""
from __future__ import annotations

import base64
import io
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from bench.bench_generation import build_full_size_sd
from core.config import Settings
from core.gpu.queue import queue_for
from core.models.manager import ModelManager
from core.models.registry import MODELS
from core.tasks import generation, image_history, lora, outpaint, pnginfo, sweeps
from core.tasks.image_history import ImageHistory, ImageRecord
from core.tasks.job_board import JobBoard, NotYourJobError
from core.tasks.jobs import JobState
from core.tasks.lora import LoraChoice
from core.tasks.prompt_embeddings import encode_prompts
from core.tasks.prompt_syntax import tokenize_prompt
from core.tasks.sd_settings import GenerationResult, GenerationSettings, HiresUpscaler, Mode, SourceImages, estimate_memory
from helpers import DeviceHolder, make_standin_lora

pytestmark = pytest.mark.gpu
DEVICE, DTYPE = torch.device("cuda"), torch.float16
BASE = GenerationSettings(prompt="a lighthouse at dawn", width=512, height=512, steps=20, scheduler="DPM++ 2M Karras", seed=0)
OUTPAINT_RIGHT_PX = 256  # 512 -> 768 wide
WINDOW = 77  # CLIP positions per prompt chunk
WAIT_S = 120

# 110 tokens in three chunks (the generated CLIP vocabulary of build_full_size_sd is one token a character): the
# first and the last weighted, the middle one plain.
WEIGHTED = ("a (lighthouse:1.3) on a cliff at dawn, oil painting BREAK seagulls over the rocks, dramatic sky, crashing waves "
            "BREAK [fog] in the valley, ((distant hills))")
PLAIN = ("a lighthouse on a cliff at dawn, oil painting BREAK seagulls over the rocks, dramatic sky, crashing waves "
         "BREAK fog in the valley, distant hills")
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("full-size")
    build_full_size_sd(root / "models")
    # Compile off: a background compile finishing mid-test would change the path (as tests/test_gpu_generation.py).
    # Shared batches off: a plain run and a varied or LoRA run (always solo) are compared bit for bit, so both take the
    # solo path; a shared batch matches it within fp16 rounding only (test_gpu_generation's shared-batch test).
    manager = ModelManager(Settings(models_root=root / "models", standin_dir=root / "standins", compile=False, shared_batches=False,
                                    compile_cache_dir=root / "inductor"))
    model = manager.get(MODELS["sd15"])
    assert not model.is_standin and model.dtype == DTYPE and model.device.type == DEVICE.type
    give_the_final_norm_a_trained_bias(model.obj.text_encoder)
    yield model
    manager.unload_all()


def give_the_final_norm_a_trained_bias(text_encoder: torch.nn.Module) -> None:
    """Random init leaves CLIP's final layer norm at weight 1 and bias 0: every token's state then has mean 0, and the
    chunk mean that A1111's emphasis keeps is rounding noise (2e-9 against -3e-9 on this architecture: a rescale by
    -0.67). A trained CLIP's final norm has a learned bias (SD 1.5's has), so the mean is a real number: give it one."""
    norm = next(module for name, module in text_encoder.named_modules() if name.endswith("final_layer_norm"))
    bias = torch.randn(norm.bias.shape, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.2
    with torch.no_grad():
        norm.bias.copy_(bias)


def emit(label: str, result: GenerationResult | None = None, **figures) -> None:
    line = {"run": label}
    if result is not None:
        settings = result.settings
        line |= {"mode": str(settings.mode), "size": "{}x{}".format(*settings.output_size), "images": settings.num_images,
                 "steps": settings.total_denoising_steps, "precision": result.dtype, "unet_path": result.unet_path,
                 "seconds": round(result.seconds, 3), "peak_allocated_bytes": result.peak_memory_bytes}
    print(json.dumps(line | figures), flush=True)


def run(sd, settings: GenerationSettings, label: str, **arguments) -> GenerationResult:
    result = generation.generate(sd, settings, **arguments)
    emit(label, result)
    return result


def pixels(result: GenerationResult, index: int = 0) -> np.ndarray:
    return np.asarray(result.images[index].image, dtype=np.int16)


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# 1. Prompt syntax ---------------------------------------------------------------------------------------------

def test_a_long_weighted_prompt_with_break_encodes_as_a1111_and_a_lora_tag_loads_and_comes_off(sd, tmp_path_factory):
    # Embeddings, through the run's own tokenizer copy and text encoder (eager), holding the device as a run does
    run_pipe = generation.run_pipeline(sd.obj, Mode.TEXT_TO_IMAGE, BASE.scheduler)
    with queue_for(sd.device).slot():
        weighted, plain = (encode_prompts(run_pipe.tokenizer, run_pipe.text_encoder, text, NEGATIVE, sd.device, DTYPE) for text in (WEIGHTED, PLAIN))
    tokens = tokenize_prompt(run_pipe.tokenizer, WEIGHTED)
    hidden = sd.obj.text_encoder.config.hidden_size
    assert tokens.token_count > 100 and len(tokens.chunks) == 3
    assert [chunk.ids for chunk in tokens.chunks] == [chunk.ids for chunk in tokenize_prompt(run_pipe.tokenizer, PLAIN).chunks]
    assert weighted.prompt_embeds.shape == weighted.negative_prompt_embeds.shape == (1, 3 * WINDOW, hidden)
    assert weighted.prompt_embeds.dtype == DTYPE and torch.equal(weighted.negative_prompt_embeds, plain.negative_prompt_embeds)
    figures = []
    for i, chunk in enumerate(tokens.chunks):
        ours, theirs = (embeds[0, i * WINDOW:(i + 1) * WINDOW].double() for embeds in (weighted.prompt_embeds, plain.prompt_embeds))
        if not chunk.weighted:  # a chunk without weights is the text encoder's output as it is
            assert torch.equal(ours, theirs), f"chunk {i}"
            figures.append({"chunk": i, "weighted": False})
            continue
        # As tests/test_prompt_embeddings.py defines it: unweighted tokens are the plain ones times one rescale
        # factor, weighted tokens times their weight too, and the chunk keeps the plain one's mean.
        weights = torch.tensor(chunk.weights, dtype=torch.float64, device=ours.device)[:, None]
        unweighted = (weights == 1).squeeze(1)
        rescale = (ours[unweighted] * theirs[unweighted]).sum() / (theirs[unweighted] ** 2).sum()
        torch.testing.assert_close(ours, rescale * weights * theirs, rtol=2e-3, atol=2e-3)  # fp16 rounding
        torch.testing.assert_close(ours.mean(), theirs.mean(), rtol=2e-3, atol=1e-4)
        assert not torch.equal(ours[~unweighted], theirs[~unweighted]) and abs(rescale.item() - 1) > 1e-3
        figures.append({"chunk": i, "weighted": True, "weights": sorted({round(w, 4) for w in chunk.weights}), "rescale": round(rescale.item(), 5)})
    emit("prompt embeddings", tokens=tokens.token_count, chunks=len(tokens.chunks), per_chunk=figures)

    # Images: the weights change the picture; the LoRA of the tag loads at the tag's weight and comes off again
    folder = tmp_path_factory.mktemp("ink")
    make_standin_lora(Path(sd.source.location), folder)  # rank 4, random B: it changes what it touches
    adapter = lora.read_source(str(folder), Settings(models_root=folder.parent))
    tag = f"<lora:{adapter.name}:0.8>"
    loaded = {name: value.clone() for name, value in sd.obj.unet.state_dict().items()}
    base = run(sd, replace(BASE, prompt=WEIGHTED, negative_prompt=NEGATIVE), "weighted 110-token prompt, 3 chunks")
    plain_image = run(sd, replace(BASE, prompt=PLAIN, negative_prompt=NEGATIVE), "the same words unweighted")
    tagged = run(sd, replace(BASE, prompt=f"{WEIGHTED} {tag}", negative_prompt=NEGATIVE), f"weighted prompt with {tag}",
                 loras=(LoraChoice(adapter, 1.0),))  # the tag's 0.8 overrides the adapter's own weight
    boxed = run(sd, replace(BASE, prompt=f"{WEIGHTED} ", negative_prompt=NEGATIVE), "weighted prompt, the LoRA at 0.8 without a tag",
                loras=(LoraChoice(adapter, 0.8),))
    after = run(sd, replace(BASE, prompt=WEIGHTED, negative_prompt=NEGATIVE), "weighted prompt after the LoRA")
    figures = {"weights_vs_plain": mean_difference(pixels(base), pixels(plain_image)), "lora_vs_base": mean_difference(pixels(tagged), pixels(base)),
               "tag_vs_weight_box": mean_difference(pixels(tagged), pixels(boxed)), "after_vs_base": mean_difference(pixels(after), pixels(base))}
    emit("prompt syntax and LoRA tag, mean pixel differences", **figures)
    assert not np.array_equal(pixels(base), pixels(plain_image))
    assert tagged.settings.loras == ((adapter.name, 0.8),) and tagged.settings.prompt.endswith(tag)
    assert f'LoRA: "{adapter.name}:0.8"' in pnginfo.parameters_text(tagged.settings_for(0), tagged.model_name, is_standin=False)
    assert figures["lora_vs_base"] > 1
    assert figures["tag_vs_weight_box"] < 0.5  # the same weight whichever way it was given: the same picture
    assert figures["after_vs_base"] < 1 and sd.obj.get_list_adapters() == {}
    for name, value in sd.obj.unet.state_dict().items():
        assert torch.equal(value, loaded[name]), name


# 2. Painted masks and outpainting -----------------------------------------------------------------------------

def picture(width: int, height: int) -> Image.Image:
    """A smooth picture with a few shapes: gradients, a sun, a horizon."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([0.3 + 0.6 * x, 0.4 + 0.4 * y, 0.6 + 0.3 * np.sin(6 * x)], axis=-1)
    rgb[(x - 0.7) ** 2 + (y - 0.3) ** 2 < 0.01] = (1.0, 0.85, 0.3)
    rgb[y > 0.75] *= 0.5
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def painted_mask(size: tuple[int, int]) -> Image.Image:
    """A brush stroke as the mask painter delivers it: its canvas (red where painted, transparent elsewhere) as the
    browser's PNG data URL, decoded by core.tasks.outpaint as app_pages/mask_painter.py:paint_mask decodes it."""
    mask_size = outpaint.painted_mask_size(size)
    width, height = mask_size
    canvas = Image.new("RGBA", mask_size, (0, 0, 0, 0))
    brush = width * 3 // 16  # 96 px at 512: the painter's largest brush
    points = [(width * 0.25, height * 0.35), (width * 0.45, height * 0.6), (width * 0.7, height * 0.45)]
    draw = ImageDraw.Draw(canvas)
    draw.line(points, fill=(255, 40, 40, 255), width=brush, joint="curve")
    for x, y in (points[0], points[-1]):  # round caps, as the browser's lineCap "round"
        draw.ellipse((x - brush / 2, y - brush / 2, x + brush / 2, y + brush / 2), fill=(255, 40, 40, 255))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    mask = outpaint.decode_mask_payload(outpaint.PNG_DATA_URL_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii"), mask_size)
    return mask if mask.size == size else mask.resize(size, Image.Resampling.NEAREST)


@contextmanager
def decoded_latents(vae: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """The latents each VAE decode in the block starts from: what the pipeline hands the decoder after its last step
    (diffusers' AutoencoderKL runs post_quant_conv first; compile is off, so the decode is diffusers' own)."""
    seen: list[torch.Tensor] = []
    handle = vae.post_quant_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().float().cpu()))
    try:
        yield seen
    finally:
        handle.remove()


def latent_cells(mask: Image.Image, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent cells surely kept and surely repainted: kept where no masked pixel is in the cell or its neighbours
    (so a cell-alignment convention cannot matter), repainted where every pixel of the cell is masked."""
    painted = torch.tensor(np.asarray(mask) > 127, dtype=torch.float32)[None, None]
    touched = torch.nn.functional.max_pool2d(painted, scale, scale)
    kept = torch.nn.functional.max_pool2d(touched, 3, 1, 1)[0, 0] == 0
    repainted = -torch.nn.functional.max_pool2d(-painted, scale, scale)[0, 0] == 1
    return kept, repainted


def pixel_regions(mask: Image.Image, outside_px: int, inside_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels more than `outside_px` from the mask, and pixels more than `inside_px` inside it."""
    painted = torch.tensor(np.asarray(mask) > 127, dtype=torch.float32)[None, None]
    grown = torch.nn.functional.max_pool2d(painted, 2 * outside_px + 1, 1, outside_px)[0, 0]
    shrunk = 1 - torch.nn.functional.max_pool2d(1 - painted, 2 * inside_px + 1, 1, inside_px)[0, 0]
    return (grown == 0).numpy(), (shrunk == 1).numpy()


def inpaint_against_reference(sd, settings: GenerationSettings, image: Image.Image, mask: Image.Image, label: str) -> dict:
    """`settings` with `mask`, and the same run with nothing masked: the picture as the model's VAE keeps it (the same
    seed draws the same encoding of `image`). Returns the figures the tests assert on."""
    with decoded_latents(sd.obj.vae) as latents:
        result = run(sd, settings, label, source=SourceImages(image, mask))
        reference = run(sd, settings, f"{label}: nothing masked", source=SourceImages(image, Image.new("L", image.size, 0)))
    assert len(latents) == 2
    kept, repainted = latent_cells(mask, sd.obj.vae_scale_factor)
    assert kept.any() and repainted.any()
    out, ref = latents[0][0], latents[1][0]
    far_outside, deep_inside = pixel_regions(mask, settings.width // 8, settings.width // 32)
    difference = np.abs(pixels(result) - pixels(reference)).mean(axis=-1)
    figures = {
        "size": result.images[0].image.size, "masked_fraction": round(float((np.asarray(mask) > 127).mean()), 3),
        "kept_latents_equal": bool(torch.equal(out[:, kept], ref[:, kept])),
        "kept_latents_max_difference": (out[:, kept] - ref[:, kept]).abs().max().item(), "kept_latents_max": ref[:, kept].abs().max().item(),
        "repainted_latents_mean_difference": round((out[:, repainted] - ref[:, repainted]).abs().mean().item(), 3),
        "latent_std": {"repainted": round(out[:, repainted].std().item(), 2), "kept": round(ref[:, kept].std().item(), 2)},
        "pixel_mean_difference": {"deep_inside": round(float(difference[deep_inside].mean()), 2),
                                  "far_outside": round(float(difference[far_outside].mean()), 2)},
    }
    emit(f"{label}: against nothing masked", **figures)
    return figures


def kept_exactly(figures: dict) -> bool:
    """The kept latents are the picture's own: equal, or a few fp16 steps apart should the two runs' encodings of the
    picture round differently (the repainted ones differ by tens)."""
    return figures["kept_latents_max_difference"] <= 2e-3 * figures["kept_latents_max"]


def test_a_painted_mask_repaints_only_under_the_stroke_and_outpainting_keeps_the_original(sd):
    """Outside the mask, diffusers' inpaint pipeline (which the core runs with SD's own 4-channel UNet) puts the
    picture's own latents back after every step: the latents decoded there are exactly the picture's. In pixels that is
    exact only up to the VAE decoder, whose group norms and attention see the whole image: with random weights the
    repainted latents are far larger than a picture's (the random UNet drives them off), and that spreads to every
    pixel, so the pixel figures outside the mask are printed, not asserted (a trained model keeps them close)."""
    size = (BASE.width, BASE.height)
    source = picture(*size)
    mask = painted_mask(size)
    assert mask.mode == "L" and mask.size == size and set(np.unique(np.asarray(mask))) == {0, 255}
    inpaint = replace(BASE, mode=Mode.INPAINT, strength=1.0, seed=3)
    painted = inpaint_against_reference(sd, inpaint, source, mask, "inpaint, painted mask")
    assert painted["size"] == size and kept_exactly(painted)
    assert painted["repainted_latents_mean_difference"] > 0.1
    assert painted["pixel_mean_difference"]["deep_inside"] > 5  # the stroke's area is repainted

    canvas = outpaint.extend_canvas(source, right=OUTPAINT_RIGHT_PX)
    width = size[0] + OUTPAINT_RIGHT_PX
    assert canvas.image.size == canvas.mask.size == (width, size[1])
    assert np.array_equal(np.asarray(canvas.image)[:, :size[0]], np.asarray(source))  # the original's pixels, untouched
    kept_width = size[0] - outpaint.DEFAULT_OVERLAP_PX  # the seam's band is repainted too
    assert (np.asarray(canvas.mask)[:, :kept_width] == 0).all() and (np.asarray(canvas.mask)[:, kept_width:] == 255).all()
    outpainted = inpaint_against_reference(sd, replace(inpaint, width=width), canvas.image, canvas.mask, f"outpaint {size[0]} -> {width} wide")
    assert outpainted["size"] == (width, size[1]) and kept_exactly(outpainted)
    assert outpainted["repainted_latents_mean_difference"] > 0.1
    assert outpainted["pixel_mean_difference"]["deep_inside"] > 5  # the new area is painted, not the stretched edge


# 3. X/Y plot --------------------------------------------------------------------------------------------------

def test_a_four_by_four_xy_plot_of_cfg_and_seed(sd):
    plan = sweeps.plan_sweep(BASE, sweeps.parse_axis(sweeps.AxisKind.CFG_SCALE, "4-10 [4]", name="X"),
                             sweeps.parse_axis(sweeps.AxisKind.SEED, "1-4", name="Y"))
    cell_seconds: list[float] = []

    def generate_one(settings: GenerationSettings, loras: tuple[LoraChoice, ...]) -> list[Image.Image]:
        result = generation.generate(sd, settings, loras=loras)
        cell_seconds.append(result.seconds)
        return [image.image for image in result.images]

    generate_one(plan.cells[0].settings, ())  # warm-up: the shape's graphs captured, as for any run after the first
    cell_seconds.clear()
    started = time.perf_counter()
    result = sweeps.run_sweep(plan, generate_one, sd.spec.repo_id, is_standin=sd.is_standin)
    total_s = time.perf_counter() - started
    emit("4x4 X/Y plot (CFG 4-10 x seed 1-4), 16 cells and the grid", total_s=round(total_s, 3), cells=len(result.cells),
         s_per_cell=round(total_s / len(result.cells), 3), cell_run_s_median=round(statistics.median(cell_seconds), 3),
         cell_run_s=[round(s, 3) for s in cell_seconds], grid_size=result.grid.size, size=f"{BASE.width}x{BASE.height}", steps=BASE.steps)

    layout = sweeps.grid_layout(plan)
    assert not result.cancelled and len(result.cells) == 16 == len(plan.cells)
    assert result.grid.size == layout.size == (layout.left_band_px + 4 * BASE.width, layout.top_band_px + 4 * BASE.height)
    grid = np.asarray(result.grid)
    for made in result.cells:
        cell = made.cell
        assert made.image.size == (BASE.width, BASE.height)
        x0, y0 = layout.cell_origin(cell.column, cell.row)
        assert np.array_equal(grid[y0:y0 + BASE.height, x0:x0 + BASE.width], np.asarray(made.image.convert("RGB")))
        parsed = pnginfo.parse_parameters(pnginfo.read_parameters(made.png))
        assert parsed.settings == cell.settings and parsed.model == sd.spec.repo_id
        assert (parsed.settings.guidance_scale, parsed.settings.seed) == (plan.x.values[cell.column], plan.y.values[cell.row])
    assert [plan.x.values[c.cell.column] for c in result.cells[:4]] == [4, 6, 8, 10] and plan.y.values == (1, 2, 3, 4)
    images = [np.asarray(made.image) for made in result.cells]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[4])  # CFG and seed both tell
    grid_text = pnginfo.read_parameters(result.grid_png)
    assert 'X Type: CFG scale, X Values: "4, 6, 8, 10", Y Type: Seed, Y Values: "1, 2, 3, 4"' in grid_text
    assert pnginfo.parse_parameters(grid_text).settings == plan.cells[0].settings


# 4. Variation seed and hires fix ------------------------------------------------------------------------------

HIRES = replace(BASE, prompt="a castle on a hill at night", seed=7, hires_scale=2.0, hires_steps=BASE.steps, hires_strength=0.5, hires_upscaler=HiresUpscaler.LATENT)


@pytest.fixture(scope="module")
def hires_run(sd) -> GenerationResult:
    """512 -> 1024 with the latent upscaler, 10 hires steps (A1111's hires steps x strength): made once, the history
    test keeps it too."""
    return run(sd, HIRES, "hires fix 2x, latent, strength 0.5")


def test_variation_seeds_blend_from_the_seed_to_the_variation_seed_and_hires_doubles_the_size(sd, hires_run):
    seed, other = replace(BASE, seed=7), replace(BASE, seed=99)
    plain, other_image = run(sd, seed, "seed 7"), run(sd, other, "seed 99")
    varied = replace(seed, variation_seed=99)
    nothing = run(sd, replace(varied, variation_strength=0.0), "seed 7, variation seed 99 at 0")
    whole = run(sd, replace(varied, variation_strength=1.0), "seed 7, variation seed 99 at 1")
    little = run(sd, replace(varied, variation_strength=0.05), "seed 7, variation seed 99 at 0.05")
    figures = {"to_plain": {"strength 0.05": mean_difference(pixels(little), pixels(plain)), "seed 99": mean_difference(pixels(other_image), pixels(plain))}}
    emit("variation, mean pixel differences", **figures)
    assert np.array_equal(pixels(nothing), pixels(plain))  # strength 0 is the seed's own image
    assert np.array_equal(pixels(whole), pixels(other_image))  # strength 1 is exactly the variation seed's
    assert whole.settings.variation_seed == 99 and little.settings.variation_strength == 0.05
    assert not np.array_equal(pixels(little), pixels(plain))
    assert figures["to_plain"]["strength 0.05"] < figures["to_plain"]["seed 99"]  # a little variation stays nearer

    # Hires: twice the size, within the memory the core's admission control reserves for it
    estimate = estimate_memory(sd.info, HIRES)
    image = hires_run.images[0].image
    emit("hires fix 2x against its estimate", hires_run, estimate_bytes=estimate.total_bytes, plain_512_peak_bytes=plain.peak_memory_bytes,
         steps_per_s=round(hires_run.steps_per_s, 1), hires_steps=HIRES.hires_denoising_steps)
    assert image.size == HIRES.output_size == (2 * BASE.width, 2 * BASE.height)
    assert np.asarray(image).std() > 0 and hires_run.settings.hires_denoising_steps == BASE.steps // 2
    assert_peak_within(hires_run, estimate.total_bytes, above=plain)
    again = pnginfo.parse_parameters(pnginfo.read_parameters(pnginfo.png_bytes(image, hires_run.settings_for(0), hires_run.model_name, is_standin=False)))
    assert again.settings == hires_run.settings_for(0)  # its PNG makes it again


def assert_peak_within(result: GenerationResult, bound_bytes: int, above: GenerationResult) -> None:
    """`check_memory` admits a run when `estimate_memory` fits the free memory: a run that went past its estimate
    could be admitted onto a card it then fills. Four times the pixels also needs more than a 512x512 run."""
    assert above.peak_memory_bytes < result.peak_memory_bytes <= bound_bytes


# 5. Image history ---------------------------------------------------------------------------------------------

def kept_pngs(result: GenerationResult) -> list[tuple[bytes, ImageRecord]]:
    """Each image's PNG and record as the generation page keeps them (app_pages/generate_history.py:records_of)."""
    kept = []
    for i, image in enumerate(result.images):
        settings = result.settings_for(i)
        png = pnginfo.png_bytes(image.image, settings, result.model_name, is_standin=result.is_standin)
        kept.append((png, ImageRecord(settings.prompt, settings.negative_prompt, result.model_name, settings.seed, image.image.width,
                                      image.image.height, settings.steps, pnginfo.read_parameters(png))))
    return kept


def test_full_size_images_are_kept_found_after_a_restart_deleted_and_evicted_oldest_first(sd, hires_run, tmp_path):
    lighthouses = run(sd, replace(BASE, prompt="a Lighthouse at dawn", num_images=2, seed=21), "history: two lighthouses")
    fox = run(sd, replace(BASE, prompt="a red fox in snow", seed=22), "history: a fox")
    alice, bob = image_history.user_owner("alice@example.com"), image_history.browser_owner("0123456789abcdef0123456789abcdef")
    made = kept_pngs(lighthouses) + kept_pngs(hires_run)
    sizes = [len(png) for png, _ in made]
    with ImageHistory(tmp_path / "history", max_bytes=2**30) as store:
        ids = [store.add(alice, png, record) for png, record in made]
        (fox_png, fox_record), = kept_pngs(fox)
        fox_id = store.add(bob, fox_png, fox_record)

    with ImageHistory(tmp_path / "history", max_bytes=2**30) as store:  # a new process on the same folder
        assert [entry.id for entry in store.list(alice)] == ids[::-1]  # newest first
        assert [entry.id for entry in store.list(alice, "LIGHTHOUSE")] == ids[1::-1]  # any case, the hires castle not
        assert [entry.id for entry in store.list(bob, "fox")] == [fox_id] and store.list(alice, "fox") == ()
        for image_id, (png, record), original in zip(ids, made, [*lighthouses.images, *hires_run.images], strict=True):
            kept = store.get(alice, image_id)
            assert kept.png_bytes == png and kept.entry.record == record and kept.entry.byte_size == len(png)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(kept.png_bytes)).convert("RGB")), np.asarray(original.image.convert("RGB")))
        assert pnginfo.parse_parameters(store.get(alice, ids[2]).entry.record.parameters).settings == hires_run.settings_for(0)
        assert store.get(alice, fox_id) is None and not store.delete(alice, fox_id) and store.get(bob, fox_id) is not None
        assert store.delete(alice, ids[0]) and store.get(alice, ids[0]) is None
        assert store.usage(alice).image_count == 2 and store.usage().total_bytes == sum(sizes[1:]) + len(fox_png)
        assert len(list((tmp_path / "history" / image_history.IMAGES_DIR).rglob("*.png"))) == 3

    # The size limit: room for the first three PNGs less a byte, so each add evicts the oldest image, of any owner
    (first, first_record), (second, second_record) = made[:2]
    limit = len(first) + len(fox_png) + len(second) - 1
    with ImageHistory(tmp_path / "limited", max_bytes=limit) as store:
        oldest = store.add(alice, first, first_record)
        bobs = store.add(bob, fox_png, fox_record)
        newest = store.add(alice, second, second_record)
        assert store.get(alice, oldest) is None and store.get(bob, bobs) is not None and store.get(alice, newest) is not None
        last = store.add(alice, first, first_record)
        assert store.get(bob, bobs) is None and [entry.id for entry in store.list(alice)] == [last, newest]
        assert store.usage().total_bytes <= limit
    emit("history of full-size PNGs", png_bytes=sizes + [len(fox_png)], limit_bytes=limit)


# 6. The job queue ---------------------------------------------------------------------------------------------

def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_two_owners_share_the_gpu_fairly_see_their_places_and_cancel_their_own_queued_run(sd):
    board, holder = JobBoard(max_unfinished_per_owner=4), DeviceHolder(WAIT_S)
    alice, bob = "user:alice@example.com", "browser:0123456789abcdef0123456789abcdef"
    finished: list[str] = []
    lock = threading.Lock()

    def work(name: str, seed: int, abandoned: Callable[[], bool] = lambda: False):
        def generate(context):
            result = generation.generate(sd, replace(BASE, seed=seed), context, abandoned=abandoned)
            with lock:
                finished.append(name)
            return result
        return generate

    def places(owner: str) -> dict[str, int | None]:
        return {job.name: job.place for job in board.jobs(owner)}

    ids = {"a1": board.submit(alice, work("a1", 31, holder.abandoned), "a1")}
    assert holder.running.wait(WAIT_S)  # a1 holds the GPU at its first step until released
    for name, seed in (("a2", 32), ("a3", 33)):
        ids[name] = board.submit(alice, work(name, seed), name)
    wait_for(lambda: places(alice) == {"a1": 0, "a2": 1, "a3": 2}, "alice's places")
    ids["b1"] = board.submit(bob, work("b1", 41), "b1")
    wait_for(lambda: places(bob) == {"b1": 1} and places(alice) == {"a1": 0, "a2": 2, "a3": 3}, "bob's run to go first")
    ids["a4"] = board.submit(alice, work("a4", 34), "a4")
    wait_for(lambda: places(alice)["a4"] == 4, "alice's fourth run")
    details = {job.name: job.snapshot.detail for job in board.jobs(alice) + board.jobs(bob)}
    assert details["b1"] == "waiting for the GPU: next in line" and details["a2"] == "waiting for the GPU: 2nd in line"

    with pytest.raises(NotYourJobError):
        board.cancel(bob, ids["a2"])
    board.cancel(alice, ids["a4"])
    assert board.wait(ids["a4"], WAIT_S)  # while a1 still holds the GPU
    cancelled = next(job for job in board.jobs(alice) if job.name == "a4")
    assert cancelled.snapshot.state is JobState.CANCELLED and cancelled.place is None and cancelled.snapshot.done == 0
    assert places(alice) == {"a1": 0, "a2": 2, "a3": 3, "a4": None} and len(queue_for(sd.device)) == 4

    holder.release.set()
    for name in ("a1", "a2", "a3", "b1"):
        assert board.wait(ids[name], WAIT_S), name
    results = {name: board.collect(owner, ids[name]) for owner, names in ((alice, ("a1", "a2", "a3", "a4")), (bob, ("b1",))) for name in names}
    emit("job queue, two owners", order=finished, seconds={name: round(job.result.seconds, 3) for name, job in results.items() if job.result},
         states={name: str(job.snapshot().state) for name, job in results.items()})
    assert finished == ["a1", "b1", "a2", "a3"]  # bob's one run before alice's second and third
    assert all(results[name].snapshot().state is JobState.DONE for name in ("a1", "a2", "a3", "b1"))
    assert all(results[name].result.images[0].image.size == (BASE.width, BASE.height) for name in ("a1", "a2", "a3", "b1"))
    assert results["a4"].snapshot().state is JobState.CANCELLED and results["a4"].result is None
    assert len(queue_for(sd.device)) == 0 and board.jobs(alice) == board.jobs(bob) == []
