"""Metrics for graded ranking, per query over grouped documents, and for click prediction.

Inputs are flat: ``scores [D]`` (higher ranks first), ``labels [D]`` (graded relevance, whole
numbers >= 0) and ``offsets [Q + 1]`` (int64), where query q owns documents ``offsets[q]:offsets[q +
1]`` - the layout of `twotower.data.letor.LetorData`. The groups are padded into a [Q, Lmax] matrix
and every metric is computed for all queries at once, so memory is Q x Lmax (the longest query),
not D.

Definitions (rank r counts from 1):

    gain(y) = 2^y - 1,  discount(r) = 1 / log2(r + 1)
    DCG@k   = sum over the k best-scored documents of gain(label) * discount(rank)
    IDCG@k  = the same over the query's labels sorted descending (all its documents, not only the
              scored top k), so NDCG@k = DCG@k / IDCG@k is 1 exactly for an ideal ordering
    RR@k    = 1 / rank of the first document with label >= threshold within the top k, 0 if none

A query whose IDCG is 0 (no document with label >= 1) gets NaN NDCG, and a query with no document
>= threshold gets NaN RR: nothing can be ranked well or badly there. `ranking_metrics` averages
over the other queries only and reports how many there were. A k larger than a query's length
simply takes all of its documents.

**Ties** in score are broken by document row order: documents are ranked by a stable sort on
``-score``, so of two equal scores the one in the earlier row ranks higher. Ties therefore favour
neither the model nor the ideal; sort a query's rows randomly beforehand to average over them.

`roc_auc` and `click_log_likelihood` score click probabilities per impression (flat arrays).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["click_log_likelihood", "mrr_per_query", "ndcg_per_query", "ranking_metrics", "roc_auc"]

_EPS = 1e-6


def _rank(scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels in rank order, padded: ([Q, Lmax] int64 with 0 in padding, [Q, Lmax] bool valid)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    offsets = np.asarray(offsets, dtype=np.int64)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(
            f"scores and labels must be 1-D and equal in length, got {scores.shape}, {labels.shape}"
        )
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(scores):
        raise ValueError(f"offsets must be [Q + 1], run from 0 to {len(scores)}")
    lengths = np.diff(offsets)
    if np.any(lengths < 0):
        raise ValueError("offsets must be non-decreasing")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if labels.size and (labels.dtype.kind not in "iuf" or np.any(labels < 0) or np.any(labels % 1 != 0)):
        raise ValueError("labels must be whole numbers >= 0")
    width = int(lengths.max(initial=0))
    valid = np.arange(width) < lengths[:, None]
    rows = np.where(valid, offsets[:-1, None] + np.arange(width), 0)  # padding reads row 0 ...
    padded = np.where(valid, scores[rows], -np.inf)  # ... and scores -inf
    # Stable, so ties keep row order; padding (-(-inf) = inf) sorts after every document, even
    # one scored -inf, because padding comes after the documents in each row.
    order = np.argsort(-padded, axis=1, kind="stable")
    ranked = np.where(valid, labels.astype(np.int64)[rows], 0)
    return np.take_along_axis(ranked, order, axis=1), np.take_along_axis(valid, order, axis=1)


def _ndcg(ranked: np.ndarray, k: int) -> np.ndarray:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = min(k, ranked.shape[1])  # k beyond the longest query: every document counts
    discount = 1.0 / np.log2(np.arange(2, top + 2))
    gains = np.exp2(ranked.astype(np.float64)) - 1.0  # padding has label 0, so gain 0
    dcg = gains[:, :top] @ discount
    ideal = -np.sort(-gains, axis=1)[:, :top] @ discount
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ideal > 0, dcg / ideal, np.nan)


def _reciprocal_rank(ranked: np.ndarray, valid: np.ndarray, k: int | None, threshold: int) -> np.ndarray:
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    hits = (ranked >= threshold) & valid
    if hits.shape[1] == 0:  # no query has a document (argmax needs a non-empty axis)
        return np.full(len(hits), np.nan)
    first = np.argmax(hits, axis=1)  # index of the first hit; 0 when there is none, masked below
    any_hit = hits.any(axis=1)
    in_top = any_hit & (first < (k if k is not None else hits.shape[1]))
    return np.where(any_hit, np.where(in_top, 1.0 / (first + 1), 0.0), np.nan)


def ndcg_per_query(scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k of every query, float64 [Q]; NaN where the query has no document with label >= 1."""
    return _ndcg(_rank(scores, labels, offsets)[0], k)


