"""Hand-computed tests for `twotower.funnel_metrics`: recall inside retrieval, agreement, served nDCG."""

from __future__ import annotations

from math import log2, sqrt

import numpy as np
import pytest
import torch

from twotower.funnel_metrics import funnel_table, rank_correlation, ranker_topk_recall, served_ndcg

# ------------------------------------------------------------------------------ ranker_topk_recall
RETRIEVED = np.array([[5, 3, 9, -1], [1, 2, -1, -1], [7, 8, 0, 4]])
RANKER_TOP = np.array([[3, 4, -1], [-1, -1, -1], [0, 7, 6]])
# User 0: valid ranker items {3, 4}, retrieval holds 3 (its -1 never matches the ranker's -1) -> 1/2.
# User 1: no valid ranker item -> skipped. User 2: {0, 7, 6}, retrieval holds 0 and 7 -> 2/3.
# Mean over users 0 and 2: (1/2 + 2/3) / 2 = 7/12.


def test_ranker_topk_recall_hand_computed_with_padding_and_a_skipped_user() -> None:
    assert ranker_topk_recall(RETRIEVED, RANKER_TOP) == pytest.approx(7 / 12)
    assert ranker_topk_recall(torch.from_numpy(RETRIEVED), torch.from_numpy(RANKER_TOP)) == pytest.approx(
        7 / 12
    )
    # Retrieval's order and repeats do not matter, only membership.
    shuffled = np.array([[9, 3, 3, 5], [-1, 2, 1, -1], [4, 0, 8, 7]])
    assert ranker_topk_recall(shuffled, RANKER_TOP) == pytest.approx(7 / 12)


def test_ranker_topk_recall_edges() -> None:
    # Everything found: 1. Nothing retrieved at all: 0 for users with ranker items.
    assert ranker_topk_recall(np.array([[2, 1, 0]]), np.array([[0, 1]])) == 1.0
    assert ranker_topk_recall(np.full((2, 3), -1), np.array([[0, 1], [2, -1]])) == 0.0
    assert np.isnan(ranker_topk_recall(RETRIEVED[:1], np.full((1, 2), -1)))  # every user skipped


def test_ranker_topk_recall_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="3 users but ranker_top has 2"):
        ranker_topk_recall(RETRIEVED, RANKER_TOP[:2])
    with pytest.raises(ValueError, match="row 0 names item 4 more than once"):
        ranker_topk_recall(RETRIEVED[:1], np.array([[4, 4, -1]]))
    with pytest.raises(ValueError, match="-1 marks an empty slot"):
        ranker_topk_recall(RETRIEVED, RANKER_TOP - 1)
    with pytest.raises(ValueError, match="integer item ids"):
        ranker_topk_recall(RETRIEVED.astype(float), RANKER_TOP)
    with pytest.raises(ValueError, match="2-D"):
        ranker_topk_recall(RETRIEVED[0], RANKER_TOP[0])


# -------------------------------------------------------------------------------- rank_correlation
# Row 0, with a tie in a:  a = [1, 2, 2, 3], b = [1, 3, 2, 4].
#   Spearman: average ranks a = [1, 2.5, 2.5, 4], b = [1, 3, 2, 4], both with mean 2.5;
#   deviations a = [-1.5, 0, 0, 1.5], b = [-1.5, .5, -.5, 1.5]; cov = 2.25 + 2.25 = 4.5,
#   var_a = 4.5, var_b = 2.25 + .25 + .25 + 2.25 = 5 -> rho = 4.5 / sqrt(22.5) = sqrt(0.9) = 0.948683.
#   Kendall tau-b: of the 6 pairs, (1, 2) is tied in a and the other 5 are concordant; no ties in b:
#   tau_b = (5 - 0) / sqrt((6 - 1) * (6 - 0)) = 5 / sqrt(30) = 0.912871.
# Row 1: the last cell is padding; the three real candidates are in exactly reversed order -> -1
#   (counting the padding cell (0, 0) would give a different value).
# Row 2: one valid candidate -> skipped (its padding holds NaN, which is allowed).
# Row 3: a is constant over the valid cells -> skipped.
SCORES_A = np.array([[1.0, 2, 2, 3], [4, 3, 2, 0], [5, np.nan, 0, 0], [7, 7, 7, 1]])
SCORES_B = np.array([[1.0, 3, 2, 4], [10, 20, 30, 0], [1, 2, 0, 0], [1, 2, 3, 4]])
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=bool)


