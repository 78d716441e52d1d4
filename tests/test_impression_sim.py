"""Simulated impression logs: the planted position-biased click model, which items are shown and where,
taste vs affinity relevance, seeding, and the schema `read_impressions` reads.

The retriever is a stand-in with chosen embeddings (the simulator reads only its embeddings and id
arrays), so each user's top candidates are known without training a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from twotower.data.impression_sim import DEFAULT_ETA, examination, simulate_impressions
from twotower.data.impressions import ImpressionColumns, read_impressions
from twotower.data.synthetic import SyntheticWorld, WorldConfig

COLUMNS = ["request_id", "item_id", "position", "click", "user_id", "device", "true_affinity"]


@dataclass
class FixedModel:
    users: torch.Tensor
    items: torch.Tensor

    def user_embeddings(self) -> torch.Tensor:
        return self.users

    def item_embeddings(self) -> torch.Tensor:
        return self.items


@dataclass
class FixedRetriever:
    """What `simulate_impressions` reads of a `Retriever`: embeddings by catalogue index, raw ids."""

    model: FixedModel
    user_ids: np.ndarray
    item_ids: np.ndarray


def _retriever(users, items, user_ids=None, item_ids=None) -> FixedRetriever:
    users, items = np.asarray(users, dtype=np.float32), np.asarray(items, dtype=np.float32)
    return FixedRetriever(
        FixedModel(torch.from_numpy(users), torch.from_numpy(items)),
        np.arange(len(users)) if user_ids is None else np.asarray(user_ids),
        np.arange(len(items)) if item_ids is None else np.asarray(item_ids),
    )


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld.generate(WorldConfig(num_users=40, num_items=30, seed=3))


def _world_retriever(world: SyntheticWorld) -> FixedRetriever:
    """Retrieval by the world's own latents: the top candidates are the user's best <u, i>."""
    return _retriever(world.user_latent, world.item_latent)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def test_examination_is_one_over_position_to_the_eta() -> None:
    assert examination(np.array([1, 2, 4]), 1.0) == pytest.approx([1.0, 0.5, 0.25])
    assert examination(np.array([1, 2, 4]), 2.0) == pytest.approx([1.0, 0.25, 0.0625])
    assert examination(np.array([1, 3, 10]), 0.0) == pytest.approx([1.0, 1.0, 1.0])
    assert DEFAULT_ETA == {"desktop": 1.0, "mobile": 2.0}


def test_click_rate_over_the_relevance_term_follows_the_planted_examination_curve(world) -> None:
    shown, offset = 5, -1.0
    log = simulate_impressions(_world_retriever(world), world, 20_000, seed=0, shown=shown, candidates=10,
                               offset=offset)  # fmt: skip
    # The relevance term, recomputed from the world rather than read from the log.
    sig = _sigmoid(world.affinity(log["user_id"].to_numpy(), log["item_id"].to_numpy()) - offset)
    clicks = log["click"].to_numpy()
    for device, eta in DEFAULT_ETA.items():
        for position in range(1, shown + 1):
            cell = (log["device"] == device).to_numpy() & (log["position"] == position).to_numpy()
            expected = (1.0 / position) ** eta
            # Clicks in a cell are independent Bernoulli(q) with q = expected * sig, so
            # sum(clicks) / sum(sig) estimates `expected` with standard error sqrt(sum q(1-q)) / sum(sig).
            # About 10,000 requests per device give an SE of 0.002-0.005 here; 4 SE leaves a false
            # failure chance of about 6e-5 per cell (normal approximation: sum(q) >= 370 in every cell).
            q = expected * sig[cell]
            se = np.sqrt(np.sum(q * (1 - q))) / sig[cell].sum()
            ratio = clicks[cell].sum() / sig[cell].sum()
            assert abs(ratio - expected) < 4 * se, (device, position, ratio, expected, se)
            other = (1.0 / position) ** (3.0 - eta)  # the other device's curve: eta 1 <-> 2
            if position > 1:  # the test can tell the two curves apart
                assert abs(ratio - other) > 8 * se, (device, position)


def test_devices_are_the_eta_keys_drawn_uniformly_and_constant_within_a_request(world) -> None:
    eta = {"tv": 0.5, "watch": 3.0, "car": 1.0}
    requests = 9000
    log = simulate_impressions(_world_retriever(world), world, requests, seed=1, shown=3, eta=eta)
    per_request = log.groupby("request_id")["device"]
    assert (per_request.nunique() == 1).all()
    share = per_request.first().value_counts(normalize=True)
    assert set(share.index) == set(eta)
    # Binomial(9000, 1/3): SE of a share is sqrt(1/3 * 2/3 / 9000) = 0.005; 4 SE = 0.02.
    assert np.allclose(share.to_numpy(), 1 / 3, atol=0.02), share


def test_eta_zero_and_a_huge_negative_offset_click_everything_a_huge_offset_nothing(world) -> None:
    retriever = _world_retriever(world)
    # p = 1 ** 0 * sigmoid(truth + 60) is 1.0 in float64 and a uniform draw is < 1: every item clicked.
    every = simulate_impressions(retriever, world, 200, shown=4, eta={"flat": 0.0}, offset=-60.0)
    assert (every["click"] == 1).all() and (every["device"] == "flat").all()
    # p = sigmoid(truth - 60) < 1e-23: no click in 800 draws.
    none = simulate_impressions(retriever, world, 200, shown=4, eta={"flat": 0.0}, offset=60.0)
    assert (none["click"] == 0).all()


def test_shown_items_are_distinct_top_candidates_at_positions_one_to_shown(world) -> None:
    # Raw ids differ from catalogue indices (reversed), as in a real run's id arrays.
    n_users, n_items = len(world.user_latent), len(world.item_latent)
    retriever = _retriever(world.user_latent, world.item_latent, np.arange(n_users)[::-1],
                           np.arange(n_items)[::-1])  # fmt: skip
    shown, candidates, requests = 4, 7, 3000
    log = simulate_impressions(retriever, world, requests, seed=2, shown=shown, candidates=candidates)
    assert len(log) == requests * shown
    assert log["request_id"].tolist() == np.repeat(np.arange(requests), shown).tolist()
    assert log["position"].tolist() == [1, 2, 3, 4] * requests
    scores = world.user_latent @ world.item_latent.T  # retrieval scores, by catalogue index
    top = np.argsort(-scores, axis=1)[:, :candidates]
    users = log["user_id"].to_numpy().reshape(requests, shown)
    items = log["item_id"].to_numpy().reshape(requests, shown)
    assert (users == users[:, :1]).all()
    assert all(len(set(row)) == shown for row in items.tolist())
    # The user's top candidates as raw ids (raw id = n - 1 - catalogue index here).
    allowed = {n_users - 1 - u: {n_items - 1 - i for i in top[u]} for u in range(n_users)}
    seen: dict[int, set[int]] = {}
    for user, row in zip(users[:, 0].tolist(), items.tolist(), strict=True):
        assert set(row) <= allowed[user], (user, row, allowed[user])
        seen.setdefault(user, set()).update(row)
    # Shown items are drawn among all the top candidates, not just the best `shown` of them: with
    # ~75 requests a user, a candidate left out of every one has chance (3/7) ** 75 ~ 1e-28.
    assert seen == allowed


def test_taste_drops_the_popularity_term_of_the_true_logit() -> None:
    # Hand-set truth: world rows 7 and 3 are the run's users 0 and 1; raw item ids 2, 0, 1.
    world = SyntheticWorld.generate(WorldConfig(num_users=10, num_items=10, seed=0))
    user_latent = np.zeros((10, 2))
    user_latent[7], user_latent[3] = [1.0, 0.0], [0.0, 1.0]
    item_latent = np.zeros((10, 2))
    item_latent[:3] = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    pop = np.zeros(10)
    pop[:3] = [0.7, -0.2, -0.5]
    world = dataclasses.replace(world, user_latent=user_latent, item_latent=item_latent,
                                item_popularity_logit=pop)  # fmt: skip
    assert world.config.affinity_strength == 3.0 and world.config.popularity_strength == 1.0
    retriever = _retriever(user_latent[[7, 3]], item_latent[[2, 0, 1]], [7, 3], [2, 0, 1])
    # taste = 3 <u, i>; affinity = taste + pop[i], for (user, item) in raw ids.
    taste = {(7, 0): 3.0, (7, 1): 0.0, (7, 2): 1.5, (3, 0): 0.0, (3, 1): 3.0, (3, 2): 1.5}
    affinity = {(7, 0): 3.7, (7, 1): -0.2, (7, 2): 1.0, (3, 0): 0.7, (3, 1): 2.8, (3, 2): 1.0}
    for relevance, truth in (("taste", taste), ("affinity", affinity)):
        log = simulate_impressions(retriever, world, 40, seed=0, shown=3, candidates=3, relevance=relevance)
        assert set(log["user_id"]) == {3, 7} and set(log["item_id"]) == {0, 1, 2}
        for user, item, value in log[["user_id", "item_id", "true_affinity"]].itertuples(index=False):
            assert value == pytest.approx(truth[user, item]), (relevance, user, item)


def test_relevance_and_slate_size_are_validated(world) -> None:
    retriever = _world_retriever(world)
    with pytest.raises(ValueError, match="relevance must be 'affinity' or 'taste'"):
        simulate_impressions(retriever, world, 10, relevance="popularity")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shown=11 exceeds candidates=10"):
        simulate_impressions(retriever, world, 10, shown=11, candidates=10)


def test_a_seed_fixes_the_log_and_another_seed_changes_it(world) -> None:
    retriever = _world_retriever(world)
    first = simulate_impressions(retriever, world, 500, seed=4)
    pd.testing.assert_frame_equal(first, simulate_impressions(retriever, world, 500, seed=4))
    other = simulate_impressions(retriever, world, 500, seed=5)
    for column in ("user_id", "item_id", "click", "device"):
        assert (first[column] != other[column]).any(), column


def test_the_log_has_the_schema_read_impressions_reads_and_round_trips(world, tmp_path) -> None:
    log = simulate_impressions(_world_retriever(world), world, 300, seed=6, shown=6)
    assert list(log.columns) == COLUMNS
    numeric = dict(zip(COLUMNS, ["int64", "int64", "int64", "int8", "int64", None, "float64"], strict=True))
    assert {c: str(log[c].dtype) for c in COLUMNS if numeric[c]} == {c: t for c, t in numeric.items() if t}
    assert pd.api.types.is_string_dtype(log["device"])
    assert set(log["click"].unique()) <= {0, 1}
    logged = log.drop(columns="true_affinity")
    columns = ImpressionColumns(user="user_id", context=["device"])
    for path in (tmp_path / "log.parquet", tmp_path / "log.csv"):
        if path.suffix == ".csv":
            logged.to_csv(path, index=False)
        else:
            logged.to_parquet(path, index=False)
        read = read_impressions(path, columns)  # raises on any bad row
        assert read.skipped == 0
        pd.testing.assert_frame_equal(read.frame, logged)
    lists = read.to_lists()
    assert lists.items.shape == (300, 6) and lists.mask.all()
    assert lists.clicks.sum() == log["click"].sum()


def test_catalogue_size_and_negative_eta_are_validated(world) -> None:
    retriever = _retriever(np.ones((2, 2)), np.eye(2)[[0, 1, 0, 1, 0]])  # a run with 5 items
    # torch.topk used to fail with "selected index k out of range".
    with pytest.raises(ValueError, match=r"candidates=6 exceeds the catalogue \(5 items\)"):
        simulate_impressions(retriever, world, 3, shown=2, candidates=6)
    # A negative eta made (1 / position) ** eta exceed 1 at every rank past the first.
    with pytest.raises(ValueError, match="eta must be >= 0"):
        simulate_impressions(retriever, world, 3, shown=2, candidates=5, eta={"tv": -1.0})


def test_requests_must_be_positive(world) -> None:
    retriever = _retriever(np.ones((2, 2)), np.eye(2)[[0, 1, 0, 1, 0]])
    with pytest.raises(ValueError, match="requests must be >= 1"):
        simulate_impressions(retriever, world, 0, shown=2, candidates=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # shown=0 used to return an empty log, and shown=-2 fail with numpy's "negative dimensions".
        ({"shown": 0}, "shown must be >= 1, got 0"),
        ({"shown": -2}, "shown must be >= 1, got -2"),
        # An empty device map used to fall back to DEFAULT_ETA silently.
        ({"eta": {}}, "eta must name at least one device"),
        # A NaN eta passed the `< 0` check and made every examination NaN: a log without a click.
        ({"eta": {"tv": float("nan")}}, "eta must be >= 0"),
    ],
)
def test_slate_size_and_device_curves_are_validated_with_clear_errors(world, kwargs, message) -> None:
    retriever = _retriever(np.ones((2, 2)), np.eye(2)[[0, 1, 0, 1, 0]])  # a run with 5 items
    with pytest.raises(ValueError, match=message):
        simulate_impressions(retriever, world, 3, **{"shown": 2, "candidates": 5, **kwargs})
