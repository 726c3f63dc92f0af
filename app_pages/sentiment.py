"""Sentiment: one text, many lines, or a whole CSV / TSV file, through a text-classification pipeline.

Every result is kept in session state under the inputs that made it, so a rerun caused by another widget reuses it
and a bad new input never wipes what is already shown. A file runs as a core.tasks.jobs.Job in the background.
"""
from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import altair as alt
import pandas as pd
import streamlit as st

from app_pages.common import STANDIN_FILE_SUFFIX, literal, require_model, show_error, show_scores
from core.api import MODELS, DashboardError, Job, JobState, LoadedModel, held_for_the_run, precision_label, sentiment, tables
from core.app_state import get_backend, get_settings

EXAMPLES = {
    "😊 A fan": "I loved this film: the cast is wonderful and the ending made me cry happy tears.",
    "😠 A critic": "Two hours I will never get back. Dull, slow and badly acted.",
}
TONE_COLOURS = {"positive": "#2f9e44", "negative": "#e03131", "other": "#1c7ed6"}
AUTO_ENCODING = "auto-detect"
RUN_KEY, RESULT_KEY, NOTE_KEY = "sentiment:csv_run", "sentiment:csv_result", "sentiment:csv_note"
Value = TypeVar("Value")


@dataclass(frozen=True)
class CsvRun:
    """A file being classified in the background, with what is needed to put its results back in the table."""

    job: Job[sentiment.SentimentScores]
    table: tables.Table
    texts: tables.ColumnTexts


@dataclass(frozen=True)
class CsvResult:
    frame: pd.DataFrame  # the user's columns plus label, score, truncated
    scores: sentiment.SentimentScores
    name: str
    column: str
    blank_rows: int


def remembered(key: str, inputs: tuple, compute: Callable[[], Value]) -> Value | DashboardError:
    """compute() once per distinct `inputs` (its error too), kept in session state across reruns."""
    saved = st.session_state.get(key)
    if saved is None or saved[0] != inputs:
        try:
            value: Value | DashboardError = compute()
        except DashboardError as error:
            value = error
        st.session_state[key] = saved = (inputs, value)
    return saved[1]


def tone(label: str) -> str:
    name = label.lower()
    return "positive" if "pos" in name else "negative" if "neg" in name else "other"


def colour_scale(labels: tuple[str, ...]) -> alt.Scale:
    return alt.Scale(domain=list(labels), range=[TONE_COLOURS[tone(label)] for label in labels])


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def standin_suffix(is_standin: bool) -> str:
    return " Stand-in model: these labels are meaningless." if is_standin else ""


# Page ---------------------------------------------------------------------------------------------------------

st.title("💬 Sentiment")
st.caption("A text-classification model through `transformers.pipeline('text-classification')`: one text, many lines, or a whole file.")

with st.expander("Model", expanded=False):
    choice = st.text_input(
        "Text-classification model: a Hub repo id (owner/name) or a local folder in Hub layout",
        value=MODELS["sentiment"].repo_id, key="sentiment:model",
    )
try:
    spec = sentiment.model_spec(choice, get_settings())
except DashboardError as error:
    show_error(error)
    st.stop()
model = require_model(spec)
limit = model.info.max_tokens
st.caption(
    f"**{literal(model.spec.title)}** on {model.device} ({precision_label(model.dtype)}); labels "
    f"{literal(', '.join(model.info.labels))}. It reads at most {limit} tokens of a text: longer texts are "
    "scored on their first tokens and marked as cut."
)

one_tab, lines_tab, file_tab = st.tabs(["One text", "Many lines", "CSV / TSV file"])


# One text -----------------------------------------------------------------------------------------------------


