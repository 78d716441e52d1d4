"""The scale generator on a small size: row counts, schema, row groups, determinism, planted structure."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower.data.scale import ScaleConfig, generate_scale_dataset, open_scale_dataset
from twotower.data.streaming import ParquetStream, StreamConfig

SMALL = ScaleConfig(
    num_interactions=50_000, num_items=5_000, num_users=800, num_categories=50, num_tags=30,
    row_group_size=4_096, chunk_rows=12_000, seed=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_scale_dataset(tmp_path_factory.mktemp("scale"), SMALL)


def test_counts_schema_and_row_groups(dataset):
    log = pq.ParquetFile(dataset.interactions)
    assert log.metadata.num_rows == 50_000
    assert log.schema_arrow == pa.schema(
        [("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())]
    )
    sizes = [log.metadata.row_group(i).num_rows for i in range(log.metadata.num_row_groups)]
    assert max(sizes) <= 4_096 and sum(sizes) == 50_000 and len(sizes) >= 13
    items = pq.read_table(dataset.items)
    assert items.schema.field("tags").type == pa.list_(pa.int32())
    assert items.column("item_id").to_pylist() == list(range(5_000))
    tags = items.column("tags").to_pylist()
    assert all(1 <= len(t) <= 3 and len(set(t)) == len(t) and all(0 <= x < 30 for x in t) for t in tags)
    category = items.column("category").to_numpy()
    assert ((category >= 0) & (category < 50)).all()


def test_values_in_range_time_ordered_and_structured(dataset):
    log = pq.read_table(dataset.interactions).to_pandas()
    assert log["item_id"].between(0, 4_999).all()
    assert log["user_id"].nunique() <= 800 and log["user_id"].min() >= 0
    assert (np.diff(log["timestamp"].to_numpy()) >= -1).all()  # time order, up to the 1 s jitter
    counts = log["item_id"].value_counts()
    assert counts.iloc[:50].sum() / len(log) > 0.15  # a heavy popularity head: top 1% of items
    # Affinity: a user's rows concentrate on a couple of categories (random would spread over 50).
    category = pq.read_table(dataset.items).column("category").to_numpy()
    log["category"] = category[log["item_id"].to_numpy()]
    top = log.groupby("user_id")["category"].agg(lambda c: c.value_counts().iloc[:2].sum() / len(c))
    busy = log["user_id"].value_counts()
    assert top[busy[busy >= 50].index].mean() > 0.5


def test_same_config_same_files_and_reuse(dataset, tmp_path):
    again = generate_scale_dataset(tmp_path, SMALL)
    assert pq.read_table(again.interactions).equals(pq.read_table(dataset.interactions))
    assert open_scale_dataset(tmp_path, SMALL) == again
    assert open_scale_dataset(tmp_path, SMALL.model_copy(update={"seed": 4})) is None
    assert open_scale_dataset(tmp_path / "absent") is None


def test_streams_exactly_once(dataset):
    cfg = StreamConfig(batch_size=1000, shuffle_buffer=5000, columns={"item_idx": "item_id"})
    stream = ParquetStream(dataset.interactions, cfg)
    total = sum(len(b["item_idx"]) for b in stream.epoch(0))
    assert total == 50_000
