"""core.tasks.prompt_syntax: AUTOMATIC1111's prompt grammar (cases from its own parse_prompt_attention doctests) and its
75-token chunking, with the stand-in SD model's CLIP tokenizer (one token per character, `</w>` ending a word)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from core.errors import BadInputError
from core.models.standins import clip_tokenizer_files
from core.tasks.prompt_syntax import (
    CHUNK_TOKENS,
    MAX_CHUNKS,
    MAX_PROMPT_CHARS,
    Break,
    Fragment,
    LoraTag,
    empty_chunk,
    parse_attention,
    parse_prompt,
    prompt_usage,
    tokenize_prompt,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def pairs(text: str) -> list[tuple[str, float]]:
    return [(part.text, part.weight) if isinstance(part, Fragment) else ("BREAK", -1) for part in parse_attention(text)]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("a (red:1.5) car", [("a ", 1.0), ("red", 1.5), (" car", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("a [quiet] word", [("a ", 1.0), ("quiet", 1 / 1.1), (" word", 1.0)]),
        ("(a [b] c)", [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1.1)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)],
        ),
        ("(big:-0.5) dog", [("big", -0.5), (" dog", 1.0)]),
        ("", []),
    ],
)
def test_weights_as_automatic1111_gives_them(prompt, expected):
    assert pairs(prompt) == [(text, pytest.approx(weight)) for text, weight in expected]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (r"\(literal\]", [("(literal]", 1.0)]),
        (r"a \(b\) \[c\] \\ d", [(r"a (b) [c] \ d", 1.0)]),
        (r"(\(x\))", [("(x)", 1.1)]),  # escaped brackets inside an emphasis take its weight
    ],
)
def test_escaped_brackets_are_the_characters(prompt, expected):
    assert pairs(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("(unbalanced", [("unbalanced", 1.1)]),  # never closed: applies to the end
        ("a [b (c", [("a ", 1.0), ("b ", 1 / 1.1), ("c", 1.1 / 1.1)]),
        ("a) b] c:", [("a) b] c:", 1.0)]),  # closed but never opened, and a lone colon: plain text
        ("x:1.5) y", [("x:1.5) y", 1.0)]),  # a weight with no bracket to close
        ("[a:b:0.5]", [("a:b:0.5", 1 / 1.1)]),  # A1111's prompt editing is not supported: its text, de-emphasised
    ],
)
def test_unbalanced_brackets_as_automatic1111_handles_them(prompt, expected):
    assert pairs(prompt) == [(text, pytest.approx(weight)) for text, weight in expected]


def test_break_splits_only_as_a_whole_word():
    assert pairs("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1), ("a dog", 1.0)]
    assert pairs("BREAKFAST, break, Break") == [("BREAKFAST, break, Break", 1.0)]
    assert pairs("(red BREAK car)") == [("red", 1.1), ("BREAK", -1), ("car", 1.1)]
    assert parse_attention("a BREAK b")[1] == Break()


def test_lora_tags_are_taken_out_of_the_prompt():
    parsed = parse_prompt("a cat <lora:film-grain:0.6>, <lora:ink> on a mat <hypernet:old:1>")
    assert parsed.loras == (LoraTag("film-grain", 0.6), LoraTag("ink", 1.0))
    assert parsed.parts == (Fragment("a cat ,  on a mat ", 1.0),)
    assert parsed.ignored_tags == ("<hypernet:old:1>",)
    assert parse_prompt("<lyco:soft:-0.5>").loras == (LoraTag("soft", -0.5),)


def test_negative_prompt_keeps_tags_as_text():
    parsed = parse_prompt("blurry <lora:x:1>", read_tags=False)
    assert parsed.loras == () and parsed.parts == (Fragment("blurry <lora:x:1>", 1.0),)


@pytest.mark.parametrize(
    ("prompt", "quoted"),
    [("<lora:x:strong>", "`<lora:x:strong>`"), ("<lora:x:0.5:0.8>", "`<lora:x:0.5:0.8>`"), ("<lora: :1>", "`<lora: :1>`"), ("a (b:1.2.3) c", "`:1.2.3)`")],
)
def test_a_weight_that_is_no_number_is_refused_quoting_it(prompt, quoted):
    with pytest.raises(BadInputError, match=re.escape(quoted)):
        parse_prompt(prompt)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CLIPTokenizer:
    folder = tmp_path_factory.mktemp("clip")
    clip_tokenizer_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_a_short_plain_prompt_is_the_window_diffusers_builds(tokenizer):
    tokenized = tokenize_prompt(tokenizer, "a red car")
    diffusers_ids = tokenizer("a red car", padding="max_length", max_length=77, truncation=True).input_ids
    assert [chunk.ids for chunk in tokenized.chunks] == [tuple(diffusers_ids)]
    assert tokenized.token_count == 7 and not tokenized.chunks[0].weighted


def test_weights_follow_their_tokens(tokenizer):
    chunk = tokenize_prompt(tokenizer, "a (red:1.5) car").chunks[0]
    assert chunk.ids == tokenize_prompt(tokenizer, "a red car").chunks[0].ids
    red = ids_of(tokenizer, "red")  # three letters: three tokens
    assert chunk.weights[:9] == (1.0, 1.0, 1.5, 1.5, 1.5, 1.0, 1.0, 1.0, 1.0) and len(red) == 3
    assert set(chunk.weights[9:]) == {1.0}


def test_a_long_prompt_is_cut_into_75_token_chunks(tokenizer):
    tokenized = tokenize_prompt(tokenizer, "a " * 200)
    assert tokenized.token_count == 200 and len(tokenized.chunks) == 3
    a = ids_of(tokenizer, "a")[0]
    for chunk, count in zip(tokenized.chunks, (75, 75, 50), strict=True):
        assert len(chunk.ids) == 77 and chunk.ids[0] == tokenizer.bos_token_id
        assert chunk.ids[1:count + 1] == (a,) * count and chunk.ids[count + 1] == tokenizer.eos_token_id
    assert prompt_usage(tokenizer, "a " * 200).caption == "200 tokens, 3 chunks"
    assert prompt_usage(tokenizer, "a").caption == "1 token, 1 chunk"


def test_the_words_after_a_late_comma_move_to_the_next_chunk(tokenizer):
    a, b, comma = (ids_of(tokenizer, word)[0] for word in ("a", "b", ","))
    late = tokenize_prompt(tokenizer, "a " * 70 + ", " + "b " * 10)  # the comma is token 71: within 20 of the end
    assert late.chunks[0].ids[1:73] == (a,) * 70 + (comma, tokenizer.eos_token_id)
    assert late.chunks[1].ids[1:12] == (b,) * 10 + (tokenizer.eos_token_id,)
    early = tokenize_prompt(tokenizer, "a " * 50 + ", " + "b " * 30)  # 25 tokens back: cut at 75 as usual
    assert early.chunks[0].ids[1:77] == (a,) * 50 + (comma,) + (b,) * 24 + (tokenizer.eos_token_id,)
    assert early.chunks[1].ids[1:8] == (b,) * 6 + (tokenizer.eos_token_id,)


def test_break_starts_a_new_chunk(tokenizer):
    tokenized = tokenize_prompt(tokenizer, "a cat BREAK a dog")
    assert len(tokenized.chunks) == 2 and tokenized.token_count == 8
    assert tokenized.chunks[1].ids[:6] == (tokenizer.bos_token_id, *ids_of(tokenizer, "a dog"), tokenizer.eos_token_id)


def test_an_empty_prompt_is_one_empty_chunk(tokenizer):
    tokenized = tokenize_prompt(tokenizer, "")
    assert tokenized.chunks == (empty_chunk(tokenizer),) and tokenized.token_count == 0
    assert empty_chunk(tokenizer).ids == tuple(tokenizer("", padding="max_length", max_length=77).input_ids)


def test_a_prompt_past_the_chunk_limit_is_refused(tokenizer):
    tokenize_prompt(tokenizer, "a " * CHUNK_TOKENS * MAX_CHUNKS)
    with pytest.raises(BadInputError, match=f"{CHUNK_TOKENS * MAX_CHUNKS + 1} tokens in {MAX_CHUNKS + 1} chunks"):
        tokenize_prompt(tokenizer, "a " * (CHUNK_TOKENS * MAX_CHUNKS + 1))


def test_a_prompt_past_the_character_limit_is_refused_before_parsing():
    # Brackets nested thousands deep make the parser's work grow with the square of the length (each closing bracket
    # reweighs everything after its opening), as do thousands of unclosed `<a:` for the tag pattern.
    deepest = parse_attention("(a" * (MAX_PROMPT_CHARS // 4) + ")" * (MAX_PROMPT_CHARS // 4))
    assert len(deepest) == MAX_PROMPT_CHARS // 4 and deepest[-1].weight == pytest.approx(1.1 ** (MAX_PROMPT_CHARS // 4))
    for hostile in ("(a" * (MAX_PROMPT_CHARS // 2) + "(", "<a:" * (MAX_PROMPT_CHARS // 3 + 1)):
        with pytest.raises(BadInputError, match=f"{len(hostile):,} characters long; this app reads at most {MAX_PROMPT_CHARS:,}"):
            parse_prompt(hostile)


def test_the_parser_needs_no_torch():
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, core.tasks.prompt_syntax; print('torch' in sys.modules)"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
    )
    assert imported.stdout.strip() == "False"