def highlighted(attributions: sentiment.Attributions) -> str:
    """The text with each word's background green (toward the label) or red (away), stronger for larger scores."""
    text, parts, cursor = attributions.text, [], 0
    for word in attributions.words:
        colour = "47,158,68" if word.score > 0 else "224,49,49"
        parts.append(html.escape(text[cursor : word.start]))
        parts.append(
            f'<span style="background: rgba({colour},{0.15 + 0.6 * abs(word.score):.2f}); border-radius: 3px; padding: 0 2px" '
            f'title="{word.score:+.2f}">{html.escape(word.word)}</span>'
        )
        cursor = word.end
    parts.append(html.escape(text[cursor : attributions.covered_chars]))
    if attributions.covered_chars < len(text):  # past the token limit: shown, but the model never read it
        parts.append(f'<span style="color: #999">{html.escape(text[attributions.covered_chars :])}</span>')
    return f'<div style="white-space: pre-wrap; line-height: 1.9; font-size: 1.05rem">{"".join(parts)}</div>'


def score_one(model: LoadedModel, text: str) -> sentiment.TextSentiment:
    sentiment.check_text(text)
    return get_backend().score_texts(model, [text]).result(0, text)


def one_text(model: LoadedModel) -> None:
    st.text_area("Text", key="sentiment:text", height=110, placeholder="Type or paste a review, a tweet, a sentence…")
    with st.container(horizontal=True):
        for title, example in EXAMPLES.items():
            st.button(f"Try: {title}", key=f"sentiment:example:{title}", on_click=st.session_state.__setitem__, args=("sentiment:text", example))
    text = st.session_state.get("sentiment:text", "")
    if not text.strip():
        st.info("Type a text, or try an example: the label appears at once." if not text else "The text is only whitespace: type some words.")
        return
    result = remembered("sentiment:one", (model.spec.key, text), lambda: score_one(model, text))
    if isinstance(result, DashboardError):
        show_error(result)
        return
    colour = {"positive": "green", "negative": "red", "other": "blue"}[tone(result.top.label)]
    st.markdown(f"### :{colour}[{literal(result.top.label)}] · {result.top.score:.1%}")
    show_scores(result.scores)
    if result.truncated:
        st.warning(
            f"This text is {result.token_count:,} tokens long and the model reads at most {result.max_tokens}: it was scored on "
            f"its first {result.max_tokens} tokens only (greyed out below: the part it never read)."
        )
    toggle_column, method_column = st.columns([1, 3])
    if not toggle_column.toggle("Word attributions", value=True, key="sentiment:attributions"):
        return
    method = method_column.radio(
        "Method", [sentiment.INTEGRATED_GRADIENTS, sentiment.GRADIENT_X_INPUT], horizontal=True, key="sentiment:method",
        label_visibility="collapsed", help="Integrated gradients adds up exactly to the change in the model's output; gradient × input is one pass, rougher.",
    )
    with st.spinner("Attributing the label to words…"):
        attributions = remembered("sentiment:explain", (model.spec.key, text, method), lambda: get_backend().explain(model, text, method, sentiment.ATTRIBUTION_STEPS, None))
    if isinstance(attributions, DashboardError):
        show_error(attributions)
        return
    st.html(highlighted(attributions))
    st.caption(
        f"Green words pushed the model toward **{literal(attributions.label)}**, red ones away from it; hover a word for its score "
        f"(the strongest is ±1). {attributions.method.capitalize()} on the word embeddings, from a text of [PAD] tokens."
        + standin_suffix(model.is_standin)
    )


# Many lines ---------------------------------------------------------------------------------------------------


def score_lines(model: LoadedModel, block: str) -> tuple[pd.DataFrame, sentiment.SentimentScores]:
    numbers, texts = zip(*sentiment.split_lines(block), strict=True)  # the page asks only when a line holds text
    scores = get_backend().score_texts(model, list(texts))
    return pd.DataFrame({"line": numbers, "text": texts, **scores.columns()}), scores


