"""Simulated impression logs for a run trained on a synthetic world: position-biased clicks, known truth.

What a production log looks like, with the answer known: each request shows ``shown`` of a user's
top-``candidates`` retrieved items, in an order set by a logging policy with its own taste (a fixed
random boost per item plus noise, unrelated to the user), on a device drawn at random. Clicks follow
a position-based model,

    p(click) = (1 / position) ** eta[device] * sigmoid(true affinity - offset),

so the examination curve per device and the true relevance are both known. ``relevance="affinity"``
uses the world's full true logit (taste plus the item's popularity, what its interaction log is drawn
from); ``"taste"`` drops the popularity term: a click on a *seen* item then reflects taste alone, while
the interaction log retrieval trains on still carries popularity (popular items are engaged with more
because they are found more). That gap is what a ranker trained on debiased clicks can correct in
retrieval (see :mod:`twotower.align`). The frame has the
columns of :func:`twotower.data.impressions.read_impressions` (``request_id, item_id, position,
click, user_id, device``), ready for :func:`twotower.reranker.train_run_ranker`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import torch

from twotower.data.synthetic import SyntheticWorld
from twotower.recommender import Retriever

__all__ = ["DEFAULT_ETA", "examination", "simulate_impressions"]

DEFAULT_ETA = {"desktop": 1.0, "mobile": 2.0}


def examination(position: np.ndarray, eta: float) -> np.ndarray:
    """The planted probability that a slot is looked at: ``(1 / position) ** eta``."""
    return (1.0 / np.asarray(position, dtype=np.float64)) ** eta


def simulate_impressions(
    retriever: Retriever,
    world: SyntheticWorld,
    requests: int,
    seed: int = 0,
    shown: int = 10,
    candidates: int = 30,
    eta: dict[str, float] | None = None,
    offset: float = 4.0,
    relevance: Literal["affinity", "taste"] = "affinity",
) -> pd.DataFrame:
    """``requests`` logged requests over the run's catalogue (synthetic ids are world rows)."""
    eta = DEFAULT_ETA if eta is None else eta  # an empty dict is no device at all, not the default
    if relevance not in ("affinity", "taste"):
        raise ValueError(f"relevance must be 'affinity' or 'taste', got {relevance!r}")
    if requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    if shown < 1:  # 0 gave an empty log, a negative count numpy's "negative dimensions are not allowed"
        raise ValueError(f"shown must be >= 1, got {shown}")
    if shown > candidates:
        raise ValueError(f"shown={shown} exceeds candidates={candidates}")
    if not eta:
        raise ValueError("eta must name at least one device")
    # (1 / position) ** eta would exceed 1 below 0; a NaN eta would silently never click
    if not all(e >= 0 for e in eta.values()):
        raise ValueError(f"eta must be >= 0 for every device, got {eta}")
    rng = np.random.default_rng([seed, 41])
    model = retriever.model
    user_emb, item_emb = model.user_embeddings(), model.item_embeddings()
    if candidates > len(item_emb):  # torch.topk would fail with "selected index k out of range"
        raise ValueError(f"candidates={candidates} exceeds the catalogue ({len(item_emb)} items)")
    users = rng.integers(0, len(user_emb), requests)
    # Each request's candidates: the user's top retrieved items (chunked: catalogues may be large).
    top = np.concatenate(
        [torch.topk(user_emb[c] @ item_emb.T, candidates, dim=1).indices.numpy()
         for c in torch.from_numpy(users).split(256)]
    )  # fmt: skip
    pick = np.argsort(rng.random((requests, candidates)), axis=1)[:, :shown]
    slate = np.take_along_axis(top, pick, axis=1)
    boost = np.random.default_rng([seed, 42]).normal(size=len(item_emb))
    order = np.argsort(-(boost[slate] + 0.5 * rng.normal(size=slate.shape)), axis=1)
    slate = np.take_along_axis(slate, order, axis=1)
    devices = np.array(sorted(eta))
    device = devices[rng.integers(0, len(devices), requests)]
    exam = examination(np.arange(1, shown + 1)[None, :], np.array([eta[d] for d in device])[:, None])
    raw_users = retriever.user_ids[users].astype(np.int64)
    raw_items = retriever.item_ids[slate].astype(np.int64)
    truth_of = world.affinity if relevance == "affinity" else world.taste
    truth = truth_of(np.repeat(raw_users, shown), raw_items.ravel()).reshape(slate.shape)
    clicks = rng.random(slate.shape) < exam / (1.0 + np.exp(-(truth - offset)))
    return pd.DataFrame(
        {
            "request_id": np.repeat(np.arange(requests), shown),
            "item_id": raw_items.ravel(),
            "position": np.tile(np.arange(1, shown + 1), requests),
            "click": clicks.ravel().astype(np.int8),
            "user_id": np.repeat(raw_users, shown),
            "device": np.repeat(device, shown),
            "true_affinity": truth.ravel(),
        }
    )
