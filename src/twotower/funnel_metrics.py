"""Metrics for a whole recommendation funnel: retrieval -> light ranker -> main ranker -> served list.

Each stage is usually judged alone (retrieval by recall over the catalogue, a ranker by nDCG on the
candidates it was given). These functions ask how the stages fit together:

* :func:`ranker_topk_recall` - of the items the main ranker would put in its top k if it scored the whole
  catalogue (or a larger candidate set), what share does retrieval's top N hand it? Retrieval caps what
  any later stage can show, so this is the ceiling retrieval puts on the ranker, in the ranker's terms.
* :func:`rank_correlation` - do two stages order the same candidates alike (Spearman or Kendall)? A light
  ranker that disagrees with the main ranker throws away the candidates the main ranker would have liked.
* :func:`served_ndcg` - how good is what the user finally sees, judged against TRUE relevance (a
  simulator's affinity or a held-out graded label) with the ideal taken over the whole catalogue, so a
  good item lost at any earlier stage counts against the served list.
* :func:`funnel_table` - one markdown table of per-stage metrics, for reports.

Inputs are numpy arrays or torch tensors (moved to the CPU); outputs are plain floats. Item ids are
integers with ``-1`` marking an empty slot, as `twotower.topk.topk_items` returns them. Every mean runs
over the users for which the metric is defined; the skipped users are named in each docstring, and a
mean over no users is NaN (as in `twotower.metrics` and `twotower.ranking_metrics`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["funnel_table", "rank_correlation", "ranker_topk_recall", "served_ndcg"]

ArrayLike = np.ndarray | torch.Tensor
Truth = ArrayLike | Callable[[np.ndarray], ArrayLike]

# Kendall compares every pair of a user's candidates: [users, M, M] sign matrices, built this many
# cells at a time so a large user count cannot exhaust memory.
_PAIR_CELLS = 1 << 22


def _array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _ids(x: Any, name: str) -> np.ndarray:
    """An int64 [U, K] id matrix: integers, -1 for empty slots, nothing below -1."""
    ids = _array(x)
    if ids.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [users, slots] id matrix, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer item ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and ids.min() < -1:
        raise ValueError(f"{name} holds {ids.min()}; item ids are >= 0 and -1 marks an empty slot")
    return ids


def _require_unique(ids: np.ndarray, name: str) -> None:
    """A ranked list names each item once; a repeat would be counted twice (nDCG could exceed 1)."""
    ordered = np.sort(ids, axis=1)
    repeat = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeat.any():
        row, col = np.argwhere(repeat)[0]
        raise ValueError(f"{name} row {row} names item {ordered[row, col]} more than once")


def _mean(per_user: np.ndarray) -> float:
    """Mean over the users with a defined (non-NaN) value; NaN when there are none."""
    defined = ~np.isnan(per_user)
    return float(per_user[defined].mean()) if defined.any() else float("nan")


# ------------------------------------------------------------------------------------------ recall
def ranker_topk_recall(retrieved: ArrayLike, ranker_top: ArrayLike) -> float:
    """Mean over users of ``|ranker_top[u] ∩ retrieved[u]| / |ranker_top[u]|`` (valid ids only).

    Args:
        retrieved: int [U, N], retrieval's top N per user; -1 marks an empty slot. Order and repeats
            do not matter, only membership.
        ranker_top: int [U, k], the main ranker's top k per user over the whole catalogue (or any set
            larger than retrieval's); -1 marks an empty slot. Each item at most once per row.

    Users whose ``ranker_top`` row is all -1 have nothing to recall and are skipped.
    """
    retrieved = _ids(retrieved, "retrieved")
    top = _ids(ranker_top, "ranker_top")
    if retrieved.shape[0] != top.shape[0]:
        raise ValueError(f"retrieved has {retrieved.shape[0]} users but ranker_top has {top.shape[0]}")
    _require_unique(top, "ranker_top")
    n_users = top.shape[0]
    valid = top >= 0
    n_valid = valid.sum(axis=1)
    # Membership for all (user, item) pairs at once: encode each pair as user * width + item, sort
    # retrieval's keys once and binary-search the ranker's keys (as `twotower.metrics.hit_matrix`).
    width = int(max(retrieved.max(initial=-1), top.max(initial=-1))) + 1
    users = np.arange(n_users, dtype=np.int64)[:, None]
    keys = np.sort((users * width + retrieved)[retrieved >= 0])
    queries = users * width + np.maximum(top, 0)
    if keys.size:
        found = valid & (keys[np.searchsorted(keys, queries).clip(max=keys.size - 1)] == queries)
    else:
        found = np.zeros_like(valid)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_user = np.where(n_valid > 0, found.sum(axis=1) / n_valid, np.nan)
    return _mean(per_user)


# ------------------------------------------------------------------------------------- correlation
def _average_ranks(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-row ranks 1..n of the valid entries, ties sharing the mean of the ranks they span.

    Invalid entries sort after every valid one (their ranks are meaningless and masked by callers).
    """
    n_cols = x.shape[1]
    order = np.lexsort((x, ~mask), axis=-1)  # last key is primary: valid first, then by value
    xs = np.take_along_axis(x, order, axis=1)
    vs = np.take_along_axis(mask, order, axis=1)
    starts = np.ones_like(vs)  # True where a new tie group begins
    # A valid and an invalid entry never share a group, even with equal stored values.
    starts[:, 1:] = (xs[:, 1:] != xs[:, :-1]) | (vs[:, 1:] != vs[:, :-1])
    ends = np.ones_like(vs)
    ends[:, :-1] = starts[:, 1:]
    pos = np.arange(n_cols)
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, pos, n_cols - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(x.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=1)
    return ranks


