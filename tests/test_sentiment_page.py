from __future__ import annotations

import io
import resource
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from core.app_state import get_backend
from core.models.registry import MODELS
from core.tasks import sentiment, tables
from core.tasks.jobs import JobState

HOME = str(Path(__file__).resolve().parent.parent / "Home.py")
PAGE = "app_pages/sentiment.py"
RUN_KEY, RESULT_KEY = "sentiment:csv_run", "sentiment:csv_result"


def open_page() -> AppTest:
    at = AppTest.from_file(HOME, default_timeout=60).run()
    at.switch_page(PAGE).run()
    assert not at.exception
    return at


def the_model():
    return get_backend().get(MODELS["sentiment"], allow_standin=True)


def column_box(at: AppTest):
    return next(box for box in at.selectbox if box.label == "Column with the text")


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    at.file_uploader(key="sentiment:file").upload(name, data, "text/csv").run()
    assert not at.exception
    return at


def run_file(at: AppTest) -> AppTest:
    """Click Classify, let the background job finish, and rerun as the progress fragment would."""
    at.button(key="sentiment:run").click().run()
    if RUN_KEY in at.session_state:  # a small file may already be done and collected by the rerun the click made
        assert at.session_state[RUN_KEY].job.wait(120)
        at.run()
    assert not at.exception and RESULT_KEY in at.session_state
    return at


def table_with(at: AppTest, *columns: str) -> pd.DataFrame:
    """The last table on the page that has all of `columns`."""
    return [frame.value for frame in at.dataframe if set(columns) <= set(frame.value.columns)][-1]


def texts_of(at: AppTest, element: str) -> list[str]:
    return [item.value for item in getattr(at, element)]


def test_one_text_shows_the_label_at_once_with_word_attributions(app_env):
    at = open_page()
    assert any("stand-in model with random weights" in text.lower() for text in texts_of(at, "warning"))
    text = "I loved this movie, the ending was great"
    at.text_area(key="sentiment:text").input(text).run()
    expected = sentiment.classify_text(the_model(), text)
    assert f"### :green[{expected.top.label}] · {expected.top.score:.1%}" in texts_of(at, "markdown")
    highlighted = at.get("html")[0].proto.body
    for word in ("loved", "movie", "ending", "great"):
        assert f">{word}</span>" in highlighted
    assert any("Integrated gradients" in caption for caption in texts_of(at, "caption"))
    at.button(key="sentiment:example:😠 A critic").click().run()
    assert at.text_area(key="sentiment:text").value.startswith("Two hours")


def test_empty_and_long_single_texts_are_handled_on_purpose(app_env):
    at = open_page()
    at.text_area(key="sentiment:text").input("   \n ").run()
    assert "The text is only whitespace: type some words." in texts_of(at, "info")
    at.text_area(key="sentiment:text").input("good " * 800).run()
    assert any("802 tokens long and the model reads at most 512" in text for text in texts_of(at, "warning"))
    assert not at.error


def test_many_lines_give_one_row_per_non_empty_line(app_env):
    at = open_page()
    at.text_area(key="sentiment:lines").input("great film\n\n   \nawful plot\nit was ok").run()
    table = table_with(at, "line", "label")
    assert table["line"].tolist() == [1, 4, 5] and table["text"].tolist() == ["great film", "awful plot", "it was ok"]
    expected = sentiment.score_texts(the_model(), ["great film", "awful plot", "it was ok"])
    assert table["label"].tolist() == expected.top_labels.tolist()
    assert np.allclose(table["score"], expected.top_scores, atol=1e-4)
    at.text_area(key="sentiment:lines").input("\n  \n\t").run()
    assert "Write or paste one text per line." in texts_of(at, "info") and not at.error