@pytest.mark.parametrize(("method", "row0"), [("spearman", sqrt(0.9)), ("kendall", 5 / sqrt(30))])
def test_rank_correlation_ties_padding_and_skipped_users(method: str, row0: float) -> None:
    assert row0 == pytest.approx({"spearman": 0.948683, "kendall": 0.912871}[method], abs=1e-6)
    got = rank_correlation(SCORES_A, SCORES_B, MASK, method=method)
    assert got == pytest.approx((row0 - 1.0) / 2)  # mean of rows 0 and 1
    # Row 0 alone, and torch input.
    alone = rank_correlation(torch.tensor(SCORES_A[:1]), torch.tensor(SCORES_B[:1]), method=method)
    assert alone == pytest.approx(row0)


@pytest.mark.parametrize("method", ["spearman", "kendall"])
def test_rank_correlation_perfect_and_reversed(method: str) -> None:
    a = np.array([[1.0, 2, 3, 4], [0.5, 0.5, 2, -np.inf]])  # row 1: a tie and an -inf score
    same = np.array([[10.0, 20, 30, 40], [-3, -3, 9, -7]])  # the same order, the same tie
    assert rank_correlation(a, same, method=method) == pytest.approx(1.0)
    assert rank_correlation(a, -same, method=method) == pytest.approx(-1.0)


@pytest.mark.parametrize("method", ["spearman", "kendall"])
def test_rank_correlation_matches_scipy(method: str) -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(20, 9)).astype(float)  # few distinct values: many ties
    b = a + rng.integers(-2, 3, size=a.shape)
    mask = rng.random(a.shape) < 0.8
    expected = []
    for u in range(len(a)):
        x, y = a[u, mask[u]], b[u, mask[u]]
        if len(x) >= 2 and np.ptp(x) > 0 and np.ptp(y) > 0:
            fn = stats.spearmanr if method == "spearman" else stats.kendalltau  # kendalltau is tau-b
            expected.append(fn(x, y)[0])
    assert rank_correlation(a, b, mask, method=method) == pytest.approx(np.mean(expected))


def test_rank_correlation_edges_and_errors() -> None:
    assert np.isnan(rank_correlation(SCORES_A[2:], SCORES_B[2:], MASK[2:]))  # every user skipped
    with pytest.raises(ValueError, match="both be"):
        rank_correlation(SCORES_A, SCORES_B[:, :3])
    with pytest.raises(ValueError, match="mask must be a bool"):
        rank_correlation(SCORES_A, SCORES_B, MASK.astype(int))
    with pytest.raises(ValueError, match="NaN in a valid"):
        rank_correlation(SCORES_A, SCORES_B)  # row 2's NaN is no longer masked out
    with pytest.raises(ValueError, match="'spearman' or 'kendall'"):
        rank_correlation(SCORES_A, SCORES_B, MASK, method="pearson")


# ------------------------------------------------------------------------------------- served_ndcg
# 5 items. User 0's true relevance (real-valued, linear gain); user 1 likes nothing (IDCG 0, skipped).
TRUTH = np.array([[0.0, 3.0, 1.0, 2.0, 0.5], [0, 0, 0, 0, 0]])
IDCG3 = 3 + 2 / log2(3) + 1 / log2(4)  # best 3 of the catalogue: items 1, 3, 2 -> 4.761860


@pytest.mark.parametrize(
    ("row", "dcg"),
    [
        ([1, 3, 2], IDCG3),  # the ideal list: nDCG 1
        ([3, 1, 2], 2 + 3 / log2(3) + 1 / log2(4)),  # top two swapped: 4.392789 / 4.761860 = 0.922495
        ([1, -1, 4], 3 + 0 + 0.5 / log2(4)),  # an empty slot adds 0: 3.25 / 4.761860 = 0.682506
        ([3, 2, 4], 2 + 1 / log2(3) + 0.5 / log2(4)),  # item 1 lost upstream: 2.880930 / 4.761860 = 0.605001
    ],
)
def test_served_ndcg_linear_gain_full_corpus_ideal(row: list[int], dcg: float) -> None:
    served = np.array([row, [0, 1, 2]])  # user 1 is skipped, so the mean is user 0's value
    assert served_ndcg(served, TRUTH, k=3) == pytest.approx(dcg / IDCG3)


def test_served_ndcg_hand_values() -> None:
    swapped = served_ndcg(np.array([[3, 1, 2]]), TRUTH[:1], k=3)
    assert swapped == pytest.approx(0.922495, abs=1e-6)
    assert served_ndcg(np.array([[1, 3, 2]]), TRUTH[:1], k=3) == pytest.approx(1.0)


