"""Named offline evaluation protocols for any model that yields user and item embeddings.

A protocol fixes how interactions are split, which items are removed before ranking, what counts as
a query and which metrics are reported. Scores are always s(u, i) = user_emb[u] . item_emb[i] over
the FULL item catalogue, ranked exactly (:func:`twotower.topk.topk_items`).

``msrec`` (Microsoft Recommenders ML-100K benchmark)
    Split: :func:`~twotower.data.splits.stratified_split` per item, 75 % train / 25 % test, seed 42.
    Query: one per user with >= 1 test interaction; every test interaction is relevant (binary).
    The user's training items are removed before ranking. K = 10; reports ndcg, recall, precision,
    map, mrr and hit @10, each the mean over those users (definitions in :mod:`twotower.metrics`).

``tfrs`` (TensorFlow Recommenders retrieval tutorial)
    Split: :func:`~twotower.data.splits.random_split`, 80 % train / 20 % test, seed 42.
    Query: EVERY test rating is one query (user -> scores over the full catalogue) whose single
    target is the rated item; a user with n test ratings contributes n queries. NOTHING is excluded,
    not even the user's training items. Reports factorized top-K categorical accuracy for
    K in (1, 5, 10, 50, 100) as "top1_accuracy" ... "top100_accuracy".

``temporal`` (leave-last-out)
    Split: :func:`~twotower.data.splits.temporal_split`: per user the last interaction is test, the
    second to last validation, the rest train (users with < 3 interactions stay in train).
    Query: one per user with a test interaction. Only TRAINING items are excluded; the validation
    item stays rankable and is not relevant (pass train + valid pairs as the "train" arguments to
    exclude it as well). K = 10, the same six metrics @10 as msrec.

With every protocol, a relevant item that also occurs among the excluded training pairs (a repeated
user-item interaction) can never be retrieved; this matches Microsoft's ``remove_seen`` behaviour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from twotower.data.splits import random_split, stratified_split, temporal_split
from twotower.metrics import METRICS, compute_metrics
from twotower.topk import CSR, topk_items

__all__ = ["PROTOCOLS", "Protocol", "evaluate_embeddings", "result_keys", "split_for"]

_RANKING_KEY = re.compile(r"^([a-z]+)@(\d+)$")
_ACCURACY_KEY = re.compile(r"^top(\d+)_accuracy$")
# Rows of per-rating target lookups processed at once: bounds memory at _RATING_CHUNK x K ids.
_RATING_CHUNK = 65536
# Rank reported for a target missing from its query's top-K list: larger than any cut-off.
_ABSENT = torch.iinfo(torch.long).max


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol (see the module docstring for the three registered ones).

    Attributes:
        name: registry key, also reported as ``result["protocol"]``.
        k: ranking depth, the largest cut-off among ``metrics``.
        exclude_train: remove each user's training items before ranking.
        per_rating_queries: one query per test rating with a single target (top-K accuracy), instead
            of one query per user with all its test items relevant (ranking metrics).
        metrics: the result keys reported by default: ``"<name>@<k>"`` with a name from
            :data:`twotower.metrics.METRICS` when ``per_rating_queries`` is False, else
            ``"top<k>_accuracy"``.
    """

    name: str
    k: int
    exclude_train: bool
    per_rating_queries: bool
    metrics: tuple[str, ...]

    def __post_init__(self) -> None:
        cut_offs = [_parse_key(key, self.per_rating_queries)[1] for key in self.metrics]
        if not cut_offs or max(cut_offs) != self.k:
            raise ValueError(f"protocol {self.name!r}: k={self.k} must equal the largest metric cut-off")


def _parse_key(key: str, per_rating: bool) -> tuple[str, int]:
    """``"ndcg@10"`` -> ("ndcg", 10); ``"top5_accuracy"`` -> ("top_accuracy", 5)."""
    match = (_ACCURACY_KEY if per_rating else _RANKING_KEY).match(key)
    if match is None or (not per_rating and match.group(1) not in METRICS):
        kind = "top<k>_accuracy" if per_rating else f"<metric>@<k> with metric in {sorted(METRICS)}"
        raise ValueError(f"metric key {key!r} is not of the form {kind}")
    if per_rating:
        return "top_accuracy", int(match.group(1))
    return match.group(1), int(match.group(2))


_AT_10 = tuple(f"{name}@10" for name in ("ndcg", "recall", "precision", "map", "mrr", "hit"))

PROTOCOLS: dict[str, Protocol] = {
    "msrec": Protocol("msrec", k=10, exclude_train=True, per_rating_queries=False, metrics=_AT_10),
    "tfrs": Protocol(
        "tfrs",
        k=100,
        exclude_train=False,
        per_rating_queries=True,
        metrics=tuple(f"top{k}_accuracy" for k in (1, 5, 10, 50, 100)),
    ),
    "temporal": Protocol("temporal", k=10, exclude_train=True, per_rating_queries=False, metrics=_AT_10),
}


def split_for(protocol_name: str, df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame]:
    """Split ``df`` as the named protocol prescribes: ``(train, valid or None, test)``."""
    if protocol_name == "msrec":
        train, test = stratified_split(df, ratio=0.75, filter_by="item", seed=42)
        return train, None, test
    if protocol_name == "tfrs":
        train, test = random_split(df, test_fraction=0.2, seed=42)
        return train, None, test
    if protocol_name == "temporal":
        return temporal_split(df)
    raise KeyError(f"unknown protocol {protocol_name!r}; known: {sorted(PROTOCOLS)}")


