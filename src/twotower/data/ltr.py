"""Queries with graded documents: the ground truth of semi-synthetic unbiased-learning-to-rank runs.

A :class:`RankingData` is the flat layout LTR data sets use: document rows ``features[D, F]`` and
graded labels ``labels[D]`` (``0 .. max_label``), grouped by query through ``query_offsets[Q + 1]``
(the documents of query ``q`` are rows ``offsets[q]:offsets[q + 1]``). ``item_index[D]`` optionally
names each document's catalogue item, for an id embedding in the relevance tower.

Three sources build one:

* :func:`from_letor`: any LETOR/svmlight file (MSLR-WEB10K/30K, Yahoo, MQ2007/2008, Istella), its
  features passed through ``sign(x) log(1 + |x|)`` (they are heavy-tailed counts), its documents
  shuffled within each query (seeded);
* :func:`from_synthetic_world`: users as queries; each gets ``candidates`` items (half drawn from its
  own preference distribution, half uniformly), labelled by cutting the true logit at global quantiles
  (``label_shares``: by default 50/25/15/7/3 % for labels 0-4, like MSLR). Features: the user's
  segment, region and age and the item's genres, price and year; the item id is its ``item_index``;
* :func:`from_movielens`: users as queries, the movies they rated as documents, ``rating - 1`` as the
  graded label (0-4); features: age, gender, occupation, genres, year; the movie id as ``item_index``.

Features are standardised later with statistics of the training queries only (:meth:`RankingData.
standardized`), so that nothing about held-out queries leaks into training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from twotower.data.synthetic import REGIONS, SyntheticWorld

if TYPE_CHECKING:
    from twotower.data.letor import LetorData
    from twotower.data.movielens import MovieLensData

__all__ = ["RankingData", "from_letor", "from_movielens", "from_synthetic_world"]


@dataclass
class RankingData:
    name: str
    features: np.ndarray  # float32 [D, F]
    labels: np.ndarray  # int64 [D], graded 0 .. max_label
    query_offsets: np.ndarray  # int64 [Q + 1]
    max_label: int
    feature_names: list[str]
    item_index: np.ndarray | None = None  # int64 [D] in 0 .. num_items - 1, or None
    num_items: int = 0

    def __post_init__(self) -> None:
        d = len(self.labels)
        if d == 0:  # labels.min() below would fail with numpy's "zero-size array" message
            raise ValueError(f"{self.name}: no documents")
        if self.features.shape[0] != d or self.query_offsets[-1] != d or self.query_offsets[0] != 0:
            raise ValueError("features, labels and query_offsets disagree on the number of documents")
        if np.any(np.diff(self.query_offsets) < 1):
            raise ValueError("every query needs at least one document")
        if self.labels.min() < 0 or self.labels.max() > self.max_label:
            raise ValueError(f"labels must lie in 0..{self.max_label}")

    @property
    def num_queries(self) -> int:
        return len(self.query_offsets) - 1

    @property
    def num_features(self) -> int:
        return self.features.shape[1]

    @property
    def doc_query(self) -> np.ndarray:
        """[D] the query index of every document."""
        return np.repeat(np.arange(self.num_queries), np.diff(self.query_offsets))

    def subset(self, queries: np.ndarray) -> RankingData:
        """The given queries (in the given order), their documents renumbered."""
        queries = np.asarray(queries, dtype=np.int64)
        starts, ends = self.query_offsets[queries], self.query_offsets[queries + 1]
        rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])
        offsets = np.r_[0, np.cumsum(ends - starts)].astype(np.int64)
        item = self.item_index[rows] if self.item_index is not None else None
        return replace(self, features=self.features[rows], labels=self.labels[rows], query_offsets=offsets,
                       item_index=item)  # fmt: skip

    def split(self, test_share: float, seed: int) -> tuple[RankingData, RankingData]:
        """A random split of the queries: (train, test)."""
        if self.num_queries < 2 or not 0.0 < test_share < 1.0:
            raise ValueError(
                f"{self.name}: a train/test split needs >= 2 queries and 0 < test_share < 1, "
                f"got {self.num_queries} queries and test_share={test_share}"
            )
        order = np.random.default_rng([seed, 11]).permutation(self.num_queries)
        n_test = min(max(1, round(test_share * self.num_queries)), self.num_queries - 1)
        return self.subset(np.sort(order[n_test:])), self.subset(np.sort(order[:n_test]))

    def feature_stats(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.features.mean(axis=0)
        std = self.features.std(axis=0)
        return mean, np.where(std > 1e-8, std, 1.0)  # constant features stay constant (0)

    def standardized(self, mean: np.ndarray, std: np.ndarray) -> RankingData:
        return replace(self, features=((self.features - mean) / std).astype(np.float32))


def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def from_letor(
    data: LetorData, max_label: int | None = None, log_transform: bool = True, seed: int = 0
) -> RankingData:
    if len(data.labels) == 0:
        raise ValueError(f"{data.path}: no documents")
    offsets = data.query_offsets.astype(np.int64)
    # Shuffle the documents within each query, as from_movielens does: LETOR files are often in a
    # meaningful order (by label, by a baseline's score), and both evaluation and the logging
    # policy's top N break score ties by document order, so file order would leak into them.
    doc_query = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    order = np.lexsort((np.random.default_rng([seed, 14]).random(len(doc_query)), doc_query))
    labels = data.labels.astype(np.int64)[order]
    feats = data.features.astype(np.float32)[order]
    return RankingData(
        name=data.path.name,
        features=_signed_log(feats).astype(np.float32) if log_transform else feats,
        labels=labels,
        query_offsets=offsets,
        # At least 1: a file whose labels are all 0 would give 2^0 - 1 = 0 in the click mapping's
        # denominator (from_impressions does the same).
        max_label=max(1, int(labels.max())) if max_label is None else max_label,
        feature_names=[f"f{j + 1}" for j in range(feats.shape[1])],
    )


def _one_hot(values: pd.Series | np.ndarray, categories: list) -> np.ndarray:
    index = {c: j for j, c in enumerate(categories)}
    out = np.zeros((len(values), len(categories)), dtype=np.float32)
    out[np.arange(len(values)), [index[v] for v in values]] = 1.0
    return out


def _multi_hot(joined: pd.Series, categories: list[str]) -> np.ndarray:
    index = {c: j for j, c in enumerate(categories)}
    out = np.zeros((len(joined), len(categories)), dtype=np.float32)
    for row, text in enumerate(joined):
        for name in filter(None, str(text).split("|")):
            out[row, index[name]] = 1.0
    return out


def from_synthetic_world(
    world: SyntheticWorld,
    candidates: int = 40,
    label_shares: tuple[float, ...] = (0.50, 0.25, 0.15, 0.07, 0.03),
    seed: int = 0,
) -> RankingData:
    cfg = world.config
    n_u, n_i = cfg.num_users, cfg.num_items
    if candidates > n_i:
        raise ValueError(f"candidates={candidates} exceeds the catalogue ({n_i} items)")
    # Cut points are cumulative shares: shares that do not sum to 1 would silently resize the top label.
    if min(label_shares, default=0.0) <= 0 or abs(sum(label_shares) - 1.0) > 1e-6:
        raise ValueError(f"label_shares must be positive and sum to 1, got {label_shares}")
    rng = np.random.default_rng([cfg.seed, seed, 12])
    preferred = candidates // 2
    docs = np.empty((n_u, candidates), dtype=np.int64)
    for u in range(n_u):
        logits = world.affinity(np.full(n_i, u), np.arange(n_i))
        mine = np.argsort(-(logits + rng.gumbel(size=n_i)))[:preferred]  # Gumbel-top-k from its softmax
        rest = np.setdiff1d(np.arange(n_i), mine)
        docs[u] = rng.permutation(np.r_[mine, rng.choice(rest, candidates - preferred, replace=False)])
    users = np.repeat(np.arange(n_u), candidates)
    items = docs.ravel()
    truth = world.affinity(users, items)
    cuts = np.quantile(truth, np.cumsum(label_shares)[:-1])
    labels = np.searchsorted(cuts, truth, side="right").astype(np.int64)

    u, i = world.users.iloc[users], world.items.iloc[items]
    segments = sorted(world.users["segment"].unique(), key=lambda s: int(s[1:]))
    genres = [f"g{g}" for g in range(cfg.num_genres)]
    features = np.concatenate(
        [_one_hot(u["segment"].to_numpy(), segments), _one_hot(u["region"].to_numpy(), list(REGIONS)),
         u[["age"]].to_numpy(np.float32), _multi_hot(i["genres"], genres),
         np.log(i[["price"]].to_numpy(np.float32)), i[["year"]].to_numpy(np.float32)],
        axis=1,
    )  # fmt: skip
    names = [f"segment={s}" for s in segments] + [f"region={r}" for r in REGIONS] + ["age"]
    names += [f"genre={g}" for g in genres] + ["log_price", "year"]
    return RankingData(
        name=f"synthetic-{n_u}x{n_i}", features=features, labels=labels,
        query_offsets=np.arange(0, n_u * candidates + 1, candidates, dtype=np.int64),
        max_label=len(label_shares) - 1, feature_names=names, item_index=items, num_items=n_i,
    )  # fmt: skip


def from_movielens(data: MovieLensData, seed: int = 0) -> RankingData:
    if data.users is None:
        raise ValueError(f"{data.name} has no user table; the ranking features need one")
    rng = np.random.default_rng([seed, 13])
    # Shuffle the documents within each query: file order must carry no information, because
    # evaluation breaks score ties by document order.
    frame = data.interactions.assign(_r=rng.random(len(data.interactions)))
    frame = frame.sort_values(["user_id", "_r"]).reset_index(drop=True)
    users = data.users.set_index("user_id").loc[frame["user_id"]]
    items = data.items.set_index("item_id").loc[frame["item_id"]]
    genres = sorted({g for text in data.items["genres"] for g in str(text).split("|") if g})
    occupations = sorted(data.users["occupation"].unique())
    year = items["year"].to_numpy(np.float32)
    year = np.where(np.isnan(year), np.nanmedian(year), year)[:, None]
    features = np.concatenate(
        [users[["age"]].to_numpy(np.float32), (users[["gender"]].to_numpy() == "F").astype(np.float32),
         _one_hot(users["occupation"].to_numpy(), occupations), _multi_hot(items["genres"], genres), year],
        axis=1,
    )  # fmt: skip
    names = ["age", "female"] + [f"occupation={o}" for o in occupations]
    names += [f"genre={g}" for g in genres] + ["year"]
    item_codes, item_ids = pd.factorize(frame["item_id"], sort=True)
    counts = frame.groupby("user_id", sort=True).size().to_numpy()
    return RankingData(
        name=data.name, features=features.astype(np.float32),
        labels=(frame["rating"].to_numpy() - 1).astype(np.int64),
        query_offsets=np.r_[0, np.cumsum(counts)].astype(np.int64), max_label=4, feature_names=names,
        item_index=item_codes.astype(np.int64), num_items=len(item_ids),
    )  # fmt: skip
