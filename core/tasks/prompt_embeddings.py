"""Prompt and negative prompt as CLIP embeddings, the way AUTOMATIC1111 makes them, for a diffusers SD 1.x pipeline.

    embeddings = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompt, negative_prompt, device, dtype)
    pipe(prompt_embeds=embeddings.prompt_embeds, negative_prompt_embeds=embeddings.negative_prompt_embeds, ...)

Each 77-token chunk of core.tasks.prompt_syntax is encoded alone and the chunks are concatenated along the sequence, so
a prompt of any length is read whole. A chunk with weights has its hidden states multiplied token by token, then
scaled back to the chunk's original mean (A1111's "Original" emphasis). A chunk without weights is the text
encoder's output as it is, in the same call diffusers' `encode_prompt` makes, so a plain prompt of at most 75
tokens gives the very same tensor (tests/test_prompt_embeddings.py) and costs nothing extra; each call has the
shape (1, 77), so core.accel.cuda_graphs' text-encoder graph serves every chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from core.tasks.prompt_syntax import LoraTag, TokenChunk, empty_chunk, tokenize_prompt


@dataclass(frozen=True)
class PromptEmbeddings:
    prompt_embeds: torch.Tensor  # (1, 77 x chunks, hidden size), for the pipeline's `prompt_embeds`
    negative_prompt_embeds: torch.Tensor  # the same shape (the shorter side padded with empty chunks), for CFG
    loras: tuple[LoraTag, ...]  # the prompt's <lora:name:weight> tags, for the caller to load (their text is removed)
    ignored_tags: tuple[str, ...]  # the prompt's other <kind:...> tags, removed and not used


def encode_prompts(
    tokenizer: Any, text_encoder: torch.nn.Module, prompt: str, negative_prompt: str, device: torch.device, dtype: torch.dtype
) -> PromptEmbeddings:
    """Both prompts' embeddings on `device` in `dtype` (diffusers casts to the text encoder's dtype).

    `device` is where the pipeline runs (`pipe._execution_device` under CPU offload). BadInputError (before any
    encoding) for a weight or LoRA tag that is no number and for an over-long prompt. The tokenizer must not be
    padding for another caller meanwhile (see core.tasks.prompt_syntax).
    """
    positive = tokenize_prompt(tokenizer, prompt)
    negative = tokenize_prompt(tokenizer, negative_prompt, read_tags=False)  # A1111 reads tags from the prompt only
    # no_grad as diffusers' own pipelines run, not inference_mode: the text encoder's CUDA graph keeps static input
    # tensors, and one captured under inference_mode refuses the copies of a later caller outside it (shared batches).
    with torch.no_grad():
        sides = [[_encode_chunk(text_encoder, chunk, device) for chunk in side.chunks] for side in (positive, negative)]
        longest = max(len(side) for side in sides)
        if any(len(side) < longest for side in sides):
            # diffusers concatenates the two for classifier-free guidance: A1111 pads the shorter with empty prompts
            empty = _encode_chunk(text_encoder, empty_chunk(tokenizer), device)
            sides = [side + [empty] * (longest - len(side)) for side in sides]
        prompt_embeds, negative_embeds = (torch.cat(side, dim=1).to(dtype=dtype, device=device) for side in sides)
    return PromptEmbeddings(prompt_embeds, negative_embeds, positive.loras, positive.ignored_tags)


def _encode_chunk(text_encoder: torch.nn.Module, chunk: TokenChunk, device: torch.device) -> torch.Tensor:
    """One chunk's last hidden state, (1, 77, hidden size), with its weights applied."""
    hidden = text_encoder(torch.tensor([chunk.ids], device=device))[0]
    if not chunk.weighted:
        return hidden
    return emphasize(hidden, torch.tensor(chunk.weights, device=hidden.device))


def emphasize(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: each token's hidden state times its weight, the whole then scaled back to the
    original mean (A1111 keeps the mean because without it heavy weights gave artefacts). Computed in float32, then
    back in the model's dtype, so that the rescale does not add half-precision rounding of its own."""
    original = hidden.float()
    weighted = original * weights.float()[None, :, None]
    scale = original.mean() / weighted.mean()
    if not torch.isfinite(scale):
        # A weighted mean of exactly 0 (a text encoder whose outputs are centred, as the stand-in's layer norm makes
        # them) holds no scale to keep: dividing by it made the embeddings inf, and the image came out black.
        return weighted.to(hidden.dtype)
    return (weighted * scale).to(hidden.dtype)
