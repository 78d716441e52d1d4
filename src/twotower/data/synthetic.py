"""A synthetic recommendation world with a planted, known structure.

The generative story (all draws from ``numpy.random.default_rng``, deterministic given the seed):

* ``num_genres`` genre vectors: orthonormal when ``num_genres <= latent_dim``, else random unit vectors;
* ``num_segments`` user segments; each prefers a few genres and its centroid is the sum of their
  vectors; each user belongs to one segment and its latent is the centroid plus Gaussian noise;
* each item has 1-3 genres; its latent is the normalised mean of their vectors plus Gaussian noise
  (``noise`` is the per-coordinate std of both deviations), so an item of one preferred genre has
  ``<u, i>`` near 1 and an unrelated one near 0;
* item popularity is Zipf-like and independent of the latents: ``-log(rank + num_items / 50)`` of a
  random rank, centred, so ``softmax(popularity_strength * pop)`` is a Zipf-Mandelbrot law of exponent
  ``popularity_strength`` (the offset flattens the very head: by default the top 1% of items draw
  ~10% of interactions, not 35%);
* the true logit of a pair is ``affinity_strength * <u, i> + popularity_strength * pop[i]``; each user
  draws ``max(min_per_user, Poisson(interactions_per_user))`` distinct items from the softmax of its
  logits (Gumbel-top-k), so a popularity ranking is a meaningfully weaker baseline than a personal one.

Ids are 0-based and equal to the row index: ``user_id == u`` is row ``u`` of ``user_latent`` and
``item_id == i`` row ``i`` of ``item_latent``. Segment and genre names are ``"s0"``, ``"g0"``...; the
side features (segment, region, age of users; genres of items) are predictive of the latents.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["SyntheticWorld", "WorldConfig"]

REGIONS = ("north", "south", "east", "west", "central")
T_START = 1_420_070_400  # 2015-01-01 UTC
T_SPAN = 5 * 365 * 86_400  # five years
_CHUNK_CELLS = 4_000_000  # cells of a [users, items] block materialised at once


class WorldConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_users: int = Field(2000, ge=10)
    num_items: int = Field(1000, ge=10)
    num_segments: int = Field(8, ge=1, description="user clusters; each segment prefers a few genres")
    num_genres: int = Field(12, ge=1)
    latent_dim: int = Field(16, ge=1)
    interactions_per_user: float = Field(25.0, gt=0, description="mean of the per-user Poisson count")
    min_per_user: int = Field(5, ge=1, description="every user has at least this many interactions")
    popularity_strength: float = Field(1.0, ge=0, description="weight of the Zipf popularity logit")
    affinity_strength: float = Field(3.0, ge=0, description="weight of the user-item latent affinity")
    noise: float = Field(0.1, ge=0, description="per-coordinate std of user/item latent deviations")
    seed: int = Field(0, ge=0, description="numpy takes no negative seed")

    @model_validator(mode="after")
    def _enough_items(self) -> WorldConfig:
        if self.min_per_user > self.num_items:
            raise ValueError(f"min_per_user={self.min_per_user} exceeds num_items={self.num_items}")
        return self


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class SyntheticWorld:
    """The generated world: side-feature tables plus the latent truth behind them (see module doc)."""

    config: WorldConfig
    users: pd.DataFrame  # user_id, segment, age, region
    items: pd.DataFrame  # item_id, genres, price, year, title
    user_latent: np.ndarray  # [U, d]
    item_latent: np.ndarray  # [I, d]
    item_popularity_logit: np.ndarray  # [I], centred -log(popularity rank + num_items / 50)
    user_segment: np.ndarray  # [U] int segment index
    item_genres: np.ndarray  # [I, G] bool multi-hot
    segment_genres: np.ndarray  # [S, G] bool: the genres each segment prefers
    genre_latent: np.ndarray  # [G, d] unit vectors

    @classmethod
    def generate(cls, config: WorldConfig | None = None) -> SyntheticWorld:
        cfg = config or WorldConfig()
        rng = np.random.default_rng([cfg.seed, 0])
        n_u, n_i, n_s, n_g, d = cfg.num_users, cfg.num_items, cfg.num_segments, cfg.num_genres, cfg.latent_dim

        if n_g <= d:  # orthonormal genres: unrelated genres score exactly 0
            genre_latent = np.linalg.qr(rng.normal(size=(d, n_g)))[0].T
        else:
            genre_latent = _unit(rng.normal(size=(n_g, d)))
        # Segment s prefers k consecutive genres of a shuffled cycle, so every genre is liked by someone.
        # Its centroid is the plain sum (norm ~sqrt(k)): each preferred genre scores ~1 on its own.
        k = min(n_g, math.ceil(n_g / n_s) + 1)
        cycle = rng.permutation(n_g)
        segment_genres = np.zeros((n_s, n_g), dtype=bool)
        for s in range(n_s):
            segment_genres[s, cycle[(s * k + np.arange(k)) % n_g]] = True
        centroids = segment_genres @ genre_latent

        user_segment = rng.integers(0, n_s, size=n_u)
        user_latent = centroids[user_segment] + cfg.noise * rng.normal(size=(n_u, d))

        n_genres = np.minimum(1 + rng.binomial(2, 0.35, size=n_i), n_g)
        order = np.argsort(rng.random((n_i, n_g)), axis=1)  # a random genre permutation per item
        item_genres = np.zeros((n_i, n_g), dtype=bool)
        np.put_along_axis(item_genres, order, np.arange(n_g)[None, :] < n_genres[:, None], axis=1)
        item_latent = _unit(item_genres @ genre_latent) + cfg.noise * rng.normal(size=(n_i, d))

        rank = rng.permutation(n_i) + 1
        pop = -np.log(rank + n_i / 50)
        pop = pop - pop.mean()

        # Side features: age and region depend on the segment; price and year are plain noise.
        seg_age = rng.uniform(20, 60, size=n_s)
        age = np.clip(seg_age[user_segment] + rng.normal(0, 8, size=n_u), 16, 80).round(1)
        seg_region = rng.integers(0, len(REGIONS), size=n_s)
        region_idx = np.where(
            rng.random(n_u) < 0.6, seg_region[user_segment], rng.integers(0, len(REGIONS), size=n_u)
        )
        users = pd.DataFrame(
            {
                "user_id": np.arange(n_u, dtype=np.int64),
                "segment": [f"s{s}" for s in user_segment],
                "age": age.astype(np.float64),
                "region": np.asarray(REGIONS, dtype=object)[region_idx],
            }
        )
        names = np.array([f"g{g}" for g in range(n_g)], dtype=object)
        genre_str = ["|".join(names[row]) for row in item_genres]
        items = pd.DataFrame(
            {
                "item_id": np.arange(n_i, dtype=np.int64),
                "genres": genre_str,
                "price": np.round(np.exp(rng.normal(2.5, 0.6, size=n_i)), 2),
                "year": rng.integers(1970, 2025, size=n_i).astype(np.int64),
                "title": [f"Item {i} ({g})" for i, g in enumerate(genre_str)],
            }
        )
        return cls(
            cfg, users, items, user_latent, item_latent, pop, user_segment, item_genres, segment_genres,
            genre_latent,
        )  # fmt: skip

    # ----------------------------------------------------------------------------------- truth
    def affinity(self, user_index: np.ndarray, item_index: np.ndarray) -> np.ndarray:
        """True logit of (user, item) index pairs (broadcast elementwise)."""
        u = self.user_latent[np.asarray(user_index)]
        i = self.item_latent[np.asarray(item_index)]
        return (
            self.config.affinity_strength * np.sum(u * i, axis=-1)
            + self.config.popularity_strength * self.item_popularity_logit[np.asarray(item_index)]
        )

    def taste(self, user_index: np.ndarray, item_index: np.ndarray) -> np.ndarray:
        """The taste part of the true logit, ``affinity_strength * <u, i>`` (no popularity term)."""
        u = self.user_latent[np.asarray(user_index)]
        i = self.item_latent[np.asarray(item_index)]
        return self.config.affinity_strength * np.sum(u * i, axis=-1)

    def _logits(self, rows: slice) -> np.ndarray:
        cfg = self.config
        return (cfg.affinity_strength * self.user_latent[rows]) @ self.item_latent.T + (
            cfg.popularity_strength * self.item_popularity_logit
        )[None, :]

    def _chunks(self) -> Iterator[slice]:
        step = max(1, _CHUNK_CELLS // self.config.num_items)
        for start in range(0, self.config.num_users, step):
            yield slice(start, min(start + step, self.config.num_users))

    def affinity_matrix(self) -> np.ndarray:
        """[U, I] true logits: ``affinity_strength * <u, i> + popularity_strength * pop``."""
        return self._logits(slice(None))

    def true_relevant(self, k: int) -> np.ndarray:
        """[U, k] item indices of each user's k highest true logits, best first."""
        k = min(k, self.config.num_items)
        out = np.empty((self.config.num_users, k), dtype=np.int64)
        for rows in self._chunks():
            out[rows] = _top_k(self._logits(rows), k)
        return out

    # ------------------------------------------------------------------------------- sampling
    def sample_interactions(self, seed: int | None = None) -> pd.DataFrame:
        """A log of distinct (user, item) draws from each user's softmax over true logits.

        Columns: user_id, item_id, timestamp (int64 Unix seconds, strictly increasing within a user,
        from 2015 on), rating (float 1-5 from the latent affinity plus noise). Rows are sorted by
        (user_id, timestamp). The same seed gives the same frame; ``None`` derives it from the world's.
        """
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 1] if seed is None else [seed, 2])
        n_u, n_i = cfg.num_users, cfg.num_items
        counts = np.clip(rng.poisson(cfg.interactions_per_user, size=n_u), cfg.min_per_user, None)
        counts = np.minimum(counts, n_i)
        users, items = [], []
        for rows in self._chunks():
            n = counts[rows]
            perturbed = self._logits(rows) + rng.gumbel(size=(len(n), n_i))
            top = _top_k(perturbed, int(n.max()))
            keep = np.arange(top.shape[1])[None, :] < n[:, None]
            users.append(np.broadcast_to(np.arange(rows.start, rows.stop)[:, None], top.shape)[keep])
            items.append(top[keep])
        user = np.concatenate(users)
        item = np.concatenate(items)
        # Shuffle each user's items into a random temporal order (top-k order is by preference).
        order = np.lexsort((rng.random(len(user)), user))
        user, item = user[order], item[order]
        # Timestamps: a per-user start, then strictly positive gaps accumulated within the user.
        gaps = 1 + np.floor(rng.exponential(3 * 86_400, size=len(user))).astype(np.int64)
        csum = np.cumsum(gaps)
        first = np.r_[0, np.cumsum(counts)[:-1]]
        before = np.r_[0, csum][first]  # cumulative gap up to each user's first row (exclusive)
        start = T_START + (rng.random(n_u) * 0.8 * T_SPAN).astype(np.int64)
        timestamp = start[user] + csum - np.repeat(before, counts)
        latent = np.sum(self.user_latent[user] * self.item_latent[item], axis=1)
        rating = np.clip(np.round(2.2 + 1.5 * latent + rng.normal(0, 0.7, size=len(user))), 1, 5)
        return pd.DataFrame(
            {
                "user_id": user.astype(np.int64),
                "item_id": item.astype(np.int64),
                "timestamp": timestamp.astype(np.int64),
                "rating": rating.astype(np.float64),
            }
        )

    def describe(self) -> str:
        cfg = self.config
        top1 = max(1, cfg.num_items // 100)
        top10 = max(1, cfg.num_items // 10)
        by_pop = np.argsort(-self.item_popularity_logit)
        share1 = share10 = 0.0
        for rows in self._chunks():
            logits = self._logits(rows)
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            share1 += p[:, by_pop[:top1]].sum()
            share10 += p[:, by_pop[:top10]].sum()
        lam, m = cfg.interactions_per_user, cfg.min_per_user  # E[max(m, Poisson(lam))]
        mean = lam + sum((m - j) * math.exp(j * math.log(lam) - lam - math.lgamma(j + 1)) for j in range(m))
        density = min(1.0, mean / cfg.num_items)
        return (
            f"Synthetic world (seed {cfg.seed}): {cfg.num_users} users in {cfg.num_segments} segments, "
            f"{cfg.num_items} items over {cfg.num_genres} genres, latent dim {cfg.latent_dim}. "
            f"About {mean:.0f} interactions per user (at least {cfg.min_per_user}), "
            f"density {density:.2%} (sparsity {1 - density:.2%}). "
            f"Popularity is Zipf-like with exponent {cfg.popularity_strength:g}: the top 1% of items "
            f"draw {share1 / cfg.num_users:.1%} and the top 10% draw {share10 / cfg.num_users:.1%} of "
            f"the expected interactions; affinity strength {cfg.affinity_strength:g}, noise {cfg.noise:g}."
        )


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest values of each row, in descending order."""
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
    vals = np.take_along_axis(scores, part, axis=1)
    return np.take_along_axis(part, np.argsort(-vals, axis=1, kind="stable"), axis=1)
