"""Delimited-text reading for `twotower.data.loader`: pandas parses, a Python-level scan points back.

pandas (C engine) reads the cells fast but cannot say which physical line a frame row came from, and
its handling of rows with too many fields is silent or lossy. `records` re-reads the file with
`csv.reader` (exact with quoted newlines, but slow), so it only runs when something has to be located:
an error to report, or a row pandas complained about. Both must agree on what a data row is, so blank
lines (empty, or only spaces and tabs) are skipped here exactly as pandas skips them.

Rows with more fields than the header: pandas' C parser expects max(header width, fields of the first
data row) fields; it skips later rows with more than that ("Skipping line N") and, with
``index_col=False``, silently truncates rows between the header width and that count. Every such row
whose fields beyond the header are not all blank is reported as ``expected {width} fields, saw {n}``
and dropped from the frame; extra fields that are all blank (Excel-style trailing separators, ``1,10,``)
are harmless and the row is kept, unless pandas already skipped it, which is then reported too.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twotower.data.errors import DataError

_TEXT_SEPS = {".csv": ",", ".tsv": "\t"}
# pandas' ParserWarnings about rows whose field count differs from the header's; handled by _align.
_SHAPE_WARNINGS = ("Skipping line", "Length of header or names does not match")
_Frame = tuple[pd.DataFrame, np.ndarray, list[DataError]]  # cells, data-row numbers, malformed rows


def resolve_sep(path: Path, sep: str | None) -> str:
    """The given single-character separator, the one of the suffix, or one sniffed from the header."""
    if sep is not None:
        if len(sep) != 1:
            raise ValueError(f"sep must be a single character, got {sep!r}")
        return sep
    if path.suffix.lower() in _TEXT_SEPS:
        return _TEXT_SEPS[path.suffix.lower()]
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        header = fh.readline()
    try:
        return csv.Sniffer().sniff(header, delimiters=",\t|;").delimiter
    except csv.Error:
        raise DataError(path, "cannot infer the separator from the header; pass sep=", line=1) from None


def _scan(path: Path, sep: str) -> Iterator[tuple[int, list[str]]]:
    """(first physical line, fields) of every non-blank record, the header included."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        last = [""]  # raw text of the line read last: a record's last line once it is complete

        def lines() -> Iterator[str]:
            for text in fh:
                last[0] = text
                yield text

        reader = csv.reader(lines(), delimiter=sep)
        end = 0
        for record in reader:
            start, end = end + 1, reader.line_num
            # pandas skips empty lines and lines of only spaces/tabs; csv.reader gives [] for the first
            # and one whitespace field for the second (but also for a quoted '"  "', a real row).
            if not record or (len(record) == 1 and start == end and not last[0].strip(" \t\r\n")):
                continue
            yield start, record


def records(path: Path, sep: str) -> Iterator[tuple[int, int, list[str]]]:
    """(data row, physical line, fields) of each data record, i.e. each non-blank record after the header."""
    scan = _scan(path, sep)
    next(scan, None)
    for row, (line, fields) in enumerate(scan, start=1):
        yield row, line, fields


def lines_of(path: Path, sep: str, rows: set[int]) -> dict[int, int]:
    """Physical line of each of ``rows``; only run when reporting errors (the scan is exact but slow)."""
    found: dict[int, int] = {}
    if rows:
        last = max(rows)
        for row, line, _ in records(path, sep):
            if row in rows:
                found[row] = line
            if row >= last:
                break
    return found


def _bad_byte_line(path: Path) -> int | None:
    # UTF-8 multi-byte sequences never contain b"\n", so decoding line by line finds the line exactly.
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


@contextmanager
def _parse_errors(path: Path, sep: str) -> Iterator[None]:
    """Turn pandas' decoding and tokenizing errors into DataErrors that name the file (and the line)."""
    try:
        yield
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start : exc.start + 1].hex()
        reason = f"not valid UTF-8 (byte 0x{bad}); save the file as UTF-8"
        raise DataError(path, reason, line=_bad_byte_line(path)) from None
    except pd.errors.ParserError as exc:
        if "EOF inside string" in str(exc):
            # csv.reader (non-strict) reads the open quote to the end of the file: the last record.
            line = max((start for start, _ in _scan(path, sep)), default=None)
            raise DataError(path, "unterminated quoted field (a '\"' is never closed)", line=line) from None
        raise DataError(path, f"cannot parse as {sep!r}-separated text: {exc}") from None


def read_columns(path: Path, sep: str, required: list[str]) -> list[str]:
    """The header's column names; a required name appearing more than once is an error."""
    try:
        with _parse_errors(path, sep):
            available = list(pd.read_csv(path, sep=sep, nrows=0, index_col=False).columns)
    except pd.errors.EmptyDataError:
        raise DataError(path, "empty file (a header row is required)") from None
    # pandas renames a repeated name ("x", "x.1") and the loader would silently take the first.
    line, header = next(_scan(path, sep), (1, []))
    for col in required:
        if header.count(col) > 1:
            raise DataError(path, "appears more than once in the header", line=line, column=col)
    return available


def read_frame(path: Path, sep: str, dtype: Any, default_na: bool) -> _Frame:
    """Cells of every data row, the 1-based data-row number of each frame row, and the rows with too
    many fields (reported, not in the frame; see the module docstring)."""
    with _parse_errors(path, sep), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        # index_col=False: without it, rows with one field more than the header make pandas take the
        # first column as the index, shifting every column silently. on_bad_lines="warn" keeps reading
        # past rows with too many fields; they are located below.
        frame = pd.read_csv(
            path,
            sep=sep,
            dtype=dtype,
            keep_default_na=default_na,
            on_bad_lines="warn",
            encoding="utf-8-sig",
            index_col=False,
            # Inferring types chunk by chunk can give one column ints in some rows and strs in others
            # (3 and "3", two categories); with every column read as str there is nothing to infer.
            low_memory=dtype is str,
        )
    shape_warned = False
    for w in caught:
        if any(s in str(w.message) for s in _SHAPE_WARNINGS):
            shape_warned = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not shape_warned:
        return frame, np.arange(1, len(frame) + 1), []
    return _align(path, sep, frame)


def _align(path: Path, sep: str, frame: pd.DataFrame) -> _Frame:
    width = len(frame.columns)
    expected: int | None = None  # pandas' expected field count: max(width, first data row's count)
    positions: list[int] = []  # frame positions of the rows kept
    rows: list[int] = []
    malformed: list[DataError] = []
    pos = 0  # frame position of the next record pandas kept
    for row, line, fields in records(path, sep):
        n = len(fields)
        expected = max(width, n) if expected is None else expected
        skipped = n > expected  # pandas dropped it ("Skipping line")
        if skipped or (n > width and any(f.strip() for f in fields[width:])):
            malformed.append(DataError(path, f"expected {width} fields, saw {n}", row=row, line=line))
        else:
            positions.append(pos)
            rows.append(row)
        if not skipped:
            pos += 1
    if pos != len(frame):  # never mislabel rows: better no answer than a wrong line number
        raise DataError(path, f"cannot align the {len(frame)} rows pandas read with the {pos} records found")
    return frame.iloc[positions].reset_index(drop=True), np.asarray(rows, dtype=np.int64), malformed