def _spearman(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pearson correlation of the average ranks, per row (NaN-free only where both vary)."""
    n = np.maximum(mask.sum(axis=1), 1)
    dev = []
    for x in (a, b):
        ranks = np.where(mask, _average_ranks(x, mask), 0.0)
        dev.append(np.where(mask, ranks - (ranks.sum(axis=1) / n)[:, None], 0.0))
    cov, var_a, var_b = (dev[0] * dev[1]).sum(1), (dev[0] ** 2).sum(1), (dev[1] ** 2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.sqrt(var_a * var_b)


def _kendall_tau_b(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """tau-b = (concordant - discordant) / sqrt((P - ties_a) (P - ties_b)) over valid pairs, per row.

    With s_x(i, j) = sign(x_i - x_j), the numerator is sum s_a s_b and each factor under the root is
    sum s_x^2 (the pairs NOT tied in x); summing over ordered pairs doubles all three, leaving the
    ratio unchanged. O(M^2) per user, chunked over users.
    """
    n_users, n_cols = a.shape
    out = np.empty(n_users, dtype=np.float64)
    step = max(1, _PAIR_CELLS // max(1, n_cols * n_cols))
    for lo in range(0, n_users, step):
        rows = slice(lo, min(lo + step, n_users))
        pair = mask[rows, :, None] & mask[rows, None, :]
        signs = []
        for x in (a[rows], b[rows]):
            # Comparisons rather than a difference: inf - inf would be NaN, inf > inf is False.
            greater, less = x[:, :, None] > x[:, None, :], x[:, :, None] < x[:, None, :]
            signs.append((greater.astype(np.int8) - less.astype(np.int8)) * pair)
        sa, sb = signs
        num = (sa * sb).sum(axis=(1, 2), dtype=np.int64)
        den = np.abs(sa).sum(axis=(1, 2), dtype=np.int64) * np.abs(sb).sum(axis=(1, 2), dtype=np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[rows] = num / np.sqrt(den.astype(np.float64))
    return out


def rank_correlation(
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    mask: ArrayLike | None = None,
    method: Literal["spearman", "kendall"] = "spearman",
) -> float:
    """Mean per-user rank correlation between two stages' scores of the same candidates.

    Args:
        scores_a, scores_b: float [U, M]; column j of row u is the same candidate in both. ±inf is
            allowed (it ranks first / last); NaN is an error in a valid cell.
        mask: bool [U, M], True for real candidates (padding False); None means all are real.
        method: ``"spearman"`` (Pearson correlation of ranks, ties take the average rank) or
            ``"kendall"`` (tau-b, which corrects for ties in either list). Both equal scipy's
            ``spearmanr`` / ``kendalltau`` on each row's valid cells.

    A user is skipped when fewer than 2 candidates are valid or when either stage gives all of them
    the same score: there is no order to agree with, and the correlation is 0/0.
    """
    if method not in ("spearman", "kendall"):
        raise ValueError(f"method must be 'spearman' or 'kendall', got {method!r}")
    a, b = _array(scores_a), _array(scores_b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"scores_a and scores_b must both be [users, candidates], got {a.shape}, {b.shape}")
    for x, name in ((a, "scores_a"), (b, "scores_b")):
        if x.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be real-valued, got dtype {x.dtype}")
    valid = np.ones(a.shape, dtype=bool) if mask is None else _array(mask)
    if valid.shape != a.shape or valid.dtype != np.bool_:
        raise ValueError(f"mask must be a bool array of shape {a.shape}, got {valid.dtype} {valid.shape}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    if np.isnan(a[valid]).any() or np.isnan(b[valid]).any():
        raise ValueError("scores contain NaN in a valid (masked-in) cell")
    # Padding gets a fixed value so it can never poison a comparison or a sort.
    a, b = np.where(valid, a, 0.0), np.where(valid, b, 0.0)

    def varies(x: np.ndarray) -> np.ndarray:
        low = np.where(valid, x, np.inf).min(axis=1, initial=np.inf)
        return low < np.where(valid, x, -np.inf).max(axis=1, initial=-np.inf)

    keep = (valid.sum(axis=1) >= 2) & varies(a) & varies(b)
    corr = np.full(a.shape[0], np.nan)
    if keep.any():
        compute = _spearman if method == "spearman" else _kendall_tau_b
        # Rounding can leave |corr| a hair above 1 for identical orderings.
        corr[keep] = np.clip(compute(a[keep], b[keep], valid[keep]), -1.0, 1.0)
    return _mean(corr)


# ------------------------------------------------------------------------------------ served nDCG
def _gains(relevance: np.ndarray, gain: str) -> np.ndarray:
    if relevance.dtype.kind not in "biuf":
        raise ValueError(f"relevance must be real-valued, got dtype {relevance.dtype}")
    rel = relevance.astype(np.float64)
    if not np.isfinite(rel).all():
        raise ValueError("relevance must be finite (no NaN or inf)")
    # Negative gains break the normalisation: an empty slot (gain 0) would beat a served item and
    # the "ideal" list could score below an empty one. sklearn's ndcg_score refuses them too.
    if (rel < 0).any():
        raise ValueError(
            "relevance must be >= 0 for nDCG; map a logit to a probability (sigmoid) or shift it first"
        )
    if gain == "linear":
        return rel
    if (rel % 1 != 0).any():
        raise ValueError("gain='exponential' (2^rel - 1) needs whole-number labels")
    return np.exp2(rel) - 1.0


def served_ndcg(
    served: ArrayLike,
    truth: Truth,
    k: int = 10,
    gain: Literal["linear", "exponential"] = "linear",
    user_chunk: int = 1024,
) -> float:
    """Mean nDCG@k of the served lists against true relevance, ideal over the whole catalogue.

    ``DCG@k = sum_{r<=k} gain(rel[u, served[u, r]]) / log2(r + 1)`` (-1 slots add 0) and ``IDCG@k`` is
    the same sum over the user's k most relevant items in the WHOLE catalogue, so an item the funnel
    dropped at any stage costs the served list. ``gain="linear"`` uses relevance as given (a true
    affinity, a probability, a rating), so real values keep their spacing; ``"exponential"`` is the
    LETOR ``2^rel - 1`` for whole-number labels, as in `twotower.ranking_metrics`.

    Args:
        served: int [U, L], the list shown to user u in row u, best first; -1 marks an empty slot;
            each item at most once. Only the first k slots count; a shorter list is padded with -1.
        truth: float [U, num_items] relevance >= 0, or a callable that maps an int64 array of row
            indices to their [len(rows), num_items] relevance (for catalogues too big to hold U x
            num_items at once, e.g. a simulator's affinities computed on the fly).
        k: cut-off, >= 1.
        user_chunk: users scored per block (bounds memory to user_chunk x num_items).

    Users whose true relevance is 0 for every item (IDCG 0) cannot be ranked well or badly: skipped.
    """
    ids = _ids(served, "served")
    _require_unique(ids, "served")
    if k < 1 or user_chunk < 1:
        raise ValueError(f"k and user_chunk must be >= 1, got k={k}, user_chunk={user_chunk}")
    if gain not in ("linear", "exponential"):
        raise ValueError(f"gain must be 'linear' or 'exponential', got {gain!r}")
    n_users = ids.shape[0]
    if callable(truth):
        fetch = truth
    else:
        matrix = _array(truth)
        if matrix.ndim != 2 or matrix.shape[0] != n_users:
            raise ValueError(
                f"truth must be [{n_users}, num_items] (one row per served row), got {matrix.shape}"
            )

        def fetch(rows: np.ndarray) -> np.ndarray:
            return matrix[rows]

    # Slots past k are cut; a list shorter than k is padded with empty slots.
    ids = np.pad(ids[:, :k], ((0, 0), (0, max(0, k - ids.shape[1]))), constant_values=-1)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    per_user = np.full(n_users, np.nan)
    num_items: int | None = None
    for lo in range(0, n_users, user_chunk):
        rows = np.arange(lo, min(lo + user_chunk, n_users), dtype=np.int64)
        rel = _array(fetch(rows))
        if (
            rel.ndim != 2
            or rel.shape[0] != rows.size
            or (num_items is not None and rel.shape[1] != num_items)
        ):
            raise ValueError(
                f"truth gave shape {rel.shape} for {rows.size} rows (expected [rows, num_items])"
            )
        num_items = rel.shape[1]
        g = _gains(rel, gain)
        block = ids[rows]
        if block.max(initial=-1) >= num_items:
            raise ValueError(f"served names item {block.max()} but truth has only {num_items} items")
        if num_items == 0:
            continue  # an empty catalogue: IDCG 0, every user skipped
        dcg = np.where(block >= 0, np.take_along_axis(g, np.maximum(block, 0), axis=1), 0.0) @ discount
        top = min(k, num_items)
        # torch.topk returns the k largest, sorted, about 10x faster than np.partition + sort here.
        best = torch.topk(torch.from_numpy(g), top, dim=1).values.numpy()
        idcg = best @ discount[:top]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_user[rows] = np.where(idcg > 0, dcg / idcg, np.nan)
    return _mean(per_user)


# ----------------------------------------------------------------------------------------- table
def _cell(value: Any, stage: str, metric: str) -> str:
    # Integers (user counts, k) stay integers; every other number gets 4 decimals. None is how a NaN
    # comes back from a saved file (write_json writes null), so a reloaded funnel prints as it did.
    if value is None:
        return "nan"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"stage {stage!r} metric {metric!r}: expected a number, got {value!r}")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return f"{float(value):.4f}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")  # a bare | would split the cell


def funnel_table(stages: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per stage (in dict order), one column per metric in first-seen order.

    Floats print with 4 decimals (NaN, or None as read back from JSON, as ``nan``), integers as
    integers, a metric a stage lacks as a blank cell. No trailing newline.
    """
    if not stages:
        raise ValueError("stages is empty: nothing to tabulate")
    columns: list[str] = []
    for stage, metrics in stages.items():
        if not isinstance(metrics, dict):
            raise TypeError(
                f"stage {stage!r}: expected a dict of metric -> value, got {type(metrics).__name__}"
            )
        columns.extend(m for m in metrics if m not in columns)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    lines = [line(["stage", *map(_escape, columns)]), "|" + "---|" * (len(columns) + 1)]
    for stage, metrics in stages.items():
        cells = [_cell(metrics[m], stage, m) if m in metrics else "" for m in columns]
        lines.append(line([_escape(stage), *cells]))
    return "\n".join(lines)
