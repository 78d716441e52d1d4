"""Tests for twotower.data.synthetic: determinism, log invariants, and that the planted structure is real."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from twotower.data.synthetic import SyntheticWorld, WorldConfig

SMALL = WorldConfig(num_users=300, num_items=200, seed=3)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld.generate()


@pytest.fixture(scope="module")
def log(world: SyntheticWorld) -> pd.DataFrame:
    return world.sample_interactions()


def test_same_seed_gives_identical_world_and_log():
    a, b = SyntheticWorld.generate(SMALL), SyntheticWorld.generate(SMALL)
    pd.testing.assert_frame_equal(a.users, b.users)
    pd.testing.assert_frame_equal(a.items, b.items)
    np.testing.assert_array_equal(a.user_latent, b.user_latent)
    np.testing.assert_array_equal(a.item_popularity_logit, b.item_popularity_logit)
    pd.testing.assert_frame_equal(a.sample_interactions(), b.sample_interactions())
    pd.testing.assert_frame_equal(a.sample_interactions(seed=7), b.sample_interactions(seed=7))


def test_different_seed_gives_different_world_and_log():
    a = SyntheticWorld.generate(SMALL)
    b = SyntheticWorld.generate(SMALL.model_copy(update={"seed": 4}))
    assert not np.allclose(a.user_latent, b.user_latent)
    assert not a.users.equals(b.users)
    log_a, log_a7 = a.sample_interactions(), a.sample_interactions(seed=7)
    assert not log_a.equals(b.sample_interactions())
    assert not log_a.equals(log_a7)


def test_shapes_columns_and_dtypes(world: SyntheticWorld, log: pd.DataFrame):
    cfg = world.config
    assert world.user_latent.shape == (cfg.num_users, cfg.latent_dim)
    assert world.item_latent.shape == (cfg.num_items, cfg.latent_dim)
    assert world.item_popularity_logit.shape == (cfg.num_items,)
    assert world.affinity_matrix().shape == (cfg.num_users, cfg.num_items)

    assert list(world.users.columns) == ["user_id", "segment", "age", "region"]
    np.testing.assert_array_equal(world.users["user_id"], np.arange(cfg.num_users))
    assert world.users["user_id"].dtype == np.int64
    assert world.users["age"].dtype == np.float64
    assert world.users["segment"].str.fullmatch(r"s\d+").all()
    assert world.users["region"].nunique() > 1

    assert list(world.items.columns) == ["item_id", "genres", "price", "year", "title"]
    np.testing.assert_array_equal(world.items["item_id"], np.arange(cfg.num_items))
    assert world.items["price"].dtype == np.float64 and world.items["year"].dtype == np.int64
    assert world.items["genres"].str.fullmatch(r"g\d+(\|g\d+)*").all()
    assert world.items["title"].iloc[17] == f"Item 17 ({world.items['genres'].iloc[17]})"

    assert list(log.columns) == ["user_id", "item_id", "timestamp", "rating"]
    assert [log[c].dtype for c in log.columns] == [np.int64, np.int64, np.int64, np.float64]
    assert log["rating"].between(1, 5).all() and log["rating"].nunique() > 2
    assert log["user_id"].between(0, cfg.num_users - 1).all()
    assert log["item_id"].between(0, cfg.num_items - 1).all()


def test_log_invariants(world: SyntheticWorld, log: pd.DataFrame):
    cfg = world.config
    assert not log.duplicated(["user_id", "item_id"]).any()
    per_user = log.groupby("user_id").size()
    assert len(per_user) == cfg.num_users and per_user.min() >= cfg.min_per_user
    assert abs(per_user.mean() - cfg.interactions_per_user) < 1.0
    assert (log.groupby("user_id")["timestamp"].diff().dropna() > 0).all()
    span_years = (log["timestamp"].max() - log["timestamp"].min()) / (365 * 86_400)
    assert 2 < span_years < 10


def test_min_per_user_is_enforced_for_sparse_worlds():
    cfg = WorldConfig(num_users=50, num_items=40, interactions_per_user=0.5, min_per_user=5)
    log = SyntheticWorld.generate(cfg).sample_interactions()
    assert (log.groupby("user_id").size() == 5).all()
    assert not log.duplicated(["user_id", "item_id"]).any()


def test_unknown_config_key_is_an_error():
    with pytest.raises(ValidationError, match="num_user"):
        WorldConfig(num_user=10)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        WorldConfig(num_items=3)
    with pytest.raises(ValidationError, match="min_per_user"):
        WorldConfig(num_items=10, min_per_user=11)


def test_affinity_agrees_with_matrix_and_true_relevant(world: SyntheticWorld):
    matrix = world.affinity_matrix()
    u = np.array([0, 5, 5, 1999])
    i = np.array([3, 0, 999, 42])
    np.testing.assert_allclose(world.affinity(u, i), matrix[u, i], rtol=1e-10)
    top = world.true_relevant(10)
    assert top.shape == (world.config.num_users, 10)
    np.testing.assert_array_equal(top[:, 0], matrix.argmax(axis=1))
    scores = np.take_along_axis(matrix, top, axis=1)
    assert (np.diff(scores, axis=1) <= 0).all()
    assert (scores[:, -1] >= np.sort(matrix, axis=1)[:, -10]).all()


def test_true_ranking_recalls_held_out_far_better_than_popularity(world: SyntheticWorld, log: pd.DataFrame):
    held_out = world.sample_interactions(seed=123)
    popular = log["item_id"].value_counts().index[:10].to_numpy()  # popularity fitted on another sample
    relevant = world.true_relevant(10)
    n_users, n_items = world.config.num_users, world.config.num_items
    seen = np.zeros((n_users, n_items), dtype=bool)
    seen[held_out["user_id"], held_out["item_id"]] = True
    personal_hits = np.take_along_axis(seen, relevant, axis=1).sum(axis=1).mean()
    popular_hits = seen[:, popular].sum(axis=1).mean()
    assert personal_hits >= 2 * popular_hits > 0


def test_users_of_a_segment_are_closer_than_users_of_different_segments(world: SyntheticWorld):
    z = world.user_latent / np.linalg.norm(world.user_latent, axis=1, keepdims=True)
    sim = z @ z.T
    seg = world.users["segment"].to_numpy()
    same = seg[:, None] == seg[None, :]
    np.fill_diagonal(same, False)
    diff = seg[:, None] != seg[None, :]
    assert sim[same].mean() > sim[diff].mean() + 0.5


def test_side_features_carry_the_structure(world: SyntheticWorld, log: pd.DataFrame):
    # Within a segment, items of the segment's preferred genres dominate its interactions.
    genres = world.items["genres"].str.split("|")
    seg = world.users["segment"].to_numpy()[log["user_id"].to_numpy()]
    item_genres = genres.to_numpy()[log["item_id"].to_numpy()]
    preferred = {
        f"s{s}": {f"g{g}" for g in np.flatnonzero(row)} for s, row in enumerate(world.segment_genres)
    }
    liked = np.mean([bool(preferred[s] & set(g)) for s, g in zip(seg, item_genres, strict=True)])
    base = np.mean([bool(preferred[s] & set(g)) for s in preferred for g in genres])
    assert liked > base + 0.3


def test_describe_mentions_sizes(world: SyntheticWorld):
    text = world.describe()
    assert "2000 users" in text and "1000 items" in text and "%" in text


def test_a_negative_seed_is_refused_by_the_config():
    # It used to validate, then fail in numpy with "expected non-negative integer", naming no field.
    with pytest.raises(ValidationError, match="seed"):
        WorldConfig(seed=-1)
