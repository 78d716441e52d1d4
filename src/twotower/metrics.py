"""Ranking metrics on top-K lists, vectorised over queries.

Inputs are a ranked id matrix ``topk_ids: LongTensor[Q, K]`` (row q is query q's list, best first;
``-1`` marks an empty slot, which is never a hit) and ``relevant: CSR`` with Q rows listing the
relevant item indices of every query (binary relevance). Rank ``r`` counts from 1.

With ``hit(r) = 1`` when the item at rank r is relevant, ``H = sum_{r<=k} hit(r)`` and ``R = |rel|``:

    precision@k = H / k                       (k, not the list length, even if fewer are filled)
    recall@k    = H / R
    ndcg@k      = DCG / IDCG,  DCG = sum_{r<=k} hit(r) / log2(r + 1),
                               IDCG = sum_{i=1}^{min(R, k)} 1 / log2(i + 1)
    map@k       = (sum_{r<=k} hit(r) * precision@r) / R
    mrr@k       = 1 / (rank of the first hit), 0 when there is no hit in the top k
    hit@k       = 1 if H > 0 else 0

These follow the Microsoft Recommenders ``python_evaluation`` definitions used by its ML-100K
benchmark; note that MAP@k divides by ALL relevant items R, not by min(R, k), so a query with more
than k relevant items cannot reach MAP 1. :func:`compute_metrics` averages over the queries with at
least one relevant item (queries without any are skipped, as Microsoft's evaluation only sees users
present in the test set).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from twotower.topk import CSR

__all__ = [
    "METRICS",
    "compute_metrics",
    "hit_at_k",
    "hit_matrix",
    "map_at_k",
    "mrr_at_k",
    "ndcg_at_k",
    "precision_at_k",
    "recall_at_k",
    "top_k_accuracy",
]


def hit_matrix(topk_ids: Tensor, relevant: CSR) -> Tensor:
    """BoolTensor[Q, K]: ``hits[q, j]`` is True iff ``topk_ids[q, j]`` is in row q of ``relevant``.

    Membership is one binary search per slot: every (query, item) pair is encoded as the key
    ``q * W + item`` with W larger than any item id. A CSR from :meth:`CSR.from_pairs` is sorted by
    (row, col), so its keys form one globally sorted array and ``searchsorted`` answers all Q x K
    lookups at once in O(QK log nnz) time and O(QK) memory, whatever the catalogue size.
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [Q, K], got shape {tuple(topk_ids.shape)}")
    n_q, n_k = topk_ids.shape
    if relevant.n_rows != n_q:
        raise ValueError(f"relevant has {relevant.n_rows} rows but topk_ids has {n_q}")
    device = topk_ids.device
    relevant = _canonical(relevant)
    indptr, indices = relevant.indptr.to(device), relevant.indices.to(device)
    if indices.numel() == 0 or topk_ids.numel() == 0:
        return torch.zeros((n_q, n_k), dtype=torch.bool, device=device)
    ids = topk_ids.long()
    width = max(int(indices.max()), int(ids.max())) + 1
    if n_q * width >= 2**63:  # raw 64-bit ids: keys would wrap, so rank the ids present instead
        present = torch.unique(torch.cat([indices, ids[ids >= 0]]))  # sorted: the order is kept
        indices = torch.searchsorted(present, indices)
        ids = torch.where(ids >= 0, torch.searchsorted(present, ids.clamp(min=0)), ids)
        width = present.numel()
    rows = torch.repeat_interleave(torch.arange(n_q, device=device), indptr.diff())
    rel_keys = rows * width + indices  # sorted and unique: the CSR is canonical
    keys = torch.arange(n_q, device=device).unsqueeze(1) * width + ids.clamp(min=0)
    pos = torch.searchsorted(rel_keys, keys).clamp(max=rel_keys.numel() - 1)
    return (rel_keys[pos] == keys) & (ids >= 0)


def _canonical(relevant: CSR) -> CSR:
    """``relevant`` with every row's items sorted and unique, as :meth:`CSR.from_pairs` builds it. A
    hand-built CSR may repeat an item or list it out of order: normalised once here, for the hits and
    for R (the row lengths) alike, rather than mis-answered."""
    indices = relevant.indices
    if indices.numel() < 2:
        return relevant
    rows = torch.repeat_interleave(torch.arange(relevant.n_rows, device=indices.device), relevant.lengths())
    if bool(((indices[1:] > indices[:-1]) | (rows[1:] != rows[:-1])).all()):
        return relevant
    return CSR.from_pairs(rows, indices, relevant.n_rows)


def _pad(hits: Tensor, k: int) -> Tensor:
    """First k columns of ``hits``; a list shorter than k is padded with misses (empty slots)."""
    if hits.shape[1] >= k:
        return hits[:, :k]
    pad = torch.zeros((hits.shape[0], k - hits.shape[1]), dtype=hits.dtype, device=hits.device)
    return torch.cat([hits, pad], dim=1)


def _ranks(k: int, device: torch.device) -> Tensor:
    return torch.arange(1, k + 1, dtype=torch.float64, device=device)


# Each kernel maps (hits [Q, k] bool, n_relevant [Q] float64, k) to a float64 score per query.
# Queries with n_relevant == 0 produce 0 here (never NaN); compute_metrics drops them before averaging.
def _precision(hits: Tensor, n_rel: Tensor, k: int) -> Tensor:
    return hits.sum(dim=1, dtype=torch.float64) / k


def _recall(hits: Tensor, n_rel: Tensor, k: int) -> Tensor:
    return hits.sum(dim=1, dtype=torch.float64) / n_rel.clamp(min=1)


