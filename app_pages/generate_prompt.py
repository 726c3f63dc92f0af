"""The caption under the generation page's prompt: how many tokens and chunks the model reads, or why it cannot read
the prompt. Prompts are read as AUTOMATIC1111 reads them (docs/PROMPTS.md): the whole prompt, 75 tokens a chunk.
"""
from __future__ import annotations

import streamlit as st

from app_pages.common import show_error
from core.api import BadInputError, LoadedModel, generation, prompt_syntax


def prompt_caption(model: LoadedModel, prompt: str, negative_prompt: str) -> None:
    """"N tokens, M chunks", or the message for what the run would refuse (a weight that is no number, a prompt over
    the length limits), said before Generate is pressed."""
    try:
        generation.check_prompt_syntax(prompt, negative_prompt)
        usage = generation.prompt_usage(model.info, prompt)
    except BadInputError as error:
        show_error(error)
        return
    whole = f" · all of it is read, {prompt_syntax.CHUNK_TOKENS} tokens a chunk" if usage.chunks > 1 else ""
    st.caption(f"Prompt: {usage.caption}{whole}")