def result_keys(protocol: Protocol, ks: tuple[int, ...] | None) -> list[tuple[str, str, int]]:
    """(result key, metric name, cut-off) triples: the protocol's own keys, or its metric names
    crossed with the caller's cut-offs when ``ks`` is given."""
    parsed = [(key, *_parse_key(key, protocol.per_rating_queries)) for key in protocol.metrics]
    if ks is None:
        return parsed
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be non-empty positive cut-offs, got {ks}")
    if protocol.per_rating_queries:
        return [(f"top{k}_accuracy", "top_accuracy", k) for k in ks]
    names = list(dict.fromkeys(name for _, name, _ in parsed))  # de-duplicate, keep order
    return [(f"{name}@{k}", name, k) for name in names for k in ks]


def _target_ranks(user_topk: Tensor, query_user: Tensor, targets: Tensor) -> Tensor:
    """0-based position of each query's target in its user's top-K list, ``_ABSENT`` if absent.

    The sentinel must exceed every cut-off, not merely the list width: the list is narrower than
    the requested depth when the catalogue is smaller, and ``rank < k`` must stay False for a target
    that is missing (e.g. excluded) from the list.
    """
    out = torch.empty_like(targets)
    for c0 in range(0, targets.numel(), _RATING_CHUNK):
        c1 = min(c0 + _RATING_CHUNK, targets.numel())
        match = user_topk[query_user[c0:c1]] == targets[c0:c1].unsqueeze(1)  # -1 never equals a target
        first = torch.argmax(match.to(torch.uint8), dim=1)
        out[c0:c1] = torch.where(match.any(dim=1), first, torch.full_like(first, _ABSENT))
    return out


@torch.no_grad()
def evaluate_embeddings(
    protocol: Protocol,
    user_emb: Tensor,
    item_emb: Tensor,
    test_users: Tensor,
    test_items: Tensor,
    train_users: Tensor | None,
    train_items: Tensor | None,
    ks: tuple[int, ...] | None = None,
    item_chunk: int = 65536,
) -> dict[str, float | str]:
    """Evaluate embeddings under ``protocol``.

    Args:
        protocol: e.g. ``PROTOCOLS["msrec"]``.
        user_emb: Tensor[U, d]; item_emb: Tensor[I, d]. Scores are user_emb @ item_emb.T.
        test_users, test_items: LongTensor[n], INDICES (0..U-1, 0..I-1) of the test interactions.
        train_users, train_items: LongTensor[m] training interactions as indices; required when
            ``protocol.exclude_train``, ignored otherwise (may be None).
        ks: optional cut-offs replacing the protocol's own (same metric names).
        item_chunk: items scored per block (memory bound, see :func:`topk_items`).

    Returns:
        The metric values, plus ``"n_queries"`` (users with >= 1 test item, or test ratings for
        per-rating protocols) and ``"protocol"`` (its name).
    """
    n_users, n_items = user_emb.shape[0], item_emb.shape[0]
    device = user_emb.device
    test_users = torch.as_tensor(test_users, dtype=torch.long, device=device).reshape(-1)
    test_items = torch.as_tensor(test_items, dtype=torch.long, device=device).reshape(-1)
    if test_users.numel() != test_items.numel():
        raise ValueError("test_users and test_items differ in length")
    _check_range(test_users, n_users, "test_users")
    _check_range(test_items, n_items, "test_items")
    keys = result_keys(protocol, ks)
    depth = max(k for _, _, k in keys)

    # Each distinct test user is ranked once, however many test rows (or per-rating queries) it has.
    users, query_user = torch.unique(test_users, sorted=True, return_inverse=True)
    exclude = None
    if protocol.exclude_train:
        if train_users is None or train_items is None:
            raise ValueError(f"protocol {protocol.name!r} excludes training items: pass train_users/items")
        train_users = torch.as_tensor(train_users, dtype=torch.long, device=device).reshape(-1)
        train_items = torch.as_tensor(train_items, dtype=torch.long, device=device).reshape(-1)
        if train_users.numel() != train_items.numel():
            raise ValueError("train_users and train_items differ in length")
        _check_range(train_users, n_users, "train_users")
        _check_range(train_items, n_items, "train_items")
        # Row of every user in `users`, -1 for users without test items (their train rows are dropped).
        row_of = torch.full((n_users,), -1, dtype=torch.long, device=device)
        row_of[users] = torch.arange(users.numel(), device=device)
        rows = row_of[train_users]
        keep = rows >= 0
        exclude = CSR.from_pairs(rows[keep], train_items[keep], users.numel())
    topk_ids, _ = topk_items(user_emb[users], item_emb, depth, exclude=exclude, item_chunk=item_chunk)

    result: dict[str, float | str] = {"protocol": protocol.name}
    if protocol.per_rating_queries:
        ranks = _target_ranks(topk_ids, query_user, test_items)
        for key, _, k in keys:
            # rank < k <=> target among the top k: the factorized top-K accuracy of metrics.top_k_accuracy.
            result[key] = float((ranks < k).double().mean()) if ranks.numel() else float("nan")
        result["n_queries"] = test_items.numel()
    else:
        relevant = CSR.from_pairs(query_user, test_items, users.numel())
        names = tuple(dict.fromkeys(name for _, name, _ in keys))
        cut_offs = tuple(sorted({k for _, _, k in keys}))
        values = compute_metrics(topk_ids, relevant, ks=cut_offs, names=names)
        for key, _, _ in keys:
            result[key] = values[key]
        result["n_queries"] = users.numel()
    return result


def _check_range(index: Tensor, size: int, what: str) -> None:
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise ValueError(
            f"{what} must be indices in [0, {size}), got range [{int(index.min())}, {int(index.max())}]"
        )