def many_lines(model: LoadedModel) -> None:
    block = st.text_area(
        f"One text per line (up to {sentiment.MAX_LINES:,}; empty lines are skipped)", key="sentiment:lines", height=180,
        placeholder="Great service!\nThe food was cold.\nNot bad at all",
    )
    if not block.strip():
        st.info("Write or paste one text per line.")
        return
    outcome = remembered("sentiment:lines_result", (model.spec.key, block), lambda: score_lines(model, block))
    if isinstance(outcome, DashboardError):
        show_error(outcome)
        return
    table, scores = outcome
    st.dataframe(
        table, hide_index=True,
        column_config={"score": st.column_config.ProgressColumn("score", min_value=0.0, max_value=1.0, format="%.3f")},
    )
    truncated = int(scores.truncated.sum())
    st.caption(
        f"{len(scores):,} lines in {scores.seconds * 1000:,.0f} ms on {scores.device} ({precision_label(scores.dtype)})."
        + (f" {truncated:,} longer than {scores.max_tokens} tokens were cut (column `truncated`)." if truncated else "")
        + standin_suffix(scores.is_standin)
    )


# CSV / TSV file -----------------------------------------------------------------------------------------------


def load_table() -> tables.Table | None:
    upload = st.file_uploader("CSV or TSV file, first row the column names", type=["csv", "tsv", "tab", "txt"], key="sentiment:file")
    encoding = st.selectbox(
        "Encoding", [AUTO_ENCODING, *tables.ENCODINGS], key="sentiment:encoding",
        help="Auto-detect reads a byte-order mark, then UTF-8, then guesses; pick one if the text looks wrong.",
    )
    if upload is None:
        return None
    table = remembered(
        "sentiment:table", (upload.file_id, encoding),
        lambda: tables.read_table(upload.getvalue(), upload.name, None if encoding == AUTO_ENCODING else encoding),
    )
    if isinstance(table, DashboardError):
        show_error(table)
        return None
    delimiter = tables.DELIMITERS.get(table.delimiter, "none (one column)")
    guessed = " (guessed: pick another above if the text looks wrong)" if table.encoding_guessed else ""
    st.caption(f"**{literal(table.name)}**: {len(table.frame):,} rows, {len(table.frame.columns)} columns, delimiter {delimiter}, encoding {table.encoding}{guessed}.")
    st.dataframe(table.frame.head(5), hide_index=True)
    return table


def start_run(model: LoadedModel, table: tables.Table, texts: tables.ColumnTexts) -> None:
    if RUN_KEY in st.session_state:  # one run per session: a second click must not orphan the first job
        return
    # A stand-in stays allowed if the model must load again (someone unloaded it on the VRAM page mid-run).
    backend = get_backend()
    work = held_for_the_run(backend, model.spec, model.is_standin, lambda held, context: backend.score_texts(held, texts.texts, context))
    st.session_state[RUN_KEY] = CsvRun(Job(work, name=f"sentiment of {table.name}"), table, texts)
    st.session_state.pop(NOTE_KEY, None)


def collect_finished_run() -> None:
    """Move a finished job's outcome into session state: a result, or a note saying why there is none."""
    run: CsvRun | None = st.session_state.get(RUN_KEY)
    if run is None or not run.job.finished:
        return
    del st.session_state[RUN_KEY]
    snapshot = run.job.snapshot()
    if snapshot.state is JobState.DONE and run.job.result is not None:
        scores = run.job.result
        frame = tables.with_columns(run.table.frame, run.texts.rows, scores.columns())
        st.session_state[RESULT_KEY] = CsvResult(frame, scores, run.table.name, run.texts.column, run.texts.blank_rows)
    elif snapshot.state is JobState.CANCELLED:
        st.session_state[NOTE_KEY] = f"Stopped after {snapshot.done:,} of {snapshot.total:,} rows; that run's partial results were dropped."
    else:
        st.session_state[NOTE_KEY] = snapshot.error


