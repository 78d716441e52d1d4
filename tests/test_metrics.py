"""Known-answer tests for twotower.metrics: every expected value is worked out by hand below."""

from __future__ import annotations

import math

import pytest
import torch

from twotower.metrics import (
    compute_metrics,
    hit_at_k,
    hit_matrix,
    map_at_k,
    mrr_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    top_k_accuracy,
)
from twotower.topk import CSR, topk_items


def relevant_csr(rows: list[list[int]]) -> CSR:
    """CSR with one row per query from plain lists of relevant item indices."""
    r = [q for q, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    return CSR.from_pairs(torch.tensor(r, dtype=torch.long), torch.tensor(c, dtype=torch.long), len(rows))


# Five queries, lists of width 4 (best first); -1 is an empty slot.
#   q0: [3, 1, 7, 5]   relevant {1, 5, 9}  -> hits at ranks 2 and 4, R = 3
#   q1: [2, 4, 0, 6]   relevant {2}        -> hit at rank 1, R = 1 < K
#   q2: [0, 8, 6, -1]  relevant {6, 8}     -> hits at ranks 2 and 3, R = 2 < K, one empty slot
#   q3: [4, -1, -1, -1] relevant {0}       -> no hit: an empty slot must not match item 0
#   q4: [1, 2, 3, 4]   relevant {}         -> no relevant item: skipped by compute_metrics
TOPK = torch.tensor(
    [
        [3, 1, 7, 5],
        [2, 4, 0, 6],
        [0, 8, 6, -1],
        [4, -1, -1, -1],
        [1, 2, 3, 4],
    ]
)
RELEVANT = relevant_csr([[1, 5, 9], [2], [6, 8], [0], []])

# Per-query expected values at k = 4.
NDCG_4 = [
    (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3) + 1 / math.log2(4)),
    (1 / 1) / 1,
    (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3)),  # IDCG over min(R, k) = 2
    0.0,
    0.0,
]
RECALL_4 = [2 / 3, 1 / 1, 2 / 2, 0 / 1, 0.0]
PRECISION_4 = [2 / 4, 1 / 4, 2 / 4, 0 / 4, 0 / 4]  # divides by k even when R < k or slots are empty
MAP_4 = [(1 / 2 + 2 / 4) / 3, (1 / 1) / 1, (1 / 2 + 2 / 3) / 2, 0.0, 0.0]
MRR_4 = [1 / 2, 1 / 1, 1 / 2, 0.0, 0.0]
HIT_4 = [1.0, 1.0, 1.0, 0.0, 0.0]

# Per-query expected values at k = 2 (first two columns only).
NDCG_2 = [
    (1 / math.log2(3)) / (1 + 1 / math.log2(3)),  # IDCG over min(3, 2) = 2
    1.0,
    (1 / math.log2(3)) / (1 + 1 / math.log2(3)),
    0.0,
    0.0,
]
RECALL_2 = [1 / 3, 1 / 1, 1 / 2, 0.0, 0.0]
PRECISION_2 = [1 / 2, 1 / 2, 1 / 2, 0.0, 0.0]
MAP_2 = [(1 / 2) / 3, (1 / 1) / 1, (1 / 2) / 2, 0.0, 0.0]  # MAP divides by ALL R, not min(R, k)
MRR_2 = [1 / 2, 1 / 1, 1 / 2, 0.0, 0.0]
HIT_2 = [1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "fn,k,expected",
    [
        (ndcg_at_k, 4, NDCG_4),
        (recall_at_k, 4, RECALL_4),
        (precision_at_k, 4, PRECISION_4),
        (map_at_k, 4, MAP_4),
        (mrr_at_k, 4, MRR_4),
        (hit_at_k, 4, HIT_4),
        (ndcg_at_k, 2, NDCG_2),
        (recall_at_k, 2, RECALL_2),
        (precision_at_k, 2, PRECISION_2),
        (map_at_k, 2, MAP_2),
        (mrr_at_k, 2, MRR_2),
        (hit_at_k, 2, HIT_2),
    ],
)
def test_per_query_hand_values(fn, k, expected):
    values = fn(TOPK, RELEVANT, k)
    assert values.dtype == torch.float64 and values.shape == (5,)
    assert values.tolist() == pytest.approx(expected, abs=1e-12)


def test_hit_matrix_and_empty_slot_never_hits():
    hits = hit_matrix(TOPK, RELEVANT)
    assert hits.tolist() == [
        [False, True, False, True],
        [True, False, False, False],
        [False, True, True, False],
        [False, False, False, False],  # -1 slots vs relevant item 0: never a hit
        [False, False, False, False],
    ]
    # A hand-built CSR with an unsorted, duplicated row still answers correctly.
    csr = CSR(indptr=torch.tensor([0, 3]), indices=torch.tensor([5, 1, 5]))
    assert hit_matrix(torch.tensor([[1, 2, 5, -1]]), csr).tolist() == [[True, False, True, False]]


