from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from twotower.data.click_log import (
    ClickLog,
    LoggingPolicyConfig,
    SimulationConfig,
    _top_n,
    estimate_propensities,
    from_impressions,
    logging_scores,
    simulate_click_log,
)
from twotower.data.click_models import ClickModel
from twotower.data.impressions import ImpressionLists
from twotower.data.ltr import RankingData


def _planted(num_queries=300, per_query=12, seed=0) -> RankingData:
    """Label = a noisy linear function of feature 0, so a linear ranker can learn it."""
    rng = np.random.default_rng(seed)
    d = num_queries * per_query
    x = rng.normal(size=(d, 3)).astype(np.float32)
    labels = np.clip(np.round(2 + 1.5 * x[:, 0] + 0.3 * rng.normal(size=d)), 0, 4).astype(np.int64)
    offsets = np.arange(0, d + 1, per_query, dtype=np.int64)
    return RankingData("planted", x, labels, offsets, 4, ["a", "b", "c"])


def test_top_n_by_hand_with_short_queries():
    data = RankingData(
        "t", np.zeros((5, 1), np.float32), np.zeros(5, np.int64), np.array([0, 3, 5]), 4, ["x"]
    )
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.3])
    # Query 0: rows 1 (.9), 2 (.5), 0 (.1); query 1: rows 4 (.3), 3 (.2), then padding.
    assert _top_n(data, scores, 3).tolist() == [[1, 2, 0], [4, 3, -1]]
    assert _top_n(data, scores, 4).tolist() == [[1, 2, 0, -1], [4, 3, -1, -1]]


def test_mixture_policy_controls_confounding():
    data = _planted()
    exact = logging_scores(data, LoggingPolicyConfig(kind="mixture", w=1.0), seed=0)
    assert exact == pytest.approx(data.labels.astype(float))
    noise = logging_scores(data, LoggingPolicyConfig(kind="mixture", w=0.0), seed=0)
    assert noise.min() >= 0 and noise.max() <= 4
    assert abs(np.corrcoef(noise, data.labels)[0, 1]) < 0.06
    half = logging_scores(data, LoggingPolicyConfig(kind="mixture", w=0.5), seed=0)
    assert 0.3 < np.corrcoef(half, data.labels)[0, 1] < 0.95


def test_production_policy_learns_from_a_few_labelled_queries():
    data = _planted()
    scores = logging_scores(data, LoggingPolicyConfig(kind="production", label_share=0.02), seed=0)
    assert np.corrcoef(scores, data.labels)[0, 1] > 0.9  # 6 labelled queries suffice for a linear truth


def test_simulated_log_shows_the_policy_top_n_and_randomises_a_share():
    data = _planted(num_queries=200)
    cfg = SimulationConfig(top_n=5, sessions_per_query=20, intervention_share=0.25)
    scores = logging_scores(data, cfg.logging, seed=0)
    log = simulate_click_log(data, scores, cfg, seed=1)
    assert log.num_sessions == 4000 and log.docs.shape == (4000, 5)
    top = _top_n(data, scores, 5)
    plain = ~log.randomized
    assert (log.docs[plain] == top[log.query[plain]]).all()
    assert log.randomized.mean() == pytest.approx(0.25, abs=0.03)
    shuffled = log.docs[log.randomized]
    assert (np.sort(shuffled, axis=1) == np.sort(top[log.query[log.randomized]], axis=1)).all()
    assert (shuffled != top[log.query[log.randomized]]).any()
    assert (log.labels == data.labels[log.docs]).all()
    model = ClickModel(cfg.click_model, 4, 5)
    assert log.examination == pytest.approx(model.examination(log.labels, log.device))
    again = simulate_click_log(data, scores, cfg, seed=1)
    assert np.array_equal(again.clicks, log.clicks)  # deterministic given the seed


