"""Item embeddings of a whole catalogue, computed and written chunk by chunk.

Embedding a catalogue of millions of items in one go holds every intermediate at once: the gathered
feature tensors of all items, each chunk's output, and the concatenated matrix (the one-shot
``TwoTowerModel.item_embeddings`` holds the chunk outputs and their concatenation together: twice
the result). Here each chunk's features are gathered, embedded, appended to the output file and
dropped before the next chunk starts, so memory is one chunk, whatever the catalogue size.

The file is an ordinary safetensors file, byte for byte what ``safetensors.torch.save_file`` writes
for ``{"embeddings": Tensor[N, d]}``: the header only needs the final shape, which is known before
the first row is computed (N items, the tower's output size), so it is written first and the rows
are appended after it. The file is written under a temporary name, flushed to disk and renamed into
place (``twotower.storage``), and :func:`open_embeddings` maps it back without reading it into memory.

With the same chunk size the rows are bit-identical to ``item_embeddings`` (both embed chunks of
8192 by default; a matrix product's rounding may depend on how many rows it is given).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from twotower.storage import temp_file_beside

__all__ = ["SafetensorsAppender", "embed_item_chunks", "open_embeddings", "write_item_embeddings"]

_DTYPES = {
    torch.float32: ("F32", np.float32),
    torch.float16: ("F16", np.float16),
    torch.int64: ("I64", np.int64),
}


class SafetensorsAppender:
    """Write ONE tensor of a known shape into a safetensors file, rows appended in order.

    ``with SafetensorsAppender(path, "embeddings", (n, d)) as out: out.append(rows)``; closing checks
    that exactly ``n`` rows arrived, fsyncs and renames the temporary file over ``path``. An error
    inside the block leaves no file behind (and the previous ``path``, if any, untouched).
    """

    def __init__(
        self,
        path: str | Path,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype = torch.float32,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype}; supported: {list(_DTYPES)}")
        self.path, self.name, self.shape, self.dtype = Path(path), name, tuple(shape), dtype
        self.metadata = metadata
        self.rows_written = 0
        self._handle: Any = None
        self._tmp: str | None = None

    def _header(self) -> bytes:
        code, np_dtype = _DTYPES[self.dtype]
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
        header: dict[str, Any] = {}
        if self.metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in self.metadata.items()}
        header[self.name] = {"dtype": code, "shape": list(self.shape), "data_offsets": [0, nbytes]}
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        # The format pads the header with spaces so the data starts 8-byte aligned.
        text += b" " * (-(8 + len(text)) % 8)
        return len(text).to_bytes(8, "little") + text

    def __enter__(self) -> SafetensorsAppender:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = temp_file_beside(self.path)
        self._handle = os.fdopen(fd, "wb")
        self._handle.write(self._header())
        return self

    def append(self, rows: Tensor) -> None:
        if tuple(rows.shape[1:]) != self.shape[1:]:
            raise ValueError(f"rows of shape {tuple(rows.shape[1:])}, expected {self.shape[1:]}")
        if self.rows_written + len(rows) > self.shape[0]:
            raise ValueError(f"more than the declared {self.shape[0]} rows")
        data = rows.detach().to("cpu", self.dtype).contiguous().numpy()
        self._handle.write(data.tobytes())  # native byte order: little-endian on every supported CPU
        self.rows_written += len(rows)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._handle is not None and self._tmp is not None
        try:
            if exc_type is None and self.rows_written != self.shape[0]:
                raise ValueError(f"{self.rows_written} rows written, {self.shape[0]} declared")
            if exc_type is None:
                self._handle.flush()
                os.fsync(self._handle.fileno())
            self._handle.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            if not self._handle.closed:
                self._handle.close()
            Path(self._tmp).unlink(missing_ok=True)  # no-op after a successful rename


@torch.no_grad()
def embed_item_chunks(model: Any, chunk_size: int = 8192) -> Iterator[Tensor]:
    """The item tower's embeddings of catalogue indices 0..N-1, ``chunk_size`` items at a time, in eval
    mode (no dropout). Only one chunk's gathered features and output exist at any time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    was_training = model.training
    model.eval()
    try:
        for start in range(0, model.num_items, chunk_size):
            idx = torch.arange(start, min(start + chunk_size, model.num_items))
            yield model.item_tower(model.item_features(idx))
    finally:
        model.train(was_training)


def write_item_embeddings(
    model: Any, path: str | Path, chunk_size: int = 8192, metadata: dict[str, str] | None = None
) -> Tensor:
    """Embed the catalogue of a ``TwoTowerModel`` chunk by chunk into ``path`` (``{"embeddings": [N, d]}``
    safetensors); returns the written matrix memory-mapped from the file (see :func:`open_embeddings`)."""
    shape = (model.num_items, model.item_tower.output_dim)
    with SafetensorsAppender(path, "embeddings", shape, torch.float32, metadata) as out:
        for chunk in embed_item_chunks(model, chunk_size):
            out.append(chunk)
    return open_embeddings(path)


def open_embeddings(path: str | Path, name: str = "embeddings") -> Tensor:
    """A tensor of a safetensors file, memory-mapped: pages are read when touched, never all at once.

    The mapping is copy-on-write, so writing into the tensor never changes the file.
    """
    path = Path(path)
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    if name not in header:
        raise KeyError(f"{path} holds no tensor {name!r} (tensors: {sorted(set(header) - {'__metadata__'})})")
    entry = header[name]
    np_dtype = next((np_t for code, np_t in _DTYPES.values() if code == entry["dtype"]), None)
    if np_dtype is None:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize:
        raise ValueError(f"{path}: tensor {name!r} offsets do not match its shape {shape}")
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return torch.zeros(shape, dtype=next(t for t, (c, _) in _DTYPES.items() if c == entry["dtype"]))
    array = np.memmap(path, dtype=np_dtype, mode="c", offset=8 + size + begin, shape=shape)
    return torch.from_numpy(array)
