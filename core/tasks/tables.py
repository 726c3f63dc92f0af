"""Uploaded CSV / TSV bytes -> a table of strings, or one BadInputError that names the file and what is wrong.

Every cell is read as text, so the result CSV gives back the user's columns exactly as they were (leading zeros,
long ids, number formatting). Only empty cells are missing values: "NA" or "None" in a review is a review.
"""
from __future__ import annotations

import codecs
import csv
import io
import itertools
import re
from dataclasses import dataclass

import charset_normalizer
import numpy as np
import pandas as pd

from core.errors import BadInputError

# Offered when detection guesses wrong; Python codec names.
ENCODINGS = ("utf-8", "utf-16", "cp1252", "latin-1", "iso-8859-15", "mac-roman", "shift_jis", "euc-kr", "gb18030", "big5", "koi8-r")
DELIMITERS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
# Enough lines to see the delimiter; little enough that sniffing a 200 MiB file costs nothing.
SNIFF_CHARS = 64 * 1024
SNIFF_ROWS = 50
# When the header has no delimiter at all the file is one column: split on a character text never holds.
_ONE_COLUMN = "\x1f"
# How much more "chaos" (charset_normalizer's mess score, 0..1) than the best guess still counts as a tie.
NEAR_TIE_CHAOS = 0.2
# A spreadsheet reads a cell starting with one of these as a formula (OWASP, CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


@dataclass(frozen=True)
class Table:
    name: str
    frame: pd.DataFrame  # every column holds str or NaN (empty cell)
    encoding: str
    encoding_guessed: bool  # True when the encoding came from statistics, not from a BOM, valid UTF-8 or the user
    delimiter: str

    @property
    def text_columns(self) -> tuple[str, ...]:
        """Columns worth offering as the text: some cell holds something that is not a number."""
        return tuple(str(column) for column in self.frame.columns if _has_text(self.frame[column]))

    def guess_text_column(self) -> str | None:
        """The text column with the longest cells on average: reviews beat ids and categories."""
        candidates = self.text_columns
        if not candidates:
            return None
        return max(candidates, key=lambda column: self.frame[column].dropna().str.len().mean())


@dataclass(frozen=True)
class ColumnTexts:
    """The non-blank cells of one column, and where they sit in the table."""

    column: str
    texts: list[str]
    rows: np.ndarray  # row positions of `texts` in the table
    blank_rows: int  # empty or whitespace-only cells, left without a result


def decode(data: bytes, name: str, encoding: str | None = None) -> tuple[str, str, bool]:
    """(text, encoding, guessed). An explicit `encoding` is used as given; otherwise BOM, then UTF-8, then detection."""
    if encoding:
        return _decode_as(data, name, encoding), encoding, False
    for bom, bom_encoding in _BOMS:
        if data.startswith(bom):
            return _decode_as(data, name, bom_encoding), bom_encoding, False
    try:
        return data.decode("utf-8"), "utf-8", False
    except UnicodeDecodeError:
        pass
    guess = _guess_encoding(data[: 1024 * 1024])
    if guess is None:
        raise BadInputError(
            f"{name} does not look like text in any encoding this app knows (is it a spreadsheet or a binary file?).",
            remedy="Save it as CSV or TSV text (UTF-8 is best), or choose its encoding in the list.",
        )
    return _decode_as(data, name, guess), guess, True


def _guess_encoding(sample: bytes) -> str | None:
    """charset_normalizer's best guess, except that cp1252 wins a near tie.

    Short samples leave several code pages equally plausible (cp1250, cp1257 for "café crème"); a non-UTF-8 CSV is
    most often an Excel export from Western Europe, and the user can still pick another encoding.
    """
    matches = charset_normalizer.from_bytes(sample)
    best = matches.best()
    if best is None:
        return None
    near = [match.encoding for match in matches if match.chaos <= best.chaos + NEAR_TIE_CHAOS]
    return "cp1252" if "cp1252" in near else best.encoding


