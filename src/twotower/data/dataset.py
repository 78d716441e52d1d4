"""From a data config to encoded tensors: raw logs -> protocol split -> catalogue -> feature tables.

The order matters and is the point of this module:
1. load the raw interaction log (and optional user/item feature tables) from any source;
2. split it by the evaluation protocol *before* anything is fitted, so vocabularies and numeric
   statistics come from training data only (ids first seen at test time map to the OOV bucket);
3. build the catalogue - every user and item known to the logs or feature tables - which fixes the
   integer index of each entity; full-corpus evaluation ranks all catalogue items;
4. encode one feature row per catalogue entity (the tables the towers look up by index).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from twotower.config import FileSource, MovieLensSource, RunConfig, SyntheticSource
from twotower.data.loader import load_interactions, load_table
from twotower.data.movielens import load_movielens
from twotower.data.synthetic import SyntheticWorld
from twotower.evaluate import split_for
from twotower.features import FeatureEncoder, HashedIdFeature, IdFeature
from twotower.history import history_positions

USER, ITEM = "user_id", "item_id"


@dataclass
class RawData:
    interactions: pd.DataFrame  # user_id, item_id and optional timestamp, rating, weight
    users: pd.DataFrame | None  # keyed by user_id
    items: pd.DataFrame | None  # keyed by item_id
    world: SyntheticWorld | None = None  # the known truth, when the data is synthetic
    impressions: pd.DataFrame | None = None  # shown but not clicked (user_id, item_id[, timestamp])


@dataclass
class Interactions:
    """Interactions as catalogue indices (the form training and evaluation consume)."""

    user_idx: Tensor
    item_idx: Tensor
    weight: Tensor | None = None
    history_end: Tensor | None = None  # training rows: how many of the user's events precede this one
    action: Tensor | None = None  # per-event action code (e.g. rating) for the history encoder

    def __len__(self) -> int:
        return len(self.user_idx)


@dataclass
class RetrievalData:
    user_ids: np.ndarray  # raw id of each user index
    item_ids: np.ndarray  # raw id of each item index
    user_encoder: FeatureEncoder
    item_encoder: FeatureEncoder
    user_table: dict[str, Tensor]
    item_table: dict[str, Tensor]
    train: Interactions
    valid: Interactions | None
    test: Interactions
    impressions: Interactions | None  # training-time impressions without a click
    items: pd.DataFrame | None  # item metadata (titles...) in raw-id form, for display
    raw: RawData
    # Per user index, the timestamp of the user's first test event (int64 max: none); None without
    # timestamps. Later logs (align's clicks) must not teach the model anything from then on.
    test_start: Tensor | None = None

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


def load_raw(source: MovieLensSource | SyntheticSource | FileSource) -> RawData:
    """Load the raw logs of any configured source into canonical column names."""
    if isinstance(source, MovieLensSource):
        ml = load_movielens(source.name, path=source.path, cache_dir=source.cache_dir)
        return RawData(ml.interactions, ml.users, ml.items)
    if isinstance(source, SyntheticSource):
        world = SyntheticWorld.generate(source.world)
        return RawData(world.sample_interactions(), world.users, world.items, world=world)
    loaded = load_interactions(source.interactions, source.columns, on_bad_rows=source.on_bad_rows)
    users = load_table(source.users, key=source.user_key) if source.users else None
    items = load_table(source.items, key=source.item_key) if source.items else None
    if users is not None:
        users = users.rename(columns={source.user_key: USER})
    if items is not None:
        items = items.rename(columns={source.item_key: ITEM})
    frame, impressions = loaded.frame, None
    for key, table in ((USER, users), (ITEM, items)):
        frame, table = _ids_compared_as_text(frame, table, key)
        users, items = (table, items) if key == USER else (users, table)
    if "clicked" in frame.columns:
        # Clicks are the interactions; rows shown without a click become candidate negatives.
        clicked = frame["clicked"].to_numpy(bool)
        impressions = frame[~clicked].drop(columns="clicked").reset_index(drop=True)
        frame = frame[clicked].drop(columns="clicked").reset_index(drop=True)
    return RawData(frame, users, items, impressions=impressions)


def build_retrieval_data(config: RunConfig, raw: RawData | None = None) -> RetrievalData:
    raw = raw or load_raw(config.data)
    train_df, valid_df, test_df = split_for(config.eval.protocol, raw.interactions)
    # A protocol's own validation split (temporal: each user's second-to-last event) is as much the
    # future of training as its test split: impressions stop before either (a random holdout is not).
    held_out = test_df if valid_df is None else pd.concat([valid_df, test_df])
    if "timestamp" in train_df.columns:
        # Chronological training log: user histories (and their most-recent truncation) follow time.
        train_df = train_df.sort_values("timestamp", kind="stable").reset_index(drop=True)
    if valid_df is None and config.train.valid_fraction > 0:
        train_df, valid_df = _holdout(train_df, config.train.valid_fraction, config.train.seed)

    shown = raw.interactions if raw.impressions is None else pd.concat([raw.interactions, raw.impressions])
    user_ids = _catalogue(shown[USER], raw.users)
    item_ids = _catalogue(shown[ITEM], raw.items)
    user_frame = _entity_frame(USER, user_ids, raw.users)
    item_frame = _entity_frame(ITEM, item_ids, raw.items)

    user_encoder = FeatureEncoder(list(config.features.user))
    item_encoder = FeatureEncoder(list(config.features.item))
    # Features are fitted on the entities of training rows; id vocabularies on the training rows
    # themselves, repeats included, so an id feature's min_count counts interactions.
    train_users, train_items = train_df[USER].unique(), train_df[ITEM].unique()
    tables = _table_names(config)
    _check_feature_columns(config.features.user, user_frame, tables[USER])
    _check_feature_columns(config.features.item, item_frame, tables[ITEM])
    # (A side may declare no id feature: a user tower of features and history only.)
    with _naming(tables[USER]):
        user_ids_seen = _ids_for(user_encoder, train_df[USER])
        user_encoder.fit(user_frame[user_frame[USER].isin(train_users)], id_values=user_ids_seen)
        user_table = user_encoder.transform(user_frame)
    with _naming(tables[ITEM]):
        item_ids_seen = _ids_for(item_encoder, train_df[ITEM])
        item_encoder.fit(item_frame[item_frame[ITEM].isin(train_items)], id_values=item_ids_seen)
        item_table = item_encoder.transform(item_frame)

    user_pos = pd.Index(user_ids)
    item_pos = pd.Index(item_ids)
    train = _to_indices(train_df, user_pos, item_pos)
    # Rows are chronological (sorted above when there are timestamps), so a row's position among its
    # user's rows counts the events before it: the history it may see in training. Events of the same
    # timestamp are not before one another (MovieLens logs many ratings per second), so none of them
    # is in another's history; without timestamps the log order decides.
    times = None
    if "timestamp" in train_df.columns:
        times = torch.as_tensor(train_df["timestamp"].to_numpy(np.int64, copy=True))
    train.history_end = history_positions(train.user_idx, len(user_ids), times)
    action = config.model.history.action_column
    if config.model.history.enabled and action is not None:
        if action not in train_df.columns:
            raise ValueError(
                f"model.history.action_column {action!r} is not a column of the interactions "
                f"(columns: {list(train_df.columns)})"
            )
        codes = pd.to_numeric(train_df[action]).round().astype("int64").to_numpy(copy=True)
        train.action = torch.as_tensor(codes)
        if int(train.action.min()) < 0:
            raise ValueError(f"model.history.action_column {action!r} must hold non-negative codes")
    return RetrievalData(
        user_ids=user_ids,
        item_ids=item_ids,
        user_encoder=user_encoder,
        item_encoder=item_encoder,
        user_table=user_table,
        item_table=item_table,
        train=train,
        impressions=_training_impressions(raw.impressions, held_out, user_pos, item_pos),
        valid=None if valid_df is None else _to_indices(valid_df, user_pos, item_pos),
        test=_to_indices(test_df, user_pos, item_pos),
        items=raw.items,
        raw=raw,
        test_start=_test_start(test_df, user_pos),
    )


def batch_count(rows: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches :func:`iterate_batches` yields per epoch over ``rows`` rows (a progress total)."""
    full, tail = divmod(rows, batch_size)
    return full + (0 if drop_last or tail < 2 else 1)  # a 1-row tail is skipped: no negative for it


