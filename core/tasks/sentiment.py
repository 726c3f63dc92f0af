"""Sentiment (any text-classification model) on the shared manager: preprocess -> _forward -> postprocess.

Speed: texts are tokenised a slab at a time (the fast tokenizer uses every core), sorted by length and cut into
batches padded only to their longest member, so little compute goes to padding; the next slab is tokenised in a
second thread while the model works on this one. The model's dtype (fp16 on CUDA) comes from the manager.

Long texts: the model sees at most `max_tokens` tokens (512 for DistilBERT). A longer text keeps its first
`max_tokens - 1` tokens and its final [SEP]; every result carries `token_count` and `truncated` so pages say so.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from core.config import Settings
from core.errors import BadInputError
from core.models.manager import LoadedModel
from core.models.memory import out_of_memory_guard
from core.models.registry import MODELS, ModelSpec, custom_spec, folder_in_models_root, is_typed_folder, is_valid_repo_id
from core.tasks import cross_session
from core.tasks.classify import LabelScore
from core.tasks.jobs import JobContext

# Texts tokenised at a time: bounds host memory for 100,000 rows, and is the unit that overlaps with the model.
SLAB_TEXTS = 4096
# A batch holds at most this many rows and rows x padded length tokens. CUDA wants big batches to keep its cores
# busy; the CPU gains nothing past a few thousand tokens and a smaller batch reports progress more often.
BATCH_LIMITS = {"cuda": (512, 65_536), "cpu": (128, 4096)}
# A text past this many characters cannot fit 512 tokens anyway; cutting first keeps a 100 MB cell from
# costing seconds of tokenising (its result says `truncated`).
MAX_CHARS = 100_000
# Lines scored while the page waits (a file upload runs in the background instead): about a second on a CPU.
MAX_LINES = 2000
# Requests of at most this many texts (the page's single text, a few lines) may share a forward with other sessions'
# (core.tasks.cross_session); larger ones (lines, files) keep length-sorted batches of their own.
SHARED_TEXTS_AT_MOST = 8
SHARED_BATCH_TEXTS = 64  # texts in one forward shared by sessions
# Shared texts are padded to the longest of the forward: only texts of the same padded-length class (a power of two,
# at least this) meet, so that one 500-token text never pads fifteen short ones to 500.
SHARED_LENGTH_CLASS_MIN = 32
# Integrated-gradients path points: with Gauss-Legendre nodes (Captum's default) the attributions add up to the
# output change within about 1% (right Riemann sums need several times more points for the same).
ATTRIBUTION_STEPS = 16
INTEGRATED_GRADIENTS, GRADIENT_X_INPUT = "integrated gradients", "gradient × input"


@dataclass(frozen=True)
class Encoded:
    """Token ids of a list of texts, each already cut to the model's limit."""

    ids: list[list[int]]
    token_counts: np.ndarray  # tokens each text had before cutting, [CLS] and [SEP] included
    truncated: np.ndarray  # bool: the model saw only the first `max_tokens` tokens


@dataclass(frozen=True)
class TextSentiment:
    text: str
    scores: tuple[LabelScore, ...]  # every label of the model, highest first
    token_count: int
    truncated: bool
    max_tokens: int  # the model's limit: a truncated text was scored on this many tokens

    @property
    def top(self) -> LabelScore:
        return self.scores[0]


