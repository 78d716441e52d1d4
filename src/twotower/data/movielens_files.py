"""Reading the delimited files of a MovieLens release, from a folder or a zip, with located errors.

`MovieLensFiles` finds a release's files (by base name, in a folder, its ``name`` subfolder, or a zip
read in place); `read_delimited` parses one into typed columns. Every problem is a `DataError` naming
the file (``archive.zip:member`` inside a zip), the row and physical line, and the column:

- a cell of a typed column that is no number (no integer for int64 columns, no finite number for
  float64 ones);
- a row with more fields than the layout names. pandas would silently shift every column when all
  rows have one field more (the first becomes the index) and silently drop extra fields otherwise;
  extra fields that are all blank (trailing separators) are harmless and dropped.

Row and line numbering follow `twotower.data.errors`; blank lines (empty, or only spaces and tabs
other than the separator) are not rows, as pandas skips them.
"""

from __future__ import annotations

import csv
import io
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from twotower.data.errors import DataError

__all__ = ["MovieLensFiles", "line_of", "read_delimited"]

# pandas' ParserWarning when a row has more fields than the names given (with index_col=False).
_WIDTH_WARNING = "Length of header or names does not match"


class MovieLensFiles:
    """Uniform read access to a MovieLens folder or zip (members found by base name)."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, str] = {}
        if path.is_dir():
            self._root = self.folder_root(path, name)
        elif zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            for member in sorted(self._zip.namelist(), key=lambda m: (m.count("/"), m)):
                if not member.endswith("/") and "__MACOSX" not in member:
                    self._members.setdefault(member.rsplit("/", 1)[-1], member)
        else:
            raise FileNotFoundError(f"{path}: not a MovieLens folder or zip file")

    @staticmethod
    def folder_root(path: Path, name: str) -> Path:
        """The release's folder: ``path`` itself or its ``name`` subfolder (as a zip would extract)."""
        return path / name if (path / name).is_dir() else path

    def has(self, fname: str) -> bool:
        return fname in self._members if self._zip else (self._root / fname).is_file()

    def label(self, fname: str) -> str:
        if self._zip:
            return f"{self.path}:{self._members.get(fname, fname)}"
        return str(self._root / fname)

    @contextmanager
    def open(self, fname: str):
        if not self.has(fname):
            where = "archive" if self._zip else "folder"
            raise FileNotFoundError(f"{self.path}: the {where} has no {fname!r}")
        with self._zip.open(self._members[fname]) if self._zip else open(self._root / fname, "rb") as fh:
            yield fh

    def close(self) -> None:
        if self._zip:
            self._zip.close()