def iterate_batches(
    data: Interactions, batch_size: int, seed: int, epoch: int, drop_last: bool = False
) -> Iterator[dict[str, Tensor]]:
    """Shuffled batches whose order depends only on (seed, epoch), so a resumed run sees the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(data), generator=generator)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < 2:  # an in-batch softmax needs at least one negative
            continue
        batch = {"user_idx": data.user_idx[idx], "item_idx": data.item_idx[idx]}
        if data.weight is not None:
            batch["weight"] = data.weight[idx]
        if data.history_end is not None:
            batch["history_end"] = data.history_end[idx]
        yield batch


def _test_start(test_df: pd.DataFrame, users: pd.Index) -> Tensor | None:
    """Each user index's first test timestamp (int64 max for users without one); None without times."""
    if "timestamp" not in test_df.columns:
        return None
    start = np.full(len(users), np.iinfo(np.int64).max, dtype=np.int64)
    if len(test_df):
        first = test_df.groupby(USER)["timestamp"].min()
        start[users.get_indexer(first.index)] = first.to_numpy(np.int64)
    return torch.from_numpy(start)


def _training_impressions(
    impressions: pd.DataFrame | None, held_out: pd.DataFrame, users: pd.Index, items: pd.Index
) -> Interactions | None:
    """Impressions a model may learn from: with timestamps, those before the user's first held-out
    (validation or test) event."""
    if impressions is None:
        return None
    if "timestamp" in impressions.columns and "timestamp" in held_out.columns and len(held_out):
        first_test = held_out.groupby(USER)["timestamp"].min()
        cutoff = impressions[USER].map(first_test)
        impressions = impressions[cutoff.isna() | (impressions["timestamp"] < cutoff)]
    return _to_indices(impressions, users, items)


