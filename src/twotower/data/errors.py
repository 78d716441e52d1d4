"""Errors raised by the data layer.

`DataError` pins a problem to a place in a file, so that a user staring at a 25-million-row CSV can go
straight to the offending cell: ``ratings.csv, line 7 (row 6), column 'rating': not a number: 'abc'``.

Numbering conventions (shared by every loader in `twotower.data`):

- ``row`` is the 1-based index of the *data* row (the header is not a row), or None when the problem
  is not tied to one row (a missing column, an unreadable file);
- ``line`` is the 1-based physical line in a text file, counting the header as line 1; it differs from
  ``row + 1`` only when the file has quoted multi-line fields. It is None for binary formats (Parquet).
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data, located by file, row/line and column.

    Subclasses `ValueError` so that callers that only care about "the input was wrong" can catch the
    standard exception.
    """

    def __init__(
        self,
        path: str | Path,
        reason: str,
        *,
        row: int | None = None,
        line: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path = str(path)
        self.reason = reason
        self.row = row
        self.line = line
        self.column = column
        super().__init__(self._format())

    def _format(self) -> str:
        where = [self.path]
        if self.line is not None and self.row is not None:
            where.append(f"line {self.line} (row {self.row})")
        elif self.line is not None:
            where.append(f"line {self.line}")
        elif self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return f"{', '.join(where)}: {self.reason}"

    def __reduce__(self):  # keep the error picklable (DataLoader workers send exceptions across processes)
        return (_rebuild, (self.path, self.reason, self.row, self.line, self.column))


def _rebuild(path: str, reason: str, row: int | None, line: int | None, column: str | None) -> DataError:
    return DataError(path, reason, row=row, line=line, column=column)


class ChecksumError(ValueError):
    """A downloaded file's digest differs from the expected one (corrupt or tampered download)."""

    def __init__(self, url: str, algorithm: str, expected: str, actual: str) -> None:
        self.url = url
        self.algorithm = algorithm
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"checksum mismatch for {url}: expected {algorithm} {expected}, got {actual}; "
            "the download was deleted - retry, or check the URL and the expected digest"
        )

    def __reduce__(self):
        return (ChecksumError, (self.url, self.algorithm, self.expected, self.actual))