@dataclass(frozen=True, eq=False)
class SentimentScores:
    """Results for many texts, as arrays in input order (100,000 rows stay a few MB)."""

    labels: tuple[str, ...]  # the model's labels, in id order (from model.config.id2label)
    probabilities: np.ndarray  # (texts, labels) float32, softmax in fp32
    token_counts: np.ndarray
    truncated: np.ndarray
    max_tokens: int
    seconds: float
    device: str
    dtype: str
    model_title: str
    is_standin: bool

    def __len__(self) -> int:
        return len(self.probabilities)

    @property
    def top_labels(self) -> np.ndarray:
        return np.asarray(self.labels, dtype=object)[self.probabilities.argmax(axis=1)]

    @property
    def top_scores(self) -> np.ndarray:
        return self.probabilities.max(axis=1)

    @property
    def texts_per_s(self) -> float:
        return len(self) / self.seconds if self.seconds > 0 else float("inf")

    def columns(self) -> dict[str, np.ndarray]:
        """What a results table adds per text: label, score (its probability) and whether the text was cut."""
        return {"label": self.top_labels, "score": self.top_scores.round(4), "truncated": self.truncated}

    def result(self, index: int, text: str) -> TextSentiment:
        order = np.argsort(-self.probabilities[index], kind="stable")
        scores = tuple(LabelScore(self.labels[i], float(self.probabilities[index, i])) for i in order)
        return TextSentiment(text, scores, int(self.token_counts[index]), bool(self.truncated[index]), self.max_tokens)

    def label_counts(self) -> pd.DataFrame:
        """Texts per label (every label of the model, zeros included), most first."""
        counts = np.bincount(self.probabilities.argmax(axis=1), minlength=len(self.labels))
        return pd.DataFrame({"label": self.labels, "texts": counts}).sort_values("texts", ascending=False, ignore_index=True)

    def score_histogram(self, bins: int = 20) -> pd.DataFrame:
        """Texts per (label, score bin), for a stacked histogram: the top score lies in [1 / labels, 1]."""
        edges = np.linspace(1 / len(self.labels), 1, bins + 1)
        top, scores = self.probabilities.argmax(axis=1), self.top_scores
        rows = [
            {"label": label, "bin_start": float(edges[i]), "bin_end": float(edges[i + 1]), "texts": int(count)}
            for index, label in enumerate(self.labels)
            for i, count in enumerate(np.histogram(scores[top == index], bins=edges)[0])
        ]
        return pd.DataFrame(rows)


def model_spec(choice: str, settings: Settings) -> ModelSpec:
    """The spec for a text-classification model given as a Hub repo id (owner/name) or a folder inside the models
    root (starting with /, ~ or .; see `core.models.registry.folder_in_models_root`)."""
    value = choice.strip()
    default = MODELS["sentiment"]
    if not value or value == default.repo_id:
        return default
    if is_typed_folder(value):
        folder = folder_in_models_root(value, settings.models_root, "model")
        if not (folder / "config.json").is_file():
            raise BadInputError(f"model folder {value!r} has no config.json.", remedy="Give the folder saved by save_pretrained (Hub layout).")
        return custom_spec("sentiment", str(folder))
    if not is_valid_repo_id(value):
        raise BadInputError(
            f"model {value!r} is neither a Hub repo id (owner/name) nor a local folder (starting with /, ~ or .).",
            remedy="For example distilbert/distilbert-base-uncased-finetuned-sst-2-english, or ./my-classifier inside the models root.",
        )
    return custom_spec("sentiment", value)


def split_lines(block: str, max_lines: int = MAX_LINES) -> list[tuple[int, str]]:
    """(line number from 1, text) for every line of `block` that holds more than whitespace."""
    lines = [(number, line.strip()) for number, line in enumerate(block.splitlines(), start=1) if line.strip()]
    if len(lines) > max_lines:
        raise BadInputError(
            f"the text area has {len(lines):,} non-empty lines, more than {max_lines:,} scored as you type.",
            remedy="Save them as a CSV or TSV file and upload it: a file runs in the background with a progress bar.",
        )
    return lines


def check_inputs(texts: Sequence[str]) -> None:
    if len(texts) == 0:
        raise BadInputError("No text to classify.", remedy="Type a text, or give lines or a file with text in it.")
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise BadInputError(f"text {index + 1} is {text!r}: empty or whitespace only.", remedy="Leave out empty texts.")


# 1. Preprocess ------------------------------------------------------------------------------------------------


def preprocess(tokenizer: Any, texts: Sequence[str], limit: int) -> Encoded:
    """Token ids with the model's special tokens, cut to `limit` tokens (keeping the closing [SEP])."""
    # verbose=False: the tokenizer would warn that long texts overflow the model; cutting them is our job, just below.
    encoded = tokenizer([text[:MAX_CHARS] for text in texts], verbose=False, return_attention_mask=False, return_token_type_ids=False)
    ids = encoded["input_ids"]
    counts = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
    truncated = counts > limit
    for index in np.flatnonzero(truncated):
        ids[index] = cut(ids[index], limit)
    cut_chars = np.fromiter((len(text) > MAX_CHARS for text in texts), dtype=bool, count=len(texts))
    return Encoded(ids, counts, truncated | cut_chars)


def cut(sequence: list, limit: int) -> list:
    """The first `limit - 1` items and the last (the closing [SEP]) of a tokenised text longer than `limit`.

    We cut, not the tokenizer: asking it to truncate changes state inside the Rust tokenizer that every session
    shares, and a call from another thread at that moment fails with "Already borrowed".
    """
    return sequence if len(sequence) <= limit else sequence[: limit - 1] + sequence[-1:]


