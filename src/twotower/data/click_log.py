"""Logged sessions with simulated clicks: a logging policy ranks each query, the top N are shown.

The logging policies (:class:`LoggingPolicyConfig`):

* ``production`` (the ULTRA protocol): a linear ranker fitted by ridge regression on the true labels
  of a small share (default 1 %) of the training queries; it ranks every query's documents;
* ``mixture``: ``score = w * y + (1 - w) * U(0, max_label)``, the noise drawn once per document, so the
  logging ranker is deterministic like a production system. ``w`` controls confounding: at ``w = 1``
  the shown order is the true order (position and relevance fully entangled), at ``w = 0`` it is random.

Each query is logged ``sessions_per_query`` times; a session draws a device and clicks from the
click model. A share ``intervention_share`` of sessions instead shows the policy's top N in a uniformly
random order (RandTop-N, Joachims et al. 2017): the click-through rate per position over those
sessions estimates the examination curve without any model (:func:`estimate_propensities`), which is
what ``ipw-estimated`` uses. Every method trains on all sessions, randomised ones included.

A :class:`ClickLog` keeps, per session, the shown document rows (``docs[S, N]``, ``-1`` padding,
column ``j`` = rank ``j + 1``), the device, the clicks, and the simulator's truth: the exact
examination probability of each slot (``ipw-true``'s propensities) and the true labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from twotower.data.click_models import ClickModel, ClickModelConfig
from twotower.data.impressions import ImpressionLists
from twotower.data.loader import _py
from twotower.data.ltr import RankingData

__all__ = [
    "ClickLog",
    "LoggingPolicyConfig",
    "SimulationConfig",
    "estimate_propensities",
    "from_impressions",
    "logging_scores",
    "simulate_click_log",
]


class LoggingPolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["production", "mixture"] = "production"
    label_share: float = Field(0.01, gt=0.0, le=1.0, description="production: share of labelled queries")
    ridge: float = Field(1.0, ge=0.0, description="production: L2 penalty of the linear ranker")
    w: float = Field(0.5, ge=0.0, le=1.0, description="mixture: weight of the true label")


class SimulationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    click_model: ClickModelConfig = Field(default_factory=ClickModelConfig)
    logging: LoggingPolicyConfig = Field(default_factory=LoggingPolicyConfig)
    top_n: int = Field(10, ge=1, description="documents shown per session")
    sessions_per_query: int = Field(10, ge=1)
    intervention_share: float = Field(0.05, ge=0.0, le=1.0, description="RandTop-N sessions")


@dataclass
class ClickLog:
    query: np.ndarray  # int64 [S] query index into the RankingData
    docs: np.ndarray  # int64 [S, N] document rows, -1 = empty slot
    device: np.ndarray  # int64 [S]
    clicks: np.ndarray  # float32 [S, N]
    examination: np.ndarray  # float64 [S, N] true P(E = 1), 0 on empty slots
    labels: np.ndarray  # int64 [S, N] true labels, -1 on empty slots
    randomized: np.ndarray  # bool [S] RandTop-N sessions
    device_names: list[str]
    simulated: bool = True  # False for a real log: its clicks cannot be redrawn, its truth is unknown

    @property
    def num_sessions(self) -> int:
        return len(self.query)

    @property
    def mask(self) -> np.ndarray:
        return self.docs >= 0

    def take(self, sessions: np.ndarray) -> ClickLog:
        return ClickLog(self.query[sessions], self.docs[sessions], self.device[sessions],
                        self.clicks[sessions], self.examination[sessions], self.labels[sessions],
                        self.randomized[sessions], self.device_names, self.simulated)  # fmt: skip


def logging_scores(
    data: RankingData, config: LoggingPolicyConfig, seed: int, fitted_on: RankingData | None = None
) -> np.ndarray:
    """The logging policy's score of every document of ``data`` (higher is shown first).

    ``production`` learns from the labels of ``label_share`` of ``fitted_on``'s queries (default:
    ``data`` itself) and scores ``data``: pass the training queries as ``fitted_on`` to log held-out
    queries with the ranker that logged training, as ULTRA does, rather than with one fitted on
    labels of the held-out queries. The same ``seed`` and ``fitted_on`` give the same ranker.
    """
    rng = np.random.default_rng([seed, 21])
    if config.kind == "mixture":
        noise = rng.uniform(0.0, data.max_label, size=len(data.labels))
        return config.w * data.labels + (1.0 - config.w) * noise
    source = data if fitted_on is None else fitted_on
    if source.features.shape[1] != data.features.shape[1]:
        raise ValueError(
            f"fitted_on has {source.features.shape[1]} features, the data to score {data.features.shape[1]}"
        )
    n_labelled = max(1, round(config.label_share * source.num_queries))
    queries = rng.choice(source.num_queries, size=n_labelled, replace=False)
    rows = np.concatenate([np.arange(source.query_offsets[q], source.query_offsets[q + 1]) for q in queries])
    mean, std = source.feature_stats()

    def design(part: RankingData) -> np.ndarray:
        return np.c_[(part.features - mean) / std, np.ones(len(part.labels))]

    xs, ys = design(source)[rows], source.labels[rows].astype(np.float64)
    penalty = config.ridge * np.eye(xs.shape[1])
    penalty[-1, -1] = 0.0  # no penalty on the intercept
    # lstsq, not solve: with ridge=0 a constant feature (or fewer labelled documents than features)
    # makes the system singular; lstsq gives the minimum-norm least-squares fit instead of an error.
    weights = np.linalg.lstsq(xs.T @ xs + penalty, xs.T @ ys, rcond=None)[0]
    return design(data) @ weights


def _top_n(data: RankingData, scores: np.ndarray, n: int) -> np.ndarray:
    """[Q, n] document rows of each query's n best scores, best first; -1 pads short queries."""
    sizes = np.diff(data.query_offsets)
    width = int(sizes.max())
    padded = np.full((data.num_queries, width), -np.inf)
    cols = np.arange(len(scores)) - np.repeat(data.query_offsets[:-1], sizes)
    padded[data.doc_query, cols] = scores
    order = np.argsort(-padded, axis=1, kind="stable")[:, :n]
    rows = data.query_offsets[:-1, None] + order
    top = np.where(np.take_along_axis(padded, order, axis=1) > -np.inf, rows, -1)
    if top.shape[1] < n:
        top = np.pad(top, ((0, 0), (0, n - top.shape[1])), constant_values=-1)
    return top