def read_delimited(
    files: MovieLensFiles,
    fname: str,
    names: list[str],
    *,
    sep: str,
    header: bool = False,
    encoding: str = "utf-8",
    numeric: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Read a delimited member; columns in ``numeric`` get their dtype or a DataError naming the cell."""
    numeric = numeric or {}
    label = files.label(fname)
    opts: dict[str, Any] = dict(
        header=0 if header else None,
        names=names,
        encoding=encoding,
        sep="\t" if sep == "::" else sep,
        # Header-less files use no quoting (titles contain bare quotes); the CSVs quote titles.
        quoting=csv.QUOTE_MINIMAL if header else csv.QUOTE_NONE,
        keep_default_na=False,
        # Without it, rows with one field more than `names` make pandas take the first field as the
        # index: every column shifts by one, silently (user ids read as item ids).
        index_col=False,
    )
    try:
        frame = _parse(files, fname, sep, {c: numeric.get(c, str) for c in names}, opts)
        if not any(frame[c].isna().any() or np.isinf(frame[c].to_numpy()).any() for c in numeric):
            return frame
    except DataError:
        raise
    except (ValueError, OverflowError):
        pass
    # Slow path, only for broken files: re-read as text to find the first bad cell.
    frame = _parse(files, fname, sep, str, opts)
    for column, dtype in numeric.items():
        values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
        as_float = values.astype(np.float64)
        bad = values.isna() | ~np.isfinite(as_float)
        if dtype == "int64":  # a whole number beyond int64 would wrap around silently
            bad |= (values % 1 != 0) | ((as_float.abs() >= 2**63) if values.dtype != np.int64 else False)
        if bad.any():
            pos = int(np.flatnonzero(bad.to_numpy())[0])
            what = (
                "an integer"
                if dtype == "int64"
                else "a finite number"
                if values.notna().iloc[pos]
                else "a number"
            )
            line = line_of(files, fname, pos + 1 + header, str(opts["sep"]))
            raise DataError(
                label, f"not {what}: {frame[column].iloc[pos]!r}", row=pos + 1, line=line, column=column
            )
        frame[column] = values.astype(dtype)
    return frame


def _parse(files: MovieLensFiles, fname: str, sep: str, dtype: Any, opts: dict[str, Any]) -> pd.DataFrame:
    """pandas' parse of a member; rows wider than ``opts["names"]`` become a located DataError."""

    def source(fh: IO[bytes]) -> IO[bytes]:
        # pandas' C parser takes single-character separators only; "::" never occurs inside a field.
        return io.BytesIO(fh.read().replace(b"::", b"\t")) if sep == "::" else fh

    def too_wide() -> DataError | None:
        return _wide_row(files, fname, len(opts["names"]), sep, opts["header"] == 0, opts["encoding"])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        try:
            with files.open(fname) as fh:
                frame = pd.read_csv(source(fh), dtype=dtype, **opts)
        except pd.errors.ParserError as exc:
            raise too_wide() or DataError(files.label(fname), f"malformed file ({exc})") from None
    widened = False
    for w in caught:
        if _WIDTH_WARNING in str(w.message):
            widened = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if widened and (error := too_wide()) is not None:
        raise error
    return frame


def _records(
    files: MovieLensFiles, fname: str, sep: str, header: bool, encoding: str
) -> Iterator[tuple[int, int, list[str]]]:
    """(data row, physical line, fields) of each record, parsed as `read_delimited` parses it."""
    delimiter = "\t" if sep == "::" else sep
    blank = " \t".replace(delimiter, "")
    row = -1 if header else 0
    with files.open(fname) as fh:
        for number, raw in enumerate(fh, start=1):
            text = raw.decode(encoding, errors="replace").rstrip("\r\n")
            if not text.strip(blank):
                continue
            row += 1
            if row == 0:
                continue  # the header
            if sep == "::":
                text = text.replace("::", "\t")
            fields = next(csv.reader([text], delimiter=delimiter)) if header else text.split(delimiter)
            yield row, number, fields


def _wide_row(
    files: MovieLensFiles, fname: str, width: int, sep: str, header: bool, encoding: str
) -> DataError | None:
    """The first row with more fields than ``width`` that pandas refuses or would truncate with loss:
    one wider than pandas' expected count (``width`` or the first row's count, whichever is more), or
    any row whose extra fields are not all blank. None when every extra field is blank."""
    expected: int | None = None
    for row, line, fields in _records(files, fname, sep, header, encoding):
        n = len(fields)
        expected = max(width, n) if expected is None else expected
        if n > expected or (n > width and any(f.strip() for f in fields[width:])):
            return DataError(files.label(fname), f"expected {width} fields, saw {n}", row=row, line=line)
    return None


def line_of(files: MovieLensFiles, fname: str, record: int, sep: str) -> int | None:
    """Physical line of the ``record``-th record (header included) as pandas counts them: it skips empty
    lines and lines of only spaces and tabs (other than the separator)."""
    blank = b" \t".replace(sep.encode(), b"")
    seen = 0
    with files.open(fname) as fh:
        for number, raw in enumerate(fh, start=1):
            if raw.rstrip(b"\r\n").strip(blank):
                seen += 1
                if seen == record:
                    return number
    return None
