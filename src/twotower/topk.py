"""Exact, full-corpus top-K retrieval by brute-force inner product, chunked for bounded memory.

For every query ``q`` and item ``i`` the score is the inner product

    s(q, i) = <queries[q], items[i]>

(callers normalise and divide by a temperature beforehand: only the order matters here). The
result for a query is its ``k`` highest-scoring items, ordered by

    (score descending, item index ascending)

so that among equal scores the LOWER item index always ranks first. ``torch.topk`` does not promise
which of several tied elements it returns, nor in which order, so this module re-establishes the
order with stable sorts and resolves ties that straddle the k-th place explicitly.

Memory: queries are processed ``query_chunk`` at a time and items ``item_chunk`` at a time; a
running top-k per query is merged with each item chunk's top-k. The peak working set is therefore
O(query_chunk x (item_chunk + k)) scores, independent of the catalogue size, which keeps a
million-item catalogue within a few hundred MB with the defaults.

Excluded items (e.g. a user's training items) are given the score -inf and can never be returned:
any slot whose score is -inf is reported as the empty slot ``(id=-1, score=-inf)``. The same holds
for an item whose genuine score is -inf. NaN scores have no defined rank: a NaN score for any item
that is not excluded raises ValueError (``torch.topk`` would silently rank it above every number).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CSR", "topk_items"]


@dataclass(frozen=True)
class CSR:
    """A compressed-sparse-row list of item indices per row (query / user).

    Row ``r`` holds ``indices[indptr[r]:indptr[r + 1]]``. Rows built by :meth:`from_pairs` are sorted
    ascending and free of duplicates, which :mod:`twotower.metrics` relies on for membership tests
    by binary search.

    Attributes:
        indptr: LongTensor[n_rows + 1], non-decreasing, ``indptr[0] == 0``, ``indptr[-1] == nnz``.
        indices: LongTensor[nnz], the column (item) indices.
    """

    indptr: Tensor
    indices: Tensor

    def __post_init__(self) -> None:
        if self.indptr.dim() != 1 or self.indptr.numel() < 1:
            raise ValueError("CSR.indptr must be a 1-D tensor with at least one element")
        if self.indices.dim() != 1:
            raise ValueError("CSR.indices must be a 1-D tensor")
        if int(self.indptr[0]) != 0 or int(self.indptr[-1]) != self.indices.numel():
            raise ValueError("CSR.indptr must start at 0 and end at len(indices)")

    @property
    def n_rows(self) -> int:
        """Number of rows, ``len(indptr) - 1``."""
        return self.indptr.numel() - 1

    def row(self, i: int) -> Tensor:
        """Item indices of row ``i`` (a view, not a copy)."""
        return self.indices[int(self.indptr[i]) : int(self.indptr[i + 1])]

    def lengths(self) -> Tensor:
        """LongTensor[n_rows]: number of entries per row, ``indptr[r + 1] - indptr[r]``."""
        return self.indptr[1:] - self.indptr[:-1]

    @classmethod
    def from_pairs(cls, rows: Tensor, cols: Tensor, n_rows: int) -> CSR:
        """Build a CSR from (row, col) pairs; duplicate pairs are dropped, each row sorted ascending.

        Args:
            rows: integer tensor [n] with values in ``[0, n_rows)``.
            cols: non-negative integer tensor [n], any int64 value (a huge one costs a slower path).
            n_rows: number of rows; rows without pairs are empty.
        """
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        cols = torch.as_tensor(cols, dtype=torch.long, device=rows.device).reshape(-1)
        if rows.numel() != cols.numel():
            raise ValueError(f"rows and cols differ in length: {rows.numel()} vs {cols.numel()}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_rows):
            raise ValueError(f"row indices must lie in [0, {n_rows})")
        if cols.numel() and int(cols.min()) < 0:
            raise ValueError("column indices must be non-negative")
        # One int64 key per pair, row-major: sorting and de-duplicating the keys sorts rows and the
        # columns inside each row in a single vectorised pass. n_rows x width stays far below 2**63
        # for any realistic catalogue (1e6 x 1e6 = 1e12), but not for a stray huge column (a raw
        # 64-bit id): its key would wrap around into another row's, so such inputs take the slower
        # lexicographic unique over (row, col) pairs instead.
        width = int(cols.max()) + 1 if cols.numel() else 1
        if n_rows * width < 2**63:
            keys = torch.unique(rows * width + cols, sorted=True)
            rows, cols = keys // width, keys % width
        else:
            rows, cols = torch.unique(torch.stack([rows, cols], dim=1), dim=0, sorted=True).unbind(1)
            cols = cols.contiguous()  # a column of the [n, 2] pairs is a strided view
        counts = torch.bincount(rows, minlength=n_rows)
        indptr = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
        indptr[1:] = torch.cumsum(counts, dim=0)
        return cls(indptr=indptr, indices=cols)


def _sort_desc_index_asc(vals: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Order each row by (score desc, index asc) with two sorts: index first, then a STABLE sort by
    score, which keeps the ascending index order inside every group of equal scores."""
    idx, perm = torch.sort(idx, dim=1)
    vals = torch.gather(vals, 1, perm)
    vals, perm = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, torch.gather(idx, 1, perm)


