"""Hand-computed tests for `twotower.ranking_metrics` (graded per-query ranking and click metrics)."""

from __future__ import annotations

from math import log, log2

import numpy as np
import pytest

from twotower.ranking_metrics import (
    click_log_likelihood,
    mrr_per_query,
    ndcg_per_query,
    ranking_metrics,
    roc_auc,
)

# Query A: rows 0-3, with a score tie between rows 1 and 2. Query B: rows 4-5, nothing relevant.
# Query C: row 6 alone.
SCORES = np.array([0.9, 0.3, 0.3, 0.1, 2.0, 1.0, -5.0])
LABELS = np.array([1, 0, 3, 2, 0, 0, 2])
OFFSETS = np.array([0, 4, 6, 7])

# A ranks rows 0, 1, 2, 3 (the tie goes to the earlier row 1), so its labels in rank order are
# [1, 0, 3, 2], gains 2^y - 1 = [1, 0, 7, 3]; the ideal order has gains [7, 3, 1, 0].
A_DCG3 = 1 + 0 / log2(3) + 7 / log2(4)  # = 4.5
A_IDCG3 = 7 + 3 / log2(3) + 1 / log2(4)  # = 9.3928
A_DCG10 = A_DCG3 + 3 / log2(5)  # k = 10 > 4 documents: every document counts
A_IDCG10 = A_IDCG3 + 0 / log2(5)


def test_ndcg_hand_computed_with_ties_and_an_empty_query() -> None:
    ndcg1 = ndcg_per_query(SCORES, LABELS, OFFSETS, k=1)
    # A: DCG@1 = 1 (label 1 on top), IDCG@1 = 7. B has IDCG 0: NaN. C: its one document is ideal.
    np.testing.assert_allclose(ndcg1, [1 / 7, np.nan, 1.0])
    np.testing.assert_allclose(ndcg_per_query(SCORES, LABELS, OFFSETS, k=3), [A_DCG3 / A_IDCG3, np.nan, 1.0])
    np.testing.assert_allclose(
        ndcg_per_query(SCORES, LABELS, OFFSETS, k=10), [A_DCG10 / A_IDCG10, np.nan, 1.0]
    )
    assert abs(A_DCG3 / A_IDCG3 - 0.479091) < 1e-6


def test_ties_follow_row_order() -> None:
    # The same two tied documents in the other row order: label 3 now ranks 2nd, label 0 3rd.
    swapped = ndcg_per_query(np.array([0.9, 0.3, 0.3, 0.1]), np.array([1, 3, 0, 2]), np.array([0, 4]), k=3)
    dcg = 1 + 7 / log2(3) + 0 / log2(4)  # = 5.4165
    np.testing.assert_allclose(swapped, [dcg / A_IDCG3])


def test_mrr_thresholds_and_cutoffs() -> None:
    # A in rank order has labels [1, 0, 3, 2]: first label >= 1 at rank 1, first >= 2 at rank 3.
    np.testing.assert_allclose(mrr_per_query(SCORES, LABELS, OFFSETS), [1.0, np.nan, 1.0])
    np.testing.assert_allclose(mrr_per_query(SCORES, LABELS, OFFSETS, threshold=2), [1 / 3, np.nan, 1.0])
    np.testing.assert_allclose(mrr_per_query(SCORES, LABELS, OFFSETS, k=2, threshold=2), [0.0, np.nan, 1.0])
    # C's label 2 is not >= 3, and neither is anything else: every query is NaN.
    assert np.isnan(mrr_per_query(SCORES, LABELS, OFFSETS, threshold=4)).all()


def test_minus_inf_scores_still_rank_before_padding() -> None:
    # The second query is padded to the first one's length 3 with -inf scores; its real
    # documents, scored -inf too, must still take ranks 1 and 2 (relevant one at rank 2).
    scores = np.array([1.0, 2.0, 3.0, -np.inf, -np.inf])
    labels = np.array([0, 0, 1, 0, 1])
    offsets = np.array([0, 3, 5])
    np.testing.assert_allclose(mrr_per_query(scores, labels, offsets), [1.0, 0.5])
    np.testing.assert_allclose(ndcg_per_query(scores, labels, offsets, k=2), [1.0, (1 / log2(3)) / 1.0])


