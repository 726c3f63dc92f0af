from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from core.errors import BadInputError
from core.tasks.tables import column_texts, decode, read_table, sniff_delimiter, to_csv_bytes, with_columns


def test_csv_cells_stay_text_exactly_as_written():
    table = read_table(b"id,review,stars\n007,Loved it,5\n008,NA,1.50\n", "reviews.csv")
    assert table.delimiter == "," and table.encoding == "utf-8" and not table.encoding_guessed
    assert table.frame["id"].tolist() == ["007", "008"]  # ids keep their leading zeros
    assert table.frame["review"].tolist() == ["Loved it", "NA"]  # "NA" is a review, not a missing value
    assert table.frame["stars"].tolist() == ["5", "1.50"]
    assert table.text_columns == ("review",) and table.guess_text_column() == "review"


@pytest.mark.parametrize(
    ("name", "data", "delimiter"),
    [
        ("a.tsv", b"id\ttext\n1\tgood, really good\n2\tbad\n", "\t"),  # commas inside a TSV's text never split it
        ("a.csv", b"id;text\n1;good\n2;bad, awful\n", ";"),
        ("a.txt", b"id|text\n1|good\n", "|"),
        ("a.csv", b'id,text\n1,"good, really"\n2,bad\n', ","),
    ],
)
def test_delimiter_is_sniffed_from_the_rows(name, data, delimiter):
    table = read_table(data, name)
    assert table.delimiter == delimiter
    assert table.frame.columns.tolist() == ["id", "text"]


def test_a_list_of_sentences_with_commas_is_one_column():
    data = b'text\nI loved it, really\nbad\n"quoted, ""twice"""\n'
    table = read_table(data, "lines.csv")
    assert table.frame["text"].tolist() == ["I loved it, really", "bad", 'quoted, "twice"']
    assert sniff_delimiter(data.decode(), "lines.csv") not in ",\t;|"


@pytest.mark.parametrize(
    ("encoded", "encoding"),
    [
        ("text\ncafé crème brûlée\n".encode("utf-8-sig"), "utf-8-sig"),
        ("text\ncafé crème brûlée\n".encode("utf-16"), "utf-16"),
    ],
)
def test_byte_order_marks_decide_the_encoding(encoded, encoding):
    text, used, guessed = decode(encoded, "f.csv")
    assert used == encoding and not guessed and text == "text\ncafé crème brûlée\n"


def test_non_utf8_file_is_detected_and_said_to_be_a_guess():
    table = read_table("review,n\ncafé crème très bon,1\n".encode("cp1252"), "excel.csv")
    assert table.encoding_guessed and table.frame["review"].tolist() == ["café crème très bon"]
    cyrillic = read_table("отзыв,n\nочень хорошо,1\n".encode("cp1251"), "ru.csv")
    assert cyrillic.frame.columns.tolist() == ["отзыв", "n"] and cyrillic.encoding_guessed


def test_an_explicit_encoding_is_used_and_a_wrong_one_is_named():
    data = "text\nnaïve\n".encode("latin-1")
    assert read_table(data, "f.csv", encoding="latin-1").frame["text"].tolist() == ["naïve"]
    with pytest.raises(BadInputError, match=r"f\.csv is not valid utf-8: byte 7 is b'\\xef'"):
        read_table(data, "f.csv", encoding="utf-8")
    with pytest.raises(BadInputError, match="encoding 'klingon' is not one Python knows"):
        read_table(data, "f.csv", encoding="klingon")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"empty\.csv is empty \(0 bytes\)"),
        (b" \n\n  \n", "holds only whitespace"),
        (b"id,text\n", r"has a header \(columns: id, text\) but no rows"),
        (b"id,text\n1,good\n2,bad,extra\n", "Expected 2 fields in line 3, saw 3"),
        (b"id,text\n1,2,3\n", "first row under the header has 3 fields but the header has 2"),
        (b'id,text\n1,"never closed\n', "EOF inside string"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01", "binary file|does not look like text"),
    ],
)
def test_bad_files_are_one_clear_message_naming_the_file(data, message):
    with pytest.raises(BadInputError, match=message) as raised:
        read_table(data, "empty.csv")
    assert "empty.csv" in str(raised.value) and raised.value.remedy


def test_column_texts_skips_blank_cells_and_keeps_their_positions():
    table = read_table(b"id,text\n1,good\n2,\n3,   \n4,bad\n", "f.csv")
    texts = column_texts(table, "text")
    assert texts.texts == ["good", "bad"] and texts.rows.tolist() == [0, 3] and texts.blank_rows == 2


@pytest.mark.parametrize(
    ("column", "message"),
    [
        ("review", r"column 'review' is not in f\.csv; its columns are 'id', 'text', 'empty'"),
        ("id", "column 'id' of f.csv holds only numbers, not text"),
        ("empty", "column 'empty' of f.csv is empty in every row"),
    ],
)
def test_missing_numeric_or_empty_columns_are_named(column, message):
    table = read_table(b"id,text,empty\n1,good,\n2,bad,\n", "f.csv")
    with pytest.raises(BadInputError, match=message):
        column_texts(table, column)


def test_results_go_back_to_their_rows_and_never_overwrite_user_columns():
    table = read_table(b"label,text\nx,good\ny,\nz,bad\n", "f.csv")
    texts = column_texts(table, "text")
    frame = with_columns(table.frame, texts.rows, {"label": np.array(["POS", "NEG"], dtype=object), "score": np.array([0.9, 0.6])})
    assert frame.columns.tolist() == ["label", "text", "label_2", "score"]
    assert frame["label"].tolist() == ["x", "y", "z"]
    assert frame["label_2"].tolist()[::2] == ["POS", "NEG"] and pd.isna(frame["label_2"][1]) and pd.isna(frame["score"][1])
    round_trip = pd.read_csv(io.BytesIO(to_csv_bytes(frame)), dtype=str, keep_default_na=False)
    assert round_trip["score"].tolist() == ["0.9", "", "0.6"] and round_trip["text"].tolist() == ["good", "", "bad"]
