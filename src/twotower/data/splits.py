"""Train / test splits of an interaction table, reproducing published evaluation protocols.

Every function takes a pandas DataFrame with columns ``user_id`` and ``item_id`` (raw ids, any
hashable type) plus optional ``timestamp`` and ``rating`` (and any other columns, carried along
untouched). It never modifies its input and returns new DataFrames holding the original columns
with a fresh ``RangeIndex``.

* :func:`stratified_split`: Microsoft Recommenders' ``python_stratified_split`` (random, per item or
  per user), the split behind its ML-100K benchmark.
* :func:`random_split`: the TensorFlow Recommenders tutorial's global 80/20 shuffle.
* :func:`temporal_split`: per-user leave-last-out (train / validation / test).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["random_split", "stratified_split", "temporal_split"]

USER, ITEM, TIMESTAMP = "user_id", "item_id", "timestamp"


def _check_columns(df: pd.DataFrame, *required: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"interaction frame lacks column(s) {missing}; has {list(df.columns)}")


def _take(df: pd.DataFrame, positions: np.ndarray) -> pd.DataFrame:
    """Rows at integer ``positions`` (in that order) as a new frame with a fresh RangeIndex."""
    return df.iloc[positions].reset_index(drop=True)


def stratified_split(
    df: pd.DataFrame, ratio: float = 0.75, filter_by: str = "item", seed: int = 42
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-group random split, identical to Microsoft Recommenders'
    ``python_stratified_split(data, ratio, min_rating=1, filter_by, seed)`` (``is_random=True``).

    Algorithm (g = ``item_id`` if ``filter_by == "item"`` else ``user_id``):

    1. draw ``u = RandomState(seed).rand(n)``, one uniform per row IN INPUT ORDER (the same stream
       as Microsoft's ``np.random.seed(seed); np.random.rand(n)``, without touching global state);
    2. sort rows by (g, u); within each group let ``count`` be its size and ``rank`` = 1, 2, ...;
    3. train = rows with ``rank <= round(ratio * count)``, test = the rest, where round is numpy's
       half-to-even rounding (count 1 -> 1 train row, 2 -> 2, 6 -> 4, 10 -> 8 at ratio 0.75).

    Because the uniforms are assigned in input order, the result depends on row order: pass
    MovieLens ``u.data`` as read from the file. On ML-100K with the defaults this gives 75,066 train
    and 24,934 test rows, and every one of the 943 users has at least one test row.

    Note: recent Microsoft Recommenders releases replaced step 3 by ``rank / count <= ratio``
    (74,331 / 25,669 on ML-100K); this function follows the rounding rule of the published benchmark.

    Returns:
        (train, test), each ordered like Microsoft's output: by (g, u).
    """
    if filter_by not in ("item", "user"):
        raise ValueError(f"filter_by must be 'item' or 'user', got {filter_by!r}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must lie in (0, 1), got {ratio}")
    _check_columns(df, USER, ITEM)
    group = ITEM if filter_by == "item" else USER
    n = len(df)
    order = pd.DataFrame(
        {"g": df[group].to_numpy(), "u": np.random.RandomState(seed).rand(n), "pos": np.arange(n)}
    )
    # Multi-column sort_values is a stable lexsort, as in Microsoft's code; draws practically never
    # tie, and if they did both implementations would fall back to input order.
    order = order.sort_values(["g", "u"], kind="stable")
    groups = order.groupby("g", sort=False)
    count = groups["g"].transform("size").to_numpy()
    rank = groups.cumcount().to_numpy() + 1
    # np.round rounds halves to even, exactly like pandas' Series.round used by Microsoft's round().
    in_train = rank <= np.round(ratio * count)
    pos = order["pos"].to_numpy()
    return _take(df, pos[in_train]), _take(df, pos[~in_train])


def random_split(
    df: pd.DataFrame, test_fraction: float = 0.2, seed: int = 42
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Global random split, the TensorFlow Recommenders retrieval-tutorial protocol.

    Rows are shuffled with ``np.random.default_rng(seed).permutation(n)``; the first
    ``n_train = n - round(test_fraction * n)`` shuffled rows are train, the remaining ones test
    (80,000 / 20,000 for ML-100K at the default 0.2). Both keep the shuffled order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n = len(df)
    perm = np.random.default_rng(seed).permutation(n)
    # Python's round (half to even) on the test count, so 0.2 of 100,000 is exactly 20,000 rows.
    n_train = n - round(test_fraction * n)
    return _take(df, perm[:n_train]), _take(df, perm[n_train:])


def temporal_split(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per-user leave-last-out split: (train, valid, test).

    Each user's interactions are ordered by ``timestamp``, ties broken by input row order (stable
    sort). The last one goes to test, the second to last to valid, all earlier ones to train.
    Users with fewer than 3 interactions keep ALL of them in train: holding one out would leave a
    user with at most one training interaction (or none), which cannot be evaluated meaningfully.
    Each output keeps the input's row order.
    """
    _check_columns(df, USER, ITEM, TIMESTAMP)
    n = len(df)
    # factorize: raw ids need only be hashable, not mutually orderable (e.g. mixed int / str).
    user_code = pd.factorize(df[USER])[0]
    order = pd.DataFrame({"u": user_code, "t": df[TIMESTAMP].to_numpy(), "pos": np.arange(n)})
    order = order.sort_values(["u", "t"], kind="stable")  # stable: equal times keep input order
    groups = order.groupby("u", sort=False)
    # from_end = 0 for a user's last interaction, 1 for the second to last, ...
    from_end = groups.cumcount(ascending=False).to_numpy()
    eligible = groups["u"].transform("size").to_numpy() >= 3
    label = np.zeros(n, dtype=np.int8)  # 0 train, 1 valid, 2 test, indexed by input position
    pos = order["pos"].to_numpy()
    label[pos[eligible & (from_end == 0)]] = 2
    label[pos[eligible & (from_end == 1)]] = 1
    return tuple(_take(df, np.flatnonzero(label == v)) for v in (0, 1, 2))  # type: ignore[return-value]
