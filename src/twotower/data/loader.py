"""Generic loaders for interaction logs and user/item feature tables (CSV/TSV/TXT and Parquet).

Every problem is reported as a `DataError` that names the file, the 1-based data row (and, for text
files, the physical line, header = line 1) and the column, so that a bad cell in a large file can be
found without guessing.

Conventions:

- **Formats** by suffix: ``.csv`` (``,``), ``.tsv`` (``\\t``), ``.txt`` (separator sniffed from the
  header unless given), ``.parquet``/``.pq``. Text files must be UTF-8 and have a header row, in which
  a configured column may appear only once. Blank lines (empty or only spaces/tabs) are not data rows
  and are ignored. A row with more fields than the header is bad unless the extra fields are all blank
  (trailing separators); see `twotower.data.csv_records`.
- **Ids** keep their identity: in text files a column whose every value is a canonical integer literal
  (``12``, ``-3``; not ``007``, which would silently merge with ``7``) becomes int64; in Parquet an
  integer column (or a float column holding only whole numbers, which is what a nullable integer
  column becomes in pandas) becomes int64, unless it holds unsigned values beyond the int64 range;
  a categorical (dictionary) column is judged by its values. Anything else becomes ``str``.
  Surrounding spaces are stripped from text ids, in text files and Parquet alike.
- **Missing** means NaN/None or, in text, an empty cell or one of ``nan NaN NA N/A NULL null None``.
  A configured column that is missing in a row makes that row bad (ids, rating, weight, timestamp).
- **Timestamps** become int64 Unix seconds. With ``timestamp_format=None`` a bare number is Unix seconds
  (a fraction is floored) and anything else must be ISO-8601; zone-less times are taken as UTC. With a
  format every value is parsed with it, a Parquet number as the digits of its integer value (20200101
  with ``%Y%m%d``, as in a CSV); a number with a fraction does not match a format.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from twotower.data.csv_records import lines_of, read_columns, read_frame, resolve_sep
from twotower.data.errors import DataError

log = logging.getLogger("twotower.data")

_TEXT_SUFFIXES = {".csv", ".tsv", ".txt"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
_NA_TOKENS = ["", "nan", "NaN", "NA", "N/A", "NULL", "null", "None"]
_CANONICAL_INT = r"^(?:0|-?[1-9][0-9]{0,17})$"  # <= 18 digits always fits in int64
_EPOCH = pd.Timestamp("1970-01-01", tz="UTC")
_MAX_EXAMPLES = 5


class InteractionColumns(BaseModel):
    """Which file columns hold what; optional columns are only read when named."""

    model_config = ConfigDict(extra="forbid")

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = None
    rating: str | None = None
    weight: str | None = None
    clicked: str | None = None  # 1/0 (true/false, yes/no): rows with 0 are impressions without a click
    timestamp_format: str | None = None  # strftime format; None: Unix seconds or ISO-8601


@dataclass
class LoadedInteractions:
    """Canonical interactions (file order) plus what was dropped in ``on_bad_rows="skip"`` mode."""

    frame: pd.DataFrame  # user_id, item_id[, timestamp int64][, rating float64][, weight float64]
    path: Path
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


# --- reading --------------------------------------------------------------------------------------


@dataclass
class _Raw:
    """Raw cells of a file plus the bookkeeping needed to point back into it."""

    path: Path
    frame: pd.DataFrame
    sep: str | None  # None for Parquet
    rows: np.ndarray  # 1-based data-row number of each frame row
    malformed: list[DataError]  # text rows with too many fields (not in frame)

    def errors(self, found: list[tuple[int, str, str]]) -> list[DataError]:
        """DataErrors for (frame position, column, reason) triples, with physical lines for text."""
        rows = [int(self.rows[pos]) for pos, _, _ in found]
        lines = lines_of(self.path, self.sep, set(rows)) if self.sep is not None else {}
        return [
            DataError(self.path, reason, row=row, line=lines.get(row), column=col)
            for row, (_, col, reason) in zip(rows, found, strict=True)
        ]


def _check_columns(path: Path, available: list[str], required: list[str]) -> None:
    for col in required:
        if col not in available:
            raise DataError(path, f"column not found; available columns: {available}", column=col)


def _nullable_int(t: Any) -> Any:
    """pandas' nullable integer dtype for an Arrow integer type (None for any other type)."""
    import pyarrow as pa

    if not pa.types.is_integer(t):
        return None
    return pd.api.types.pandas_dtype(f"{'UInt' if pa.types.is_unsigned_integer(t) else 'Int'}{t.bit_width}")


