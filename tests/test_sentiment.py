from __future__ import annotations

import shutil
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from core.backends.base import held_for_the_run
from core.config import Settings
from core.errors import BadInputError
from core.models.manager import ModelManager
from core.models.registry import MODELS, custom_spec
from core.models.standins import ensure_built
from core.tasks import sentiment
from core.tasks.jobs import Job, JobState
from helpers import sentiment_with_spread_weights

TEXTS = [
    "good",
    "I loved this movie, the cast was great and the ending was happy",
    "bad " * 700,  # past the 512-token limit
    "the film was ok",
    "awful, boring and too long. I hated it!",
]


@pytest.fixture()
def model(manager):
    """The stand-in with larger random weights (the manager is this test's own)."""
    return sentiment_with_spread_weights(manager)


def test_batched_scores_match_the_pipeline_text_by_text(model, monkeypatch):
    # Tiny batches force padding, several batches and a length order unlike the input order.
    monkeypatch.setitem(sentiment.BATCH_LIMITS, "cpu", (2, 64))
    scores = sentiment.score_texts(model, TEXTS)
    assert scores.labels == ("NEGATIVE", "POSITIVE") and scores.is_standin
    for index, text in enumerate(TEXTS):
        expected = {item["label"]: item["score"] for item in model.obj(text, truncation=True, top_k=None)}
        got = {item.label: item.score for item in scores.result(index, text).scores}
        assert got == pytest.approx(expected, abs=1e-5)
    assert np.allclose(scores.probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert np.ptp(scores.probabilities[:, 0]) > 0.1  # the texts really differ, so the order check above means something


def test_long_texts_are_cut_to_the_limit_on_purpose_and_reported(model):
    tokenizer, limit = model.obj.tokenizer, model.info.max_tokens
    assert limit == 512
    full = tokenizer(TEXTS[2], verbose=False)["input_ids"]
    encoded = sentiment.preprocess(tokenizer, TEXTS, limit)
    assert encoded.truncated.tolist() == [False, False, True, False, False]
    assert encoded.token_counts[2] == len(full) > limit
    assert encoded.ids[2] == full[: limit - 1] + [tokenizer.sep_token_id]
    cut_by_chars = sentiment.preprocess(tokenizer, ["a" * (sentiment.MAX_CHARS + 1)], limit)
    assert cut_by_chars.truncated.tolist() == [True]
    result = sentiment.classify_text(model, TEXTS[2])
    assert result.truncated and result.token_count == len(full) and result.max_tokens == 512


def test_length_sorted_batches_cover_every_text_once_within_the_limits():
    lengths = np.random.default_rng(0).integers(3, 300, size=1000)
    batches = sentiment.length_sorted_batches(lengths, max_rows=64, max_batch_tokens=4096)
    order = np.concatenate(batches)
    assert sorted(order.tolist()) == list(range(1000))
    assert np.all(np.diff(lengths[order]) >= 0)  # shortest first: neighbours pad to similar lengths
    for rows in batches:
        assert len(rows) <= 64 and (len(rows) == 1 or len(rows) * lengths[rows].max() <= 4096)
    padded = sum(len(rows) * lengths[rows].max() for rows in batches)
    assert padded < 1.1 * lengths.sum()  # unsorted batches of 64 would pad to nearly 2x


def test_pad_batch_pads_to_the_longest_row_with_a_mask():
    ids = [[101, 5, 102], [101, 5, 6, 7, 102], [101, 102]]
    input_ids, mask = sentiment.pad_batch(ids, np.array([2, 0]), pad_id=0, device=torch.device("cpu"))
    assert input_ids.tolist() == [[101, 102, 0], [101, 5, 102]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_labels_come_from_the_model_config(settings, standin_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    settings = replace(settings, models_root=tmp_path)  # a typed folder loads only from inside the models root
    folder = tmp_path / "three-labels"
    shutil.copytree(ensure_built(MODELS["sentiment"], standin_dir), folder)
    config = AutoConfig.from_pretrained(folder, id2label={0: "sad", 1: "meh", 2: "glad"}, label2id={"sad": 0, "meh": 1, "glad": 2})
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)  # a three-output head
    spec = sentiment.model_spec(str(folder), settings)
    assert spec.key == f"sentiment@{folder.resolve()}"
    scores = sentiment.score_texts(ModelManager(settings).get(spec), ["good", "bad"])
    assert scores.labels == ("sad", "meh", "glad") and scores.probabilities.shape == (2, 3)
    assert set(scores.top_labels) <= {"sad", "meh", "glad"}
    assert scores.label_counts()["texts"].sum() == 2 and scores.score_histogram()["texts"].sum() == 2


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        ("not a repo", "model 'not a repo' is neither a Hub repo id"),
        ("owner/name/extra", "model 'owner/name/extra' is neither"),
        ("/no/such/folder", "`model` '/no/such/folder' is not a folder inside the models root"),
        ("./absent", "`model`: the models root has no folder './absent'"),
    ],
)
def test_bad_model_choices_are_named(choice, message, tmp_path):
    with pytest.raises(BadInputError, match=message):
        sentiment.model_spec(choice, Settings(models_root=tmp_path))