def mrr_per_query(
    scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray, k: int | None = None, threshold: int = 1
) -> np.ndarray:
    """Reciprocal rank of the first document with label >= threshold in the top k, float64 [Q].

    0 when none is in the top k; NaN when the query has none at all. ``k=None`` looks at every rank.
    """
    return _reciprocal_rank(*_rank(scores, labels, offsets), k, threshold)


def ranking_metrics(
    scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray, ks: Iterable[int] = (1, 3, 5, 10)
) -> dict[str, float]:
    """Mean ``ndcg@k`` and ``mrr@k`` for each k over the queries with a relevant document.

    With the default ks the keys are ndcg@1/3/5/10, mrr@1/3/5/10 (ULTRA reports both at 3, 5 and 10)
    and ``queries``, the
    number of queries averaged over (queries without a document of label >= 1 are left out, see the
    module docstring). Means over no queries are NaN.
    """
    ks = sorted(set(ks))
    if not ks:
        raise ValueError("ks must name at least one cutoff")
    ranked, valid = _rank(scores, labels, offsets)
    per_query = {f"ndcg@{k}": _ndcg(ranked, k) for k in ks}
    per_query |= {f"mrr@{k}": _reciprocal_rank(ranked, valid, k, threshold=1) for k in ks}
    # The same queries are NaN in every entry: those without a document of label >= 1.
    used = int(np.count_nonzero(~np.isnan(per_query[f"ndcg@{ks[0]}"])))
    out: dict[str, float] = {
        name: float(np.nanmean(values)) if used else float("nan") for name, values in per_query.items()
    }
    out["queries"] = used
    return out


def _flat(probs: np.ndarray, clicks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64).ravel()
    clicks = np.asarray(clicks, dtype=np.float64).ravel()
    if probs.shape != clicks.shape:
        raise ValueError(f"probs and clicks differ in size: {probs.size} vs {clicks.size}")
    if np.isnan(probs).any():
        raise ValueError("probs contain NaN")
    if not np.isin(clicks, (0.0, 1.0)).all():
        raise ValueError("clicks must be 0 or 1")
    return probs, clicks


def click_log_likelihood(probs: np.ndarray, clicks: np.ndarray) -> float:
    """Mean per-impression log-likelihood of the clicks; probs are clipped to [1e-6, 1 - 1e-6].

    Clipping keeps one confident mistake from making the mean -inf. NaN for no impressions.
    """
    probs, clicks = _flat(probs, clicks)
    if not probs.size:
        return float("nan")
    p = np.clip(probs, _EPS, 1.0 - _EPS)
    return float(np.mean(clicks * np.log(p) + (1.0 - clicks) * np.log1p(-p)))


def roc_auc(probs: np.ndarray, clicks: np.ndarray) -> float:
    """Area under the ROC curve: P(a clicked impression outscores an unclicked one), ties count 1/2.

    Computed as the Mann-Whitney U statistic from average ranks (equal to sklearn's
    ``roc_auc_score``) in O(n log n). NaN when only one class is present.
    """
    probs, clicks = _flat(probs, clicks)
    positives = int(clicks.sum())
    negatives = probs.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(probs, return_inverse=True, return_counts=True)
    # Tied values share the mean of the ranks they span: (first + last) / 2 = end - (count - 1) / 2.
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = average_rank[inverse][clicks == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))
