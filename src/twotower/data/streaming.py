"""Stream batches out of Parquet files larger than memory: row groups in, shuffled batches out.

``ParquetStream(paths, StreamConfig(...), rank=r, world_size=w).epoch(e)`` yields ``dict[str, Tensor]``
batches, and ``stream.epoch`` is exactly the ``batches(epoch)`` callable ``twotower.train.fit`` takes.

How an epoch is read (everything random is derived from (seed, epoch), so a resumed run or another
rank recomputes the same thing):

1. The unit of I/O is a Parquet row group of any file of the dataset (``pyarrow.dataset``; the row
   counts come from the file footers, no data is read to plan an epoch).
2. Row-group order is shuffled with an RNG of (seed, epoch) - identical on every rank - and the
   shuffled row groups are dealt to ranks greedily (each goes to the rank holding the fewest rows so
   far), so the ranks' parts are disjoint, together cover every row, and differ by at most one row
   group in size. A row group is read by exactly one rank: no rank reads what it does not use.
3. Each rank pushes its row groups through a bounded shuffle buffer of rows: after a row group is
   added, the buffer is permuted (RNG of (seed, epoch, rank)) and whole batches are cut off until
   at most ``shuffle_buffer`` rows remain; at the end of the shard the remainder is permuted and
   emptied. Every row is yielded exactly once per epoch, and at most ``shuffle_buffer`` plus one
   row group plus one batch of rows is ever held - memory is bounded by the buffer, not the files.

DDP needs every rank to take the same number of steps; ``even_batches=True`` makes every rank stop
after the number of full batches the smallest shard holds (known from the footers before reading),
at the price of leaving a few rows out of that epoch (a different few each epoch).

``twotower.train.fit`` itself shards every GLOBAL batch across ranks (``twotower.distributed``): under
it, give every rank the same stream (``rank=0, world_size=1``, same seed), so all ranks see the same
global batches. ``rank``/``world_size`` here are for loops where each process reads only its own part
of the data (each row group is then read by one process instead of all of them).

Columns are converted per row group, before buffering, by ``encode(table) -> {name: array}`` (default:
each selected column as a numeric numpy array): the place to hash string ids
(``twotower.hashing``) or map raw ids to catalogue indices, so the buffer only holds compact numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

__all__ = ["ParquetStream", "RowGroup", "StreamConfig"]

Encode = Callable[[pa.Table], dict[str, np.ndarray]]


class StreamConfig(BaseModel):
    """How a Parquet dataset is cut into batches."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(1024, ge=1)
    shuffle_buffer: int = Field(
        262_144, ge=0, description="rows held back for shuffling across row groups; 0: no row shuffle"
    )
    shuffle_row_groups: bool = Field(True, description="a new row-group order every epoch")
    drop_last: bool = Field(False, description="drop each shard's final partial batch")
    even_batches: bool = Field(
        False, description="every rank yields the same number of full batches (DDP lockstep)"
    )
    columns: dict[str, str] | None = Field(
        None, description="batch key -> Parquet column for the default encoder; None: every column"
    )
    seed: int = Field(0, ge=0, description="seeds numpy's generators, which take no negative seed")


@dataclass(frozen=True)
class RowGroup:
    """One unit of I/O: row group ``index`` of file number ``file``."""

    file: int
    index: int
    num_rows: int


