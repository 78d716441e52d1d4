"""Read and write learning-to-rank files in LETOR / svmlight format.

The format of MSLR-WEB10K/30K, Yahoo LTR, MQ2007/2008 and Istella: one document per line,
``label qid:Q index:value ... # comment``, e.g. ``2 qid:10 1:0.5 3:1.25 # docid = GX000``.

Conventions:

- **Lines** are physical lines counted from 1 (blank lines and lines starting with ``#`` count but
  are skipped). In a `DataError`, ``line`` is that line and ``row`` the 1-based document number;
  ``column`` is ``label``, ``qid``, ``features`` (a token that is not ``index:value``), ``feature
  index`` (a bad index) or ``feature K``. A ``.gz`` file is read and written through gzip.
- **Labels** are graded relevance: whole numbers >= 0 (``2`` and ``2.0``; not ``2.5``, ``-1``).
- **Features**: ``index:value`` with a 1-based index in ASCII digits (index k is column k - 1), at
  most once per line but in any order, and a finite decimal value; absent features are 0.0. Values
  are parsed to the correctly rounded float64, then stored as float32 (a value that would round to
  float32 inf, such as ``1e39``, is an error).
- **Queries**: a query's documents must be contiguous; ``query_offsets`` delimits them in file
  order. Query ids keep their identity as ids do in `twotower.data.loader`: int64 when every qid is
  a canonical integer (``7``; ``007`` is not one), else str.
- **Comments** are the text after a line's first ``#``, stripped ('' when a line has none).

Speed: labels and qids are parsed line by line (a few tokens per line), while the ``index:value``
pairs, which are nearly all of the text, go through pyarrow's CSV reader one block of lines at a
time, one pair per CSV row. Anything that reader rejects, or that fails a vectorised check, makes
the block go through a per-token Python parser that names the exact line and field; it applies the
same rules, so both paths accept the same files and give the same numbers.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv

from twotower.data.errors import DataError
from twotower.data.loader import _normalise_ids
from twotower.storage import _atomic_write

__all__ = ["LetorData", "read_letor", "write_letor"]

_BLOCK_CHARS = 1 << 25  # ~32 MiB of text per block bounds the fast path's temporaries
_MAX_FEATURES = 1 << 20  # without num_features, a wider index is a typo, not a [docs x 1M] matrix
_MAX_WHOLE = 1 << 31  # labels are small grades; a bigger whole number is garbage
# Values are stored as float32: a finite float64 at or past this magnitude rounds to float32 inf
# (the halfway point between FLT_MAX and 2^128 rounds to even, i.e. up), which the rules forbid.
_F32_LIMIT = 2.0**128 - 2.0**103
_WS_TO_NEWLINE = bytes.maketrans(b" \t\r\x0b\x0c", b"\n\n\n\n\n")  # one pair per CSV row
_WRITE_ROWS = 4096


@dataclass
class LetorData:
    """Documents grouped by query; query q owns rows ``query_offsets[q]:query_offsets[q + 1]``."""

    features: np.ndarray  # float32 [D, F], dense
    labels: np.ndarray  # int64 [D], graded >= 0
    query_offsets: np.ndarray  # int64 [Q + 1]
    query_ids: np.ndarray  # [Q], int64 or str objects
    comments: list[str] | None  # one per document, None when not kept
    path: Path

    @property
    def num_queries(self) -> int:
        return len(self.query_offsets) - 1

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    def query_slice(self, q: int) -> slice:
        """Rows of query ``q`` (negative q counts from the end, as in a list)."""
        if not -self.num_queries <= q < self.num_queries:
            raise IndexError(f"query {q} out of range for {self.num_queries} queries")
        q %= self.num_queries
        return slice(int(self.query_offsets[q]), int(self.query_offsets[q + 1]))


class _Bad(Exception):
    """A bad field in the line being parsed; the caller adds file, line and row."""

    def __init__(self, column: str, reason: str) -> None:
        super().__init__(reason)
        self.column, self.reason = column, reason


def _whole(token: str) -> int | None:
    """Value of a whole-number literal (``2``, ``2.0``, ``2e0``), None if the token is not one."""
    if not token.isascii() or "_" in token:  # int()/float() also take '٢' and '1_0'
        return None
    try:
        value: float = int(token)
    except ValueError:
        try:
            value = float(token)
        except ValueError:
            return None
        if not value.is_integer():  # also False for nan and inf
            return None
    return int(value) if abs(value) < _MAX_WHOLE else None


def _number(token: str) -> float | None:
    """Value of a decimal literal (nan/inf included), None if the token is not one."""
    if not token.isascii() or "_" in token:
        return None
    try:
        return float(token)
    except ValueError:
        return None


class _Reader:
    """Parses blocks of lines in order, keeping what the final arrays are assembled from."""

    def __init__(self, path: Path, num_features: int | None, keep_comments: bool, max_label: int | None):
        self.path, self.num_features, self.max_label = path, num_features, max_label
        self.width_limit = num_features if num_features is not None else _MAX_FEATURES
        self.labels: list[int] = []
        self.comments: list[str] | None = [] if keep_comments else None
        self.qids: list[str] = []  # one per query, file order
        self.starts: list[int] = []  # first document of each query
        self.spans: dict[str, tuple[int, int]] = {}  # finished query -> (first line, last line)
        self.first_line = self.last_line = 0
        self.blocks: list[np.ndarray] = []

    def block(self, text: list[str], first_line: int) -> None:
        base = len(self.labels)  # documents before this block
        rests: list[str] = []
        lines: list[int] = []
        for offset, raw in enumerate(text):
            head, _, comment = raw.partition("#")
            parts = head.split(None, 2)
            if not parts:
                continue
            line = first_line + offset
            try:
                self._label(parts[0])
                self._qid(parts, line)
            except _Bad as bad:
                self._slow(rests, lines, base)  # a bad feature on an earlier line is reported first
                row = base + len(rests) + 1
                raise DataError(self.path, bad.reason, row=row, line=line, column=bad.column) from None
            rests.append(parts[2] if len(parts) > 2 else "")
            lines.append(line)
            if self.comments is not None:
                self.comments.append(comment.strip())
        dense = self._fast(rests)
        self.blocks.append(dense if dense is not None else self._slow(rests, lines, base))

    def _label(self, token: str) -> None:
        value = _whole(token)
        if value is None or value < 0:
            raise _Bad("label", f"label must be a whole number >= 0, got {token!r}")
        if self.max_label is not None and value > self.max_label:
            raise _Bad("label", f"label {value} > max_label={self.max_label}")
        self.labels.append(value)

    def _qid(self, parts: list[str], line: int) -> None:
        if len(parts) < 2 or not parts[1].startswith("qid:"):
            got = repr(parts[1]) if len(parts) > 1 else "end of line"
            raise _Bad("qid", f"expected 'qid:<id>' after the label, got {got}")
        qid = parts[1][4:]
        if not qid:
            raise _Bad("qid", "empty qid")
        if not self.qids or qid != self.qids[-1]:
            if qid in self.spans:
                first, last = self.spans[qid]
                raise _Bad(
                    "qid",
                    f"qid {qid!r} reappears after other queries (its documents were on lines "
                    f"{first}-{last}); a query's documents must be contiguous",
                )
            if self.qids:
                self.spans[self.qids[-1]] = (self.first_line, self.last_line)
            self.qids.append(qid)
            self.starts.append(len(self.labels) - 1)  # the label of this line is already appended
            self.first_line = line
        self.last_line = line

    def _fast(self, rests: list[str]) -> np.ndarray | None:
        """Dense float32 block, or None when the per-token parser must look at the block."""
        # Every valid token holds exactly one ':', and the CSV reader insists on two fields per
        # row, so colons per line = pairs per line once the reader has accepted the block.
        counts = np.fromiter((r.count(":") for r in rests), dtype=np.int64, count=len(rests))
        if not counts.any():
            return None if any(r.strip() for r in rests) else self._dense(counts, [], [], len(rests))
        text = "\n".join(rests).encode("utf-8").translate(_WS_TO_NEWLINE)
        try:
            table = pa_csv.read_csv(
                pa.py_buffer(text),
                read_options=pa_csv.ReadOptions(column_names=["k", "v"]),
                parse_options=pa_csv.ParseOptions(delimiter=":", quote_char=False, ignore_empty_lines=True),
                convert_options=pa_csv.ConvertOptions(
                    column_types={"k": pa.int64(), "v": pa.float64()},
                    null_values=[],
                    strings_can_be_null=False,
                ),
            )
        except pa.ArrowInvalid:
            return None
        index = table.column("k").to_numpy()
        value = table.column("v").to_numpy()
        # The reader takes '-1', 'nan' and 'inf', which the rules do not.
        if len(index) != counts.sum() or index.min() < 1 or index.max() > self.width_limit:
            return None
        if not (np.abs(value) < _F32_LIMIT).all():  # also False for nan and inf
            return None
        # Indices may only fail to increase where a new line starts; otherwise sort to look for a
        # repeated (line, index) pair, which is the only thing that is actually wrong.
        drops = np.flatnonzero(np.diff(index) <= 0) + 1
        if not np.isin(drops, np.cumsum(counts)[:-1]).all():
            row = np.repeat(np.arange(len(rests)), counts)
            key = np.sort(row * (int(index.max()) + 1) + index)
            if np.any(key[1:] == key[:-1]):
                return None
        return self._dense(counts, index, value, len(rests))

    def _slow(self, rests: list[str], lines: list[int], base: int) -> np.ndarray:
        """Parse token by token, raising a `DataError` at the first bad field."""
        counts, indices, values = [], [], []
        for i, (rest, line) in enumerate(zip(rests, lines, strict=True)):
            seen: dict[int, int] = {}
            for position, token in enumerate(rest.split(), 1):
                try:
                    k, v = self._pair(token, position, seen)
                except _Bad as bad:
                    raise DataError(
                        self.path, bad.reason, row=base + i + 1, line=line, column=bad.column
                    ) from None
                indices.append(k)
                values.append(v)
            counts.append(len(seen))
        return self._dense(np.asarray(counts, dtype=np.int64), indices, values, len(rests))

    def _pair(self, token: str, position: int, seen: dict[int, int]) -> tuple[int, float]:
        k_text, colon, v_text = token.partition(":")
        if not colon:
            raise _Bad("features", f"expected index:value, got {token!r} (token {position} after the qid)")
        if not (k_text.isascii() and k_text.isdigit()) or int(k_text) < 1:
            raise _Bad("feature index", f"feature index must be a whole number >= 1, got {k_text!r}")
        k = int(k_text)
        column = f"feature {k}"
        if k > self.width_limit:
            if self.num_features is not None:
                raise _Bad(column, f"feature index {k} > num_features={self.num_features}")
            raise _Bad(column, f"feature index {k} > {_MAX_FEATURES}: too wide for a dense matrix")
        if k in seen:
            raise _Bad(column, f"duplicate feature index {k} (also token {seen[k]} of this line)")
        seen[k] = position
        value = _number(v_text)
        if value is None:
            raise _Bad(column, f"not a number: {v_text!r}")
        if not np.isfinite(value):
            raise _Bad(column, f"not a finite number: {v_text!r}")
        if abs(value) >= _F32_LIMIT:  # e.g. 1e39: finite here, but inf once stored as float32
            raise _Bad(column, f"out of float32 range: {v_text!r}")
        return k, value

    def _dense(
        self,
        counts: np.ndarray,
        index: Sequence[int] | np.ndarray,
        value: Sequence[float] | np.ndarray,
        n: int,
    ) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        width = self.num_features if self.num_features is not None else int(index.max(initial=0))
        value = np.asarray(value, dtype=np.float64)
        if width and len(index) == n * width and (index.reshape(n, width) == np.arange(1, width + 1)).all():
            return value.astype(np.float32).reshape(n, width)  # every line lists 1..F in order
        dense = np.zeros((n, width), dtype=np.float32)
        dense[np.repeat(np.arange(n), counts), index - 1] = value
        return dense

    def result(self) -> LetorData:
        width = self.num_features
        if width is None:
            width = max((b.shape[1] for b in self.blocks), default=0)
        features = np.zeros((len(self.labels), width), dtype=np.float32)
        start = 0
        for block in self.blocks:
            features[start : start + len(block), : block.shape[1]] = block
            start += len(block)
        offsets = np.asarray([*self.starts, len(self.labels)], dtype=np.int64)
        qids = _normalise_ids(pd.Series(self.qids, dtype=object), text=True).to_numpy()
        if qids.dtype != np.int64:
            qids = qids.astype(object)
        labels = np.asarray(self.labels, dtype=np.int64)
        return LetorData(features, labels, offsets, qids, self.comments, self.path)


def _open(path: Path) -> IO[str]:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace")
    return open(path, encoding="utf-8-sig", errors="replace")


def read_letor(
    path: str | Path,
    num_features: int | None = None,
    keep_comments: bool = True,
    max_label: int | None = None,
) -> LetorData:
    """Read a LETOR/svmlight file (see the module docstring for the rules and error locations).

    ``num_features`` fixes the matrix width (a larger index is an error); by default it is the
    largest index seen. ``max_label`` makes a larger label an error.
    """
    path = Path(path)
    if num_features is not None and num_features < 0:
        raise ValueError(f"num_features must be >= 0, got {num_features}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    reader = _Reader(path, num_features, keep_comments, max_label)
    try:
        with _open(path) as handle:
            line = 1
            while text := handle.readlines(_BLOCK_CHARS):
                reader.block(text, line)
                line += len(text)
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, truncated or corrupt .gz files
        raise DataError(path, f"cannot read the file ({exc})") from exc
    return reader.result()


def _check(data: LetorData) -> None:
    n = len(data.labels)
    offsets = np.asarray(data.query_offsets)
    if data.features.ndim != 2 or len(data.features) != n:
        raise ValueError(f"features must be [{n}, F] to match labels, got {data.features.shape}")
    if len(offsets) != len(data.query_ids) + 1 or offsets[0] != 0 or offsets[-1] != n:
        raise ValueError("query_offsets must be [Q + 1], start at 0 and end at the number of documents")
    if np.any(np.diff(offsets) < 0):
        raise ValueError("query_offsets must be non-decreasing")
    labels = np.asarray(data.labels)
    if labels.dtype.kind not in "iu" or (n and labels.min() < 0):
        raise ValueError(f"labels must be integers >= 0, got dtype {labels.dtype}")
    if not np.isfinite(data.features).all():
        raise ValueError("features must be finite: nan/inf cannot be read back")
    for qid in map(str, data.query_ids):
        if not qid or qid != "".join(qid.split()) or "#" in qid:
            raise ValueError(f"qid {qid!r} cannot be written: empty, or has whitespace or '#'")
    if data.comments is not None:
        if len(data.comments) != n:
            raise ValueError(f"comments must have one entry per document ({n}), got {len(data.comments)}")
        if any("\n" in c or "\r" in c or c != c.strip() for c in data.comments):
            raise ValueError(
                "comments cannot contain line breaks or start/end with spaces (reading strips them)"
            )


def write_letor(path: str | Path, data: LetorData, sparse: bool = True) -> None:
    """Write ``data`` so that `read_letor` reads it back identically, atomically.

    ``sparse`` leaves out zero features, except that the first document lists the last feature
    when no document has it, so that the file still says how wide it is. Values are written as the
    shortest text that parses back to the same float32 (numpy's repr). A ``.gz`` path is
    gzip-compressed. Query ids come back as the module docstring says: str ids that are all
    canonical integers are read back as int64.
    """
    path = Path(path)
    _check(data)
    features = np.asarray(data.features, dtype=np.float32)
    width_hint = sparse and features.shape[1] > 0 and not features[:, -1].any()
    qid_of_doc = np.repeat(np.asarray(data.query_ids).astype(str), np.diff(data.query_offsets))
    prefixes = np.asarray([f"{k}:" for k in range(1, features.shape[1] + 1)], dtype=str)

    def emit(handle: IO[bytes], _tmp: str) -> None:
        # Level 6 is gzip's own default; Python's 9 is much slower for a few percent smaller files.
        out = (
            gzip.GzipFile(fileobj=handle, mode="wb", compresslevel=6, mtime=0)
            if path.suffix.lower() == ".gz"
            else handle
        )
        for start in range(0, len(features), _WRITE_ROWS):
            block = features[start : start + _WRITE_ROWS]
            tokens = np.strings.add(prefixes, block.astype(str))  # float32 -> shortest round-trip text
            lines = []
            for i, row in enumerate(tokens):
                doc = start + i
                keep = block[i] != 0 if sparse else np.ones(len(row), dtype=bool)
                if doc == 0 and width_hint:
                    keep[-1] = True
                parts = [f"{int(data.labels[doc])} qid:{qid_of_doc[doc]}", *row[keep].tolist()]
                if data.comments is not None and data.comments[doc]:
                    parts += ["#", data.comments[doc]]
                lines.append(" ".join(parts) + "\n")
            out.write("".join(lines).encode("utf-8"))
        if out is not handle:
            out.close()  # flushes the gzip trailer; the handle itself is closed by _atomic_write

    _atomic_write(path, emit)
