"""Streaming Parquet reader: exactly-once epochs, disjoint shards, new order per epoch, bounded buffer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from twotower.data.streaming import ParquetStream, StreamConfig
from twotower.hashing import hash_keys, to_buckets


def _write(path: Path, rows: range, row_group_size: int) -> Path:
    table = pa.table(
        {
            "row": pa.array(np.arange(rows.start, rows.stop, dtype=np.int64)),
            "value": pa.array(np.arange(rows.start, rows.stop, dtype=np.float32) / 2),
            "name": pa.array([f"u{i % 7}" for i in rows]),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture
def one_file(tmp_path: Path) -> Path:
    return _write(tmp_path / "log.parquet", range(1000), 64)  # 15 row groups of 64 and one of 40


def _rows(batches) -> list[int]:
    return [int(r) for b in batches for r in b["row"]]


def _config(**kw) -> StreamConfig:
    return StreamConfig(**{"columns": {"row": "row", "value": "value"}, "batch_size": 50, **kw})


def test_every_row_exactly_once_per_epoch(one_file: Path):
    stream = ParquetStream(one_file, _config(shuffle_buffer=200))
    assert stream.num_rows == 1000 and len(stream.row_groups) == 16
    batches = list(stream.epoch(1))
    assert sorted(_rows(batches)) == list(range(1000))
    assert [len(b["row"]) for b in batches] == [50] * 20 and len(batches) == stream.num_batches(1)
    for batch in batches:  # columns travel together, contiguous, typed
        assert torch.equal(batch["value"], batch["row"].float() / 2)
        assert batch["row"].dtype == torch.int64 and batch["value"].dtype == torch.float32
        assert all(t.is_contiguous() for t in batch.values())


def test_partial_last_batch_and_drop_last(one_file: Path):
    kept = list(ParquetStream(one_file, _config(batch_size=300)).epoch(0))
    assert [len(b["row"]) for b in kept] == [300, 300, 300, 100]
    dropped = list(ParquetStream(one_file, _config(batch_size=300, drop_last=True)).epoch(0))
    assert [len(b["row"]) for b in dropped] == [300, 300, 300]
    assert len(set(_rows(dropped))) == 900


def test_two_shards_are_disjoint_and_cover_every_row(tmp_path: Path):
    paths = [_write(tmp_path / f"part{i}.parquet", range(i * 500, (i + 1) * 500), 50) for i in range(3)]
    streams = [ParquetStream(paths, _config(shuffle_buffer=100), rank=r, world_size=2) for r in range(2)]
    for epoch in (1, 2):
        seen = [_rows(s.epoch(epoch)) for s in streams]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(1500))
        assert abs(len(seen[0]) - len(seen[1])) <= 50  # balanced to within one row group
        # Each rank reads only its own row groups: the plan is the same whichever rank computes it.
        plan = streams[0].assignment(epoch)
        assert plan == streams[1].assignment(epoch)
        assert sum(rg.num_rows for rg in plan[1]) == len(seen[1])


def test_even_batches_give_every_rank_the_same_number_of_full_batches(tmp_path: Path):
    path = _write(tmp_path / "uneven.parquet", range(530), 100)  # row groups 100 x5 and 30
    cfg = _config(batch_size=40, even_batches=True)
    counts = []
    for rank in range(2):
        batches = list(ParquetStream(path, cfg, rank=rank, world_size=2).epoch(3))
        assert all(len(b["row"]) == 40 for b in batches)
        counts.append(len(batches))
    assert counts[0] == counts[1] == ParquetStream(path, cfg, rank=0, world_size=2).num_batches(3) > 0


def test_order_changes_across_epochs_and_repeats_for_the_same_epoch(one_file: Path):
    stream = ParquetStream(one_file, _config(shuffle_buffer=300, seed=5))
    first, second = _rows(stream.epoch(1)), _rows(stream.epoch(2))
    assert sorted(first) == sorted(second) and first != second
    assert first == _rows(ParquetStream(one_file, _config(shuffle_buffer=300, seed=5)).epoch(1))
    assert first != _rows(ParquetStream(one_file, _config(shuffle_buffer=300, seed=6)).epoch(1))
    # Shuffling reaches across row groups: rows of many groups share the first batch.
    assert len({r // 64 for r in first[:50]}) > 3


def test_memory_is_bounded_by_the_buffer_not_the_file(tmp_path: Path):
    path = _write(tmp_path / "big.parquet", range(20_000), 500)
    stream = ParquetStream(path, _config(batch_size=100, shuffle_buffer=1000))
    assert len(set(_rows(stream.epoch(0)))) == 20_000
    # Held at once: at most the buffer plus one row group plus a batch's remainder - not 20k rows.
    assert 1000 <= stream.peak_buffered_rows <= 1000 + 500 + 100


def test_without_row_shuffle_rows_keep_their_order_within_a_row_group(one_file: Path):
    stream = ParquetStream(one_file, _config(shuffle_buffer=0, shuffle_row_groups=False, batch_size=64))
    assert _rows(stream.epoch(0)) == list(range(1000))


def test_columns_encoding_and_errors(one_file: Path):
    with pytest.raises(ValueError, match="not in the Parquet schema"):
        ParquetStream(one_file, StreamConfig(columns={"x": "missing"}))
    with pytest.raises(TypeError, match="encode="):
        next(iter(ParquetStream(one_file, StreamConfig(columns={"user": "name"})).epoch(0)))

    def encode(table: pa.Table) -> dict[str, np.ndarray]:
        names = table.column("name").to_pylist()
        return {"row": table.column("row").to_numpy(), "user": to_buckets(hash_keys(names), 16)}

    batch = next(iter(ParquetStream(one_file, StreamConfig(batch_size=10), encode=encode).epoch(0)))
    want = [int(to_buckets(hash_keys([f"u{int(r) % 7}"]), 16)[0]) for r in batch["row"]]
    assert batch["user"].tolist() == want
    with pytest.raises(ValueError, match="rank"):
        ParquetStream(one_file, rank=2, world_size=2)


def test_a_directory_of_parquet_files_is_read_like_the_list_of_its_files(tmp_path: Path):
    root = tmp_path / "dataset"
    root.mkdir()
    for i in range(3):
        _write(root / f"part{i}.parquet", range(i * 100, (i + 1) * 100), 30)
    (root / "_SUCCESS").write_text("")  # what Spark leaves beside its part files
    stream = ParquetStream(root, _config(shuffle_buffer=50))
    assert stream.num_rows == 300 and sorted(_rows(stream.epoch(1))) == list(range(300))
    files = sorted(root.glob("*.parquet"))
    assert _rows(stream.epoch(1)) == _rows(ParquetStream(files, _config(shuffle_buffer=50)).epoch(1))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no Parquet files under"):
        ParquetStream(empty)


def test_null_values_are_refused_naming_the_column_not_turned_into_nan(tmp_path: Path):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"item": pa.array([1, None, 3], pa.int64()), "x": [1.0, 2.0, 3.0]}), path)
    with pytest.raises(ValueError, match=r"column 'item' has 1 null value.*encode="):
        list(ParquetStream(path, StreamConfig(batch_size=3)).epoch(0))


def test_a_file_that_cannot_be_read_is_named_in_the_error(tmp_path: Path):
    good = _write(tmp_path / "good.parquet", range(100), 50)
    other = tmp_path / "other.parquet"  # no "value" column: the dataset schema comes from the first file
    pq.write_table(pa.table({"row": np.arange(100, 150, dtype=np.int64)}), other)
    stream = ParquetStream([good, other], _config(shuffle_row_groups=False))
    with pytest.raises(ValueError, match=r"other\.parquet.*row group 0"):
        list(stream.epoch(0))


def test_one_column_under_two_batch_keys(one_file: Path):
    stream = ParquetStream(one_file, StreamConfig(batch_size=100, columns={"row": "row", "copy": "row"}))
    batch = next(iter(stream.epoch(0)))
    assert torch.equal(batch["row"], batch["copy"])


def test_a_negative_seed_is_refused_by_the_config_naming_it():
    from pydantic import ValidationError

    # numpy's generators take no negative seed: it was "expected non-negative integer" at the first batch
    with pytest.raises(ValidationError, match="seed"):
        StreamConfig(seed=-1)


def test_a_null_in_one_of_many_files_names_the_file_row_group_and_row(tmp_path: Path):
    # Among many part files, "column 'item' has 1 null value(s)" did not say where the null was.
    good = tmp_path / "part0.parquet"
    pq.write_table(pa.table({"row": np.arange(100, dtype=np.int64), "item": np.arange(100)}), good)
    bad = tmp_path / "part1.parquet"
    items = pa.array([7, 8, 9, 10, None, 12], pa.int64())
    pq.write_table(
        pa.table({"row": np.arange(100, 106, dtype=np.int64), "item": items}), bad, row_group_size=3
    )
    stream = ParquetStream([good, bad], StreamConfig(columns={"row": "row", "item": "item"}, batch_size=4))
    with pytest.raises(ValueError) as info:
        list(stream.epoch(0))
    message = str(info.value)
    assert message.startswith(f"{bad}, row group 1, column 'item' has 1 null value(s)")
    assert "(the first in row 5 of the file)" in message  # row group 0 holds rows 1-3
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"row": np.arange(3, dtype=np.int64), "user": ["a", "b", "c"]}), text)
    with pytest.raises(TypeError, match=rf"^{text}, row group 0, column 'user' holds string"):
        list(ParquetStream(text, StreamConfig(columns={"user": "user"})).epoch(0))