def _table_names(config: RunConfig) -> dict[str, str | None]:
    """The file each side's features come from, for error messages (None: not a file of the user's)."""
    data = config.data
    if isinstance(data, FileSource):
        return {USER: data.users or data.interactions, ITEM: data.items or data.interactions}
    return {USER: None, ITEM: None}


@contextmanager
def _naming(path: str | None) -> Iterator[None]:
    """Feature errors (a value that is not a number, a list in a categorical) prefixed with their file."""
    try:
        yield
    except ValueError as exc:
        if path is None:
            raise
        raise ValueError(f"{path}: {exc}") from exc


def _check_feature_columns(specs: list, frame: pd.DataFrame, path: str | None) -> None:
    """Every feature's column is in its side's entity frame; a missing one usually names the file's id
    column, which the loaders rename."""
    missing = [
        f"{spec.name!r} (column {spec.column!r})" for spec in specs if spec.column not in frame.columns
    ]
    if missing:
        where = f"{path}: " if path else ""
        raise ValueError(
            f"{where}features {', '.join(missing)} read columns that are not there (columns: "
            f"{list(frame.columns)}); the log's user and item id columns are always called {USER} and {ITEM}"
        )


def _holdout(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    mask = np.random.default_rng(seed).random(len(df)) < fraction
    return df[~mask].reset_index(drop=True), df[mask].reset_index(drop=True)


def _ids_for(encoder: FeatureEncoder, ids: pd.Series) -> pd.Series | None:
    """The training rows' ids for the encoder's id vocabulary; None when it declares no id feature."""
    return ids if any(isinstance(s, IdFeature | HashedIdFeature) for s in encoder.specs) else None


def _ids_compared_as_text(
    frame: pd.DataFrame, table: pd.DataFrame | None, key: str
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Each file's ids are typed on their own (whole numbers, else text): a table keyed "007" is text
    while the log's 1, 2 are numbers. Then both are compared as text, so "1" in the table is 1 in
    the log and "007" stays distinct from 7."""
    if table is None:
        return frame, table
    numeric = [pd.api.types.is_integer_dtype(f[key]) for f in (frame, table)]
    if numeric[0] == numeric[1]:
        return frame, table
    return frame.assign(**{key: frame[key].astype(str)}), table.assign(**{key: table[key].astype(str)})


def _catalogue(ids: pd.Series, table: pd.DataFrame | None) -> np.ndarray:
    values = pd.Index(ids.unique())
    if table is not None:
        values = values.union(pd.Index(table[ids.name].unique()))
    return np.asarray(values.sort_values())


def _entity_frame(key: str, ids: np.ndarray, table: pd.DataFrame | None) -> pd.DataFrame:
    """One row per catalogue entity, indexed by its id, so a bad feature value is reported by id."""
    frame = pd.DataFrame({key: ids})
    if table is not None:
        frame = frame.merge(table, on=key, how="left", validate="one_to_one")
    frame.index = pd.Index(frame[key].to_numpy(), name=key)
    return frame


def _to_indices(df: pd.DataFrame, users: pd.Index, items: pd.Index) -> Interactions:
    weight: Any = None
    if "weight" in df.columns:
        weight = torch.as_tensor(df["weight"].to_numpy(np.float32))
    return Interactions(
        user_idx=torch.as_tensor(users.get_indexer(df[USER]), dtype=torch.long),
        item_idx=torch.as_tensor(items.get_indexer(df[ITEM]), dtype=torch.long),
        weight=weight,
    )
