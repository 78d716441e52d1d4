"""Known-answer tests for twotower.data.splits (stratified, random and temporal splits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twotower.data.splits import random_split, stratified_split, temporal_split

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k" / "u.data"


def stratified_frame() -> pd.DataFrame:
    """19 rows: item 1 once, item 2 twice, item 3 six times, item 4 ten times, interleaved.

    ``row`` identifies each input row; user = row % 4 gives users 0, 1, 2 five rows each, user 3 four.
    """
    items = [1] * 1 + [2] * 2 + [3] * 6 + [4] * 10
    order = sorted(range(19), key=lambda i: (i * 7) % 19)  # a fixed interleaving of the items
    item_id = [items[i] for i in order]
    return pd.DataFrame(
        {
            "user_id": [r % 4 for r in range(19)],
            "item_id": item_id,
            "rating": [1 + r % 5 for r in range(19)],
            "row": list(range(19)),
        }
    )


def rows(df: pd.DataFrame) -> list[int]:
    return df["row"].tolist()


def test_stratified_split_per_item_counts_half_even():
    df = stratified_frame()
    before = df.copy()
    train, test = stratified_split(df, ratio=0.75, filter_by="item", seed=42)
    pd.testing.assert_frame_equal(df, before)  # input untouched
    # round(0.75 * count), halves to even: 0.75 -> 1, 1.5 -> 2, 4.5 -> 4, 7.5 -> 8
    assert train["item_id"].value_counts().sort_index().to_dict() == {1: 1, 2: 2, 3: 4, 4: 8}
    assert test["item_id"].value_counts().sort_index().to_dict() == {3: 2, 4: 2}
    assert (len(train), len(test)) == (1 + 2 + 4 + 8, 0 + 0 + 2 + 2)
    assert not set(rows(train)) & set(rows(test))
    assert sorted(rows(train) + rows(test)) == list(range(19))
    assert list(train.columns) == list(df.columns) and list(test.columns) == list(df.columns)
    assert isinstance(train.index, pd.RangeIndex) and train.index[0] == 0
    # Within each item, train holds the rows with the smallest uniforms, one drawn per input row.
    u = np.random.RandomState(42).rand(19)
    for item, n_train in {1: 1, 2: 2, 3: 4, 4: 8}.items():
        positions = np.flatnonzero(df["item_id"].to_numpy() == item)
        chosen = positions[np.argsort(u[positions], kind="stable")[:n_train]]
        assert sorted(train.loc[train["item_id"] == item, "row"]) == sorted(chosen.tolist())
    # Output ordered by (item, uniform), as in Microsoft's implementation.
    assert train["item_id"].is_monotonic_increasing and test["item_id"].is_monotonic_increasing


def test_stratified_split_per_user_counts():
    df = stratified_frame()
    train, test = stratified_split(df, ratio=0.75, filter_by="user", seed=42)
    # users 0, 1, 2 have 5 rows (0.75 * 5 = 3.75 -> 4), user 3 has 4 (0.75 * 4 = 3.0 -> 3)
    assert train["user_id"].value_counts().sort_index().to_dict() == {0: 4, 1: 4, 2: 4, 3: 3}
    assert test["user_id"].value_counts().sort_index().to_dict() == {0: 1, 1: 1, 2: 1, 3: 1}
    assert sorted(rows(train) + rows(test)) == list(range(19))


def test_stratified_split_deterministic_by_seed():
    df = stratified_frame()
    a_train, a_test = stratified_split(df, seed=42)
    b_train, b_test = stratified_split(df, seed=42)
    pd.testing.assert_frame_equal(a_train, b_train)
    pd.testing.assert_frame_equal(a_test, b_test)
    others = [set(rows(stratified_split(df, seed=s)[1])) for s in (0, 1, 2, 3)]
    assert any(o != set(rows(a_test)) for o in others)  # the seed does drive the draw


def test_stratified_split_bad_arguments():
    df = stratified_frame()
    with pytest.raises(ValueError):
        stratified_split(df, ratio=1.0)
    with pytest.raises(ValueError):
        stratified_split(df, filter_by="rating")
    with pytest.raises(ValueError):
        stratified_split(df.drop(columns="item_id"))


def test_stratified_split_ml100k_reference_counts():
    if not ML100K.is_file():
        pytest.skip(f"MovieLens 100K not available at {ML100K}; the reference-count check needs u.data")
    df = pd.read_csv(ML100K, sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"])
    assert len(df) == 100_000
    train, test = stratified_split(df, ratio=0.75, filter_by="item", seed=42)
    assert (len(train), len(test)) == (75_066, 24_934)
    assert set(test["user_id"]) == set(df["user_id"])  # all 943 users have >= 1 test row
    assert test["user_id"].nunique() == 943
    both = pd.concat([train, test]).sort_values(["user_id", "item_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(both, df.sort_values(["user_id", "item_id"]).reset_index(drop=True))


def test_random_split_sizes_and_determinism():
    df = pd.DataFrame({"user_id": np.arange(100) % 7, "item_id": np.arange(100) % 13, "row": np.arange(100)})
    train, test = random_split(df, test_fraction=0.2, seed=42)
    assert (len(train), len(test)) == (80, 20)
    assert not set(rows(train)) & set(rows(test))
    assert sorted(rows(train) + rows(test)) == list(range(100))
    perm = np.random.default_rng(42).permutation(100)
    assert rows(train) == perm[:80].tolist() and rows(test) == perm[80:].tolist()
    again_train, again_test = random_split(df, test_fraction=0.2, seed=42)
    pd.testing.assert_frame_equal(train, again_train)
    pd.testing.assert_frame_equal(test, again_test)
    assert set(rows(random_split(df, seed=7)[1])) != set(rows(test))


def test_random_split_rounds_test_count_half_even():
    df = pd.DataFrame({"user_id": range(10), "item_id": range(10)})
    assert [len(x) for x in random_split(df, test_fraction=0.25)] == [10 - 2, 2]  # round(2.5) = 2
    assert [len(x) for x in random_split(df, test_fraction=0.35)] == [10 - 4, 4]  # round(3.5) = 4
    with pytest.raises(ValueError):
        random_split(df, test_fraction=0.0)


def temporal_frame() -> pd.DataFrame:
    # row: user, item, timestamp
    data = [
        (1, 10, 10),  # r0
        (2, 20, 5),  # r1
        (1, 11, 30),  # r2
        (3, 30, 1),  # r3
        (2, 21, 5),  # r4
        (1, 12, 20),  # r5
        (4, 40, 7),  # r6
        (2, 22, 5),  # r7  user 2: three equal timestamps -> input order decides
        (3, 31, 2),  # r8
        (1, 13, 40),  # r9
    ]
    df = pd.DataFrame(data, columns=["user_id", "item_id", "timestamp"])
    df["row"] = range(len(df))
    return df


def test_temporal_split_leave_last_out():
    df = temporal_frame()
    before = df.copy()
    train, valid, test = temporal_split(df)
    pd.testing.assert_frame_equal(df, before)
    # user 1 by time: r0 (10), r5 (20), r2 (30), r9 (40) -> test r9, valid r2, train r0, r5
    # user 2 all at t=5, input order r1, r4, r7 -> test r7, valid r4, train r1
    # user 3 (2 rows) and user 4 (1 row) stay entirely in train
    assert rows(train) == [0, 1, 3, 5, 6, 8]  # each output keeps input order
    assert rows(valid) == [2, 4]
    assert rows(test) == [7, 9]
    assert list(test.columns) == list(df.columns)
    assert isinstance(test.index, pd.RangeIndex) and test.index.tolist() == [0, 1]


def test_temporal_split_mixed_id_types_and_missing_column():
    df = pd.DataFrame(
        {"user_id": ["a", 1, "a", "a", 1], "item_id": [0, 1, 2, 3, 4], "timestamp": [1, 1, 2, 3, 2]}
    )
    train, valid, test = temporal_split(df)
    assert train["item_id"].tolist() == [0, 1, 4]
    assert valid["item_id"].tolist() == [2]
    assert test["item_id"].tolist() == [3]
    with pytest.raises(ValueError):
        temporal_split(df.drop(columns="timestamp"))