def test_ranking_metrics_average_over_queries_with_a_relevant_document() -> None:
    metrics = ranking_metrics(SCORES, LABELS, OFFSETS, ks=(10, 1, 3))
    assert list(metrics) == ["ndcg@1", "ndcg@3", "ndcg@10", "mrr@1", "mrr@3", "mrr@10", "queries"]
    assert metrics["queries"] == 2  # B is left out
    assert metrics["ndcg@1"] == pytest.approx((1 / 7 + 1.0) / 2)
    assert metrics["ndcg@3"] == pytest.approx((A_DCG3 / A_IDCG3 + 1.0) / 2)
    assert metrics["ndcg@10"] == pytest.approx((A_DCG10 / A_IDCG10 + 1.0) / 2)
    assert metrics["mrr@10"] == pytest.approx((1.0 + 1.0) / 2)
    assert set(ranking_metrics(SCORES, LABELS, OFFSETS)) == {
        *(f"{name}@{k}" for name in ("ndcg", "mrr") for k in (1, 3, 5, 10)),
        "queries",
    }
    # MRR at a cut-off: a query whose first relevant document is below it counts 0 there.
    late = ranking_metrics(np.array([3.0, 2.0, 1.0]), np.array([0, 0, 1]), np.array([0, 3]), ks=(1, 3))
    assert (late["mrr@1"], late["mrr@3"]) == (0.0, pytest.approx(1 / 3))


def test_empty_groups_and_no_queries() -> None:
    # An empty query (offsets 2, 2) has no relevant document: NaN, like an all-zero query.
    per_query = ndcg_per_query(np.array([1.0, 0.0]), np.array([1, 0]), np.array([0, 2, 2]), k=5)
    np.testing.assert_allclose(per_query, [1.0, np.nan])
    empty = ranking_metrics(np.zeros(0), np.zeros(0, dtype=np.int64), np.array([0]))
    assert empty["queries"] == 0 and np.isnan(empty["ndcg@1"]) and np.isnan(empty["mrr@10"])
    assert np.isnan(mrr_per_query(np.zeros(0), np.zeros(0, dtype=np.int64), np.array([0, 0]))).tolist() == [
        True
    ]


@pytest.mark.parametrize(
    "scores,labels,offsets,k,match",
    [
        ([1.0, 2.0], [0, 1], [0, 1], 1, "offsets"),
        ([1.0, 2.0], [0, 1], [0, 2, 1, 2], 1, "non-decreasing"),
        ([1.0, np.nan], [0, 1], [0, 2], 1, "NaN"),
        ([1.0, 2.0], [0, -1], [0, 2], 1, "whole numbers"),
        ([1.0, 2.0], [0, 1.5], [0, 2], 1, "whole numbers"),
        ([1.0, 2.0], [0, 1], [0, 2], 0, "k must be"),
    ],
)
def test_bad_inputs(scores, labels, offsets, k, match) -> None:
    with pytest.raises(ValueError, match=match):
        ndcg_per_query(np.array(scores), np.array(labels), np.array(offsets), k=k)


def test_click_log_likelihood_clips() -> None:
    probs = np.array([0.9, 0.2, 0.0, 1.0])
    clicks = np.array([1, 0, 0, 0])
    # log 0.9 (click), log 0.8 (no click), log(1 - 1e-6) (p = 0 clipped up to 1e-6), and
    # log 1e-6 (p = 1 clipped down to 1 - 1e-6, no click): finite despite the certain mistake.
    expected = (log(0.9) + log(0.8) + log(1 - 1e-6) + log(1e-6)) / 4
    # (1 - (1 - 1e-6) is 1e-6 only to ~1e-11, hence the tolerance.)
    assert click_log_likelihood(probs, clicks) == pytest.approx(expected, rel=1e-9)
    assert np.isnan(click_log_likelihood(np.zeros(0), np.zeros(0)))
    with pytest.raises(ValueError, match="0 or 1"):
        click_log_likelihood(probs, np.array([1, 0, 2, 0]))


def test_roc_auc_with_ties_by_hand() -> None:
    probs = np.array([0.2, 0.5, 0.5, 0.8, 0.1])
    clicks = np.array([0, 1, 0, 1, 0])
    # Clicked 0.5 beats 0.2 and 0.1 and ties the unclicked 0.5 (1/2): 2.5. Clicked 0.8 beats all
    # three: 3. AUC = 5.5 / (2 * 3). (Ranks 1, 2, 3.5, 3.5, 5: U = 3.5 + 5 - 2 * 3 / 2 = 5.5.)
    assert roc_auc(probs, clicks) == pytest.approx(5.5 / 6)
    assert roc_auc(np.array([0.3, 0.3]), np.array([1, 0])) == 0.5
    assert roc_auc(np.array([0.1, 0.9]), np.array([1, 0])) == 0.0
    assert np.isnan(roc_auc(np.array([0.1, 0.9]), np.array([1, 1])))


def test_roc_auc_matches_a_brute_force_pair_count() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 7, 200):
        probs = np.round(rng.random(n), 1)  # 11 distinct values: plenty of ties
        clicks = (rng.random(n) < 0.3).astype(np.int64)
        clicks[:2] = [0, 1]  # both classes present
        pos, neg = probs[clicks == 1], probs[clicks == 0]
        wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        assert roc_auc(probs, clicks) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)