def _decode_as(data: bytes, name: str, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except LookupError as exc:
        raise BadInputError(f"encoding {encoding!r} is not one Python knows.", remedy="Choose an encoding from the list.") from exc
    except UnicodeDecodeError as exc:
        raise BadInputError(
            f"{name} is not valid {encoding}: byte {exc.start:,} is {data[exc.start : exc.start + 1]!r}.",
            remedy="Choose another encoding (cp1252 or latin-1 for files from Excel on Windows), or auto-detect.",
        ) from exc


def sniff_delimiter(text: str, name: str) -> str:
    """The delimiter that splits the first rows into the same number (> 1) of fields; one column when none does.

    The file's extension wins ties (tab for .tsv), so a comma inside a TSV's text never splits it.
    """
    default = "\t" if name.lower().endswith((".tsv", ".tab")) else ","
    sample = text[:SNIFF_CHARS]
    if len(text) > SNIFF_CHARS:
        sample = sample[: sample.rfind("\n") + 1] or sample  # a cut last line would miscount
    for delimiter in (default, *(d for d in DELIMITERS if d != default)):
        # newline="": the csv module splits lines itself, at \r too, as pandas does below.
        rows = [row for row in itertools.islice(csv.reader(io.StringIO(sample, newline=""), delimiter=delimiter), SNIFF_ROWS) if row]
        widths = {len(row) for row in rows}
        if len(widths) == 1 and widths.pop() > 1:
            return delimiter
    first_line = sample.split("\n", 1)[0]
    return default if any(d in first_line for d in DELIMITERS) else _ONE_COLUMN


def read_table(data: bytes, name: str, encoding: str | None = None) -> Table:
    """Parse an uploaded CSV / TSV file; the first row is the header."""
    if not data:
        raise BadInputError(f"{name} is empty (0 bytes).", remedy="Upload a CSV or TSV file with a header row and at least one row of text.")
    text, used_encoding, guessed = decode(data, name, encoding)
    if "\x00" in text:
        raise BadInputError(
            f"{name} holds NUL characters when read as {used_encoding}: it is a binary file or another encoding.",
            remedy="Upload a CSV or TSV text file, or choose its encoding (UTF-16 files often look like this).",
        )
    if not text.strip():
        raise BadInputError(f"{name} holds only whitespace.", remedy="Upload a CSV or TSV file with a header row and at least one row of text.")
    delimiter = sniff_delimiter(text, name)
    try:
        frame = pd.read_csv(
            io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False, na_values=[""], skip_blank_lines=True,
        )
    except pd.errors.EmptyDataError as exc:  # blank to pandas, though not to str.strip(): a lone byte-order mark
        raise BadInputError(f"{name} has no header row.", remedy="Upload a CSV or TSV file with a header row and at least one row of text.") from exc
    except pd.errors.ParserError as exc:
        how = "one column" if delimiter == _ONE_COLUMN else f"{DELIMITERS[delimiter]}-separated"
        detail = str(exc).strip().split("C error: ")[-1]
        raise BadInputError(
            f"{name} is not a well-formed {how} file: {detail}",
            remedy="Check the quoting on that line: a field holding the delimiter or a line break must be in double quotes.",
        ) from exc
    if not isinstance(frame.index, pd.RangeIndex):  # pandas took the extra first field of row 1 as an index
        raise BadInputError(
            f"{name}: the first row under the header has {len(frame.columns) + 1} fields but the header has {len(frame.columns)}.",
            remedy="Check the delimiter and the quoting of that row: a field holding the delimiter must be in double quotes.",
        )
    if frame.empty:
        columns = ", ".join(map(str, frame.columns)) or "none"
        raise BadInputError(f"{name} has a header (columns: {columns}) but no rows.", remedy="Upload a file with at least one row under the header.")
    frame.columns = [str(column) for column in frame.columns]
    return Table(name, frame, used_encoding, guessed, delimiter)


def _has_text(column: pd.Series) -> bool:
    values = column.dropna()
    return not values.empty and bool(pd.to_numeric(values, errors="coerce").isna().any())


def column_texts(table: Table, column: str) -> ColumnTexts:
    """The cells of `column` to classify; a missing, empty or numeric column is a BadInputError naming it."""
    if column not in table.frame.columns:
        raise BadInputError(
            f"column {column!r} is not in {table.name}; its columns are {', '.join(map(repr, table.frame.columns))}.",
            remedy="Choose one of the file's columns.",
        )
    cells = table.frame[column]
    filled = cells.notna() & cells.fillna("").str.strip().ne("")
    if not filled.any():
        raise BadInputError(f"column {column!r} of {table.name} is empty in every row.", remedy="Choose the column that holds the text.")
    if not _has_text(cells):
        raise BadInputError(f"column {column!r} of {table.name} holds only numbers, not text.", remedy="Choose the column that holds the text.")
    rows = np.flatnonzero(filled.to_numpy())
    return ColumnTexts(column, cells.iloc[rows].tolist(), rows, int(len(cells) - len(rows)))


def with_columns(frame: pd.DataFrame, rows: np.ndarray, columns: dict[str, np.ndarray | list]) -> pd.DataFrame:
    """`frame` plus new columns whose values belong at `rows` (other rows stay empty); names never overwrite the user's."""
    result = frame.copy()
    for name, values in columns.items():
        result[_free_name(name, result.columns)] = pd.Series(values, index=frame.index[rows]).reindex(frame.index)
    return result


def _free_name(name: str, taken: pd.Index) -> str:
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        candidate = f"{name}_{number}"
    return candidate


def spreadsheet_safe(cell: object) -> object:
    """A text cell that Excel and LibreOffice show as text, never run as a formula (OWASP's CSV-injection rule).

    Text starting with `=`, `+`, `-`, `@`, a tab or a carriage return gets a leading `'`. Text that is a plain
    decimal number ("-0.5", "+3", "1e-3") stays as it is: a spreadsheet reads it as that number and nothing else, and
    a user's column of numbers must come back as numbers. Cells that are not text (scores, counts) are left alone.
    """
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


def to_csv_bytes(frame: pd.DataFrame) -> bytes:
    """UTF-8 CSV with a header, no index: what a download button serves, safe to open in a spreadsheet.

    Every text cell and column name goes through `spreadsheet_safe`. Lines end in CRLF (RFC 4180), so that the csv
    writer quotes a cell holding a bare carriage return as it does one holding a newline: unquoted, a reader (pandas,
    Excel) would end the row there and shift the rest of it into a new one.
    """
    safe = frame.map(spreadsheet_safe)
    safe.columns = [spreadsheet_safe(column) for column in frame.columns]
    return safe.to_csv(index=False, lineterminator="\r\n").encode("utf-8")