def length_sorted_batches(lengths: np.ndarray, max_rows: int, max_batch_tokens: int) -> list[np.ndarray]:
    """Indices of each batch, shortest texts first, so that padding to a batch's longest text wastes little."""
    order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        end = start + 1
        # Sorted ascending, so the last row of a batch sets its padded length.
        while end < len(order) and end - start < max_rows and (end - start + 1) * lengths[order[end]] <= max_batch_tokens:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def pad_batch(ids: list[list[int]], rows: np.ndarray, pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask for `rows`, padded to the longest of them, on `device`."""
    lengths = np.fromiter((len(ids[row]) for row in rows), dtype=np.int64, count=len(rows))
    input_ids = np.full((len(rows), int(lengths.max())), pad_id, dtype=np.int64)
    for position, row in enumerate(rows):
        input_ids[position, : lengths[position]] = ids[row]
    mask = np.arange(input_ids.shape[1]) < lengths[:, None]
    ids_tensor, mask_tensor = torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))
    if device.type == "cuda":  # pinned pages let the copy run while the GPU still works on the previous batch
        return ids_tensor.pin_memory().to(device, non_blocking=True), mask_tensor.pin_memory().to(device, non_blocking=True)
    return ids_tensor, mask_tensor


def padded_to_longest(pad_id: int) -> cross_session.Merge:
    """Merges requests' (input_ids, attention_mask) of different lengths: each re-padded to the longest, its own mask
    kept (zeros over the new padding), so each text is scored as in its own batch."""

    def merge(parts: list[cross_session.Inputs]) -> cross_session.Inputs:
        longest = max(input_ids.shape[1] for input_ids, _ in parts)
        input_ids = torch.cat([torch.nn.functional.pad(ids, (0, longest - ids.shape[1]), value=pad_id) for ids, _ in parts])
        attention_mask = torch.cat([torch.nn.functional.pad(mask, (0, longest - mask.shape[1]), value=0) for _, mask in parts])
        return input_ids, attention_mask

    return merge


def length_class(padded_length: int) -> int:
    """The power of two (at least SHARED_LENGTH_CLASS_MIN) that a request's padded length falls under."""
    return max(SHARED_LENGTH_CLASS_MIN, 1 << (padded_length - 1).bit_length())


# 2. Forward ----------------------------------------------------------------------------------------------------


def _forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


# 3. Postprocess ------------------------------------------------------------------------------------------------


def postprocess(logits: torch.Tensor) -> np.ndarray:
    """Probabilities as float32 on the CPU; softmax in fp32, as fp16 logits lose small probabilities."""
    return logits.float().softmax(dim=-1).cpu().numpy()


# The public functions ------------------------------------------------------------------------------------------


def _slabs(texts: Sequence[str]) -> Iterator[tuple[int, Sequence[str]]]:
    for start in range(0, len(texts), SLAB_TEXTS):
        yield start, texts[start : start + SLAB_TEXTS]


def score_texts(model: LoadedModel, texts: Sequence[str], context: JobContext | None = None, across_sessions: bool = False) -> SentimentScores:
    """Every text through the model in length-sorted batches; arrays in input order.

    With a `context` (from core.tasks.jobs.Job) it reports texts done after each batch and stops at the next batch
    when the user cancels (raising JobCancelled). `across_sessions`: a request of a few texts without a context may
    share its forward with other threads' requests that meet it (core.tasks.cross_session).
    """
    check_inputs(texts)
    if across_sessions and context is None and len(texts) <= SHARED_TEXTS_AT_MOST:
        return _score_with_other_sessions(model, texts)
    pipe = model.obj
    limit = model.info.max_tokens
    max_rows, max_batch_tokens = BATCH_LIMITS["cuda" if model.device.type == "cuda" else "cpu"]
    pad_id = pipe.tokenizer.pad_token_id or 0
    probabilities = np.empty((len(texts), len(model.info.labels)), dtype=np.float32)
    token_counts = np.empty(len(texts), dtype=np.int64)
    truncated = np.empty(len(texts), dtype=bool)
    started = time.perf_counter()
    done = 0
    slabs = list(_slabs(texts))
    with out_of_memory_guard(f"classifying {len(texts):,} texts"):
        # One worker tokenises slab k+1 (the Rust tokenizer releases the GIL) while this thread runs slab k.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenise") as pool:
            upcoming = pool.submit(preprocess, pipe.tokenizer, slabs[0][1], limit)
            for number, (start, slab) in enumerate(slabs):
                encoded = upcoming.result()
                if number + 1 < len(slabs):
                    upcoming = pool.submit(preprocess, pipe.tokenizer, slabs[number + 1][1], limit)
                lengths = np.fromiter((len(row) for row in encoded.ids), dtype=np.int64, count=len(encoded.ids))
                batches = length_sorted_batches(lengths, max_rows, max_batch_tokens)
                logits = []
                for rows in batches:
                    if context is not None:
                        context.check_cancelled()
                    logits.append(_forward(pipe.model, *pad_batch(encoded.ids, rows, pad_id, model.device)))
                    done += len(rows)
                    if context is not None:
                        context.report(done, len(texts), f"{done:,} of {len(texts):,} texts")
                # One copy to the host per slab: a .cpu() per batch would stall the GPU queue each time.
                order = np.concatenate(batches)
                probabilities[start + order] = postprocess(torch.cat(logits))
                token_counts[start : start + len(slab)] = encoded.token_counts
                truncated[start : start + len(slab)] = encoded.truncated
    return SentimentScores(
        model.info.labels, probabilities, token_counts, truncated, limit, time.perf_counter() - started,
        str(model.device), str(model.dtype).removeprefix("torch."), model.spec.title, model.is_standin,
    )


def _score_with_other_sessions(model: LoadedModel, texts: Sequence[str]) -> SentimentScores:
    """A few texts, tokenised in this thread, in one forward that other sessions' requests may share."""
    pipe = model.obj
    limit = model.info.max_tokens
    pad_id = pipe.tokenizer.pad_token_id or 0
    batcher = cross_session.batcher_for(
        pipe.model, lambda: cross_session.SessionBatcher(padded_to_longest(pad_id), SHARED_BATCH_TEXTS, model.accel.batch_window_ms / 1000),
    )
    started = time.perf_counter()
    with out_of_memory_guard(f"classifying {len(texts):,} texts"), batcher.joining() as seat:
        encoded = preprocess(pipe.tokenizer, texts, limit)
        input_ids, attention_mask = pad_batch(encoded.ids, np.arange(len(texts)), pad_id, model.device)
        key = (model.device, length_class(input_ids.shape[1]))
        logits = seat.run((input_ids, attention_mask), lambda ids, mask: _forward(pipe.model, ids, mask), key)
    return SentimentScores(
        model.info.labels, postprocess(logits), encoded.token_counts, encoded.truncated, limit, time.perf_counter() - started,
        str(model.device), str(model.dtype).removeprefix("torch."), model.spec.title, model.is_standin,
    )


def check_text(text: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise BadInputError(f"`text` is {text!r}: empty or whitespace only.", remedy="Type or paste some text.")


def classify_text(model: LoadedModel, text: str) -> TextSentiment:
    """One text: every label with its probability, highest first."""
    check_text(text)
    return score_texts(model, [text]).result(0, text)


# Word attributions ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WordAttribution:
    word: str
    start: int  # character offsets of the word in the text
    end: int
    score: float  # > 0 pushed toward the label, < 0 away from it; the strongest word is +1 or -1


@dataclass(frozen=True)
class Attributions:
    text: str
    label: str  # the label explained (the predicted one unless asked otherwise)
    words: tuple[WordAttribution, ...]
    method: str
    covered_chars: int  # words past this offset were cut off by the token limit and have no attribution
    output_change: float  # log p(label) at the text minus at the baseline
    completeness_gap: float  # |sum of raw attributions - output_change|: how far the path integral is from exact


def explain(
    model: LoadedModel, text: str, method: str = INTEGRATED_GRADIENTS, steps: int = ATTRIBUTION_STEPS, label: str | None = None
) -> Attributions:
    """Which words pushed the model toward `label` (default: its prediction), as log p(label) attributions.

    Both methods work on the word embeddings against a baseline where every word is [PAD] ([CLS]/[SEP] kept):
    integrated gradients averages the gradient at `steps` points of the straight path from the baseline to the text;
    gradient x input takes the gradient at the text only (one pass, rougher). The gradient goes to the input alone:
    the shared model's weights get no .grad and are never changed.
    """
    if not isinstance(text, str) or not text.strip():
        raise BadInputError(f"`text` is {text!r}: empty or whitespace only.", remedy="Type or paste some text.")
    if method not in (INTEGRATED_GRADIENTS, GRADIENT_X_INPUT):
        raise BadInputError(f"`method` is {method!r}, not {INTEGRATED_GRADIENTS!r} or {GRADIENT_X_INPUT!r}.")
    if steps < 1:
        raise BadInputError(f"`steps` must be at least 1 but is {steps}.")
    pipe = model.obj
    labels = model.info.labels
    limit = model.info.max_tokens
    encoding = pipe.tokenizer(text[:MAX_CHARS], verbose=False, return_offsets_mapping=True, return_special_tokens_mask=True)
    word_ids, offsets = cut(encoding.word_ids(), limit), cut(encoding["offset_mapping"], limit)
    input_ids = torch.tensor([cut(encoding["input_ids"], limit)], device=model.device)
    special = torch.tensor([cut(encoding["special_tokens_mask"], limit)], device=model.device).bool()
    attention_mask = torch.ones_like(input_ids)
    embed = pipe.model.get_input_embeddings()
    # inference_mode(False): gradients must flow even if a caller runs this inside inference_mode.
    with torch.inference_mode(False), torch.no_grad():
        inputs = embed(input_ids)
        baseline = embed(torch.where(special, input_ids, pipe.tokenizer.pad_token_id or 0))
        log_p = _log_probs(pipe.model, torch.cat([inputs, baseline]), attention_mask.expand(2, -1))
    target = int(log_p[0].argmax()) if label is None else _label_index(labels, label)
    output_change = float(log_p[0, target] - log_p[1, target])
    alphas, weights = _path_points(method, steps)
    raw = _path_attributions(pipe.model, inputs, baseline, attention_mask, target, alphas, weights)
    return Attributions(
        text, labels[target], _words(text, word_ids, offsets, raw), method if method == GRADIENT_X_INPUT else f"{method} ({steps} points)",
        max(end for _, end in offsets), output_change, abs(float(raw.sum()) - output_change),
    )


def _label_index(labels: tuple[str, ...], label: str) -> int:
    if label not in labels:
        raise BadInputError(f"`label` is {label!r}, not one of the model's labels {labels}.")
    return labels.index(label)


def _log_probs(model: torch.nn.Module, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return model(inputs_embeds=embeddings, attention_mask=attention_mask).logits.float().log_softmax(dim=-1)


def _path_points(method: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas, weights) on the path baseline -> text: Gauss-Legendre nodes on [0, 1], or the text alone."""
    if method == GRADIENT_X_INPUT:
        return torch.ones(1), torch.ones(1)
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return torch.from_numpy((nodes + 1) / 2).float(), torch.from_numpy(weights / 2).float()


def _path_attributions(
    model: torch.nn.Module, inputs: torch.Tensor, baseline: torch.Tensor, attention_mask: torch.Tensor, target: int,
    alphas: torch.Tensor, weights: torch.Tensor,
) -> torch.Tensor:
    """Per-token attribution (fp32, on the CPU): (text - baseline) . weighted sum of gradients at the path points."""
    _, max_batch_tokens = BATCH_LIMITS["cuda" if inputs.device.type == "cuda" else "cpu"]
    chunk = max(1, max_batch_tokens // inputs.shape[1])  # path points per forward/backward pass
    delta = (inputs - baseline).float()
    gradient_sum = torch.zeros(inputs.shape[1:], device=inputs.device, dtype=torch.float32)
    for part, part_weights in zip(alphas.to(inputs.device).split(chunk), weights.to(inputs.device).split(chunk), strict=True):
        with torch.inference_mode(False), torch.enable_grad():
            points = (baseline.float() + part[:, None, None] * delta).to(inputs.dtype).requires_grad_(True)
            log_p = _log_probs(model, points, attention_mask.expand(len(part), -1))
            (gradient,) = torch.autograd.grad(log_p[:, target].sum(), points)
        gradient_sum += (part_weights[:, None, None] * gradient.float()).sum(dim=0)
    return (delta[0] * gradient_sum).sum(dim=-1).cpu()


def _words(text: str, word_ids: list[int | None], offsets: list[tuple[int, int]], raw: torch.Tensor) -> tuple[WordAttribution, ...]:
    """Token attributions summed per word (WordPiece splits words), scaled so the strongest word is +-1."""
    spans: dict[int, list[float]] = {}
    for position, word_id in enumerate(word_ids):
        if word_id is None:
            continue
        start, end = offsets[position]
        span = spans.setdefault(word_id, [start, end, 0.0])
        span[0], span[1], span[2] = min(span[0], start), max(span[1], end), span[2] + float(raw[position])
    largest = max((abs(score) for _, _, score in spans.values()), default=0.0) or 1.0
    return tuple(WordAttribution(text[int(s) : int(e)], int(s), int(e), score / largest) for s, e, score in spans.values())