class ParquetStream:
    """Shuffled, sharded batches over one or many Parquet files (see the module docstring)."""

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        config: StreamConfig | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        encode: Encode | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.config = config or StreamConfig()
        self.rank, self.world_size = rank, world_size
        sources = [str(paths)] if isinstance(paths, str | Path) else [str(p) for p in paths]
        if not sources:
            raise ValueError("ParquetStream needs at least one path")
        # pyarrow takes a list of files only: a directory (a dataset of part files) is expanded to its
        # Parquet files, in sorted order so every rank plans the same row groups.
        files: list[str] = []
        for source in sources:
            is_dir = Path(source).is_dir()
            files += sorted(ds.dataset(source, format="parquet").files) if is_dir else [source]
        if not files:
            raise ValueError(f"no Parquet files under {sources}")
        self.dataset = ds.dataset(files, format="parquet")
        self.fragments = list(self.dataset.get_fragments())
        if not self.fragments:
            raise ValueError(f"no Parquet files under {sources}")
        self.row_groups = [
            RowGroup(f, rg.id, rg.num_rows) for f, frag in enumerate(self.fragments) for rg in frag.row_groups
        ]
        self._columns = self._check_columns()
        self.encode = encode or self._default_encode
        # The largest number of rows held at once in the last epoch: what the memory bound is about.
        self.peak_buffered_rows = 0

    @property
    def num_rows(self) -> int:
        return sum(rg.num_rows for rg in self.row_groups)

    def _check_columns(self) -> list[str]:
        names = self.dataset.schema.names
        # Each column once, though several batch keys may take it (pyarrow refuses a repeated column).
        wanted = list(dict.fromkeys(self.config.columns.values())) if self.config.columns else names
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ValueError(f"columns {missing} are not in the Parquet schema (columns: {names})")
        return wanted

    # --- planning -----------------------------------------------------------------------------------

    def assignment(self, epoch: int) -> list[list[RowGroup]]:
        """Every rank's row groups for ``epoch``, in reading order (the same on every rank)."""
        order = list(self.row_groups)
        if self.config.shuffle_row_groups:
            rng = np.random.default_rng([self.config.seed, epoch])
            order = [order[i] for i in rng.permutation(len(order))]
        shards: list[list[RowGroup]] = [[] for _ in range(self.world_size)]
        load = [0] * self.world_size
        for rg in order:
            r = min(range(self.world_size), key=lambda k: (load[k], k))  # the least-loaded rank, lowest id
            shards[r].append(rg)
            load[r] += rg.num_rows
        return shards

    def num_batches(self, epoch: int) -> int:
        """Batches this rank yields in ``epoch``."""
        bs = self.config.batch_size
        sizes = [sum(rg.num_rows for rg in shard) for shard in self.assignment(epoch)]
        if self.config.even_batches:
            return min(sizes) // bs
        rows = sizes[self.rank]
        return rows // bs if self.config.drop_last else -(-rows // bs)

    # --- reading ------------------------------------------------------------------------------------

    def read(self, rg: RowGroup) -> pa.Table:
        fragment = self.fragments[rg.file]
        try:
            part = fragment.subset(row_group_ids=[rg.index])
            return part.to_table(columns=self._columns, use_threads=False)
        except pa.ArrowException as err:  # e.g. a file without a column of the first file's schema
            raise ValueError(f"{fragment.path}, row group {rg.index}: {err}") from err

    def _default_encode(self, table: pa.Table, rg: RowGroup | None = None) -> dict[str, np.ndarray]:
        mapping = self.config.columns or {name: name for name in table.column_names}
        # Where the table came from, so that a bad file among hundreds of part files can be found.
        where = "" if rg is None else f"{self.fragments[rg.file].path}, row group {rg.index}, "
        out = {}
        for key, column in mapping.items():
            nulls = table.column(column).null_count
            if nulls:  # to_numpy would turn them into NaN (integer ids into float64) without a word
                first = ""
                if rg is not None:
                    before = sum(
                        g.num_rows for g in self.row_groups if g.file == rg.file and g.index < rg.index
                    )
                    null_at = pc.index(pc.is_null(table.column(column)), True).as_py()
                    first = f" (the first in row {before + null_at + 1} of the file)"
                raise ValueError(
                    f"{where}column {column!r} has {nulls} null value(s){first}: pass an encode= that fills "
                    "or drops them"
                )
            values = table.column(column).to_numpy()
            if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
                raise TypeError(
                    f"{where}column {column!r} holds {table.schema.field(column).type}, not numbers: pass "
                    "an encode= that maps it to numbers (e.g. twotower.hashing for string ids)"
                )
            out[key] = values
        return out

    def _encoded(self, rg: RowGroup) -> dict[str, np.ndarray]:
        table = self.read(rg)
        # The default encoder is told the row group, to locate a bad cell (a bound method compares equal).
        return self._default_encode(table, rg) if self.encode == self._default_encode else self.encode(table)

    def epoch(self, epoch: int) -> Iterator[dict[str, Tensor]]:
        """This rank's batches of ``epoch`` (see the module docstring for order and guarantees)."""
        cfg = self.config
        bs, capacity = cfg.batch_size, cfg.shuffle_buffer
        limit = self.num_batches(epoch) if cfg.even_batches else None
        rng = np.random.default_rng([cfg.seed, epoch, self.rank])
        pool: dict[str, np.ndarray] | None = None
        emitted = 0
        self.peak_buffered_rows = 0
        for rg in self.assignment(epoch)[self.rank]:
            chunk = self._encoded(rg)
            pool = chunk if pool is None else {k: np.concatenate([pool[k], chunk[k]]) for k in pool}
            held = _length(pool)
            self.peak_buffered_rows = max(self.peak_buffered_rows, held)
            n_out = max(held - capacity, 0) // bs * bs
            if n_out == 0:
                continue
            # Shuffle the whole pool, emit from the front, keep the back: each emitted row is a
            # uniform draw (without replacement) from everything buffered so far.
            order = rng.permutation(held) if capacity else np.arange(held)
            for start in range(0, n_out, bs):
                if limit is not None and emitted >= limit:
                    return
                yield _take(pool, order[start : start + bs])
                emitted += 1
            pool = _take_numpy(pool, order[n_out:])
        if pool is None:
            return
        held = _length(pool)
        order = rng.permutation(held) if capacity else np.arange(held)
        stop = held - held % bs if cfg.drop_last or limit is not None else held
        for start in range(0, stop, bs):
            if limit is not None and emitted >= limit:
                return
            yield _take(pool, order[start : start + bs])
            emitted += 1

    __call__ = epoch  # a stream is itself a ``batches(epoch)`` callable


def _length(pool: dict[str, np.ndarray]) -> int:
    return len(next(iter(pool.values())))


def _take_numpy(pool: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in pool.items()}


def _take(pool: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, Tensor]:
    # Fancy indexing copies into a fresh C-contiguous array, so every batch tensor is contiguous
    # and owns its memory (the pool can be replaced underneath it).
    return {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in pool.items()}
