"""Retrieve, then rank: the one recommendation path shared by ``twotower serve`` and ``twotower recommend``.

A request names a catalogue user, or brings raw user features (cold start), optionally with the
user's recent items. The pipeline

1. encodes the query: a known user from the stored features and training history plus the recent
   items; anyone else from the given features through the run's ``FeatureEncoder`` (an id the model
   never saw maps to out-of-vocabulary, missing features to their defaults) plus the recent items;
2. retrieves ``retrieve_n`` candidates from the item index (the training similarity; cosine through
   unit vectors), never returning excluded items (training items and recent items when
   ``exclude_seen``, plus ``exclude_items``) and only items passing the filters;
3. cuts them to ``light_n`` with the run's light ranker when it has one, re-ranks those with the
   run's debiased relevance tower when it has one (no position, no bias features: only the relevance
   tower runs at inference), and answers the top ``k``.

Scores: ``retrieval_score`` = similarity / temperature (what the model was trained on);
``light_score`` and ``rank_score`` = the light and main rankers' relevance logits when they ran;
``score`` is the one the list is sorted by (the last stage's).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from twotower.export import ExportedRun, load_export, resolve_export
from twotower.features import IdFeature
from twotower.ids import IdLookup
from twotower.index import IndexConfig

__all__ = [
    "Pipeline",
    "RecommendRequest",
    "RecommendResponse",
    "RequestError",
    "load_pipeline",
    "stage_sizes",
]

MAX_K = 1000
Value = str | int | float | bool | None


def stage_sizes(k: int, retrieve_n: int, light_n: int, light: bool, main: bool) -> tuple[int, int]:
    """``(candidates to retrieve, candidates the light ranker keeps)`` for a request of ``k`` items.

    Retrieval fetches enough for every stage that follows (``retrieve_n`` when a ranker re-orders, and
    at least what the light ranker keeps); the light ranker hands the main one its best ``light_n``,
    never fewer than ``k`` (and ``k`` when it is the last stage). :func:`twotower.funnel.run_funnel`
    sizes its stages with this too."""
    light_keep = max(light_n, k) if main else k
    if not (light or main):
        return k, light_keep
    return max(k, retrieve_n, light_keep if light else 0), light_keep


def load_pipeline(
    path: str | Path, retrieve_n: int | None = None, index: IndexConfig | None = None, light_n: int = 100
) -> Pipeline:
    """The pipeline of a run directory or an export (a run without an export is exported first). Here,
    not in ``twotower.serve``: ``twotower recommend`` runs it on a base install, without FastAPI."""
    return Pipeline(load_export(resolve_export(path, index)), retrieve_n=retrieve_n, light_n=light_n)


class RequestError(ValueError):
    """A request the model cannot answer as asked (an unknown feature, a filter on no column...)."""


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Strict ints: lax pydantic would turn JSON true into user / item 1 (True is not an id here).
    user_id: str | StrictInt | None = Field(
        None, description="a catalogue user; unknown ids take the cold-start path"
    )
    features: dict[str, Value | list[Value]] | None = Field(
        None, description="raw user features by column name, for users the model has not seen"
    )
    history: list[str | StrictInt] = Field(
        default_factory=list, max_length=10_000, description="recent item ids, oldest first"
    )
    history_actions: list[StrictInt] | None = Field(None, description="one action code per history item")
    k: StrictInt = Field(10, ge=1, le=MAX_K)
    exclude_seen: StrictBool = Field(True, description="drop the user's training items and the history items")
    exclude_items: list[str | StrictInt] = Field(default_factory=list, max_length=10_000)
    filters: dict[str, list[Value]] | None = Field(
        None, description="item metadata column -> allowed values (a '|'-separated cell matches any token)"
    )
    rerank: StrictBool = Field(True, description="re-rank with the relevance tower when the run has one")


class RecommendedItem(BaseModel):
    item_id: str | int
    score: float
    retrieval_score: float
    light_score: float | None = None
    rank_score: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class RecommendResponse(BaseModel):
    user_id: str | int | None
    path: Literal["known", "cold_start"]
    reranked: bool
    items: list[RecommendedItem]
    ignored_history: list[str | int] = Field(
        default_factory=list, description="history ids not in the catalogue"
    )
    model: str


class Pipeline:
    """A loaded export answering :class:`RecommendRequest`; thread-safe for concurrent requests."""

    def __init__(self, exported: ExportedRun, retrieve_n: int | None = None, light_n: int = 100) -> None:
        """``retrieve_n`` candidates come from the index (default: 500 with a light ranker, else 100);
        the light ranker, when there is one, passes its best ``light_n`` to the main ranker."""
        self.exported = exported
        self.retrieve_n = retrieve_n or (500 if exported.light_ranker is not None else 100)
        self.light_n = light_n
        self.users, self.items = IdLookup(exported.user_ids), IdLookup(exported.item_ids)
        # Item metadata as one list per column: a row is then a dict built in microseconds.
        table = exported.items
        self._meta_columns = (
            {} if table is None else {str(c): table[c].tolist() for c in table.columns if c != "item_id"}
        )
        self.model_id = f"{exported.path.resolve()}@{exported.manifest['created']}"
        specs = exported.user_encoder.specs
        self._id_column = next((s.column for s in specs if isinstance(s, IdFeature)), None)
        self._feature_columns = {s.column for s in specs}
        # Filters on low-cardinality columns (genre, category, ...) are answered from an inverted index
        # built here, once: a scan of a large catalogue would stall the first request of each value.
        self._inverted = {c: _inverted(v) for c, v in self._meta_columns.items() if _low_cardinality(v)}
        self._filter_cache: dict[tuple[str, tuple], np.ndarray] = {}
        self._lock = threading.Lock()

    # --- ids -----------------------------------------------------------------------------------------

    def item_positions(self, ids: list[Any]) -> list[int]:
        """Catalogue position of each raw item id, -1 where the catalogue lacks it."""
        return self.items.positions(ids)

    def item_indices(self, ids: list[Any]) -> tuple[list[int], list[Any]]:
        """(positions of the known ids, the unknown ids), each in the given order."""
        positions = self.item_positions(ids)
        return [p for p in positions if p >= 0], [v for v, p in zip(ids, positions, strict=True) if p < 0]

    # --- the query -----------------------------------------------------------------------------------

    def _query(self, request: RecommendRequest) -> tuple[torch.Tensor, int, list[int], list[Any]]:
        """(query embedding [1, d], user index or -1, known history indices, unknown history ids)."""
        query = self.exported.query
        # Checked on every path: a known user's stored features win, but a misspelt name is an error.
        self._check_feature_names(request)
        positions = self.item_positions(request.history)
        keep = [i for i, p in enumerate(positions) if p >= 0]
        events = [positions[i] for i in keep]
        ignored = [v for v, p in zip(request.history, positions, strict=True) if p < 0]
        actions = None
        if request.history_actions is not None:
            if len(request.history_actions) != len(request.history):
                raise RequestError(
                    f"history_actions has {len(request.history_actions)} entries for "
                    f"{len(request.history)} history items"
                )
            actions = [torch.tensor([request.history_actions[i] for i in keep], dtype=torch.long)]
            self._check_actions(actions[0])
        event_rows = [torch.tensor(events, dtype=torch.long)]
        user = -1 if request.user_id is None else self.users.position(request.user_id)
        if user >= 0:
            return query.known(torch.tensor([user]), event_rows, actions), user, events, ignored
        features = self._encode_features(request)
        return query.from_features(features, event_rows, actions), -1, events, ignored

    def _check_actions(self, actions: torch.Tensor) -> None:
        history = self.exported.query.history
        table = history.action_embedding if history is not None else None
        if table is None:
            raise RequestError("this model's history has no actions: leave history_actions out")
        if len(actions) and (int(actions.min()) < 0 or int(actions.max()) >= table.num_embeddings):
            raise RequestError(f"history_actions must lie in 0..{table.num_embeddings - 1}")

    def _check_feature_names(self, request: RecommendRequest) -> None:
        unknown = sorted(set(request.features or {}) - self._feature_columns)
        if unknown:
            raise RequestError(
                f"unknown user feature(s) {unknown}; this model reads {sorted(self._feature_columns)}"
            )

    def _encode_features(self, request: RecommendRequest) -> dict[str, torch.Tensor]:
        given = dict(request.features or {})
        if self._id_column is not None and request.user_id is not None:
            given[self._id_column] = request.user_id  # never seen in training: out-of-vocabulary
        try:
            return self.exported.user_encoder.transform_record(given)
        except (ValueError, TypeError) as exc:
            raise RequestError(f"bad user features: {exc}") from exc

    # --- candidates ----------------------------------------------------------------------------------

    def _allowed(self, filters: dict[str, list[Value]] | None) -> np.ndarray | None:
        if not filters:
            return None
        table = self.exported.items
        allowed: np.ndarray | None = None
        for column, values in sorted(filters.items()):
            if table is None or column not in table.columns or column == "item_id":
                columns = [] if table is None else sorted(c for c in table.columns if c != "item_id")
                raise RequestError(f"cannot filter on {column!r}; item metadata columns: {columns}")
            inverted = self._inverted.get(column)
            if inverted is not None:
                keys = {key for v in values for key in _value_keys(v)}
                hits = [inverted[key] for key in sorted(keys) if key in inverted]
                if len(hits) == 1:
                    match = hits[0]  # postings are sorted and unique already
                else:
                    match = np.unique(np.concatenate(hits)) if hits else np.zeros(0, dtype=np.int64)
                allowed = match if allowed is None else np.intersect1d(allowed, match, assume_unique=True)
                continue
            # None matches nothing (see _matching), so it must not share a key with the text "None"
            key = (column, tuple(sorted({key for v in values for key in _value_keys(v)})))
            with self._lock:
                match = self._filter_cache.get(key)
                if match is None:
                    match = _matching(table[column], values)
                    if len(self._filter_cache) > 256:  # bounded: filters come from clients
                        self._filter_cache.clear()
                    self._filter_cache[key] = match
            allowed = match if allowed is None else np.intersect1d(allowed, match, assume_unique=True)
        return allowed

    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        # inference_mode: no autograd bookkeeping at all, measurably cheaper than no_grad per op.
        with torch.inference_mode():
            return self._recommend(request)

    def _recommend(self, request: RecommendRequest) -> RecommendResponse:
        exported = self.exported
        query, user, events, ignored = self._query(request)
        excluded: list[int] = []
        if request.exclude_seen:
            if user >= 0:
                excluded += exported.seen.row(user).tolist()
            excluded += events
        excluded += self.item_indices(request.exclude_items)[0]
        light = exported.light_ranker if request.rerank else None
        main = exported.ranker if request.rerank else None
        has_light, has_main = light is not None, main is not None
        n, light_keep = stage_sizes(request.k, self.retrieve_n, self.light_n, has_light, has_main)
        allowed = self._allowed(request.filters)
        # Dividing the query (not the scores) by the temperature is what training does: the scores
        # are then bit-for-bit the trained model's, and the order is the inner product's.
        ids, retrieval = exported.index.search(
            (query / exported.temperature).numpy(),
            n,
            exclude=[np.unique(np.asarray(excluded, dtype=np.int64))],
            allowed=allowed,
        )
        keep = ids[0] >= 0
        ids, retrieval = ids[0][keep], retrieval[0][keep]
        scores: dict[str, np.ndarray] = {"retrieval": retrieval}
        order = np.arange(len(ids))
        for name, ranker, keep_n in (("light", light, light_keep), ("rank", main, request.k)):
            if ranker is None or not len(order):
                continue
            item_idx = torch.from_numpy(ids[order])[None]
            logits = ranker.score(query, item_idx, exported.item_embeddings[item_idx])[0].numpy()
            scores[name] = np.full(len(ids), np.nan, dtype=np.float32)
            scores[name][order] = logits
            order = order[np.lexsort((ids[order], -logits))][:keep_n]  # ties towards the lower index
        final = "rank" if "rank" in scores else "light" if "light" in scores else "retrieval"
        order = order[: request.k]
        items = [
            RecommendedItem(
                item_id=_plain(exported.item_ids[ids[j]]),
                score=float(scores[final][j]),
                retrieval_score=float(retrieval[j]),
                light_score=float(scores["light"][j]) if "light" in scores else None,
                rank_score=float(scores["rank"][j]) if "rank" in scores else None,
                metadata=self._metadata(int(ids[j])),
            )
            for j in order.tolist()
        ]
        return RecommendResponse(
            user_id=request.user_id,
            path="known" if user >= 0 else "cold_start",
            reranked=final != "retrieval",
            items=items,
            ignored_history=ignored,
            model=self.model_id,
        )

    def _metadata(self, item: int) -> dict[str, Any]:
        return {column: _plain(values[item]) for column, values in self._meta_columns.items()}


def _matching(column: pd.Series, values: list[Value]) -> np.ndarray:
    """Catalogue indices whose cell equals one of ``values`` or, for 'a|b' cells, holds one as a token."""
    wanted = {key for v in values for key in _value_keys(v)}
    cells = column.tolist()
    hits = np.fromiter((not wanted.isdisjoint(_cell_keys(c)) for c in cells), dtype=bool, count=len(cells))
    return np.flatnonzero(hits).astype(np.int64)


def _cell_keys(cell: Any) -> list[str]:
    """The filter values a cell matches: its text and, for 'a|b' cells, each token. A whole-number
    float also matches its integer text: one missing cell makes pandas read an integer column (a year)
    as float, and ``{"year": [1974]}`` must still find the cell 1974.0."""
    if _missing(cell):
        return []
    text = str(cell)
    if "|" in text:
        return [text, *text.split("|")]
    return _value_keys(cell)


def _value_keys(value: Any) -> list[str]:
    """The texts a filter value (or a single cell) is compared as; none for None (it matches nothing)."""
    if value is None:
        return []
    if isinstance(value, np.generic):
        value = value.item()
    text = str(value)
    if isinstance(value, float) and value.is_integer():
        return [text, str(int(value))]  # 1974.0 is also "1974"
    return [text]


def _low_cardinality(values: list[Any], limit: int = 10_000) -> bool:
    seen: set[str] = set()
    for cell in values:
        seen.update(_cell_keys(cell))
        if len(seen) > limit:
            return False
    return True


def _inverted(values: list[Any]) -> dict[str, np.ndarray]:
    """filter value -> sorted catalogue indices of the cells it matches (as :func:`_matching`)."""
    postings: dict[str, list[int]] = {}
    for item, cell in enumerate(values):
        for key in set(_cell_keys(cell)):
            postings.setdefault(key, []).append(item)
    return {key: np.asarray(items, dtype=np.int64) for key, items in postings.items()}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _plain(value: Any) -> Any:
    """A JSON-ready Python value: numpy scalars unwrapped, NaN -> None, arrays -> lists."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value