def test_served_ndcg_exponential_gain() -> None:
    labels = np.array([[0, 2, 1, 0, 0]])  # gains 2^y - 1 = [0, 3, 1, 0, 0]
    # Served [2, 1]: DCG = 1 + 3 / log2(3) = 2.892789; ideal [1, 2]: IDCG = 3 + 1 / log2(3) = 3.630930.
    got = served_ndcg(np.array([[2, 1]]), labels, k=2, gain="exponential")
    assert got == pytest.approx((1 + 3 / log2(3)) / (3 + 1 / log2(3)))
    assert got == pytest.approx(0.796708, abs=1e-6)
    # Linear gain on the same labels: (1 + 2 / log2(3)) / (2 + 1 / log2(3)) = 2.261860 / 2.630930.
    assert served_ndcg(np.array([[2, 1]]), labels, k=2) == pytest.approx(
        (1 + 2 / log2(3)) / (2 + 1 / log2(3))
    )


def test_served_ndcg_cutoff_padding_and_callable_truth() -> None:
    # A list longer than k is cut: [1, 3 | 0] at k = 2 is ideal. One shorter than k is padded:
    # [1] at k = 3 gives 3 / IDCG3.
    assert served_ndcg(np.array([[1, 3, 0]]), TRUTH[:1], k=2) == pytest.approx(1.0)
    assert served_ndcg(np.array([[1]]), TRUTH[:1], k=3) == pytest.approx(3 / IDCG3)
    # A callable gives the same answer, one user per call, and sees the row indices it is asked for.
    served = np.array([[3, 1, 2], [0, 1, 2], [1, 3, 2]])
    truth = np.vstack([TRUTH, TRUTH[:1]])
    seen: list[list[int]] = []

    def lookup(rows: np.ndarray) -> torch.Tensor:
        seen.append(rows.tolist())
        return torch.from_numpy(truth[rows])

    expected = (0.922495 + 1.0) / 2  # users 0 and 2; user 1 skipped
    assert served_ndcg(served, lookup, k=3, user_chunk=1) == pytest.approx(expected, abs=1e-6)
    assert seen == [[0], [1], [2]]
    assert served_ndcg(torch.from_numpy(served), torch.from_numpy(truth), k=3) == pytest.approx(
        expected, abs=1e-6
    )
    assert np.isnan(served_ndcg(np.array([[0, 1]]), TRUTH[1:], k=2))  # every user skipped


def test_served_ndcg_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="relevance must be >= 0"):
        served_ndcg(np.array([[0]]), np.array([[-0.5, 1.0]]))
    with pytest.raises(ValueError, match="whole-number labels"):
        served_ndcg(np.array([[0]]), TRUTH[:1], gain="exponential")
    with pytest.raises(ValueError, match="names item 5 but truth has only 5 items"):
        served_ndcg(np.array([[5, 0]]), TRUTH[:1])
    with pytest.raises(ValueError, match="names item 1 more than once"):
        served_ndcg(np.array([[1, 1]]), TRUTH[:1])
    with pytest.raises(ValueError, match=r"truth must be \[1, num_items\]"):
        served_ndcg(np.array([[1]]), TRUTH)
    with pytest.raises(ValueError, match="expected \\[rows, num_items\\]"):
        served_ndcg(np.array([[1]]), lambda rows: np.zeros(5))
    with pytest.raises(ValueError, match="k and user_chunk must be >= 1"):
        served_ndcg(np.array([[1]]), TRUTH[:1], k=0)
    with pytest.raises(ValueError, match="'linear' or 'exponential'"):
        served_ndcg(np.array([[1]]), TRUTH[:1], gain="log")


# ------------------------------------------------------------------------------------ funnel_table
def test_funnel_table_exact_string() -> None:
    stages = {
        "retrieval": {"recall@100": 0.5, "users": 943},
        "light ranker": {"ndcg@10": 0.31236, "recall@100": np.float32(0.25)},
        "served": {"ndcg@10": float("nan")},
    }
    # Columns in first-seen order: recall@100, users (retrieval), then ndcg@10 (light ranker).
    assert funnel_table(stages) == (
        "| stage | recall@100 | users | ndcg@10 |\n"
        "|---|---|---|---|\n"
        "| retrieval | 0.5000 | 943 |  |\n"
        "| light ranker | 0.2500 |  | 0.3124 |\n"
        "| served |  |  | nan |"
    )


def test_funnel_table_prints_a_null_read_back_from_json_as_the_nan_it_was() -> None:
    # write_json writes a NaN as null: a funnel reloaded from its file prints as the one in memory did.
    stages = {"served": {"ndcg@10": float("nan"), "users": 5}}
    assert funnel_table({"served": {"ndcg@10": None, "users": 5}}) == funnel_table(stages)


def test_funnel_table_escapes_and_errors() -> None:
    assert funnel_table({"a|b": {"x": 1.0}}) == "| stage | x |\n|---|---|\n| a\\|b | 1.0000 |"
    with pytest.raises(ValueError, match="nothing to tabulate"):
        funnel_table({})
    with pytest.raises(TypeError, match="'served' metric 'ndcg': expected a number"):
        funnel_table({"served": {"ndcg": "high"}})
