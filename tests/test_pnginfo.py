from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from core.errors import BadInputError
from core.tasks import pnginfo
from core.tasks.sd_settings import SCHEDULERS, GenerationSettings, MemoryMode, Precision

FULL = GenerationSettings(
    prompt="a watercolour, of a lighthouse: at dawn", negative_prompt='blurry, "low" quality', steps=30, guidance_scale=6.5,
    width=768, height=512, seed=3_000_000_000, scheduler="DPM++ 2M Karras", precision=Precision.FP16, memory_mode=MemoryMode.VAE_TILING,
)


def image() -> Image.Image:
    return Image.new("RGB", (16, 16), (200, 80, 20))


def test_the_text_has_automatic1111s_layout():
    text = pnginfo.parameters_text(FULL, "stable-diffusion-v1-5/stable-diffusion-v1-5", is_standin=False)
    prompt, negative, params = text.split("\n")
    assert prompt == FULL.prompt and negative == f"Negative prompt: {FULL.negative_prompt}"
    assert params.startswith("Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3000000000, Size: 768x512, ")
    assert "Model: stable-diffusion-v1-5/stable-diffusion-v1-5" in params and "Memory mode: VAE tiling" in params


def test_pndm_is_written_as_automatic1111s_plms_and_read_back():
    settings = GenerationSettings(seed=1, scheduler="PNDM")
    text = pnginfo.parameters_text(settings, "m/n", is_standin=False)
    assert "Sampler: PLMS" in text
    assert pnginfo.parse_parameters(text).settings.scheduler == "PNDM"


def test_png_round_trip_gives_the_same_settings():
    data = pnginfo.png_bytes(image(), FULL, "someone/model", is_standin=False)
    parsed = pnginfo.parse_parameters(pnginfo.read_parameters(data))
    assert parsed.settings == FULL and parsed.model == "someone/model"
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.size == (16, 16) and reopened.getpixel((0, 0)) == (200, 80, 20)


@settings(max_examples=60, deadline=None)
@given(
    prompt=st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=80).map(str.strip),
    negative=st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40).map(str.strip),
    steps=st.integers(1, 150), guidance=st.sampled_from([0.0, 1.0, 6.5, 7.5, 12.25]), seed=st.integers(0, 2**53 - 1),
    scheduler=st.sampled_from(list(SCHEDULERS)), width=st.sampled_from([64, 512, 2048]),
)
def test_any_settings_survive_the_round_trip(prompt, negative, steps, guidance, seed, scheduler, width):
    if prompt.startswith("Negative prompt:"):
        prompt = "x" + prompt  # the layout cannot tell such a prompt from a negative prompt (nor can AUTOMATIC1111)
    original = GenerationSettings(prompt=prompt, negative_prompt=negative, steps=steps, guidance_scale=guidance, seed=seed, scheduler=scheduler, width=width)
    assert pnginfo.parse_parameters(pnginfo.parameters_text(original, "a/b", is_standin=False)).settings == original


def test_reads_automatic1111s_own_text():
    text = (
        "masterpiece, a castle on a hill\nat night\n"
        "Negative prompt: lowres, bad anatomy\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234567, Size: 512x768, "
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "a: 1, b: 2", Version: v1.10.1'
    )
    parsed = pnginfo.parse_parameters(text)
    assert parsed.settings == GenerationSettings(
        prompt="masterpiece, a castle on a hill\nat night", negative_prompt="lowres, bad anatomy", steps=20, guidance_scale=7.0,
        width=512, height=768, seed=1234567, scheduler="Euler a",
    )
    assert parsed.model == "v1-5-pruned-emaonly"


def test_a_text_without_a_parameters_line_is_all_prompt():
    parsed = pnginfo.parse_parameters("just a prompt")
    assert parsed.settings.prompt == "just a prompt" and parsed.settings.seed is None


def test_an_unknown_sampler_is_refused_by_name():
    with pytest.raises(BadInputError, match="sampler 'DPM adaptive'"):
        pnginfo.parse_parameters("p\nSteps: 20, Sampler: DPM adaptive, CFG scale: 7, Seed: 1, Size: 512x512")


def test_no_token_ever_reaches_the_png(monkeypatch):
    secret = "hf_SeCrEtToKeN1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    data = pnginfo.png_bytes(image(), FULL, "someone/model", is_standin=False)
    assert secret.encode() not in data and b"HF_TOKEN" not in data


def test_files_without_settings_are_refused_with_a_message():
    plain = io.BytesIO()
    image().save(plain, format="PNG")
    with pytest.raises(BadInputError, match="carries no generation settings"):
        pnginfo.read_parameters(plain.getvalue(), "plain.png")
    jpeg = io.BytesIO()
    image().save(jpeg, format="JPEG")
    with pytest.raises(BadInputError, match="not a PNG"):
        pnginfo.read_parameters(jpeg.getvalue(), "photo.jpg")
    with pytest.raises(BadInputError, match="not a readable image"):
        pnginfo.read_parameters(b"not an image at all", "junk.png")
