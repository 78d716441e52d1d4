"""The funnel's stage logic and metrics on hand-built rankers whose scores are a known matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twotower.align import Teacher
from twotower.funnel import FunnelConfig, FunnelLists, evaluate_funnel, oracle_rows, run_funnel


class MatrixRanker:
    """A stand-in for RunRanker: ``score`` looks up a fixed [U, I] matrix. With one-hot user and item
    embeddings the user's row is ``user_emb.argmax``."""

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = torch.as_tensor(scores, dtype=torch.float32)

    def score(self, user_emb: torch.Tensor, item_idx: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        rows = user_emb.argmax(dim=1)
        return torch.gather(self.scores[rows], 1, item_idx)


def _teacher(scores: np.ndarray) -> Teacher:
    users, items = scores.shape
    return Teacher(MatrixRanker(scores), torch.eye(users), torch.eye(items))  # type: ignore[arg-type]


# 2 users, 6 items. Main ranker: user 0 prefers items 5 > 4 > 3 > ..., user 1 prefers 0 > 1 > 2 > ...
MAIN = np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]], dtype=float)
# Light ranker: the reverse taste of the main one for user 0, the same for user 1.
LIGHT = np.array([[5, 4, 3, 2, 1, 0], [5, 4, 3, 2, 1, 0]], dtype=float)
# Retrieval's candidates (best first) for each user, as a precomputed list.
RETRIEVED = torch.tensor([[0, 1, 2, 5], [3, 4, 5, 0]])


def test_stages_by_hand() -> None:
    teacher = _teacher(MAIN)
    config = FunnelConfig(retrieve_n=4, light_n=3, k=2)
    lists = run_funnel(RETRIEVED, teacher, MatrixRanker(LIGHT), config)  # type: ignore[arg-type]
    # Light ranker keeps its top 3 of the 4 retrieved: user 0 -> 0, 1, 2 (drops 5); user 1 -> 0, 3, 4.
    assert lists.light.tolist() == [[0, 1, 2], [0, 3, 4]]
    # The main ranker orders those: user 0 -> 2, 1; user 1 -> 0, 3.
    assert lists.served.tolist() == [[2, 1], [0, 3]]
    without_light = run_funnel(RETRIEVED, teacher, None, config)
    assert without_light.served.tolist() == [[5, 2], [0, 3]]


def test_evaluate_funnel_hand_values() -> None:
    teacher = _teacher(MAIN)
    config = FunnelConfig(retrieve_n=4, light_n=3, k=2, recall_at=[2])
    lists = run_funnel(RETRIEVED, teacher, MatrixRanker(LIGHT), config)  # type: ignore[arg-type]
    # Truth: item value = its index for both users (true best 5, 4).
    truth = np.tile(np.arange(6, dtype=float), (2, 1))
    metrics = evaluate_funnel(lists, teacher, lambda rows: truth[rows], config)
    # Ranker top 2: user 0 {5, 4}, user 1 {0, 1}. Retrieved@2: {0,1} -> 0/2 and {3,4} -> 0/2;
    # retrieved@4: {0,1,2,5} -> 1/2, {3,4,5,0} -> 1/2. Light (3): {0,1,2} -> 0, {0,3,4} -> 1/2.
    assert metrics["ranker_top2_recall@2"] == pytest.approx(0.0)
    assert metrics["ranker_top2_recall@4"] == pytest.approx(0.5)
    assert metrics["light_ranker_top2_recall@3"] == pytest.approx(0.25)
    # No retrieval scores for a precomputed list: no correlation reported.
    assert "spearman_retrieval_ranker" not in metrics
    ideal = 5 + 4 / np.log2(3)
    # Served [2, 1] and [0, 3]: DCG 2 + 1/log2 3 and 0 + 3/log2 3.
    served = ((2 + 1 / np.log2(3)) / ideal + (3 / np.log2(3)) / ideal) / 2
    assert metrics["served_ndcg@2"] == pytest.approx(served)
    retrieval = ((0 + 1 / np.log2(3)) / ideal + (3 + 4 / np.log2(3)) / ideal) / 2
    assert metrics["retrieval_ndcg@2"] == pytest.approx(retrieval)


def test_oracle_rows_by_hand() -> None:
    teacher = _teacher(MAIN)
    config = FunnelConfig(retrieve_n=4, light_n=3, k=2)
    lists = run_funnel(RETRIEVED, teacher, None, config)
    truth = np.tile(np.arange(6, dtype=float), (2, 1))
    rows = oracle_rows(lists, teacher, None, lambda r: truth[r], config)
    assert rows["oracle funnel (true top k)"]["served_ndcg@2"] == pytest.approx(1.0)
    ideal = 5 + 4 / np.log2(3)
    # True best among retrieved: user 0 -> 5, 2; user 1 -> 5, 4.
    best_retrieved = ((5 + 2 / np.log2(3)) / ideal + 1.0) / 2
    assert rows["learned retrieval + oracle rankers"]["served_ndcg@2"] == pytest.approx(best_retrieved)
    # Retrieval replaced by the true top 4 {5, 4, 3, 2}; the main ranker serves user 0 -> 5, 4 (ideal)
    # and user 1 -> 2, 3.
    learned = (1.0 + (2 + 3 / np.log2(3)) / ideal) / 2
    assert rows["oracle retrieval + learned rankers"]["served_ndcg@2"] == pytest.approx(learned)


def test_spearman_is_reported_for_a_model_list() -> None:
    teacher = _teacher(MAIN)
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    lists = FunnelLists(RETRIEVED, scores, RETRIEVED, RETRIEVED[:, :2])
    metrics = evaluate_funnel(lists, teacher, None, FunnelConfig(retrieve_n=4, k=2, recall_at=[]))
    # User 0: retrieval order 0,1,2,5; ranker scores 0,1,2,5 -> perfectly reversed (-1).
    # User 1: ranker scores of 3,4,5,0 are 2,1,0,5 -> ranks vs retrieval ranks: Spearman -0.2.
    assert metrics["spearman_retrieval_ranker"] == pytest.approx((-1.0 + -0.2) / 2)
    assert "served_ndcg@2" not in metrics  # no truth, no nDCG


def test_config_is_strict() -> None:
    with pytest.raises(ValueError, match="extra"):
        FunnelConfig(retrive_n=3)  # type: ignore[call-arg]
