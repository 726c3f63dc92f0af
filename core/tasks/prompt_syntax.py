"""AUTOMATIC1111's prompt syntax, parsed without torch: weights, BREAK, LoRA tags, and prompts past CLIP's 75 tokens.

    a (red:1.3) car, ((shiny)), [rusty] BREAK on a \\(very\\) long road <lora:film-grain:0.6>

`parse_prompt` turns a prompt into weighted fragments, BREAK markers and LoRA tags, as A1111's
`prompt_parser.parse_prompt_attention` and `extra_networks.parse_prompt` do. `tokenize_prompt` turns it into CLIP
windows of 77 tokens (start, up to 75 prompt tokens, end, padding) with a weight per token, split as A1111's
`sd_hijack_clip.tokenize_line` splits them: at 75 tokens, or after the last comma when that is at most 20 tokens
back, and at every BREAK. core.tasks.prompt_embeddings encodes the windows; the page shows `prompt_usage(...).caption`.

The tokenizer is a transformers CLIP tokenizer. A fast one keeps its padding and truncation settings on the object
and sets them on every call: these functions always call it the same way (no padding, no truncation), but must not
share it with a caller that pads at the same time (see core.tasks.generation's `_counting_lock` and `run_tokenizer`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from core.errors import BadInputError

EMPHASIS = 1.1  # (word) multiplies its weight by this, [word] divides it, nested brackets multiply again
CHUNK_TOKENS = 75  # prompt tokens in one CLIP window of 77 (with the start and end tokens)
COMMA_BACKTRACK_TOKENS = 20  # A1111's default "comma_padding_backtrack": a chunk ends after a comma this close to its end
MAX_CHUNKS = 10  # 750 tokens: far past any real prompt; a pasted book would make every UNet step attend to all of it
MAX_PROMPT_CHARS = 10_000  # far past 750 tokens of text; bounds the parser's work on brackets nested thousands deep
LORA_TAG_NAMES = ("lora", "lyco")  # A1111's LoRA extension answers to both

# One token of A1111's emphasis grammar each match, in its order of precedence.
_ATTENTION_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]           # an escaped bracket or backslash: that character, literally
    | \\                   # a lone backslash: dropped, as A1111 drops it
    | \( | \[              # opens an emphasis
    | :([+-]?[.\d]+)\)     # closes (text:weight)
    | \) | ]               # closes (text) or [text]
    | [^\\()\[\]:]+        # plain text
    | :                    # a colon that closes nothing: plain text
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's <kind:arguments> (LoRA, hypernetwork, ...)
_COMMA = ",</w>"  # CLIP's token for a comma at the end of a word


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float  # 1.0 unless brackets changed it


@dataclass(frozen=True)
class Break:
    """BREAK: the prompt goes on in a new 75-token chunk."""


@dataclass(frozen=True)
class LoraTag:
    name: str
    weight: float


@dataclass(frozen=True)
class ParsedPrompt:
    parts: tuple[Fragment | Break, ...]  # adjacent fragments of one weight merged; no empty fragments
    loras: tuple[LoraTag, ...]  # the <lora:name:weight> tags, for the caller to load; their text is not in `parts`
    ignored_tags: tuple[str, ...]  # other <kind:...> tags (hypernetworks, ...): removed, as A1111 removes unknown ones

    @property
    def weighted(self) -> bool:
        return any(isinstance(part, Fragment) and part.weight != 1.0 for part in self.parts)


@dataclass(frozen=True)
class TokenChunk:
    ids: tuple[int, ...]  # one CLIP window: start token, up to 75 prompt tokens, end token, padding
    weights: tuple[float, ...]  # one per id; 1.0 for the start, end and padding

    @property
    def weighted(self) -> bool:
        return any(weight != 1.0 for weight in self.weights)


@dataclass(frozen=True)
class TokenizedPrompt:
    chunks: tuple[TokenChunk, ...]  # at least one; each encoded alone, the results concatenated
    token_count: int  # the prompt's own tokens: no start, end or padding
    loras: tuple[LoraTag, ...]
    ignored_tags: tuple[str, ...]


@dataclass(frozen=True)
class PromptUsage:
    tokens: int
    chunks: int

    @property
    def caption(self) -> str:
        return f"{self.tokens} token{'s' * (self.tokens != 1)}, {self.chunks} chunk{'s' * (self.chunks != 1)}"


def parse_prompt(prompt: str, read_tags: bool = True) -> ParsedPrompt:
    """The prompt's weighted fragments, BREAKs and LoRA tags. BadInputError for a weight or LoRA tag that is no number,
    and for a prompt longer than MAX_PROMPT_CHARS.

    `read_tags=False` for a negative prompt: A1111 reads extra-network tags from the prompt only, and a negative
    prompt's `<...>` is text like any other.
    """
    if len(prompt) > MAX_PROMPT_CHARS:  # before any regular expression runs over it
        raise BadInputError(f"The prompt is {len(prompt):,} characters long; this app reads at most {MAX_PROMPT_CHARS:,}.", remedy="Shorten the prompt.")
    loras: list[LoraTag] = []
    ignored: list[str] = []

    def take_tag(match: re.Match[str]) -> str:
        kind, arguments = match.groups()
        if kind in LORA_TAG_NAMES:
            loras.append(_lora_tag(match.group(), arguments.split(":")))
        else:
            ignored.append(match.group())
        return ""

    text = _EXTRA_NETWORK_TAG.sub(take_tag, prompt) if read_tags else prompt
    return ParsedPrompt(parse_attention(text), tuple(loras), tuple(ignored))


def _lora_tag(tag: str, arguments: list[str]) -> LoraTag:
    name, *weights = arguments
    if not name.strip() or len(weights) > 1:
        raise BadInputError(
            f"The LoRA tag `{tag}` is not `<lora:name>` or `<lora:name:weight>`.",
            remedy="Write one name and at most one weight, for example `<lora:my-style:0.8>`.",
        )
    return LoraTag(name, _number(weights[0], f"`{tag}`") if weights else 1.0)


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BadInputError(f"The weight {text!r} in {where} is not a number.", remedy="Write a weight like 1.2 or 0.8.") from None


def parse_attention(text: str) -> tuple[Fragment | Break, ...]:
    """A1111's emphasis: `(a)` x1.1, `[a]` /1.1, `(a:w)` xw, nested brackets multiply; `\\(` `\\)` `\\[` `\\]` `\\\\`
    are the characters themselves. A bracket never closed applies to the end of the prompt; a closing bracket
    never opened is plain text. Unlike A1111, a BREAK inside brackets still breaks (A1111 weights it into text).
    """
    # Parallel lists, a None text for a BREAK: every closing bracket multiplies all weights from its opening on, and
    # plain floats keep that fast where a hostile prompt nests thousands of brackets.
    texts: list[str | None] = []
    weights: list[float] = []
    round_opened: list[int] = []  # where in `texts` each open bracket started
    square_opened: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for i in range(start, len(weights)):
            weights[i] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(), match.group(1)
        if token.startswith("\\"):
            texts.append(token[1:])
            weights.append(1.0)
        elif token == "(":
            round_opened.append(len(texts))
        elif token == "[":
            square_opened.append(len(texts))
        elif weight is not None and round_opened:
            multiply_from(round_opened.pop(), _number(weight, f"the emphasis `{token}`"))
        elif token == ")" and round_opened:
            multiply_from(round_opened.pop(), EMPHASIS)
        elif token == "]" and square_opened:
            multiply_from(square_opened.pop(), 1 / EMPHASIS)
        else:
            for i, piece in enumerate(_BREAK.split(token)):
                if i:
                    texts.append(None)
                    weights.append(1.0)
                texts.append(piece)
                weights.append(1.0)
    for start in round_opened:
        multiply_from(start, EMPHASIS)
    for start in square_opened:
        multiply_from(start, 1 / EMPHASIS)
    return _merged(texts, weights)


def _merged(texts: list[str | None], weights: list[float]) -> tuple[Fragment | Break, ...]:
    """Fragments and BREAKs, adjacent fragments of one weight as one (tokenized together, as A1111 does), empty ones
    left out."""
    merged: list[Fragment | Break] = []
    for text, weight in zip(texts, weights, strict=True):
        previous = merged[-1] if merged else None
        if text is None:
            merged.append(Break())
        elif isinstance(previous, Fragment) and previous.weight == weight:
            merged[-1] = Fragment(previous.text + text, weight)
        elif text:
            merged.append(Fragment(text, weight))
    return tuple(merged)


def tokenize_prompt(tokenizer: Any, prompt: str, read_tags: bool = True) -> TokenizedPrompt:
    """The prompt as CLIP windows with a weight per token (see the module's docstring for the split).

    BadInputError for a weight or LoRA tag that is no number, and for a prompt of more than MAX_CHUNKS chunks.
    """
    parsed = parse_prompt(prompt, read_tags)
    fragments = [part for part in parsed.parts if isinstance(part, Fragment)]
    token_lists = iter(tokenizer([f.text for f in fragments], truncation=False, add_special_tokens=False, verbose=False).input_ids if fragments else [])
    comma = tokenizer.convert_tokens_to_ids(_COMMA)
    if comma == tokenizer.unk_token_id:
        comma = None  # a vocabulary without it: chunks end at 75 tokens only
    chunks: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    last_comma = -1  # where in `current` the last comma is

    def close_chunk() -> None:
        nonlocal current, last_comma
        chunks.append(current)
        current, last_comma = [], -1

    for part in parsed.parts:
        if isinstance(part, Break):
            close_chunk()
            continue
        for token in next(token_lists):
            if token == comma:
                last_comma = len(current)
            elif len(current) == CHUNK_TOKENS and last_comma >= 0 and len(current) - last_comma <= COMMA_BACKTRACK_TOKENS:
                # The words after the comma would be cut in two: they move to the next chunk together.
                moved = current[last_comma + 1:]
                current = current[:last_comma + 1]
                close_chunk()
                current = moved
            if len(current) == CHUNK_TOKENS:
                close_chunk()
            current.append((token, part.weight))
    if current or not chunks:
        close_chunk()
    token_count = sum(len(chunk) for chunk in chunks)
    if len(chunks) > MAX_CHUNKS:
        raise BadInputError(
            f"The prompt is {token_count} tokens in {len(chunks)} chunks; this app reads at most {MAX_CHUNKS} chunks of {CHUNK_TOKENS} tokens.",
            remedy="Shorten the prompt.",
        )
    return TokenizedPrompt(tuple(_window(tokenizer, chunk) for chunk in chunks), token_count, parsed.loras, parsed.ignored_tags)


def _window(tokenizer: Any, tokens: list[tuple[int, float]]) -> TokenChunk:
    """One chunk in CLIP's 77 positions, laid out as diffusers' own tokenizing pads a prompt (for SD 1.x, whose
    padding token is its end token, also as A1111 does)."""
    padding = CHUNK_TOKENS - len(tokens)
    ids = (tokenizer.bos_token_id, *(token for token, _ in tokens), tokenizer.eos_token_id, *[tokenizer.pad_token_id] * padding)
    weights = (1.0, *(weight for _, weight in tokens), 1.0, *[1.0] * padding)
    return TokenChunk(ids, weights)


def empty_chunk(tokenizer: Any) -> TokenChunk:
    """The window of an empty prompt: what pads the shorter of a prompt and its negative prompt."""
    return _window(tokenizer, [])


def prompt_usage(tokenizer: Any, prompt: str) -> PromptUsage:
    """Tokens and chunks of a prompt, for the page's "N tokens, M chunks" caption."""
    tokenized = tokenize_prompt(tokenizer, prompt)
    return PromptUsage(tokenized.token_count, len(tokenized.chunks))