def simulate_click_log(
    data: RankingData,
    scores: np.ndarray,
    config: SimulationConfig,
    seed: int,
    sessions_per_query: int | None = None,
) -> ClickLog:
    """Log every query of ``data`` ``sessions_per_query`` times under the policy ``scores``."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != data.labels.shape or not np.isfinite(scores).all():
        # A nan score would be taken for an empty slot: the document would silently never be shown.
        raise ValueError(f"scores must be [{len(data.labels)}] finite numbers, got shape {scores.shape}")
    rng = np.random.default_rng([seed, 22])
    model = ClickModel(config.click_model, data.max_label, config.top_n)
    per_query = config.sessions_per_query if sessions_per_query is None else sessions_per_query
    if per_query < 1:
        raise ValueError(f"sessions_per_query must be >= 1, got {per_query}")
    shown = _top_n(data, scores, config.top_n)
    query = np.repeat(np.arange(data.num_queries), per_query)
    docs = shown[query]
    randomized = rng.random(len(query)) < config.intervention_share
    for s in np.flatnonzero(randomized):  # shuffle the filled slots of the RandTop-N sessions
        filled = docs[s] >= 0
        docs[s, filled] = rng.permutation(docs[s, filled])
    labels = np.where(docs >= 0, data.labels[np.maximum(docs, 0)], -1)
    device = model.sample_devices(len(query), rng)
    return ClickLog(
        query=query, docs=docs, device=device, clicks=model.simulate(labels, device, rng),
        examination=model.examination(labels, device), labels=labels, randomized=randomized,
        device_names=model.device_names,
    )  # fmt: skip


def estimate_propensities(log: ClickLog, min_sessions: int = 20) -> np.ndarray:
    """Examination per (device, rank) relative to rank 1, [devices, N], from the RandTop-N sessions.

    Under random order every shown rank of a session sees the same mix of that session's documents,
    so over the sessions that show rank k, CTR(k) / CTR(1) estimates theta(k) / theta(1). Rank 1's
    CTR is taken over those same sessions: a query with fewer than N documents fills only its first
    ranks, and comparing rank k with rank 1 over all sessions would mix its documents into rank 1
    but not into rank k. A device with fewer than ``min_sessions`` randomised sessions borrows the
    pooled estimate; ratios are clipped to [0.01, 1] (IPW weights stay bounded).
    """
    n_dev = len(log.device_names)
    rand = log.randomized
    if rand.sum() < min_sessions:
        raise ValueError(
            f"{int(rand.sum())} randomised sessions; estimating propensities needs {min_sessions}"
        )

    def curve(sessions: np.ndarray) -> np.ndarray:
        mask = log.mask[sessions]
        clicks = log.clicks[sessions] * mask
        shown = np.maximum(mask.sum(axis=0), 1)
        ctr = clicks.sum(axis=0) / shown
        first = (clicks[:, :1] * mask).sum(axis=0) / shown  # rank 1's CTR where rank k is shown
        return np.clip(ctr / np.maximum(first, 1e-12), 0.01, 1.0)

    pooled = curve(rand)
    out = np.empty((n_dev, log.docs.shape[1]))
    for d in range(n_dev):
        sessions = rand & (log.device == d)
        out[d] = curve(sessions) if sessions.sum() >= min_sessions else pooled
    return out


def from_impressions(
    lists: ImpressionLists, items: pd.DataFrame, context: str | None = None
) -> tuple[RankingData, ClickLog]:
    """A logged impression file as training data for the rankers: requests become queries whose
    documents are the items they showed, featurised from the item table ``items`` (``item_id`` plus
    feature columns: numeric ones as they are, text ones one-hot over their values).

    ``context`` names the bias-context column (e.g. ``device``); without one every session is on one
    device. Labels, when the log has them, become the documents' graded labels (else 0); the
    examination truth is unknown (zero), so ``ipw-true`` is not available on real logs.
    """
    if "item_id" not in items.columns:
        raise ValueError("the item table needs an item_id column")
    # An item listed twice must be listed the same: which of two feature rows it has is no guess to make.
    distinct = items.drop_duplicates()
    clash = distinct[distinct.duplicated("item_id", keep=False)]
    if len(clash):
        item = clash["item_id"].iloc[0]
        rows = [_py(r) for r in clash.index[clash["item_id"] == item][:5]]
        raise ValueError(f"the item table lists item {_py(item)!r} with different features (rows {rows})")
    table = distinct.set_index("item_id")
    shown = lists.items[lists.mask]
    unknown = pd.Index(shown).difference(table.index)
    if len(unknown):
        raise ValueError(
            f"{len(unknown)} shown items are missing from the item table, e.g. {list(unknown[:5])}"
        )
    if context is not None and context not in lists.context:
        raise ValueError(f"no context column {context!r} in the log; it has {list(lists.context)}")
    rows = table.loc[shown]
    parts, names = [], []
    for column in rows.columns:
        values = rows[column]
        if values.isna().any():  # nan features would train to nan; a missing category broke the sort
            raise ValueError(
                f"item table column {column!r} is missing for item {_py(values.index[values.isna()][0])!r}"
            )
        if pd.api.types.is_numeric_dtype(values):
            parts.append(values.to_numpy(np.float32)[:, None])
            names.append(column)
        else:
            cats = sorted(values.astype(str).unique())
            parts.append(
                (values.astype(str).to_numpy()[:, None] == np.array(cats)[None, :]).astype(np.float32)
            )
            names += [f"{column}={c}" for c in cats]
    if not parts:
        raise ValueError("the item table has no feature columns besides item_id")
    counts = lists.mask.sum(axis=1)
    labels = lists.labels[lists.mask] if lists.labels is not None else np.zeros(len(shown), dtype=np.int64)
    item_codes, catalogue = pd.factorize(pd.Index(shown), sort=True)
    data = RankingData(
        name="impressions", features=np.concatenate(parts, axis=1), labels=labels.astype(np.int64),
        query_offsets=np.r_[0, np.cumsum(counts)].astype(np.int64), max_label=max(1, int(labels.max())),
        feature_names=names, item_index=item_codes.astype(np.int64), num_items=len(catalogue),
    )  # fmt: skip
    docs = np.full(lists.mask.shape, -1, dtype=np.int64)
    docs[lists.mask] = np.arange(len(shown))
    if context is not None:
        device, device_names = pd.factorize(lists.context[context], sort=True)
        device_names = [str(d) for d in device_names]
    else:
        device, device_names = np.zeros(len(counts), dtype=np.int64), ["all"]
    log = ClickLog(
        query=np.arange(len(counts)), docs=docs, device=device.astype(np.int64), clicks=lists.clicks,
        examination=np.zeros(docs.shape), labels=np.where(docs >= 0, data.labels[np.maximum(docs, 0)], -1),
        randomized=np.zeros(len(counts), dtype=bool), device_names=device_names, simulated=False,
    )  # fmt: skip
    return data, log
