"""core.models.model_card: a DreamBooth model's trigger phrase, from either way cards write it."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.models.loading import ModelSource
from core.models.model_card import read_card, trigger_phrase
from core.models.registry import MODELS

DIFFUSERS_SCRIPT_CARD = """---
license: creativeml-openrail-m
base_model: runwayml/stable-diffusion-v1-5
instance_prompt: a photo of sks dog
tags:
- dreambooth
---
# DreamBooth - someone/dog
"""
LIBRARY_CARD = """### Mr Potato Head on Stable Diffusion via Dreambooth
This is the Stable Diffusion model fine-tuned the Mr Potato Head concept taught to Stable Diffusion with Dreambooth.
It can be used by modifying the `instance_prompt`: **sks mr potato head**
"""


@pytest.mark.parametrize(
    ("card", "phrase"),
    [(DIFFUSERS_SCRIPT_CARD, "a photo of sks dog"), (LIBRARY_CARD, "sks mr potato head"),
     ("instance_prompt: 'a sks toy'\n", "a sks toy"), ("# A plain model card\n", None), ("", None)],
)
def test_trigger_phrase(card, phrase):
    assert trigger_phrase(card) == phrase


def test_the_card_is_read_from_a_local_folder_or_is_empty(settings, tmp_path: Path):
    spec = MODELS["mr-potato-head"]
    assert read_card(spec, ModelSource(str(tmp_path), is_local=True), settings) == ""
    (tmp_path / "README.md").write_text(LIBRARY_CARD)
    assert trigger_phrase(read_card(spec, ModelSource(str(tmp_path), is_local=True), settings)) == "sks mr potato head"


def test_no_card_offline_is_no_phrase_not_an_error(settings):
    assert read_card(MODELS["mr-potato-head"], ModelSource(MODELS["mr-potato-head"].repo_id, is_local=False), settings) == ""