def test_model_choices_that_are_fine(tmp_path):
    settings = Settings(models_root=tmp_path)
    assert sentiment.model_spec("  ", settings) == MODELS["sentiment"] == sentiment.model_spec(MODELS["sentiment"].repo_id, settings)
    repo_id = "cardiffnlp/twitter-roberta-base-sentiment"
    assert sentiment.model_spec(repo_id, settings) == custom_spec("sentiment", repo_id)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="has no config.json"):
        sentiment.model_spec(str(tmp_path / "empty"), settings)


def test_empty_inputs_are_named(model):
    with pytest.raises(BadInputError, match="No text"):
        sentiment.score_texts(model, [])
    with pytest.raises(BadInputError, match=r"text 2 is '   ': empty or whitespace only"):
        sentiment.score_texts(model, ["fine", "   "])
    with pytest.raises(BadInputError, match=r"`text` is '\\n\\t'"):
        sentiment.classify_text(model, "\n\t")


def test_lines_skip_blanks_and_keep_their_numbers():
    assert sentiment.split_lines("good\n\n   \n bad \nok") == [(1, "good"), (4, "bad"), (5, "ok")]
    with pytest.raises(BadInputError, match="has 3 non-empty lines, more than 2"):
        sentiment.split_lines("a\nb\nc", max_lines=2)


def test_job_reports_progress_and_returns_scores_in_input_order(manager, model, monkeypatch):
    monkeypatch.setitem(sentiment.BATCH_LIMITS, "cpu", (4, 4096))
    texts = [f"good movie number {i}" * (1 + i % 5) for i in range(50)]
    job = Job(held_for_the_run(manager, MODELS["sentiment"], True, lambda model, context: manager.score_texts(model, texts, context)), "test")
    assert job.wait(60)
    snapshot = job.snapshot()
    assert snapshot.state is JobState.DONE and snapshot.done == snapshot.total == 50
    direct = sentiment.score_texts(model, texts)
    assert np.allclose(job.result.probabilities, direct.probabilities, atol=1e-5)


def test_job_stops_at_the_next_batch_when_cancelled(manager, model, monkeypatch):
    monkeypatch.setitem(sentiment.BATCH_LIMITS, "cpu", (2, 4096))
    first_batch_done, release = threading.Event(), threading.Event()
    forward = sentiment._forward

    def held_forward(*args):
        logits = forward(*args)
        first_batch_done.set()
        release.wait(30)  # hold the job here until the test has cancelled it
        return logits

    monkeypatch.setattr(sentiment, "_forward", held_forward)
    job = Job(held_for_the_run(manager, MODELS["sentiment"], True, lambda model, context: manager.score_texts(model, ["good"] * 20, context)), "cancel")
    assert first_batch_done.wait(30)
    job.cancel()
    release.set()
    assert job.wait(30)
    snapshot = job.snapshot()
    assert snapshot.state is JobState.CANCELLED and job.result is None and snapshot.done == 2