def _block_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of a [q, c] score block, ties resolved towards the lower column index.

    Returns (values [q, k'], column indices [q, k']) with k' = min(k, c), ordered by
    (score desc, index asc).
    """
    kk = min(k, scores.shape[1])
    vals, idx = torch.topk(scores, kk, dim=1, largest=True, sorted=False)
    # The multiset of top-k VALUES is unique; only which of several items tied at the k-th value
    # topk picks is arbitrary. That matters only for rows where more items reach the threshold
    # than there are slots, so the (rare) repair below touches those rows alone.
    threshold = vals.min(dim=1, keepdim=True).values
    ambiguous = (scores >= threshold).sum(dim=1) > kk
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        sub, t = scores[rows], threshold[rows]
        above = sub > t
        free = kk - above.sum(dim=1, keepdim=True)  # slots left for items tied at the threshold
        tied = sub == t
        # cumsum over the tie mask numbers tied items left to right: keep the `free` lowest indices.
        keep = above | (tied & (torch.cumsum(tied, dim=1, dtype=torch.int32) <= free))
        # Exactly kk entries per row are kept, so nonzero's row-major output reshapes to [rows, kk].
        cols = keep.nonzero()[:, 1].view(rows.numel(), kk)
        idx[rows] = cols
        vals[rows] = torch.gather(sub, 1, cols)
    return _sort_desc_index_asc(vals, idx)


@torch.no_grad()
def topk_items(
    queries: Tensor,
    items: Tensor,
    k: int,
    exclude: CSR | None = None,
    item_chunk: int = 65536,
    query_chunk: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Exact top-k items for every query under s(q, i) = queries[q] . items[i].

    Args:
        queries: Tensor[Q, d].
        items: Tensor[I, d] on the same device.
        k: number of items to return; clamped to I when larger.
        exclude: optional CSR with Q rows; row q lists item indices that must never be returned for
            query q (indices >= I are ignored).
        item_chunk: items scored per block.
        query_chunk: queries scored per block; peak memory is O(query_chunk x (item_chunk + k)).

    Returns:
        ``(ids, scores)``: LongTensor[Q, k] and Tensor[Q, k], each row ordered by (score desc, item
        index asc). Slots that cannot be filled (fewer than k non-excluded items) hold id -1 and
        score -inf, always at the tail of the row.
    """
    if queries.dim() != 2 or items.dim() != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(
            f"expected queries [Q,d] and items [I,d], got {tuple(queries.shape)}, {tuple(items.shape)}"
        )
    if k < 1 or item_chunk < 1 or query_chunk < 1:
        raise ValueError("k, item_chunk and query_chunk must be >= 1")
    n_q, n_items = queries.shape[0], items.shape[0]
    if exclude is not None and exclude.n_rows != n_q:
        raise ValueError(f"exclude has {exclude.n_rows} rows but there are {n_q} queries")
    k = min(k, n_items)
    device = queries.device
    dtype = torch.result_type(queries, items)
    out_ids = torch.full((n_q, k), -1, dtype=torch.long, device=device)
    out_scores = torch.full((n_q, k), float("-inf"), dtype=dtype, device=device)
    if k == 0 or n_q == 0:
        return out_ids, out_scores

    if exclude is not None:
        ex_indptr = exclude.indptr.to(device)
        ex_indices = exclude.indices.to(device)
        ex_row_of = torch.repeat_interleave(torch.arange(n_q, device=device), ex_indptr.diff())

    for q0 in range(0, n_q, query_chunk):
        q1 = min(q0 + query_chunk, n_q)
        q_block = queries[q0:q1].to(dtype)
        if exclude is not None:
            lo, hi = int(ex_indptr[q0]), int(ex_indptr[q1])
            ex_rows, ex_cols = ex_row_of[lo:hi] - q0, ex_indices[lo:hi]
        best_vals = out_scores[q0:q1]
        best_ids = out_ids[q0:q1]
        # Item chunks are visited in ascending index order, so every id already in the running
        # top-k is lower than every id of the current chunk; this is what makes the single stable
        # merge sort below respect the index tie-break.
        for i0 in range(0, n_items, item_chunk):
            i1 = min(i0 + item_chunk, n_items)
            scores = q_block @ items[i0:i1].to(dtype).T
            if exclude is not None:
                sel = (ex_cols >= i0) & (ex_cols < i1)
                scores[ex_rows[sel], ex_cols[sel] - i0] = float("-inf")
            if bool(torch.isnan(scores).any()):
                raise ValueError(f"NaN scores among items [{i0}, {i1}): check the embeddings for NaN / inf")
            vals, idx = _block_topk(scores, k)
            pool_vals = torch.cat([best_vals, vals], dim=1)
            pool_ids = torch.cat([best_ids, idx + i0], dim=1)
            pool_vals, perm = torch.sort(pool_vals, dim=1, descending=True, stable=True)
            best_vals = pool_vals[:, :k]
            best_ids = torch.gather(pool_ids, 1, perm[:, :k])
        out_scores[q0:q1] = best_vals
        out_ids[q0:q1] = best_ids

    # -inf marks excluded items (and placeholder slots): report them uniformly as empty.
    out_ids[torch.isneginf(out_scores)] = -1
    return out_ids, out_scores