def _ndcg(hits: Tensor, n_rel: Tensor, k: int) -> Tensor:
    discount = 1.0 / torch.log2(_ranks(k, hits.device) + 1.0)  # 1/log2(r+1), r = 1..k
    dcg = (hits.double() * discount).sum(dim=1)
    # IDCG = prefix sum of the discounts up to min(R, k): all relevant items packed at the top.
    ideal = torch.cat([discount.new_zeros(1), torch.cumsum(discount, dim=0)])
    idcg = ideal[n_rel.clamp(max=k).long()]
    return torch.where(idcg > 0, dcg / idcg.clamp(min=1e-300), torch.zeros_like(dcg))


def _map(hits: Tensor, n_rel: Tensor, k: int) -> Tensor:
    h = hits.double()
    precision_at_r = torch.cumsum(h, dim=1) / _ranks(k, hits.device)
    return (h * precision_at_r).sum(dim=1) / n_rel.clamp(min=1)


def _mrr(hits: Tensor, n_rel: Tensor, k: int) -> Tensor:
    # argmax over a bool row returns the first True; rows without any hit are zeroed by the mask.
    first = torch.argmax(hits.to(torch.uint8), dim=1).double() + 1.0
    return torch.where(hits.any(dim=1), 1.0 / first, torch.zeros_like(first))


def _hit(hits: Tensor, n_rel: Tensor, k: int) -> Tensor:
    return hits.any(dim=1).double()


METRICS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    "ndcg": _ndcg,
    "recall": _recall,
    "precision": _precision,
    "map": _map,
    "mrr": _mrr,
    "hit": _hit,
}


def _per_query(name: str, topk_ids: Tensor, relevant: CSR, k: int) -> Tensor:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    relevant = _canonical(relevant)
    hits = _pad(hit_matrix(topk_ids, relevant), k)
    n_rel = relevant.lengths().to(hits.device).double()
    return METRICS[name](hits, n_rel, k)


def precision_at_k(topk_ids: Tensor, relevant: CSR, k: int) -> Tensor:
    """Float64Tensor[Q]: H / k."""
    return _per_query("precision", topk_ids, relevant, k)


def recall_at_k(topk_ids: Tensor, relevant: CSR, k: int) -> Tensor:
    """Float64Tensor[Q]: H / R (0 for queries with R = 0)."""
    return _per_query("recall", topk_ids, relevant, k)


def ndcg_at_k(topk_ids: Tensor, relevant: CSR, k: int) -> Tensor:
    """Float64Tensor[Q]: binary NDCG, DCG / IDCG as in the module docstring (0 when R = 0)."""
    return _per_query("ndcg", topk_ids, relevant, k)


def map_at_k(topk_ids: Tensor, relevant: CSR, k: int) -> Tensor:
    """Float64Tensor[Q]: sum over hits at rank r <= k of precision@r, divided by R (all relevant)."""
    return _per_query("map", topk_ids, relevant, k)


def mrr_at_k(topk_ids: Tensor, relevant: CSR, k: int) -> Tensor:
    """Float64Tensor[Q]: 1 / rank of the first hit within the top k, 0 if none."""
    return _per_query("mrr", topk_ids, relevant, k)


def hit_at_k(topk_ids: Tensor, relevant: CSR, k: int) -> Tensor:
    """Float64Tensor[Q]: 1 if any of the top k is relevant, else 0."""
    return _per_query("hit", topk_ids, relevant, k)


def compute_metrics(
    topk_ids: Tensor,
    relevant: CSR,
    ks: Iterable[int] = (10,),
    names: Iterable[str] = ("ndcg", "recall", "precision", "map", "mrr", "hit"),
) -> dict[str, float]:
    """Mean of each metric at each cut-off, keyed ``f"{name}@{k}"`` (e.g. ``"ndcg@10"``).

    The mean runs over queries with at least one relevant item; the rest are ignored. With no such
    query every value is NaN. A cut-off larger than the list width treats missing slots as misses.
    """
    names = tuple(n.lower() for n in names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    ks = tuple(ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"cut-offs must be >= 1, got {ks}")
    relevant = _canonical(relevant)
    hits_full = hit_matrix(topk_ids, relevant)  # computed once and sliced per cut-off
    n_rel = relevant.lengths().to(hits_full.device).double()
    keep = n_rel > 0
    out: dict[str, float] = {}
    for k in ks:
        hits = _pad(hits_full, k)[keep]
        for name in names:
            values = METRICS[name](hits, n_rel[keep], k)
            out[f"{name}@{k}"] = float(values.mean()) if values.numel() else float("nan")
    return out


def top_k_accuracy(topk_ids: Tensor, query_targets: Tensor) -> float:
    """Share of queries whose single target item appears anywhere in their row of ``topk_ids``.

    This is TFRS's "factorized top-K categorical accuracy": with K = ``topk_ids.shape[1]``,
    accuracy = (1/Q) * sum_q 1[target_q in topk_ids[q, :K]]. Empty slots (-1) never match.
    Returns NaN when there are no queries.
    """
    if topk_ids.dim() != 2 or query_targets.shape != (topk_ids.shape[0],):
        raise ValueError(
            f"expected topk_ids [Q,K] and targets [Q], got {tuple(topk_ids.shape)}, "
            f"{tuple(query_targets.shape)}"
        )
    if topk_ids.shape[0] == 0:
        return float("nan")
    targets = query_targets.to(topk_ids.device).long().unsqueeze(1)
    found = ((topk_ids == targets) & (topk_ids >= 0)).any(dim=1)
    return float(found.double().mean())
