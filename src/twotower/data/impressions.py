"""Ranked impression logs: which items each request showed, at which position, and what was clicked.

A log has one row per shown item. `read_impressions` validates it and `ImpressionLog.to_lists`
turns it into padded per-request arrays for click models and unbiased learning to rank.

Conventions:

- **Files, ids, missing cells, timestamps, click flags** follow `twotower.data.loader`, whose
  parsing this module reuses: CSV/TSV/TXT/Parquet by suffix; ids int64 when every value is a
  canonical integer, else str; a configured column that is missing in a row makes the row bad;
  clicks are 1/0, true/false or yes/no.
- **Positions** are the 1-based ranks as shown: whole numbers >= 1 (``3`` or ``3.0``).
- **Labels** (optional graded true relevance) are whole numbers >= 0.
- **Context** columns (bias context such as device) are categorical and read as stripped text; an
  integral Parquet column gives ``"1"``, not ``"1.0"``.
- **Within a request** a position appears once, an item appears once, and the user and every
  context value are constant. The row that breaks such a rule is the bad one: a row whose user or
  context differs from the request's first (good) row, or that repeats the position or item of an
  earlier row still kept. So ``on_bad_rows="skip"`` drops only the offending rows.
- **Errors** are `DataError`s naming file, row (and line for text) and column; in ``"raise"`` mode
  the earliest bad row is reported, whatever the rule it breaks.
- **Order**: `ImpressionLog.frame` lists requests in order of first appearance, each by position.
- **Lists**: in `ImpressionLists`, column j of a request's row holds position j + 1 (column index =
  position - 1); a position that was not shown leaves a masked slot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, model_validator

from twotower.data.loader import (
    _MAX_EXAMPLES,
    _Check,
    _flag_check,
    _id_check,
    _normalise_ids,
    _number_check,
    _py,
    _read,
    _timestamp_check,
)

__all__ = ["ImpressionColumns", "ImpressionLists", "ImpressionLog", "read_impressions"]

log = logging.getLogger("twotower.data")

_CANONICAL = ("request_id", "item_id", "position", "click", "user_id", "label", "timestamp")
_IDS = ("request_id", "item_id", "user_id")


class ImpressionColumns(BaseModel):
    """Which file columns hold what; optional columns are only read when named."""

    model_config = ConfigDict(extra="forbid")

    request: str = "request_id"  # the query/request whose ranked list a row belongs to
    item: str = "item_id"
    position: str = "position"  # 1-based rank as shown
    click: str = "click"  # 1/0, true/false, yes/no
    user: str | None = None
    label: str | None = None  # graded true relevance, whole number >= 0
    context: list[str] = []  # bias-context features (device, ...), categorical
    timestamp: str | None = None

    @model_validator(mode="after")
    def _context_names_fit(self) -> ImpressionColumns:
        # Context columns keep their own names in the frame, so they must not shadow canonical ones.
        clash = sorted(set(self.context) & set(_CANONICAL))
        if clash:
            raise ValueError(f"context columns {clash} clash with the canonical column names {_CANONICAL}")
        if len(set(self.context)) != len(self.context):
            raise ValueError(f"context columns repeat: {self.context}")
        return self


@dataclass
class ImpressionLists:
    """Per-request padded arrays: S requests by N slots, slot j = position j + 1.

    Slots where ``mask`` is False (a position not shown, or past the request's last one) hold -1
    (int ids) or None (str ids) in ``items``, 0 in ``clicks`` and -1 in ``labels``.
    """

    request_ids: np.ndarray  # [S], int64 or str objects
    items: np.ndarray  # [S, N], int64 or object
    mask: np.ndarray  # bool [S, N]
    clicks: np.ndarray  # float32 [S, N]
    labels: np.ndarray | None  # int64 [S, N]; None when the log has no label column
    context: dict[str, np.ndarray]  # name -> [S] str objects
    user_ids: np.ndarray | None  # [S]; None when the log has no user column


@dataclass
class ImpressionLog:
    """Validated impressions plus what was dropped in ``on_bad_rows="skip"`` mode."""

    # request_id, item_id, position int64, click int8[, user_id][, label int64][, timestamp int64]
    # [, one str column per context name]
    frame: pd.DataFrame
    path: Path
    context: list[str] = field(default_factory=list)
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def to_lists(self, max_position: int | None = None) -> ImpressionLists:
        """Group rows per request into padded arrays; column index = position - 1.

        ``max_position`` fixes N and drops rows shown below it (a request left without rows is
        left out); by default N is the largest position in the log.
        """
        frame = self.frame
        if max_position is not None:
            if max_position < 1:
                raise ValueError(f"max_position must be >= 1, got {max_position}")
            frame = frame[frame["position"].to_numpy() <= max_position]
        # The frame is in request order of first appearance, so codes follow it too.
        codes, requests = pd.factorize(frame["request_id"], sort=False)
        width = max_position if max_position is not None else int(frame["position"].to_numpy().max(initial=0))
        if max_position is None and len(requests) * width > 100_000_000:  # a typo'd position, e.g. 1e9
            deepest = frame.iloc[int(frame["position"].to_numpy().argmax())]
            where = f"request {_py(deepest['request_id'])!r}, item {_py(deepest['item_id'])!r}"
            raise ValueError(
                f"position {width} ({where}) would make {len(requests):,} lists of {width:,} slots: "
                "fix the log or pass max_position"
            )
        slots = (codes, frame["position"].to_numpy() - 1)
        mask = np.zeros((len(requests), width), dtype=bool)
        mask[slots] = True
        items_int = frame["item_id"].dtype == np.int64
        items = np.full(mask.shape, -1 if items_int else None, dtype=np.int64 if items_int else object)
        items[slots] = frame["item_id"].to_numpy()
        clicks = np.zeros(mask.shape, dtype=np.float32)
        clicks[slots] = frame["click"].to_numpy()
        labels = None
        if "label" in frame:
            labels = np.full(mask.shape, -1, dtype=np.int64)
            labels[slots] = frame["label"].to_numpy()
        first = np.unique(codes, return_index=True)[1]  # user and context are constant per request
        context = {name: frame[name].to_numpy(dtype=object)[first] for name in self.context}
        users = frame["user_id"].to_numpy()[first] if "user_id" in frame else None
        return ImpressionLists(requests.to_numpy(), items, mask, clicks, labels, context, users)


def _whole_check(raw: pd.Series, what: str, minimum: int) -> tuple[np.ndarray, _Check]:
    values, (bad, number_reason) = _number_check(raw, what, non_negative=False)
    with np.errstate(invalid="ignore"):
        wrong = ~bad & ((np.mod(values, 1) != 0) | (values < minimum) | (np.abs(values) >= 2**53))

    def reason(pos: int) -> str:
        if bad[pos]:
            return number_reason(pos)
        return f"{what} must be a whole number >= {minimum}: {_py(raw.iloc[pos])!r}"

    return np.where(bad | wrong, 0, values).astype(np.int64), (bad | wrong, reason)


# A rule over the rows still kept gives a bad-row mask, and (column, reason) for a bad position.
_Explain = Callable[[int], tuple[str, str]]


def _constant(
    frame: pd.DataFrame, rows: np.ndarray, key: str, src: str, what: str
) -> tuple[np.ndarray, _Explain]:
    """Rows whose ``key`` differs from the first row of their request.

    A request's first row can never break this rule, so the result does not depend on which other
    rows are dropped: such rules can run one after the other, in any order.
    """
    group = pd.factorize(frame["request_id"], sort=False)[0]
    first = np.unique(group, return_index=True)[1][group]
    values, requests = frame[key].to_numpy(), frame["request_id"].to_numpy()

    def explain(pos: int) -> tuple[str, str]:
        here, there = _py(values[pos]), _py(values[first[pos]])
        request = _py(requests[pos])
        return (
            src,
            f"{what} changes within request {request!r}: {here!r} here, {there!r} in row {rows[first[pos]]}",
        )

    return values != values[first], explain


def _duplicates(
    frame: pd.DataFrame, rows: np.ndarray, cols: ImpressionColumns
) -> tuple[np.ndarray, _Explain]:
    """Rows whose position or item an earlier *kept* row of the same request already has.

    Whether a row is kept depends on the rows before it (dropping a repeated item can free its
    position for a later row), so requests with any repeat are walked in file order; logs without
    repeats, the usual case, never enter the loop.
    """
    requests = frame["request_id"].to_numpy()
    values = {"position": frame["position"].to_numpy(), "item": frame["item_id"].to_numpy()}
    bad = np.zeros(len(frame), dtype=bool)
    first_of: dict[int, tuple[str, int]] = {}  # bad position -> (what repeats, position of the first)
    involved = (
        frame.duplicated(["request_id", "position"], keep=False).to_numpy()
        | frame.duplicated(["request_id", "item_id"], keep=False).to_numpy()
    )
    if involved.any():
        walk = np.flatnonzero(pd.Series(requests).isin(requests[involved]).to_numpy())
        seen: dict[tuple[str, Any, Any], int] = {}
        for pos in walk.tolist():
            keys = [(what, _py(requests[pos]), _py(values[what][pos])) for what in ("position", "item")]
            clash = next((key for key in keys if key in seen), None)
            if clash is None:
                seen.update(dict.fromkeys(keys, pos))
            else:
                bad[pos] = True
                first_of[pos] = (clash[0], seen[clash])

    def explain(pos: int) -> tuple[str, str]:
        what, first = first_of[pos]
        value, request = _py(values[what][pos]), _py(requests[pos])
        src = cols.position if what == "position" else cols.item
        return src, f"duplicate {what} {value!r} in request {request!r} (first in row {rows[first]})"

    return bad, explain


def read_impressions(
    path: str | Path,
    columns: ImpressionColumns | None = None,
    on_bad_rows: Literal["raise", "skip"] = "raise",
    sep: str | None = None,
) -> ImpressionLog:
    """Read and validate an impression log (see the module docstring for the rules).

    ``on_bad_rows="raise"`` raises a `DataError` for the earliest bad row; ``"skip"`` drops bad
    rows, counts them and logs one warning on the ``twotower.data`` logger.
    """
    if on_bad_rows not in ("raise", "skip"):
        raise ValueError(f"on_bad_rows must be 'raise' or 'skip', got {on_bad_rows!r}")
    cols = columns or ImpressionColumns()
    wanted = {
        "request_id": cols.request,
        "item_id": cols.item,
        "position": cols.position,
        "click": cols.click,
    }
    wanted |= {"user_id": cols.user, "label": cols.label, "timestamp": cols.timestamp}
    wanted = {canon: src for canon, src in wanted.items() if src is not None} | {c: c for c in cols.context}
    raw = _read(path, sep, list(dict.fromkeys(wanted.values())), dtype=str, default_na=False)
    text = raw.sep is not None

    # 1. Cells, column by column (vectorised), as in load_interactions.
    values: dict[str, Any] = {}
    checks: list[tuple[str, _Check]] = []
    for canon, src in wanted.items():
        series = raw.frame[src]
        if canon == "position":
            values[canon], check = _whole_check(series, "position", 1)
        elif canon == "label":
            values[canon], check = _whole_check(series, "label", 0)
        elif canon == "click":
            values[canon], check = _flag_check(series)
        elif canon == "timestamp":
            values[canon], check = _timestamp_check(series, None)
        else:  # ids and context values
            values[canon] = series
            check = _id_check(series, canon.replace("_", " ") if canon in _IDS else "context value")
        checks.append((src, check))
    cell_bad = np.zeros(len(raw.frame), dtype=bool)
    for _, (mask, _) in checks:
        cell_bad |= mask
    limit = 1 if on_bad_rows == "raise" else _MAX_EXAMPLES
    found: list[tuple[int, str, str]] = []
    for pos in np.flatnonzero(cell_bad)[:limit]:
        src, (_, reason) = next((s, c) for s, c in checks if c[0][pos])
        found.append((int(pos), src, reason(int(pos))))

    # 2. Rules across rows, on the rows whose cells are good; each rule sees the survivors of the last.
    good = np.flatnonzero(~cell_bad)
    frame = pd.DataFrame(index=pd.RangeIndex(len(good)))
    for canon in wanted:
        column = values[canon][~cell_bad]
        if canon in _IDS or canon in cols.context:
            ids = _normalise_ids(column.reset_index(drop=True), text)
            frame[canon] = ids.astype(str).to_numpy() if canon in cols.context else ids.to_numpy()
        else:
            frame[canon] = np.asarray(column, dtype=np.int8 if canon == "click" else np.int64)
    rules: list[Callable[[pd.DataFrame, np.ndarray], tuple[np.ndarray, _Explain]]] = []
    if cols.user is not None:
        rules.append(lambda f, r, src=cols.user: _constant(f, r, "user_id", src, "user"))
    for c in cols.context:
        rules.append(lambda f, r, c=c: _constant(f, r, c, c, f"context {c!r}"))
    rules.append(lambda f, r: _duplicates(f, r, cols))  # last: it depends on which rows are kept
    alive = np.ones(len(good), dtype=bool)
    for rule in rules:
        kept = np.flatnonzero(alive)
        bad, explain = rule(frame.iloc[kept], raw.rows[good[kept]])
        for pos in np.flatnonzero(bad)[:limit]:
            found.append((int(good[kept[pos]]), *explain(int(pos))))
        alive[kept[bad]] = False

    found = sorted(found)[:limit]
    problems = sorted(raw.malformed + raw.errors(found), key=lambda e: e.row or 0)
    if on_bad_rows == "raise" and problems:
        raise problems[0]

    frame = frame[alive]
    codes = pd.factorize(frame["request_id"], sort=False)[0]
    frame = frame.iloc[np.lexsort((frame["position"].to_numpy(), codes))].reset_index(drop=True)
    skipped = len(raw.malformed) + int(cell_bad.sum()) + int((~alive).sum())
    examples = [str(e) for e in problems[:_MAX_EXAMPLES]]
    if skipped:
        log.warning(
            "%s: skipped %d bad rows of %d; first: %s", raw.path, skipped, skipped + len(frame), examples[0]
        )
    return ImpressionLog(frame, raw.path, list(cols.context), skipped, examples)
