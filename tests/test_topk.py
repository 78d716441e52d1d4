"""Tests for twotower.topk: exact chunked top-K with index tie-breaking and exclusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twotower.topk import CSR, topk_items

NEG_INF = float("-inf")


def reference_topk(queries: torch.Tensor, items: torch.Tensor, k: int, exclude: CSR | None = None):
    """Brute force: full score matrix, every row ordered by (score desc, index asc) with lexsort."""
    scores = (queries @ items.T).numpy().astype(np.float64)
    if exclude is not None:
        for q in range(exclude.n_rows):
            scores[q, exclude.row(q).numpy()] = -np.inf
    k = min(k, items.shape[0])
    ids = np.full((scores.shape[0], k), -1, dtype=np.int64)
    vals = np.full((scores.shape[0], k), -np.inf)
    for q, row in enumerate(scores):
        order = np.lexsort((np.arange(row.size), -row))[:k]  # last key primary: score desc, then index
        finite = np.isfinite(row[order])
        ids[q, : finite.sum()] = order[finite]
        vals[q, : finite.sum()] = row[order][finite]
    return ids, vals


def test_hand_example_ties_exclusion_and_padding():
    # items along one axis, scores for query [1, 0] are the first coordinates: 2, 5, 5, 1, 5
    items = torch.tensor([[2.0, 0.0], [5.0, 0.0], [5.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    queries = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # query 0: three-way tie at 5 -> lower index first: 1, 2, 4 (top-2: 1, 2; item 4 loses the tie).
    ids, vals = topk_items(queries, items, k=2, item_chunk=2, query_chunk=1)
    assert ids[0].tolist() == [1, 2]
    assert vals[0].tolist() == [5.0, 5.0]
    # query 1 scores -2, -5, -5, -1, -5 -> item 3 (-1), item 0 (-2)
    assert ids[1].tolist() == [3, 0]
    # exclude items 1 and 2 for query 0 -> 4 (5), 0 (2), 3 (1); query 1 excludes 3 -> 0, then 1,2,4 tie
    exclude = CSR.from_pairs(torch.tensor([0, 0, 1]), torch.tensor([2, 1, 3]), n_rows=2)
    ids, vals = topk_items(queries, items, k=3, exclude=exclude, item_chunk=3)
    assert ids.tolist() == [[4, 0, 3], [0, 1, 2]]
    assert vals.tolist() == [[5.0, 2.0, 1.0], [-2.0, -5.0, -5.0]]
    # only 5 - 4 = 1 item survives for query 0 -> tail slots are (-1, -inf)
    exclude = CSR.from_pairs(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 2, 4]), n_rows=2)
    ids, vals = topk_items(queries, items, k=3, exclude=exclude, item_chunk=2)
    assert ids[0].tolist() == [3, -1, -1]
    assert vals[0].tolist() == [1.0, NEG_INF, NEG_INF]


def test_k_larger_than_catalogue_is_clamped():
    items = torch.tensor([[1.0], [3.0], [2.0]])
    ids, vals = topk_items(torch.tensor([[1.0]]), items, k=10)
    assert ids.shape == (1, 3) and vals.shape == (1, 3)
    assert ids.tolist() == [[1, 2, 0]]


@pytest.mark.parametrize("item_chunk,query_chunk", [(1, 1), (3, 2), (4, 5), (7, 3), (1000, 1000)])
def test_matches_bruteforce_with_many_ties(item_chunk: int, query_chunk: int):
    # Small integer embeddings make exact ties frequent, including ties across chunk boundaries and
    # at the k-th place; integer dot products are exact in float32, so the reference is unambiguous.
    gen = torch.Generator().manual_seed(0)
    queries = torch.randint(-2, 3, (11, 3), generator=gen).float()
    items = torch.randint(-2, 3, (37, 3), generator=gen).float()
    rows = torch.randint(0, 11, (60,), generator=gen)
    cols = torch.randint(0, 37, (60,), generator=gen)
    exclude = CSR.from_pairs(rows, cols, n_rows=11)
    for k in (1, 4, 9, 37, 50):
        for ex in (None, exclude):
            ids, vals = topk_items(
                queries, items, k, exclude=ex, item_chunk=item_chunk, query_chunk=query_chunk
            )
            ref_ids, ref_vals = reference_topk(queries, items, k, ex)
            np.testing.assert_array_equal(ids.numpy(), ref_ids)
            np.testing.assert_array_equal(vals.numpy().astype(np.float64), ref_vals)


def test_excluded_items_never_returned():
    gen = torch.Generator().manual_seed(1)
    queries, items = torch.randn(20, 4, generator=gen), torch.randn(50, 4, generator=gen)
    rows = torch.arange(20).repeat_interleave(45)
    cols = torch.cat([torch.randperm(50, generator=gen)[:45] for _ in range(20)])
    exclude = CSR.from_pairs(rows, cols, n_rows=20)
    ids, vals = topk_items(queries, items, k=10, exclude=exclude, item_chunk=8, query_chunk=6)
    for q in range(20):
        banned = set(exclude.row(q).tolist())
        returned = [i for i in ids[q].tolist() if i >= 0]
        assert len(returned) == 5 and not banned & set(returned)  # 50 - 45 = 5 survivors
        assert ids[q, 5:].eq(-1).all() and torch.isneginf(vals[q, 5:]).all()


def test_all_equal_scores_return_lowest_indices():
    # every score is 0: the answer must be items 0..k-1 in order, whatever the chunking
    ids, _ = topk_items(torch.zeros(3, 2), torch.zeros(10, 2), k=4, item_chunk=3, query_chunk=2)
    assert ids.tolist() == [[0, 1, 2, 3]] * 3


def test_csr_from_pairs_sorts_and_dedups():
    csr = CSR.from_pairs(torch.tensor([2, 0, 2, 2, 0]), torch.tensor([7, 3, 1, 7, 3]), n_rows=4)
    # row 0: {3} (duplicate dropped); row 1: empty; row 2: {1, 7}; row 3: empty
    assert csr.indptr.tolist() == [0, 1, 1, 3, 3]
    assert csr.indices.tolist() == [3, 1, 7]
    assert csr.row(2).tolist() == [1, 7] and csr.row(1).numel() == 0
    assert csr.lengths().tolist() == [1, 0, 2, 0] and csr.n_rows == 4
    with pytest.raises(ValueError):
        CSR.from_pairs(torch.tensor([4]), torch.tensor([0]), n_rows=4)


def test_csr_from_pairs_keeps_a_huge_column_in_its_own_row():
    """rows * (max_col + 1) + cols would wrap past 2**63: (4, 2**62) must not become (1, 3)."""
    csr = CSR.from_pairs(torch.tensor([4]), torch.tensor([2**62]), n_rows=5)
    assert csr.row(4).tolist() == [2**62] and csr.row(1).numel() == 0
    big = 2**63 - 1  # the largest int64: even max_col + 1 overflows
    csr = CSR.from_pairs(torch.tensor([2, 0, 2, 2, 0, 1]), torch.tensor([big, 3, 1, big, 3, 2**62]), n_rows=3)
    assert csr.indptr.tolist() == [0, 1, 2, 4]  # sorted and de-duplicated as on the fast path
    assert csr.indices.tolist() == [3, 2**62, 1, big]


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        topk_items(torch.zeros(2, 3), torch.zeros(4, 2), k=1)
    with pytest.raises(ValueError):
        topk_items(torch.zeros(2, 3), torch.zeros(4, 3), k=0)
    with pytest.raises(ValueError):
        topk_items(torch.zeros(2, 3), torch.zeros(4, 3), k=1, exclude=CSR.from_pairs([], [], n_rows=3))


def test_no_queries_and_mixed_dtypes():
    ids, vals = topk_items(torch.zeros(0, 3), torch.randn(5, 3), k=3)
    assert ids.shape == vals.shape == (0, 3) and ids.dtype == torch.long
    ids, vals = topk_items(torch.ones(2, 3, dtype=torch.float64), torch.ones(5, 3), k=2)
    assert vals.dtype == torch.float64 and ids.tolist() == [[0, 1], [0, 1]]


def test_excluded_ids_past_the_catalogue_are_ignored():
    items = torch.tensor([[3.0], [2.0], [1.0]])
    exclude = CSR.from_pairs(torch.tensor([0, 0, 1]), torch.tensor([0, 50, 99]), n_rows=2)
    ids, vals = topk_items(torch.ones(2, 1), items, k=3, exclude=exclude, item_chunk=2)
    assert ids.tolist() == [[1, 2, -1], [0, 1, 2]]
    assert vals[1].tolist() == [3.0, 2.0, 1.0]


def test_every_item_excluded_gives_only_empty_slots():
    exclude = CSR.from_pairs(torch.zeros(4, dtype=torch.long), torch.arange(4), n_rows=1)
    ids, vals = topk_items(torch.ones(1, 2), torch.randn(4, 2), k=6, exclude=exclude, item_chunk=3)
    assert ids.tolist() == [[-1] * 4] and torch.isneginf(vals).all()


def test_genuine_minus_inf_scores_are_reported_empty():
    items = torch.tensor([[1.0], [float("-inf")], [2.0]])
    ids, vals = topk_items(torch.ones(1, 1), items, k=3)
    assert ids.tolist() == [[2, 0, -1]] and vals[0, 2] == NEG_INF


@pytest.mark.parametrize("item_chunk", [1, 2, 100])
def test_nan_scores_raise_unless_excluded(item_chunk: int):
    # Scores for the query [1]: items 0..3 score 1, NaN, 3, 2. torch.topk ranks NaN above every
    # number, so without a check item 1 came back first: ids [1, 2] for k = 2 instead of an error.
    items = torch.tensor([[1.0], [float("nan")], [3.0], [2.0]])
    with pytest.raises(ValueError, match="NaN"):
        topk_items(torch.ones(1, 1), items, k=2, item_chunk=item_chunk)
    # An excluded item's score never matters: with item 1 excluded the answer is 2 (3), 3 (2).
    exclude = CSR.from_pairs(torch.tensor([0]), torch.tensor([1]), n_rows=1)
    ids, vals = topk_items(torch.ones(1, 1), items, k=2, exclude=exclude, item_chunk=item_chunk)
    assert ids.tolist() == [[2, 3]] and vals.tolist() == [[3.0, 2.0]]
    # A NaN query (e.g. a diverged user tower) makes every score NaN: an error too.
    with pytest.raises(ValueError, match="NaN"):
        topk_items(torch.tensor([[float("nan")]]), items[[0, 2, 3]], k=1, item_chunk=item_chunk)