def test_csv_upload_with_column_choice_gives_a_table_charts_and_download(app_env):
    data = b"id,review,stars\n007,Great film,5\n008,,3\n009,Awful plot,1\n010,\"Fine, I guess\",3\n"
    at = upload(open_page(), "reviews.csv", data)
    box = column_box(at)
    assert box.value == "review" and box.options == ["id", "review", "stars"]
    assert at.button(key="sentiment:run").label == "Classify 3 rows (1 empty cell skipped)"
    run_file(at)
    frame = table_with(at, "id", "label")
    assert frame.columns.tolist() == ["id", "review", "stars", "label", "score", "truncated"]
    expected = sentiment.score_texts(the_model(), ["Great film", "Awful plot", "Fine, I guess"])
    assert frame["label"].iloc[[0, 2, 3]].tolist() == expected.top_labels.tolist() and pd.isna(frame["label"].iloc[1])
    assert len(at.get("vega_lite_chart")) == 2
    download = at.download_button(key="sentiment:download")
    assert download.proto.label == "Download results (CSV)"
    result = at.session_state[RESULT_KEY]
    written = pd.read_csv(io.BytesIO(tables.to_csv_bytes(result.frame)), dtype=str, keep_default_na=False)
    assert written["id"].tolist() == ["007", "008", "009", "010"]  # the user's cells come back as they were
    assert written["label"].tolist()[1] == "" and written["label"].tolist()[0] == expected.top_labels[0]
    assert [float(v) for v in written["score"].iloc[[0, 2, 3]]] == pytest.approx(expected.top_scores.round(4).tolist(), abs=1e-4)

    # Choosing another column re-labels the button; a numeric column is a message, not a crash.
    column_box(at).select("stars").run()
    assert any("column 'stars' of reviews.csv holds only numbers" in error for error in texts_of(at, "error"))
    assert table_with(at, "id", "label").equals(frame)  # the results stay


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("empty.csv", b"", "empty.csv is empty (0 bytes)"),
        ("header.csv", b"id,text\n", "has a header (columns: id, text) but no rows"),
        ("broken.csv", b"id,text\n1,ok\n2,a,b\n", "Expected 2 fields in line 3, saw 3"),
        ("numbers.csv", b"a,b\n1,2\n3,4\n", "holds only numbers"),
    ],
)
def test_bad_files_are_one_message_and_earlier_results_stay(app_env, name, data, message):
    at = run_file(upload(open_page(), "good.csv", b"text\nnice\nbad\n"))
    at.file_uploader(key="sentiment:file").clear().upload(name, data, "text/csv").run()
    assert not at.exception
    assert any(message in error for error in texts_of(at, "error"))
    assert "Results: good.csv, column “text”" in [header.value for header in at.subheader]
    assert len(table_with(at, "text", "label")) == 2


def test_a_non_utf8_file_is_read_with_a_detected_encoding_that_can_be_overridden(app_env):
    at = upload(open_page(), "excel.csv", "avis\ncafé crème très bon\n".encode("cp1252"))
    assert any("encoding cp1252 (guessed" in caption for caption in texts_of(at, "caption"))
    at.selectbox(key="sentiment:encoding").select("utf-8").run()
    assert any("excel.csv is not valid utf-8" in error for error in texts_of(at, "error"))


def test_custom_model_ids_are_validated_and_loaded(app_env):
    at = open_page()
    at.text_input(key="sentiment:model").input("not a repo id").run()
    assert any("model 'not a repo id' is neither a Hub repo id" in error for error in texts_of(at, "error"))
    at.text_input(key="sentiment:model").input("someone/another-classifier").run()  # offline: its stand-in loads
    assert not at.exception and any("**someone/another-classifier** on cpu" in caption for caption in texts_of(at, "caption"))


def test_stop_cancels_the_file_run_and_keeps_earlier_results(app_env, monkeypatch):
    at = run_file(upload(open_page(), "first.csv", b"text\nnice\n"))
    first_batch_done, release = threading.Event(), threading.Event()
    forward = sentiment._forward

    def held_forward(*args):
        logits = forward(*args)
        first_batch_done.set()
        release.wait(30)  # hold the job mid-run until the test has pressed Stop
        return logits

    monkeypatch.setattr(sentiment, "_forward", held_forward)
    monkeypatch.setitem(sentiment.BATCH_LIMITS, "cpu", (2, 4096))
    at.file_uploader(key="sentiment:file").clear().upload("second.csv", b"text\n" + b"good\n" * 20, "text/csv").run()
    at.button(key="sentiment:run").click().run()
    assert at.button(key="sentiment:run").disabled  # at once: one run at a time
    job = at.session_state[RUN_KEY].job
    assert first_batch_done.wait(30)
    at.run()
    assert any(bar.proto.text.startswith("Classifying second.csv") for bar in at.get("progress"))
    at.button(key="sentiment:stop").click().run()
    release.set()
    assert job.wait(30) and job.snapshot().state is JobState.CANCELLED
    at.run()
    assert any(info.startswith("Stopped after 2 of 20 rows") for info in texts_of(at, "info"))
    assert "Results: first.csv, column “text”" in [header.value for header in at.subheader]


def test_100k_rows_run_in_the_background_once_and_survive_other_widgets(app_env):
    rows = 100_000
    data = ("id,text\n" + "".join(f"{i},review number {i} was {'good' if i % 3 else 'bad'}\n" for i in range(rows))).encode()
    at = upload(open_page(), "big.csv", data)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_file(at)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    result = at.session_state[RESULT_KEY]
    assert len(result.frame) == rows and result.frame["label"].notna().all()
    assert grown_mib < 1024, f"peak memory grew by {grown_mib:.0f} MiB for {rows:,} rows"
    # Other widgets rerun the page; the file is neither parsed again nor classified again.
    table_before = at.session_state["sentiment:table"]
    at.text_area(key="sentiment:text").input("another text").run()
    at.text_area(key="sentiment:lines").input("one\ntwo").run()
    assert not at.exception and RUN_KEY not in at.session_state
    assert at.session_state[RESULT_KEY] is result and at.session_state["sentiment:table"] is table_before