def test_randomised_sessions_estimate_the_examination_curve():
    data = _planted(num_queries=400)
    cfg = SimulationConfig(sessions_per_query=250, intervention_share=0.5)
    log = simulate_click_log(data, logging_scores(data, cfg.logging, seed=0), cfg, seed=2)
    estimated = estimate_propensities(log)
    model = ClickModel(cfg.click_model, 4, cfg.top_n)
    truth = model.curves / model.curves[:, :1]
    assert estimated == pytest.approx(truth, abs=0.03)
    with pytest.raises(ValueError, match="randomised sessions"):
        estimate_propensities(log.take(np.flatnonzero(~log.randomized)))


def test_propensities_compare_rank_k_with_rank_1_over_the_sessions_that_show_rank_k():
    # 20 randomised sessions of a two-document query: rank 1 clicked 10 times, rank 2 five times,
    # so theta(2) / theta(1) = 5 / 10. 20 more of a one-document query (rank 2 empty), its
    # document clicked every time. Rank 2 never shows that document, so it must not count at rank
    # 1 either: comparing with rank 1 over all 40 sessions gave (5 / 20) / (30 / 40) = 1 / 3.
    full, short = 20, 20
    docs = np.r_[np.tile([[0, 1]], (full, 1)), np.tile([[2, -1]], (short, 1))]
    clicks = np.zeros(docs.shape, dtype=np.float32)
    clicks[:10, 0] = 1.0
    clicks[10:15, 1] = 1.0
    clicks[full:, 0] = 1.0
    s = full + short
    log = ClickLog(
        query=np.r_[np.zeros(full, np.int64), np.ones(short, np.int64)], docs=docs,
        device=np.zeros(s, np.int64), clicks=clicks, examination=np.zeros(docs.shape),
        labels=np.where(docs >= 0, 0, -1), randomized=np.ones(s, dtype=bool), device_names=["all"],
    )  # fmt: skip
    assert estimate_propensities(log).tolist() == [[1.0, 0.5]]


def test_ties_in_the_logging_score_keep_document_order():
    # w = 1 gives tied scores within a label: the stable sort shows them in row order, every time.
    data = RankingData(
        "t", np.zeros((5, 1), np.float32), np.array([1, 2, 1, 2, 0]), np.array([0, 5]), 4, ["x"]
    )
    scores = logging_scores(data, LoggingPolicyConfig(kind="mixture", w=1.0), seed=3)
    assert _top_n(data, scores, 4).tolist() == [[1, 3, 0, 2]]


def test_one_percent_of_few_queries_still_labels_one_query():
    # round(0.01 * 30) = 0, but the production ranker is fitted on at least one query.
    data = _planted(num_queries=30)
    scores = logging_scores(data, LoggingPolicyConfig(kind="production", label_share=0.01), seed=0)
    assert np.isfinite(scores).all() and np.corrcoef(scores, data.labels)[0, 1] > 0.8


def test_held_out_queries_are_scored_by_the_ranker_fitted_on_training_queries():
    data = _planted(num_queries=200)
    train, test = data.split(0.5, seed=0)
    cfg = LoggingPolicyConfig(kind="production", label_share=0.05)
    on_train = logging_scores(train, cfg, seed=0)
    assert np.array_equal(logging_scores(train, cfg, seed=0, fitted_on=train), on_train)
    # another set of documents is scored by those same weights: here, three training queries alone
    few = train.subset(np.array([0, 1, 2]))
    np.testing.assert_allclose(
        logging_scores(few, cfg, seed=0, fitted_on=train), on_train[: train.query_offsets[3]], rtol=1e-10
    )
    scored = logging_scores(test, cfg, seed=0, fitted_on=train)
    # ... which differs from a ranker fitted on held-out labels
    assert not np.allclose(scored, logging_scores(test, cfg, seed=0))
    assert np.corrcoef(scored, test.labels)[0, 1] > 0.8
    with pytest.raises(ValueError, match="features"):
        logging_scores(replace(test, features=test.features[:, :1]), cfg, seed=0, fitted_on=train)


