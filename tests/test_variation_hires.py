"""Variation seeds and the hires fix (core.tasks.sd_settings, generation, pnginfo) on the stand-in SD pipeline."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from core.errors import BadInputError
from core.models.registry import MODELS
from core.tasks import generation, pnginfo
from core.tasks.sd_settings import GenerationSettings, HiresUpscaler, Mode, check_inputs, estimate_memory

SMALL = GenerationSettings(prompt="a red bicycle", width=64, height=64, steps=2, seed=11)


@pytest.fixture()
def sd(manager):
    return manager.get(MODELS["sd15"], allow_standin=True)


def image_of(sd, settings: GenerationSettings) -> np.ndarray:
    return np.asarray(generation.generate(sd, settings).images[0].image)


def test_variation_strength_blends_the_seed_and_the_variation_seeds_images(sd):
    plain, other = image_of(sd, SMALL), image_of(sd, replace(SMALL, seed=99))
    varied = replace(SMALL, variation_seed=99)
    np.testing.assert_array_equal(image_of(sd, replace(varied, variation_strength=1.0)), other)
    np.testing.assert_array_equal(image_of(sd, replace(varied, variation_strength=0.0)), plain)
    halfway = image_of(sd, replace(varied, variation_strength=0.5))
    assert not np.array_equal(halfway, plain) and not np.array_equal(halfway, other)


def test_a_variation_without_its_seed_draws_one_and_records_it(sd):
    result = generation.generate(sd, replace(SMALL, variation_strength=0.3))
    assert result.settings.variation_seed is not None
    again = replace(SMALL, variation_strength=0.3, variation_seed=result.settings.variation_seed)
    np.testing.assert_array_equal(image_of(sd, again), np.asarray(result.images[0].image))


def test_each_image_of_a_batch_gets_the_next_variation_seed(sd):
    batch = generation.generate(sd, replace(SMALL, num_images=2, variation_seed=40, variation_strength=0.5))
    alone = replace(SMALL, seed=12, variation_seed=41, variation_strength=0.5)
    # A batch of two runs other GEMM shapes than one image: a pixel may round one level apart (as test_generation says)
    assert np.abs(np.asarray(batch.images[1].image).astype(int) - image_of(sd, alone)).max() <= 1
    assert np.abs(np.asarray(batch.images[0].image).astype(int) - np.asarray(batch.images[1].image)).max() > 16


@pytest.mark.parametrize("upscaler", list(HiresUpscaler))
def test_hires_doubles_the_size_and_its_png_makes_it_again(sd, upscaler):
    settings = replace(SMALL, hires_scale=2.0, hires_steps=2, hires_strength=0.6, hires_upscaler=upscaler)
    result = generation.generate(sd, settings)
    assert result.images[0].image.size == (128, 128)
    png = pnginfo.png_bytes(result.images[0].image, result.settings_for(0), result.model_name, is_standin=True)
    text = pnginfo.read_parameters(png)
    assert f"Hires upscale: 2, Hires steps: 2, Hires upscaler: {'Latent' if upscaler is HiresUpscaler.LATENT else 'Lanczos'}" in text
    again = pnginfo.parse_parameters(text).settings
    assert again == result.settings_for(0)
    np.testing.assert_array_equal(image_of(sd, again), np.asarray(result.images[0].image))


def test_the_hires_pass_repaints_the_upscaled_first_pass(sd):
    first = Image.fromarray(image_of(sd, SMALL)).resize((128, 128), Image.Resampling.LANCZOS)
    hires = image_of(sd, replace(SMALL, hires_scale=2.0, hires_upscaler=HiresUpscaler.IMAGE))
    assert not np.array_equal(hires, np.asarray(first))


def test_variation_and_hires_read_from_an_automatic1111_png():
    text = ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, Variation seed: 77, Variation seed strength: 0.25, "
            "Denoising strength: 0.55, Hires upscale: 1.5, Hires upscaler: Latent (bicubic)")
    settings = pnginfo.parse_parameters(text).settings
    assert (settings.variation_seed, settings.variation_strength) == (77, 0.25)
    assert (settings.hires_scale, settings.hires_steps, settings.hires_strength, settings.hires_upscaler) == (1.5, 0, 0.55, HiresUpscaler.LATENT)


def test_an_upscaler_this_app_lacks_is_refused_by_name():
    text = "a cat\nSteps: 20, Sampler: Euler a, Seed: 5, Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+"
    with pytest.raises(BadInputError, match="`Hires upscaler` 'R-ESRGAN 4x\\+' is not one of: Latent, Lanczos"):
        pnginfo.parse_parameters(text)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"variation_strength": 1.5}, "`variation_strength` has to be between 0 and 1 but is 1.5"),
        ({"variation_seed": -1, "variation_strength": 0.5}, "`variation_seed` has to be between 0 and"),
        ({"hires_scale": 2.5}, "`hires_scale` has to be between 1 and 2 but is 2.5"),
        ({"hires_scale": 0.5}, "`hires_scale` has to be between 1 and 2 but is 0.5"),
        ({"hires_steps": 151}, "`hires_steps` has to be between 0 and 150 but is 151"),
        ({"hires_scale": 2.0, "hires_strength": 0}, "`hires_strength` has to be between 0.01 and 1 but is 0"),
        ({"hires_scale": 2.0, "width": 1536}, "`hires_scale` 2 makes 1536x64 into 3072x128, more than 2048 pixels a side"),
        ({"hires_scale": 2.0, "hires_steps": 2, "hires_strength": 0.4}, "`hires_strength` 0.4 of 2 hires steps leaves no step to run"),
        ({"hires_scale": 2.0, "mode": Mode.IMAGE_TO_IMAGE}, "`hires_scale` 2 applies to text to image only, and this run is image to image"),
        ({"variation_strength": 0.5, "mode": Mode.INPAINT}, "`variation_strength` 0.5 applies to text to image only"),
        ({"hires_scale": 2.0, "hires_upscaler": "bicubic"}, "`hires_upscaler` 'bicubic' is not one of latent, image"),
    ],
)
def test_bad_variation_and_hires_values_are_refused_naming_the_argument(change, message):
    source = generation.SourceImages(Image.new("RGB", (64, 64)), Image.new("L", (64, 64)))
    with pytest.raises(BadInputError, match=message.replace("(", r"\(").replace("+", r"\+")):
        check_inputs(replace(SMALL, **change), "cpu", source)


def test_the_memory_estimate_counts_the_hires_size(sd):
    plain = estimate_memory(sd.info, SMALL)
    doubled = estimate_memory(sd.info, replace(SMALL, hires_scale=2.0))
    assert doubled.activations_bytes == 4 * plain.activations_bytes
