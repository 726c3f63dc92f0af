"""Sentiment (DistilBERT SST-2): the naive pipeline-per-text way against the app's core path, in one process.

    python -m bench.bench_sentiment [--quick]

Full-size DistilBERT from ../shared/models/distilbert-sst2/config.json with random weights and a generated WordPiece
vocabulary of the real size (30,522 entries), saved in Hub layout and loaded through the core's loader as the real repo
would be. Texts: sentences of 5-40 words. Figures: naive (fp32 pipeline, one call per text), ours (core.tasks.sentiment:
length-sorted batches, the manager's dtype, fp16 on CUDA), and the fast tokenizer alone on the same texts.
"""
from __future__ import annotations

import argparse
import json
import string
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import torch

from bench.common import SHARED_MODELS, emit, environment, median_seconds
from core.config import Settings
from core.models.manager import ModelManager
from core.models.registry import MODELS
from core.tasks import sentiment

CONFIG_DIR = SHARED_MODELS / "distilbert-sst2"
SUFFIX_SHARE = 0.2  # of vocabulary pieces that are '##' continuations, as in BERT's uncased vocabulary
SPLIT_WORD_SHARE = 0.15  # of words in a sentence made of a word and a continuation, so WordPiece splits them
SEED = 0


@cache
def vocabulary(size: int) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(WordPiece vocab of exactly `size` entries, its whole words, its '##' continuations), made of pseudo-syllables."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    char_pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    rng = np.random.default_rng(SEED)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + list("aeiou")
    free = size - len(specials) - len(chars) - len(char_pieces)
    words: dict[str, None] = {}
    suffixes: dict[str, None] = {}
    while len(words) + len(suffixes) < free:
        piece = "".join(rng.choice(syllables, size=int(rng.integers(1, 4))))
        target = suffixes if len(suffixes) < free * SUFFIX_SHARE else words
        if piece not in words and piece not in suffixes and piece not in chars:
            target[piece] = None
    vocab = specials + chars + char_pieces + list(words) + ["##" + s for s in suffixes]
    return tuple(vocab), tuple(words), tuple(suffixes)


def sentences(count: int, vocab_size: int = 30_522, seed: int = SEED) -> list[str]:
    """`count` sentences of 5-40 words from the generated vocabulary, some words split by WordPiece, with punctuation."""
    _, words, suffixes = vocabulary(vocab_size)
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        picked = [str(w) for w in rng.choice(words, size=int(rng.integers(5, 41)))]
        for index in np.flatnonzero(rng.random(len(picked)) < SPLIT_WORD_SHARE):
            picked[index] += str(rng.choice(suffixes))
        texts.append(" ".join(picked).capitalize() + str(rng.choice([".", "!", "?", "..."])))
    return texts


def build_full_size(folder: Path) -> Path:
    """Full-size DistilBERT SST-2 (random weights, seeded) and its tokenizer, saved in Hub layout in `folder`."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertTokenizerFast

    config = DistilBertConfig.from_pretrained(CONFIG_DIR)
    vocab, _, _ = vocabulary(config.vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    DistilBertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True, model_max_length=512).save_pretrained(folder)
    torch.manual_seed(SEED)
    DistilBertForSequenceClassification(config).save_pretrained(folder)
    return folder


def time_naive(folder: Path, texts: list[str], device: torch.device, repeats: int) -> float:
    """The tutorial: the default fp32 pipeline moved to the device, called once per text. Median seconds for all texts."""
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(folder), device=device)
    for text in texts[:20]:  # warm-up (kernels, allocator) without a whole extra pass over 10,000 texts
        pipe(text)
    return median_seconds(lambda: [pipe(text) for text in texts], device, warmup=0, repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer texts and repeats, for a CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    count, naive_repeats, repeats = (400, 1, 3) if args.quick else (10_000, 3, 5)
    print(json.dumps({"environment": environment(device)}), flush=True)
    root = Path(tempfile.mkdtemp())
    folder = build_full_size(root / "models" / MODELS["sentiment"].repo_id)
    texts = sentences(count)
    words = sum(len(text.split()) for text in texts)

    naive_s = time_naive(folder, texts, device, naive_repeats)

    # The core path, on the model the manager loads (fp16 on CUDA).
    manager = ModelManager(Settings(models_root=root / "models", standin_dir=root / "standins"))
    model = manager.get(MODELS["sentiment"])
    ours_s = median_seconds(lambda: sentiment.score_texts(model, texts), device, warmup=2, repeats=repeats)
    tokenizer_s = median_seconds(lambda: model.obj.tokenizer(texts), device, warmup=1, repeats=repeats)
    tokens = int(sentiment.preprocess(model.obj.tokenizer, texts, sentiment.max_tokens(model.obj)).token_counts.sum())

    details = {"texts": count, "words": words, "tokens": tokens, "device": str(device)}
    emit("sentiment, 5-40 words", count / naive_s, count / ours_s, "texts/s", True,
         naive_path="pipeline per text, fp32", ours_path=f"core.tasks.sentiment, {str(model.dtype).removeprefix('torch.')}", **details)
    emit("sentiment tokenizer alone", None, count / tokenizer_s, "texts/s", True, **details)
    emit("sentiment ours / tokenizer alone", None, round(100 * tokenizer_s / ours_s, 1), "%", True, **details)


if __name__ == "__main__":
    main()