def test_queries_shorter_than_top_n_leave_empty_slots_unclicked():
    data = _planted(num_queries=40, per_query=3)
    cfg = SimulationConfig(top_n=5, sessions_per_query=50, intervention_share=0.5)
    log = simulate_click_log(data, logging_scores(data, cfg.logging, seed=0), cfg, seed=4)
    assert (log.docs[:, 3:] == -1).all() and (log.labels[:, 3:] == -1).all()
    assert log.clicks[:, 3:].sum() == 0 and log.examination[:, 3:].sum() == 0
    assert (log.docs[:, :3] >= 0).all()  # RandTop-N shuffles the filled slots only


def test_production_ranker_without_ridge_fits_despite_a_constant_feature():
    # Feature 1 is constant: with ridge=0 the normal equations were singular (LinAlgError). Labels
    # are exactly feature 0, so the least-squares fit scores every document by its label.
    x = np.array([[0, 5], [1, 5], [2, 5], [3, 5]], dtype=np.float32)
    data = RankingData("c", x, np.array([0, 1, 2, 3]), np.array([0, 4]), 3, ["a", "b"])
    scores = logging_scores(data, LoggingPolicyConfig(kind="production", ridge=0.0, label_share=1.0), seed=0)
    assert scores == pytest.approx([0.0, 1.0, 2.0, 3.0], abs=1e-6)


def test_scores_must_be_one_finite_number_per_document():
    data = _planted(num_queries=2, per_query=3)
    cfg = SimulationConfig(top_n=3, sessions_per_query=1)
    scores = np.arange(6, dtype=np.float64)
    scores[4] = np.nan  # was taken for an empty slot: document 4 was never shown
    with pytest.raises(ValueError, match=r"scores must be \[6\] finite"):
        simulate_click_log(data, scores, cfg, seed=0)
    with pytest.raises(ValueError, match=r"scores must be \[6\] finite"):
        simulate_click_log(data, np.arange(5.0), cfg, seed=0)


def _lists() -> ImpressionLists:
    return ImpressionLists(
        request_ids=np.array([1, 2]),
        items=np.array([[10, 11], [12, -1]]),
        mask=np.array([[True, True], [True, False]]),
        clicks=np.array([[1, 0], [0, 0]], dtype=np.float32),
        labels=None,
        context={"device": np.array(["m", "d"], dtype=object)},
        user_ids=None,
    )


def test_from_impressions_refuses_missing_item_features_and_unknown_context():
    items = pd.DataFrame({"item_id": [10, 11, 12, 13], "price": [1.0, 2.0, 3.0, np.nan]})
    data, log = from_impressions(_lists(), items, context="device")  # item 13 is not shown: fine
    assert data.features[:, 0].tolist() == [1.0, 2.0, 3.0] and log.device_names == ["d", "m"]
    # nan used to flow into the features; a missing text value crashed sorting the categories.
    with pytest.raises(ValueError, match="column 'price' is missing for item 11"):
        from_impressions(_lists(), items.assign(price=[1.0, np.nan, 3.0, 4.0]))
    with pytest.raises(ValueError, match="column 'kind' is missing for item 12"):
        from_impressions(_lists(), items.assign(price=1.0, kind=["a", "b", None, "c"]))
    with pytest.raises(ValueError, match=r"no context column 'devic'.*\['device'\]"):
        from_impressions(_lists(), items, context="devic")
    # An item twice: the same row again is harmless, another row is an error naming both (it was the first).
    again = pd.concat([items, items.iloc[[1]]], ignore_index=True)
    assert from_impressions(_lists(), again)[0].features[:, 0].tolist() == [1.0, 2.0, 3.0]
    clash = pd.concat([items, items.iloc[[1]].assign(price=9.0)], ignore_index=True)
    with pytest.raises(ValueError, match=r"lists item 11 with different features \(rows \[1, 4\]\)"):
        from_impressions(_lists(), clash)


def test_sessions_per_query_zero_is_refused_not_replaced_by_the_default():
    data = _planted(num_queries=2, per_query=3)
    with pytest.raises(ValueError, match="sessions_per_query must be >= 1"):
        simulate_click_log(data, np.arange(6.0), SimulationConfig(top_n=3), seed=0, sessions_per_query=0)