def _keep_integers(path: Path, schema: Any, frame: pd.DataFrame, required: list[str]) -> None:
    """Re-read configured integer columns holding nulls as nullable integers: pandas makes them float64,
    which rounds values beyond 2**53 (two distinct 62-bit ids would become one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [c for c in dict.fromkeys(required) if c in schema.names]
    wanted = [c for c in names if pa.types.is_integer(schema.field(c).type)]
    if wanted:
        table = pq.read_table(path, columns=wanted)
        for col in wanted:
            if table.column(col).null_count:
                frame[col] = table.column(col).to_pandas(types_mapper=_nullable_int).array


def _read(path: str | Path, sep: str | None, required: list[str], dtype: Any, default_na: bool) -> _Raw:
    path = Path(path)
    if path.is_dir():  # e.g. a Spark/Dask output folder of part files
        raise IsADirectoryError(f"{path}: is a folder; pass one .csv, .tsv, .txt or .parquet file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in _PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as exc:  # pyarrow raises several types for non-Parquet bytes
            raise DataError(path, f"not a readable Parquet file ({exc})") from exc
        # A frame saved with df.set_index("item_id") keeps the ids as its index: stored as a column, or
        # (ids 1, 2, 3...) only as a range in the pandas metadata, which pd.read_parquet rebuilds.
        ranges = [
            i.get("name")
            for i in (schema.pandas_metadata or {}).get("index_columns", [])
            if isinstance(i, dict)
        ]
        available = schema.names + [n for n in ranges if isinstance(n, str) and n not in schema.names]
        _check_columns(path, available, required)
        frame = pd.read_parquet(path)
        levels = [n for n in frame.index.names if n in required and n not in frame.columns]
        if levels:
            frame = frame.reset_index(level=levels)
        _keep_integers(path, schema, frame, required)
        return _Raw(path, frame.reset_index(drop=True), None, np.arange(1, len(frame) + 1), [])
    if suffix not in _TEXT_SUFFIXES:
        raise DataError(path, f"unsupported file type {suffix!r} (use .csv, .tsv, .txt, .parquet)")
    sep = resolve_sep(path, sep)
    available = read_columns(path, sep, required)
    _check_columns(path, available, required)
    frame, rows, malformed = read_frame(path, sep, dtype, default_na)
    return _Raw(path, frame, sep, rows, malformed)


# --- cell parsing ---------------------------------------------------------------------------------

_Check = tuple[np.ndarray, Callable[[int], str]]  # bad-row mask, reason for a bad position


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _missing(raw: pd.Series) -> np.ndarray:
    miss = raw.isna().to_numpy()
    if not (pd.api.types.is_numeric_dtype(raw) or pd.api.types.is_datetime64_any_dtype(raw)):
        miss = miss | raw.astype(str).str.strip().isin(_NA_TOKENS).to_numpy()
    return miss


def _id_check(raw: pd.Series, what: str) -> _Check:
    return _missing(raw), lambda _pos: f"missing {what}"


def _normalise_ids(values: pd.Series, text: bool) -> pd.Series:
    """int64 when the column is integral (see module docstring), else str."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        # Judge a categorical by its values: `.map` below would keep a one-category column categorical.
        # Callers have dropped missing ids, so integer categories convert exactly.
        values = values.astype(values.cat.categories.dtype)
    if pd.api.types.is_bool_dtype(values):
        return values.astype(str)
    if pd.api.types.is_integer_dtype(values):
        if pd.api.types.is_unsigned_integer_dtype(values) and (values > np.iinfo(np.int64).max).any():
            return values.astype(str)  # int64 would wrap these to negative ids
        return values.astype(np.int64)
    if pd.api.types.is_float_dtype(values):
        arr = values.to_numpy(dtype=np.float64)
        if np.all(np.mod(arr, 1) == 0) and np.all(np.abs(arr) < 2**53):
            return pd.Series(arr.astype(np.int64), index=values.index)
        return values.astype(str)
    if not text and values.map(lambda v: isinstance(v, int | np.integer) and not isinstance(v, bool)).all():
        return values.astype(np.int64)
    # Spaces around an id are never part of it, whatever the file format: a Parquet log's " 7 " must
    # join a table's 7 just as the same log written as CSV does (ids are compared as text across files).
    stripped = values.astype(str).str.strip()
    if text and stripped.str.fullmatch(_CANONICAL_INT).all():
        return stripped.astype(np.int64)
    return stripped


