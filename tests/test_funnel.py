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
    # No light ranker, no light-ranker recall (it used to repeat retrieval's recall@4 under that name).
    no_light = run_funnel(RETRIEVED, teacher, None, FunnelConfig(retrieve_n=4, k=2, recall_at=[]))
    assert no_light.light is None
    assert not any(
        m.startswith("light_")
        for m in evaluate_funnel(no_light, teacher, None, FunnelConfig(retrieve_n=4, k=2, recall_at=[]))
    )


def test_config_is_strict() -> None:
    with pytest.raises(ValueError, match="extra"):
        FunnelConfig(retrive_n=3)  # type: ignore[call-arg]


def test_stage_sizes_follow_serving_when_k_exceeds_light_n_or_retrieve_n() -> None:
    # Serving (Pipeline.recommend) retrieves at least what later stages keep and its light ranker never
    # hands the main one fewer than k; the funnel used to cut to light_n = 2 and serve 2 items of k = 3.
    teacher = _teacher(MAIN)
    config = FunnelConfig(retrieve_n=4, light_n=2, k=3)
    lists = run_funnel(RETRIEVED, teacher, MatrixRanker(LIGHT), config)  # type: ignore[arg-type]
    # Light keeps its top 3: user 0 -> 0, 1, 2; user 1 -> 0, 3, 4. The main ranker orders them.
    assert lists.light.tolist() == [[0, 1, 2], [0, 3, 4]]
    assert lists.served.tolist() == [[2, 1, 0], [0, 3, 4]]
    # k above retrieve_n: retrieval hands over k candidates (here the precomputed list's first 3).
    wide = run_funnel(torch.tensor([[0, 1, 2, 5, 4], [3, 4, 5, 0, 1]]), teacher, None, FunnelConfig(
        retrieve_n=2, light_n=2, k=3))  # fmt: skip
    assert wide.retrieved.tolist() == [[0, 1, 2], [3, 4, 5]] and wide.served.shape == (2, 3)


def test_ranker_ties_go_to_the_lower_catalogue_index() -> None:
    # A ranker that ties everything: the served list must not depend on topk's unspecified tie order.
    teacher = _teacher(np.zeros((2, 6)))
    config = FunnelConfig(retrieve_n=4, light_n=3, k=2)
    lists = run_funnel(RETRIEVED, teacher, MatrixRanker(np.zeros((2, 6))), config)  # type: ignore[arg-type]
    assert lists.light.tolist() == [[0, 1, 2], [0, 3, 4]]
    assert lists.served.tolist() == [[0, 1], [0, 3]]
    # Partial ties: user 0 scores items 2 and 5 alike (best), user 1 items 0 and 4.
    scores = np.array([[0, 0, 9, 0, 0, 9], [7, 0, 0, 0, 7, 0]], dtype=float)
    served = run_funnel(RETRIEVED, _teacher(scores), None, config).served
    assert served.tolist() == [[2, 5], [0, 4]]


def test_oracle_rows_with_k_above_retrieve_n_and_the_catalogue() -> None:
    # topk past a row's length used to raise in oracle_rows for these configs.
    teacher = _teacher(MAIN)
    truth = np.tile(np.arange(6, dtype=float), (2, 1))
    for k in (5, 8):
        config = FunnelConfig(retrieve_n=4, light_n=3, k=k)
        lists = run_funnel(RETRIEVED, teacher, None, config)
        rows = oracle_rows(lists, teacher, None, lambda r: truth[r], config)
        assert rows["oracle funnel (true top k)"][f"served_ndcg@{k}"] == pytest.approx(1.0)
        # The true best of the 4 retrieved, in true order, is the best any ranker could serve from them.
        ideal = sum(v / np.log2(r + 2) for r, v in enumerate(range(5, 5 - min(k, 6), -1)))
        got = [sum(v / np.log2(r + 2) for r, v in enumerate(sorted(row, reverse=True))) for row in
               RETRIEVED.tolist()]  # fmt: skip
        expected = np.mean([g / ideal for g in got])
        assert rows["learned retrieval + oracle rankers"][f"served_ndcg@{k}"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        FunnelConfig(recall_at=[10, -1])  # would slice retrieved[:, :-1] and report "recall@-1"
