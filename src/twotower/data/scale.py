"""A synthetic interaction log at production scale (10M rows over 1M items), written as Parquet row groups.

``generate_scale_dataset(out_dir, ScaleConfig())`` writes, generating chunk by chunk so its own peak
memory is a few chunks of rows, never the log:

    interactions.parquet   user_id int64, item_id int64, timestamp int64 - in time order, in row groups
                           of ``row_group_size`` rows (the unit ``twotower.data.streaming`` shuffles)
    items.parquet          item_id int64 (0..num_items-1, the catalogue index), category int32,
                           tags list<int32> (1-3 distinct tags, one of them the category's own)
    scale.json             the config and the counts, so a later run can reuse the files

The generative story keeps a structure a model can learn, at numpy speed:

* items are dealt into ``num_categories`` categories; popularity is a random global ranking of items,
  and an item is drawn as ``ranking[floor(n * v ** skew)]``, ``v ~ U(0, 1)`` - a heavy head (the top
  1% of ranks get ``0.01 ** (1 / skew)`` of the draws: 21.5% at skew 3) and a long tail;
* users have random sparse 62-bit ids (as real logs do: a vocabulary would have to be built from the
  log; a ``hashed_id`` feature needs none), a log-normal activity, and two preferred categories;
* a row picks a user by activity; with probability ``affinity`` its item comes from one of the
  user's categories (drawn by the same skewed law over the category's items, in popularity order),
  otherwise from the whole catalogue.

Everything is drawn from ``numpy.random.default_rng([seed, ...])``: the same config gives the same files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from twotower.storage import read_json, temp_file_beside, write_json

__all__ = ["ScaleConfig", "ScaleDataset", "generate_scale_dataset", "open_scale_dataset"]

_FORMAT = "twotower.scale/1"
T_START = 1_577_836_800  # 2020-01-01 UTC
T_SPAN = 365 * 86_400


class ScaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_interactions: int = Field(10_000_000, ge=1)
    num_items: int = Field(1_000_000, ge=2)
    num_users: int = Field(200_000, ge=1)
    num_categories: int = Field(1000, ge=1)
    num_tags: int = Field(200, ge=1)
    affinity: float = Field(0.7, ge=0, le=1, description="share of rows drawn from the user's categories")
    skew: float = Field(3.0, ge=1, description="popularity: item rank = floor(n * U(0,1) ** skew)")
    row_group_size: int = Field(262_144, ge=1, description="rows per Parquet row group")
    chunk_rows: int = Field(1_048_576, ge=1, description="rows generated (and held) at once")
    seed: int = Field(0, ge=0, description="numpy takes no negative seed")


@dataclass(frozen=True)
class ScaleDataset:
    root: Path
    config: ScaleConfig

    @property
    def interactions(self) -> Path:
        return self.root / "interactions.parquet"

    @property
    def items(self) -> Path:
        return self.root / "items.parquet"


@dataclass(frozen=True)
class _World:
    item_category: np.ndarray  # [I] int32
    tag_offsets: np.ndarray  # [I + 1] int32 offsets into tag_values (a Parquet list column)
    tag_values: np.ndarray  # int32 tag ids
    ranking: np.ndarray  # [I] item ids, most popular first
    cat_indptr: np.ndarray  # [C + 1] CSR over categories ...
    cat_items: np.ndarray  # ... of item ids, most popular first within each category
    user_ids: np.ndarray  # [U] sparse int64 ids
    user_cdf: np.ndarray  # [U] cumulative activity, last = 1
    user_categories: np.ndarray  # [U, 2] preferred categories


def _world(cfg: ScaleConfig) -> _World:
    rng = np.random.default_rng([cfg.seed, 0])
    n_i, n_c, n_t = cfg.num_items, cfg.num_categories, cfg.num_tags
    category = rng.integers(0, n_c, size=n_i).astype(np.int32)
    category_tag = rng.integers(0, n_t, size=n_c)
    extra = rng.binomial(2, 0.4, size=n_i)  # 0-2 further tags per item
    random_tags = rng.integers(0, n_t, size=(n_i, 2))
    # Tags as a padded [I, 3] block (-1 = none), de-duplicated per row by sorting: vectorised, because
    # a million small per-item arrays would cost seconds and ~100 MB of object overhead.
    tags = np.concatenate([category_tag[category][:, None], random_tags], axis=1)
    tags = np.where(np.arange(3)[None, :] <= extra[:, None], tags, -1)
    tags.sort(axis=1)
    keep = tags >= 0
    keep[:, 1:] &= tags[:, 1:] != tags[:, :-1]
    ranking = rng.permutation(n_i).astype(np.int64)
    rank_of = np.empty(n_i, dtype=np.int64)
    rank_of[ranking] = np.arange(n_i)
    by_category = np.lexsort((rank_of, category))  # category-major, popularity order within
    cat_indptr = np.r_[0, np.cumsum(np.bincount(category, minlength=n_c))]
    # Unique sparse ids: distinct draws from [0, 2**62), re-drawn on the (astronomically rare) clash.
    ids = np.unique(rng.integers(0, 2**62, size=cfg.num_users, dtype=np.int64))
    while len(ids) < cfg.num_users:
        more = rng.integers(0, 2**62, size=cfg.num_users - len(ids), dtype=np.int64)
        ids = np.unique(np.r_[ids, more])
    activity = rng.lognormal(0.0, 1.0, size=cfg.num_users)
    return _World(
        item_category=category,
        tag_offsets=np.r_[0, np.cumsum(keep.sum(axis=1))].astype(np.int32),
        tag_values=tags[keep].astype(np.int32),
        ranking=ranking,
        cat_indptr=cat_indptr,
        cat_items=by_category.astype(np.int64),
        user_ids=rng.permutation(ids),
        user_cdf=np.cumsum(activity) / activity.sum(),
        user_categories=rng.integers(0, n_c, size=(cfg.num_users, 2)),
    )


def _chunks(cfg: ScaleConfig, world: _World) -> Iterator[pa.Table]:
    """The log, ``chunk_rows`` rows at a time, in time order."""
    rng = np.random.default_rng([cfg.seed, 1])
    for start in range(0, cfg.num_interactions, cfg.chunk_rows):
        n = min(cfg.chunk_rows, cfg.num_interactions - start)
        users = np.minimum(np.searchsorted(world.user_cdf, rng.random(n)), cfg.num_users - 1)
        # Global draws by popularity, then the affinity rows replaced by draws inside a category.
        items = world.ranking[(cfg.num_items * rng.random(n) ** cfg.skew).astype(np.int64)]
        own = np.flatnonzero(rng.random(n) < cfg.affinity)
        cats = world.user_categories[users[own], rng.integers(0, 2, size=len(own))]
        lo, size = world.cat_indptr[cats], np.diff(world.cat_indptr)[cats]
        filled = size > 0
        pick = lo + (size * rng.random(len(own)) ** cfg.skew).astype(np.int64)
        items[own[filled]] = world.cat_items[pick[filled]]
        # Time advances with the row number; jitter within a second keeps ties realistic.
        row = np.arange(start, start + n, dtype=np.int64)
        timestamp = T_START + row * T_SPAN // cfg.num_interactions + rng.integers(0, 2, size=n)
        yield pa.table(
            {
                "user_id": pa.array(world.user_ids[users], pa.int64()),
                "item_id": pa.array(items, pa.int64()),
                "timestamp": pa.array(timestamp, pa.int64()),
            }
        )


def _write_atomic(path: Path, tables: Iterator[pa.Table], schema: pa.Schema, row_group_size: int) -> None:
    fd, tmp = temp_file_beside(path)  # the mode open() would give, not mkstemp's owner-only 0600
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for table in tables:
                writer.write_table(table, row_group_size=row_group_size)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())  # on disk before the rename (and before scale.json names it)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate_scale_dataset(out_dir: str | Path, config: ScaleConfig | None = None) -> ScaleDataset:
    """Write the dataset of ``config`` into ``out_dir`` (see the module docstring); returns it."""
    cfg = config or ScaleConfig()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    # The manifest vouches for the files: drop it first, so an interrupted rewrite (new items.parquet,
    # old interactions.parquet) is not later opened as the dataset of the old manifest's config.
    (root / "scale.json").unlink(missing_ok=True)
    world = _world(cfg)
    items = pa.table(
        {
            "item_id": pa.array(np.arange(cfg.num_items, dtype=np.int64)),
            "category": pa.array(world.item_category),
            "tags": pa.ListArray.from_arrays(pa.array(world.tag_offsets), pa.array(world.tag_values)),
        }
    )
    _write_atomic(root / "items.parquet", iter([items]), items.schema, cfg.row_group_size)
    del items
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
    _write_atomic(root / "interactions.parquet", _chunks(cfg, world), schema, cfg.row_group_size)
    write_json(
        root / "scale.json",
        {"format": _FORMAT, "config": cfg.model_dump(), "num_interactions": cfg.num_interactions},
    )
    return ScaleDataset(root, cfg)


def open_scale_dataset(root: str | Path, expected: ScaleConfig | None = None) -> ScaleDataset | None:
    """The dataset already written in ``root`` (None when absent, incomplete or of another config)."""
    root = Path(root)
    manifest = root / "scale.json"
    if not all(p.exists() for p in (manifest, root / "interactions.parquet", root / "items.parquet")):
        return None
    meta = read_json(manifest)
    if meta.get("format") != _FORMAT:
        return None
    config = ScaleConfig.model_validate(meta["config"])
    if expected is not None and config != expected:
        return None
    return ScaleDataset(root, config)