def test_fewer_relevant_than_k_brief_example():
    # hits at ranks 1 and 3, R = 2 < k = 5: IDCG sums min(R, k) = 2 discounts.
    topk = torch.tensor([[7, 0, 3, 4, 9]])
    rel = relevant_csr([[3, 7]])
    assert float(ndcg_at_k(topk, rel, 5)[0]) == pytest.approx(
        (1 / 1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    )
    assert float(precision_at_k(topk, rel, 5)[0]) == pytest.approx(2 / 5)
    assert float(recall_at_k(topk, rel, 5)[0]) == pytest.approx(2 / 2)
    assert float(map_at_k(topk, rel, 5)[0]) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert float(mrr_at_k(topk, rel, 5)[0]) == pytest.approx(1 / 1)


def test_more_relevant_than_k_caps_ndcg_not_map():
    # All top-2 slots are hits but R = 4: NDCG reaches 1 (IDCG over min(R, k)), MAP does not.
    topk = torch.tensor([[1, 2]])
    rel = relevant_csr([[1, 2, 3, 4]])
    assert float(ndcg_at_k(topk, rel, 2)[0]) == pytest.approx(1.0)
    assert float(map_at_k(topk, rel, 2)[0]) == pytest.approx((1 / 1 + 2 / 2) / 4)
    assert float(recall_at_k(topk, rel, 2)[0]) == pytest.approx(2 / 4)
    assert float(precision_at_k(topk, rel, 2)[0]) == pytest.approx(2 / 2)


def test_cut_off_beyond_list_width_pads_with_misses():
    # k = 6 > width 4: the two missing slots are misses; precision still divides by 6.
    assert precision_at_k(TOPK, RELEVANT, 6).tolist() == pytest.approx([2 / 6, 1 / 6, 2 / 6, 0.0, 0.0])
    assert ndcg_at_k(TOPK, RELEVANT, 6).tolist() == pytest.approx(NDCG_4)  # IDCG still over min(R, 6)
    assert map_at_k(TOPK, RELEVANT, 6).tolist() == pytest.approx(MAP_4)


def test_compute_metrics_means_skip_queries_without_relevant_items():
    out = compute_metrics(TOPK, RELEVANT, ks=(2, 4))
    names = ("ndcg", "recall", "precision", "map", "mrr", "hit")
    assert set(out) == {f"{n}@{k}" for n in names for k in (2, 4)}
    # Mean over q0..q3 only (q4 has no relevant item), hence the divisor 4.
    expected = {
        "ndcg@4": (
            (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
            + 1
            + (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
            + 0
        )
        / 4,
        "recall@4": (2 / 3 + 1 + 1 + 0) / 4,
        "precision@4": (2 / 4 + 1 / 4 + 2 / 4 + 0) / 4,
        "map@4": ((1 / 2 + 2 / 4) / 3 + 1 + (1 / 2 + 2 / 3) / 2 + 0) / 4,
        "mrr@4": (1 / 2 + 1 + 1 / 2 + 0) / 4,
        "hit@4": (1 + 1 + 1 + 0) / 4,
        "ndcg@2": (2 * (1 / math.log2(3)) / (1 + 1 / math.log2(3)) + 1 + 0) / 4,
        "recall@2": (1 / 3 + 1 + 1 / 2 + 0) / 4,
        "precision@2": (1 / 2 + 1 / 2 + 1 / 2 + 0) / 4,
        "map@2": ((1 / 2) / 3 + 1 + (1 / 2) / 2 + 0) / 4,
        "mrr@2": (1 / 2 + 1 + 1 / 2 + 0) / 4,
        "hit@2": (1 + 1 + 1 + 0) / 4,
    }
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key


def test_compute_metrics_default_key_and_subset_of_names():
    out = compute_metrics(TOPK, RELEVANT)  # default ks=(10,): keys "ndcg@10", ...
    assert sorted(out) == sorted(f"{n}@10" for n in ("ndcg", "recall", "precision", "map", "mrr", "hit"))
    assert out["precision@10"] == pytest.approx((2 / 10 + 1 / 10 + 2 / 10 + 0) / 4)
    sub = compute_metrics(TOPK, RELEVANT, ks=(1, 3), names=("MRR", "hit"))
    assert set(sub) == {"mrr@1", "mrr@3", "hit@1", "hit@3"}
    # rank-1 hits: only q1; within 3: q0 (rank 2), q1 (rank 1), q2 (rank 2)
    assert sub["mrr@1"] == pytest.approx((0 + 1 + 0 + 0) / 4)
    assert sub["hit@3"] == pytest.approx((1 + 1 + 1 + 0) / 4)
    assert sub["mrr@3"] == pytest.approx((1 / 2 + 1 + 1 / 2 + 0) / 4)


def test_compute_metrics_without_any_relevant_is_nan():
    out = compute_metrics(torch.tensor([[0, 1]]), relevant_csr([[]]), ks=(2,))
    assert all(math.isnan(v) for v in out.values()) and len(out) == 6


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        compute_metrics(TOPK, RELEVANT, names=("auc",))
    with pytest.raises(ValueError):
        compute_metrics(TOPK, RELEVANT, ks=(0,))
    with pytest.raises(ValueError):
        ndcg_at_k(TOPK, RELEVANT, 0)
    with pytest.raises(ValueError):
        hit_matrix(TOPK, relevant_csr([[1]]))  # 1 row for 5 queries
    with pytest.raises(ValueError):
        top_k_accuracy(TOPK, torch.tensor([1, 2]))


def test_top_k_accuracy_hand_values():
    topk = torch.tensor([[3, 1, 7], [2, 4, 0], [-1, -1, -1], [5, 6, 8]])
    targets = torch.tensor([7, 2, 0, 9])
    # q0: 7 at position 3; q1: 2 at position 1; q2: only empty slots (never match 0); q3: 9 absent
    assert top_k_accuracy(topk, targets) == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert top_k_accuracy(topk[:, :1], targets) == pytest.approx((0 + 1 + 0 + 0) / 4)
    assert math.isnan(top_k_accuracy(torch.empty((0, 3), dtype=torch.long), torch.empty(0)))


@pytest.mark.parametrize("item_chunk", [1, 2, 100])
def test_ties_through_topk_rank_lower_index_first(item_chunk: int):
    # Scores for the query [1]: items 0..4 score 1, 3, 3, 2, 3 -> three-way tie at 3.
    items = torch.tensor([[1.0], [3.0], [3.0], [2.0], [3.0]])
    ids, _ = topk_items(torch.tensor([[1.0]]), items, k=3, item_chunk=item_chunk)
    assert ids.tolist() == [[1, 2, 4]]  # lower index first within the tie
    # Relevant {3, 4}: hit at rank 3 only (item 3 is 4th). Had the tie put item 4 first, NDCG would differ.
    rel = relevant_csr([[3, 4]])
    assert float(ndcg_at_k(ids, rel, 3)[0]) == pytest.approx((1 / math.log2(4)) / (1 + 1 / math.log2(3)))
    assert float(precision_at_k(ids, rel, 3)[0]) == pytest.approx(1 / 3)
    assert float(mrr_at_k(ids, rel, 3)[0]) == pytest.approx(1 / 3)
    assert float(map_at_k(ids, rel, 3)[0]) == pytest.approx((1 / 3) / 2)
    ids2, _ = topk_items(torch.tensor([[1.0]]), items, k=2, item_chunk=item_chunk)
    assert ids2.tolist() == [[1, 2]]  # item 4 loses the tie at the k-th place
    assert float(hit_at_k(ids2, rel, 2)[0]) == 0.0


def _reference_metrics(ranked: list[int], rel: set[int], k: int) -> dict[str, float]:
    """The Microsoft-Recommenders definitions of the module docstring, written out in plain Python."""
    hits = [int(x >= 0 and x in rel) for x in ranked[:k]]
    hits += [0] * (k - len(hits))  # a list narrower than k: missing slots are misses
    n_rel, n_hit = len(rel), sum(hits)
    dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))  # 0-based r: discount log2(rank + 1)
    idcg = sum(1 / math.log2(i + 2) for i in range(min(n_rel, k)))
    ap, seen = 0.0, 0
    for r, h in enumerate(hits):
        if h:
            seen += 1
            ap += seen / (r + 1)  # precision at the rank of each hit
    first = next((r + 1 for r, h in enumerate(hits) if h), None)
    return {
        "ndcg": dcg / idcg,
        "recall": n_hit / n_rel,
        "precision": n_hit / k,
        "map": ap / n_rel,  # divided by ALL relevant items, not min(R, k)
        "mrr": 0.0 if first is None else 1 / first,
        "hit": float(n_hit > 0),
    }


def test_compute_metrics_matches_a_plain_python_reference_on_random_lists():
    # Random lists with empty slots, relevant sets both smaller and larger than k, and empty ones
    # (which the mean must skip); cut-offs below, at and beyond the list width.
    gen = torch.Generator().manual_seed(7)
    for _ in range(20):
        n_q, width = 4, int(torch.randint(1, 6, (1,), generator=gen))
        lists, rels = [], []
        for _ in range(n_q):
            ranked = torch.randperm(12, generator=gen)[:width].tolist()
            filled = int(torch.randint(0, width + 1, (1,), generator=gen))
            lists.append(ranked[:filled] + [-1] * (width - filled))
            n_rel = int(torch.randint(0, 8, (1,), generator=gen))
            rels.append(sorted(torch.randperm(12, generator=gen)[:n_rel].tolist()))
        ks = (1, 3, width, width + 2)
        out = compute_metrics(torch.tensor(lists), relevant_csr(rels), ks=ks)
        kept = [q for q in range(n_q) if rels[q]]
        for k in ks:
            for name in ("ndcg", "recall", "precision", "map", "mrr", "hit"):
                if not kept:
                    assert math.isnan(out[f"{name}@{k}"])
                    continue
                want = sum(_reference_metrics(lists[q], set(rels[q]), k)[name] for q in kept) / len(kept)
                assert out[f"{name}@{k}"] == pytest.approx(want, abs=1e-12), (name, k, lists, rels)


def test_map_at_k_divides_by_all_relevant_items_as_in_anchors():
    # anchors.md: Microsoft's MAP = sum of precision@rank over the hits in the top k / (number of ALL
    # relevant test items). Hits at ranks 1, 2, 3 of k = 3, R = 5:
    #   (1/1 + 2/2 + 3/3) / 5 = 3/5 = 0.6;  dividing by min(R, k) = 3 would give 1.0.
    topk = torch.tensor([[4, 2, 0, 9]])
    rel = relevant_csr([[0, 2, 4, 6, 8]])
    assert float(map_at_k(topk, rel, 3)[0]) == pytest.approx(0.6)
    # NDCG stays capped by min(R, k): a perfect top 3 gives 1 whatever R is.
    assert float(ndcg_at_k(topk, rel, 3)[0]) == pytest.approx(1.0)
    # At k = 4 the miss at rank 4 changes nothing in MAP (same 3/5) but precision drops to 3/4.
    assert float(map_at_k(topk, rel, 4)[0]) == pytest.approx(0.6)
    assert float(precision_at_k(topk, rel, 4)[0]) == pytest.approx(3 / 4)


def test_query_without_relevant_items_is_zero_per_query_and_absent_from_the_mean():
    # q0 has no relevant item but a full list; q1 hits at rank 2 of k = 2 with R = 1.
    topk = torch.tensor([[0, 1], [3, 2]])
    rel = relevant_csr([[], [2]])
    for fn in (ndcg_at_k, recall_at_k, precision_at_k, map_at_k, mrr_at_k, hit_at_k):
        assert float(fn(topk, rel, 2)[0]) == 0.0  # zero, never NaN
    out = compute_metrics(topk, rel, ks=(2,))
    # Mean over q1 alone: ndcg = (1/log2 3) / 1, recall 1/1, precision 1/2, map (1/2)/1, mrr 1/2, hit 1.
    assert out["ndcg@2"] == pytest.approx(1 / math.log2(3))
    assert out["recall@2"] == pytest.approx(1.0)
    assert out["precision@2"] == pytest.approx(0.5)
    assert out["map@2"] == pytest.approx(0.5)
    assert out["mrr@2"] == pytest.approx(0.5)
    assert out["hit@2"] == pytest.approx(1.0)


def test_hand_built_csr_with_a_duplicate_counts_the_relevant_item_once():
    # hit_matrix promises: "A hand-built CSR may hold unsorted or duplicated rows; normalise rather than
    # mis-answer" (and test_metrics pins hit_matrix on exactly this CSR). The hits are normalised, but
    # R = relevant.lengths() still counts the duplicate: R = 3 instead of |{1, 5}| = 2.
    csr = CSR(indptr=torch.tensor([0, 3]), indices=torch.tensor([5, 1, 5]))
    topk = torch.tensor([[1, 5]])
    # Both relevant items retrieved: recall = H / R = 2 / 2 = 1; MAP = (1/1 + 2/2) / 2 = 1.
    assert float(recall_at_k(topk, csr, 2)[0]) == pytest.approx(1.0)
    assert float(map_at_k(topk, csr, 2)[0]) == pytest.approx(1.0)
    assert compute_metrics(topk, csr, ks=(2,), names=("recall",))["recall@2"] == pytest.approx(1.0)


def test_hit_matrix_with_raw_64_bit_item_ids():
    # CSR.from_pairs accepts any int64 column. With 3 rows and an id of 2**62 the key q * W + item
    # (W = 2**62 + 1) wrapped around for q = 2 and the binary search missed every hit.
    relevant = relevant_csr([[5], [7], [3, 2**62]])
    topk = torch.tensor([[5, 1], [7, -1], [2**62, 3]])
    assert hit_matrix(topk, relevant).tolist() == [[True, False], [True, False], [True, True]]
    # Every query retrieved all of its relevant items within the top 2: recall 1 each.
    assert recall_at_k(topk, relevant, 2).tolist() == [1.0, 1.0, 1.0]
