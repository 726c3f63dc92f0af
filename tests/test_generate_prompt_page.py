"""The generation page's prompt (issue 19.1) through AppTest: the token and chunk caption, bad syntax and LoRA tags
refused with one message before any run, a tag setting the session adapter's weight."""
from __future__ import annotations

import re

from test_generate_page import generate, key, open_page, texts

from app_pages.common import literal


def test_the_caption_counts_tokens_and_chunks_and_warns_of_no_truncation(app_env):
    at = open_page(prompt="x" * 80)  # the stand-in's tokenizer makes one token per character
    assert "Prompt: 80 tokens, 2 chunks · all of it is read, 75 tokens a chunk" in texts(at)
    assert not any("ignored" in warning.value for warning in at.warning)
    at.text_area(key=key("prompt")).input("a (red) car").run()
    assert re.search(r"Prompt: \d+ tokens, 1 chunk\b", texts(at))


def test_bad_syntax_is_said_under_the_prompt_and_refused_at_generate_keeping_the_prompt(app_env):
    at = open_page(prompt="a (red:1.2.3) car")
    message = "In the prompt: The weight '1.2.3' in the emphasis `:1.2.3)` is not a number."
    assert [error.value.split("\n\n")[0] for error in at.error] == [literal(message)]
    at.button(key=key("start")).click().run()
    assert not at.session_state[key("runs")] and not at.exception
    assert any(literal(message) in error.value for error in at.error)
    assert at.text_area(key=key("prompt")).value == "a (red:1.2.3) car"


def test_a_lora_tag_naming_no_adapter_of_the_session_is_refused_naming_it(app_env):
    at = open_page(prompt="a fox <lora:film-grain:0.6>", seed=3)
    at.button(key=key("start")).click().run()
    assert not at.session_state[key("runs")]
    message = "The prompt's tag asks for the LoRA `film-grain`, but this session has no adapter of that name; its adapters: none."
    assert [error.value.split("\n\n")[0] for error in at.error] == [literal(message)]


def test_a_lora_tag_sets_the_session_adapters_weight_and_the_png_keeps_the_prompt_as_typed(app_env, standin_dir, tmp_path, monkeypatch):
    from core.models import standins
    from core.models.registry import MODELS
    from core.tasks import pnginfo
    from helpers import make_standin_lora

    monkeypatch.setenv("DASH_MODELS_ROOT", str(tmp_path))  # a typed LoRA folder must lie inside the models root
    make_standin_lora(standins.ensure_built(MODELS["sd15"], standin_dir), tmp_path / "my-style")
    at = open_page(prompt="a hill <lora:my-style:0.4>", seed=42)
    at.text_input(key=key("lora_source")).input(str(tmp_path / "my-style"))
    at.button(key=key("lora_add")).click().run()
    at = generate(at)
    assert not at.error, [error.value for error in at.error]
    entry = at.session_state[key("gallery")][0]
    assert entry.result.settings.loras == (("my-style", 0.4),)  # the tag's weight, not the widget's 1.0
    assert pnginfo.read_parameters(entry.pngs[0]).startswith("a hill <lora:my-style:0.4>\n")
