"""core.tasks.prompt_embeddings with the stand-in SD pipeline's tokenizer and 2-layer CLIP text encoder, on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from core.accel import Acceleration, cuda_graphs
from core.models import standins
from core.models.registry import MODELS
from core.tasks import generation, pnginfo
from core.tasks.prompt_embeddings import encode_prompts
from core.tasks.prompt_syntax import LoraTag
from core.tasks.sd_settings import GenerationSettings, Mode

CPU = torch.device("cpu")
WINDOW = 77


@pytest.fixture(scope="module")
def pipe(standin_dir):
    pipe = StableDiffusionPipeline.from_pretrained(standins.ensure_built(MODELS["sd15"], standin_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(pipe, prompt: str, negative_prompt: str = "", dtype: torch.dtype = torch.float32):
    return encode_prompts(pipe.tokenizer, pipe.text_encoder, prompt, negative_prompt, CPU, dtype)


@pytest.mark.parametrize(("prompt", "negative_prompt"), [("a red car", "blurry, dark"), ("a (red:1.0) car", ""), ("", "")])
def test_a_plain_prompt_gives_diffusers_own_embeddings_bit_for_bit(pipe, prompt, negative_prompt):
    ours = encode(pipe, prompt, negative_prompt)
    plain_prompt, plain_negative = (text.replace("(red:1.0)", "red") for text in (prompt, negative_prompt))
    theirs = pipe.encode_prompt(plain_prompt, CPU, 1, True, negative_prompt=plain_negative or None)
    assert torch.equal(ours.prompt_embeds, theirs[0]) and torch.equal(ours.negative_prompt_embeds, theirs[1])


def test_a_weight_scales_its_tokens_and_the_mean_is_kept(pipe):
    plain = encode(pipe, "a red car").prompt_embeds[0].double()
    weighted = encode(pipe, "a (red:1.5) car").prompt_embeds[0].double()
    red = torch.zeros(WINDOW, dtype=torch.bool)
    red[2:5] = True  # start token, "a", then r-e-d: one token per letter in the stand-in vocabulary
    # Before the rescale the two differ only at "red", by 1.5; the rescale then multiplies everything by one factor.
    rescale = (weighted[~red] * plain[~red]).sum() / (plain[~red] ** 2).sum()
    torch.testing.assert_close(weighted[~red], rescale * plain[~red])
    torch.testing.assert_close(weighted[red], 1.5 * rescale * plain[red])
    assert abs(rescale - 1) > 1e-3  # the rescale did change the embedding...
    torch.testing.assert_close(weighted.mean(), plain.mean())  # ...back to the plain prompt's mean


def test_a_200_token_prompt_is_three_windows_encoded_alone(pipe):
    embeddings = encode(pipe, "a " * 200, "blurry")
    assert embeddings.prompt_embeds.shape == (1, 3 * WINDOW, pipe.text_encoder.config.hidden_size)
    assert embeddings.negative_prompt_embeds.shape == embeddings.prompt_embeds.shape
    first_75 = encode(pipe, "a " * 75).prompt_embeds
    last_50 = encode(pipe, "a " * 50).prompt_embeds
    assert torch.equal(embeddings.prompt_embeds[:, :WINDOW], first_75) and torch.equal(embeddings.prompt_embeds[:, 2 * WINDOW:], last_50)
    # The negative prompt is padded with empty prompts' windows, as AUTOMATIC1111 pads it.
    empty = encode(pipe, "").prompt_embeds
    assert torch.equal(embeddings.negative_prompt_embeds[:, :WINDOW], encode(pipe, "blurry").prompt_embeds)
    assert torch.equal(embeddings.negative_prompt_embeds[:, WINDOW:], torch.cat([empty, empty], dim=1))


def test_a_long_negative_prompt_pads_the_prompt(pipe):
    embeddings = encode(pipe, "a cat", "b " * 80)
    assert embeddings.prompt_embeds.shape[1] == embeddings.negative_prompt_embeds.shape[1] == 2 * WINDOW
    assert torch.equal(embeddings.prompt_embeds[:, WINDOW:], encode(pipe, "").prompt_embeds)


def test_break_encodes_each_part_alone(pipe):
    embeddings = encode(pipe, "a cat BREAK a dog").prompt_embeds
    assert torch.equal(embeddings, torch.cat([encode(pipe, "a cat").prompt_embeds, encode(pipe, "a dog").prompt_embeds], dim=1))


@pytest.mark.parametrize("mode", list(Mode))
def test_each_modes_pipeline_makes_images_from_a_long_prompt_and_reads_all_of_it(pipe, mode):
    run_pipe = generation.run_pipeline(pipe, mode, "DDIM")  # as core.tasks.generation builds a run's pipeline
    source = {} if mode is Mode.TEXT_TO_IMAGE else {"image": Image.new("RGB", (64, 64), (90, 140, 200)), "strength": 1.0}
    if mode is Mode.INPAINT:
        source["mask_image"] = Image.new("L", (64, 64), 255)

    def images(prompt: str) -> np.ndarray:
        embeddings = encode(run_pipe, prompt, "blurry")
        output = run_pipe(
            prompt_embeds=embeddings.prompt_embeds, negative_prompt_embeds=embeddings.negative_prompt_embeds, num_images_per_prompt=2,
            height=64, width=64, num_inference_steps=1, generator=torch.Generator("cpu").manual_seed(7), output_type="np", **source,
        )
        assert output.images.shape == (2, 64, 64, 3)
        return output.images

    assert not np.array_equal(images("a " * 75 + "b " * 125), images("a " * 75))  # the tokens past 75 change the picture


def test_lora_tags_come_back_and_their_text_is_not_encoded(pipe):
    embeddings = encode(pipe, "a cat <lora:ink:0.7> <hypernet:x:1>")
    assert embeddings.loras == (LoraTag("ink", 0.7),) and embeddings.ignored_tags == ("<hypernet:x:1>",)
    assert torch.equal(embeddings.prompt_embeds, encode(pipe, "a cat  ").prompt_embeds)


def test_embeddings_come_in_the_dtype_asked_for(pipe):
    embeddings = encode(pipe, "a (red:1.3) car", dtype=torch.float16)
    assert embeddings.prompt_embeds.dtype == embeddings.negative_prompt_embeds.dtype == torch.float16


def test_a_prompt_read_back_from_png_metadata_gives_the_same_embeddings(pipe):
    settings = GenerationSettings(
        prompt="a (red:1.5) car, [[rusty]] BREAK on a \\(very\\) long: road <lora:film-grain:0.6>\n" + "b, " * 40,
        negative_prompt="(blurry:1.3), low quality, text: \"caption\"", seed=5,
    )
    read_back = pnginfo.parse_parameters(pnginfo.parameters_text(settings, "someone/model", is_standin=False)).settings
    before, after = encode(pipe, settings.prompt, settings.negative_prompt), encode(pipe, read_back.prompt, read_back.negative_prompt)
    assert before.prompt_embeds.shape[1] == 3 * WINDOW  # BREAK, then 80 more tokens than fit one window
    assert torch.equal(before.prompt_embeds, after.prompt_embeds) and torch.equal(before.negative_prompt_embeds, after.negative_prompt_embeds)
    assert after.loras == (LoraTag("film-grain", 0.6),)


@pytest.mark.gpu
def test_on_the_gpu_one_text_encoder_graph_serves_every_chunk_exactly(standin_dir):
    cuda = torch.device("cuda")
    folder = standins.ensure_built(MODELS["sd15"], standin_dir)
    gpu_pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=torch.float16).to(cuda)
    tokenizer, text_encoder = gpu_pipe.tokenizer, gpu_pipe.text_encoder

    def both(embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        return embeddings.prompt_embeds, embeddings.negative_prompt_embeds

    long_prompt, negative = "a (red:1.5) car, " + "b " * 100, "[blurry]"
    eager = both(encode_prompts(tokenizer, text_encoder, long_prompt, negative, cuda, torch.float16))
    diffusers_plain = gpu_pipe.encode_prompt("a red car", cuda, 1, True, negative_prompt="blurry")
    with cuda_graphs.graphed_text_encoder(text_encoder, Acceleration()):  # as core.tasks.generation's run holds it
        graphed = [both(encode_prompts(tokenizer, text_encoder, long_prompt, negative, cuda, torch.float16)) for _ in range(2)]
        plain = both(encode_prompts(tokenizer, text_encoder, "a red car", "blurry", cuda, torch.float16))
    assert eager[0].shape == (1, 2 * WINDOW, text_encoder.config.hidden_size) and eager[0].dtype == torch.float16  # 103 tokens: 2 chunks
    assert all(torch.equal(want, got) for run in graphed for want, got in zip(eager, run, strict=True))
    assert all(torch.equal(want, got) for want, got in zip(diffusers_plain, plain, strict=True))
    assert len(cuda_graphs._graphs[text_encoder].graphs) == 1  # every chunk of either prompt: the one (1, 77) graph