@st.fragment(run_every=0.5)
def run_progress() -> None:
    """Progress and the Stop button, refreshed without rerunning the page; a finished run reruns the page once."""
    run: CsvRun | None = st.session_state.get(RUN_KEY)
    if run is None:
        return
    if run.job.finished:
        st.rerun()
    snapshot = run.job.snapshot()
    rate = f" · {snapshot.rate_per_s:,.0f} rows/s, about {snapshot.eta_s:,.0f} s left" if snapshot.rate_per_s and snapshot.eta_s is not None else ""
    st.progress(snapshot.fraction, text=f"Classifying {literal(run.table.name)}: {literal(snapshot.detail)}{rate}")
    st.button("Stop", key="sentiment:stop", on_click=run.job.cancel, icon="⏹️")


def show_result(result: CsvResult) -> None:
    scores = result.scores
    st.subheader(f"Results: {literal(result.name)}, column “{literal(result.column)}”")
    truncated = int(scores.truncated.sum())
    st.caption(
        f"{len(scores):,} texts in {scores.seconds:,.1f} s ({scores.texts_per_s:,.0f} texts/s) on {scores.device} ({precision_label(scores.dtype)}) "
        f"with {literal(scores.model_title)}."
        + (f" {truncated:,} texts longer than {scores.max_tokens} tokens were scored on their first {scores.max_tokens} (column `truncated`)." if truncated else "")
        + (f" {plural(result.blank_rows, 'row')} with an empty cell: no result." if result.blank_rows else "")
        + standin_suffix(scores.is_standin)
    )
    colours = colour_scale(scores.labels)
    counts_column, histogram_column = st.columns(2, gap="large")
    counts_column.altair_chart(
        alt.Chart(scores.label_counts(), title="Labels").mark_bar().encode(
            x=alt.X("texts:Q", title="texts"), y=alt.Y("label:N", sort="-x", title=None),
            color=alt.Color("label:N", scale=colours, legend=None), tooltip=["label", "texts"],
        ),
    )
    histogram_column.altair_chart(
        alt.Chart(scores.score_histogram(), title="Scores (probability of the chosen label)").mark_bar().encode(
            x=alt.X("bin_start:Q", bin=alt.Bin(binned=True), title="score"), x2="bin_end:Q",
            y=alt.Y("texts:Q", stack=True, title="texts"), color=alt.Color("label:N", scale=colours), tooltip=["label", "bin_start", "bin_end", "texts"],
        ),
    )
    st.dataframe(
        result.frame, hide_index=True,
        column_config={"score": st.column_config.ProgressColumn("score", min_value=0.0, max_value=1.0, format="%.3f")},
    )
    stem = result.name.rsplit(".", 1)[0]
    st.download_button(
        "Download results (CSV)", data=lambda: tables.to_csv_bytes(result.frame),  # made on click: no copy held per session
        file_name=f"{stem}-sentiment{STANDIN_FILE_SUFFIX if scores.is_standin else ''}.csv", mime="text/csv",
        key="sentiment:download", on_click="ignore", icon="⬇️",
    )


def csv_file(model: LoadedModel) -> None:
    collect_finished_run()
    table = load_table()
    if table is not None:
        columns = list(table.frame.columns)
        guess = table.guess_text_column()
        column = st.selectbox(
            "Column with the text", columns, index=columns.index(guess) if guess else 0, key=f"sentiment:column:{table.name}:{'|'.join(columns)}",
        )
        try:
            texts = tables.column_texts(table, column)
        except DashboardError as error:
            show_error(error)
        else:
            blank = f" ({plural(texts.blank_rows, 'empty cell')} skipped)" if texts.blank_rows else ""
            # A callback starts the run before the page is drawn, so this very rerun already shows the button disabled.
            st.button(
                f"Classify {len(texts.texts):,} rows{blank}", type="primary", disabled=RUN_KEY in st.session_state, key="sentiment:run",
                on_click=start_run, args=(model, table, texts),
            )
    run_progress()
    note = st.session_state.get(NOTE_KEY)
    if isinstance(note, DashboardError):
        show_error(note)
    elif note:
        st.info(note)
    result = st.session_state.get(RESULT_KEY)
    if result is not None:
        show_result(result)


with one_tab:
    one_text(model)
with lines_tab:
    many_lines(model)
with file_tab:
    csv_file(model)