def test_integrated_gradients_add_up_to_the_output_change(model):
    text = "I loved this movie, it was great but the ending was awful"
    attributions = sentiment.explain(model, text)
    assert attributions.label == sentiment.classify_text(model, text).top.label
    assert attributions.method == f"integrated gradients ({sentiment.ATTRIBUTION_STEPS} points)"
    assert abs(attributions.output_change) > 0.05  # a real change to explain, not rounding noise
    assert attributions.completeness_gap <= 0.02 * abs(attributions.output_change)
    rough = sentiment.explain(model, text, method=sentiment.GRADIENT_X_INPUT)
    assert rough.completeness_gap > 10 * attributions.completeness_gap  # the path integral is what makes it add up
    assert [w.word for w in attributions.words] == ["I", "loved", "this", "movie", ",", "it", "was", "great", "but", "the", "ending", "was", "awful"]
    assert all(text[w.start : w.end] == w.word for w in attributions.words)
    assert max(abs(w.score) for w in attributions.words) == pytest.approx(1.0)
    assert all(p.grad is None for p in model.obj.model.parameters())  # the shared model is untouched


def test_one_step_is_gradient_times_input_summed_per_word(model):
    pipe, text = model.obj, "unbelievable movie"
    attributions = sentiment.explain(model, text, method=sentiment.GRADIENT_X_INPUT)
    assert attributions.method == "gradient × input"
    encoding = pipe.tokenizer(text, return_tensors="pt")
    embeddings = pipe.model.get_input_embeddings()
    ids = encoding["input_ids"]
    inputs = embeddings(ids).detach().requires_grad_(True)
    baseline = embeddings(torch.tensor([[ids[0, 0]] + [pipe.tokenizer.pad_token_id] * (ids.shape[1] - 2) + [ids[0, -1]]])).detach()
    target = model.info.labels.index(attributions.label)
    log_p = pipe.model(inputs_embeds=inputs).logits.log_softmax(-1)[0, target]
    (gradient,) = torch.autograd.grad(log_p, inputs)
    per_token = ((inputs - baseline) * gradient).sum(-1)[0].detach()
    per_word: dict[int, float] = {}
    for position, word_id in enumerate(encoding.word_ids(0)):
        if word_id is not None:
            per_word[word_id] = per_word.get(word_id, 0.0) + float(per_token[position])
    expected = np.array(list(per_word.values()))
    assert [w.score for w in attributions.words] == pytest.approx((expected / np.abs(expected).max()).tolist(), abs=1e-4)


def test_attributions_stop_where_the_model_stopped_reading(model):
    text = "great " * 600 + "terrible ending"
    attributions = sentiment.explain(model, text, steps=2)
    assert len(attributions.words) == 510 and attributions.covered_chars < len(text)
    assert all(w.end <= attributions.covered_chars for w in attributions.words)
    # Cutting is ours: the shared Rust tokenizer is never switched into truncation, which is not thread-safe.
    assert model.obj.tokenizer.backend_tokenizer.truncation is None
    with pytest.raises(BadInputError, match=r"`label` is 'HAPPY', not one of the model's labels"):
        sentiment.explain(model, "fine", label="HAPPY")
    with pytest.raises(BadInputError, match=r"`method` is 'saliency', not"):
        sentiment.explain(model, "fine", method="saliency")


@pytest.mark.gpu
def test_fp16_gpu_path_agrees_with_fp32_on_the_full_size_model(tmp_path):
    """fp16 on CUDA vs fp32 on the CPU, full-size DistilBERT (random weights): probabilities within 0.01."""
    from bench.bench_sentiment import build_full_size, sentences
    from core.config import Settings
    from core.models.manager import ModelManager

    root = tmp_path / "models"
    build_full_size(root / MODELS["sentiment"].repo_id)
    texts = sentences(512) + ["word " * 600]  # a truncated text too
    fp16 = ModelManager(Settings(models_root=root, standin_dir=tmp_path / "s", device="cuda")).get(MODELS["sentiment"])
    fp32 = ModelManager(Settings(models_root=root, standin_dir=tmp_path / "s", device="cpu", cpu_bf16=False)).get(MODELS["sentiment"])  # a CPU with bf16 would take it
    assert fp16.dtype == torch.float16 and fp32.dtype == torch.float32
    fast, exact = sentiment.score_texts(fp16, texts), sentiment.score_texts(fp32, texts)
    assert np.abs(fast.probabilities - exact.probabilities).max() <= 0.01
    margin = np.abs(exact.probabilities[:, 1] - exact.probabilities[:, 0])
    assert np.array_equal(fast.top_labels[margin > 0.02], exact.top_labels[margin > 0.02])
    assert fast.truncated.tolist() == exact.truncated.tolist() and fast.truncated[-1]