def _number_check(raw: pd.Series, what: str, non_negative: bool) -> tuple[np.ndarray, _Check]:
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    missing = _missing(raw)
    bad = missing | ~np.isfinite(values) | ((values < 0) if non_negative else False)

    def reason(pos: int) -> str:
        cell = _py(raw.iloc[pos])
        if missing[pos]:
            return f"missing {what}"
        if np.isnan(values[pos]):
            return f"not a number: {cell!r}"
        if np.isinf(values[pos]):
            return f"not a finite number: {cell!r}"
        return f"negative {what}: {cell!r}"

    return values, (bad, reason)


def _timestamp_check(raw: pd.Series, fmt: str | None) -> tuple[np.ndarray, _Check]:
    missing = _missing(raw)
    seconds = np.zeros(len(raw), dtype=np.int64)
    ok = np.zeros(len(raw), dtype=bool)
    if pd.api.types.is_datetime64_any_dtype(raw):
        dt = raw if raw.dt.tz is not None else raw.dt.tz_localize("UTC")
        ok = ~missing
        seconds[ok] = ((dt[ok] - _EPOCH) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
    else:
        is_number = pd.api.types.is_numeric_dtype(raw)
        if is_number or fmt is None:
            numbers = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            with np.errstate(invalid="ignore"):
                usable = ~missing & (np.abs(numbers) < 2**53)  # also rejects NaN/inf
        if fmt is None:
            # A bare number is Unix seconds (a fraction is floored); text goes to the ISO-8601 parser.
            ok = usable
            seconds[ok] = np.floor(numbers[ok]).astype(np.int64)
            to_parse = ~missing & ~ok & (not is_number)
            text = raw[to_parse].astype(str).str.strip()
        elif is_number:
            # The format describes digits (20200101 with "%Y%m%d"): parse a number's integer text, as the
            # same value in a CSV is parsed; a number with a fraction matches no format and stays bad.
            with np.errstate(invalid="ignore"):
                to_parse = usable & (np.mod(numbers, 1) == 0)
            text = pd.Series(numbers[to_parse].astype(np.int64).astype(str))
        else:
            to_parse = ~missing
            text = raw[to_parse].astype(str).str.strip()
        if to_parse.any():
            parsed = pd.to_datetime(text, format=fmt or "ISO8601", utc=True, errors="coerce")
            good = parsed.notna().to_numpy()
            idx = np.flatnonzero(to_parse)[good]
            seconds[idx] = ((parsed[good] - _EPOCH) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
            ok[idx] = True
    expected = f"format {fmt!r}" if fmt else "integer Unix seconds or ISO-8601"

    def reason(pos: int) -> str:
        if missing[pos]:
            return "missing timestamp"
        return f"unparsable timestamp: {_py(raw.iloc[pos])!r} (expected {expected})"

    return seconds, (~ok, reason)


_TRUE, _FALSE = {"1", "true", "yes", "1.0"}, {"0", "false", "no", "0.0"}


def _flag_check(raw: pd.Series) -> tuple[np.ndarray, _Check]:
    text = raw.astype(str).str.strip().str.lower()
    is_true, is_false = text.isin(_TRUE).to_numpy(), text.isin(_FALSE).to_numpy()

    def reason(pos: int) -> str:
        return f"not a click flag: {_py(raw.iloc[pos])!r} (expected 1/0, true/false or yes/no)"

    return is_true, (~(is_true | is_false), reason)


# --- public loaders -------------------------------------------------------------------------------


def load_interactions(
    path: str | Path,
    columns: InteractionColumns | None = None,
    on_bad_rows: Literal["raise", "skip"] = "raise",
    sep: str | None = None,
) -> LoadedInteractions:
    """Read an interaction log into canonical columns (see the module docstring for conventions).

    ``on_bad_rows="raise"`` raises a `DataError` for the first bad row; ``"skip"`` drops bad rows,
    counts them and logs one warning on the ``twotower.data`` logger.
    """
    if on_bad_rows not in ("raise", "skip"):
        raise ValueError(f"on_bad_rows must be 'raise' or 'skip', got {on_bad_rows!r}")
    cols = columns or InteractionColumns()
    wanted = {"user_id": cols.user, "item_id": cols.item, "timestamp": cols.timestamp}
    wanted |= {"rating": cols.rating, "weight": cols.weight, "clicked": cols.clicked}
    wanted = {canon: src for canon, src in wanted.items() if src is not None}
    raw = _read(path, sep, list(wanted.values()), dtype=str, default_na=False)
    text = raw.sep is not None

    values: dict[str, Any] = {}
    checks: list[tuple[str, _Check]] = []
    for canon, src in wanted.items():
        series = raw.frame[src]
        if canon in ("user_id", "item_id"):
            values[canon] = series
            check = _id_check(series, canon.replace("_", " "))
        elif canon == "timestamp":
            values[canon], check = _timestamp_check(series, cols.timestamp_format)
        elif canon == "clicked":
            values[canon], check = _flag_check(series)
        else:
            values[canon], check = _number_check(series, canon, non_negative=canon == "weight")
        checks.append((src, check))

    bad = np.zeros(len(raw.frame), dtype=bool)
    for _, (mask, _) in checks:
        bad |= mask
    positions = np.flatnonzero(bad)
    limit = 1 if on_bad_rows == "raise" else _MAX_EXAMPLES
    found = []
    for pos in positions[:limit]:
        src, (_, reason) = next((s, c) for s, c in checks if c[0][pos])
        found.append((int(pos), src, reason(int(pos))))
    problems = sorted(raw.malformed + raw.errors(found), key=lambda e: e.row or 0)
    if on_bad_rows == "raise" and problems:
        raise problems[0]

    keep = ~bad
    frame = pd.DataFrame(index=pd.RangeIndex(int(keep.sum())))
    for canon in wanted:
        column = values[canon][keep]
        if canon in ("user_id", "item_id"):
            frame[canon] = _normalise_ids(column.reset_index(drop=True), text).to_numpy()
        elif canon == "clicked":
            frame[canon] = np.asarray(column, dtype=bool)
        else:
            frame[canon] = np.asarray(column, dtype=np.int64 if canon == "timestamp" else np.float64)
    skipped = len(raw.malformed) + len(positions)
    examples = [str(e) for e in problems[:_MAX_EXAMPLES]]
    if skipped:
        log.warning(
            "%s: skipped %d bad rows of %d; first: %s", raw.path, skipped, skipped + len(frame), examples[0]
        )
    return LoadedInteractions(frame=frame, path=raw.path, skipped=skipped, skipped_examples=examples)


def load_table(path: str | Path, key: str, sep: str | None = None) -> pd.DataFrame:
    """Read a user/item feature table keyed by ``key`` (unique, non-missing; normalised like ids).

    Other columns keep pandas' inferred types (numbers as numbers, text as str).
    """
    raw = _read(path, sep, [key], dtype={key: str}, default_na=True)
    if raw.malformed:
        raise raw.malformed[0]
    frame = raw.frame
    missing = _missing(frame[key])
    if missing.any():
        raise raw.errors([(int(np.flatnonzero(missing)[0]), key, "missing key")])[0]
    keys = _normalise_ids(frame[key], text=raw.sep is not None)
    dup = keys.duplicated(keep="first").to_numpy()
    if dup.any():
        pos = int(np.flatnonzero(dup)[0])
        first = int(np.flatnonzero((keys == keys.iloc[pos]).to_numpy())[0])
        reason = f"duplicate key {_py(keys.iloc[pos])!r} (first seen in row {int(raw.rows[first])})"
        raise raw.errors([(pos, key, reason)])[0]
    frame = frame.copy()
    frame[key] = keys.to_numpy()
    return frame.reset_index(drop=True)
