"""Files that are never half-written: atomic text/JSON/safetensors writes, and safe loads.

Everything twotower persists is JSON or safetensors (never pickle: loading a pickle runs code).
Writes go to a temporary file in the same directory, are flushed to disk, then renamed over the
target, so a crash leaves either the old file or the new one - never a truncated one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


_umask_value = _umask()  # read once at import, not per write: setting it is process-wide (threads)
_FILE_MODE = 0o666 & ~_umask_value  # what open(path, "w") would give


def temp_file_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in ``path``'s directory, to be renamed over ``path``: ``(fd, name)``.

    ``mkstemp`` makes it owner-only (0600); it gets the mode a plain ``open`` would have given, or a
    model written by one account could not be served by another."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)
    return fd, tmp


def staging_dir_beside(path: Path, prefix: str | None = None) -> Path:
    """A new directory in ``path``'s parent, to be filled and renamed to ``path``; like
    :func:`temp_file_beside`, with the mode ``mkdir`` would have given, not ``mkdtemp``'s 0700."""
    staging = Path(tempfile.mkdtemp(prefix=prefix or f".{path.name}.", dir=path.parent))
    staging.chmod(0o777 & ~_umask_value)
    return staging


def _atomic_write(path: Path, write: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle, tmp)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable: until the directory itself is synced, a power loss may
    undo it (and a checkpoint's JSON could outlive the rename of the tensors file it names). Best
    effort: some file systems refuse to sync a directory, and the file is in place either way."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda handle, _tmp: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_parquet(path: Path, frame: Any) -> None:
    """A pandas DataFrame as Parquet (no index), atomically."""
    _atomic_write(path, lambda handle, _tmp: frame.to_parquet(handle, index=False))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks: logs and weights of GBs are never held in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, obj: Any, sort_keys: bool = True) -> None:
    """``obj`` as indented JSON, atomically; a NaN or infinite float is written as ``null``.
    ``sort_keys=False`` keeps the dicts' own order, for files whose order is their content (rows of a
    table).

    Python's json would write the bare tokens NaN / Infinity, which are not JSON: jq, JSON.parse and
    most other tools reject the whole file. Such values do occur - a metric no user could be evaluated
    on is NaN - and metrics, histories and bench results are the files people hand to other tools. An
    error instead would lose a finished run's results over one undefined metric; null reads as "no
    value", and the readers of these files (the report, the bench tables) take it as a missing number.
    ``allow_nan=False``: a value that got past :func:`_finite` fails rather than writing such a file.
    """
    text = json.dumps(_finite(obj), indent=2, sort_keys=sort_keys, default=_finite_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float inside dicts and lists (tuples too) replaced by None."""
    if isinstance(obj, float):  # numpy's float64 too; other numpy floats go through _finite_default
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(value) for value in obj]
    return obj


def _finite_default(obj: Any) -> Any:
    """What json cannot write itself (tensors, numpy values, paths), converted and then made finite."""
    return _finite(_json_default(obj))


class DamagedFileError(ValueError, SafetensorError):
    """A truncated or corrupt JSON/safetensors file; the message names the file (the parsers' own errors
    do not). A ValueError and a SafetensorError, so callers catching either still catch it."""


def read_json(path: Path) -> Any:
    try:  # JSON is UTF-8 whatever the locale says
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise DamagedFileError(f"{path}: not a readable JSON file ({err})") from err


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save a flat ``{name: tensor}`` dict as safetensors, atomically.

    Tensors are made contiguous and de-aliased first: safetensors refuses tensors that share memory
    (e.g. tied weights or views), and a checkpoint should not depend on such layout details.
    """
    flat = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata=metadata)
        os.chmod(tmp, _FILE_MODE)  # save_file writes a new file of its own, owner-only
        # On disk before the rename, as write_json does: a checkpoint's JSON commit record must never
        # name a tensors file that a power loss could leave empty.
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise DamagedFileError(f"{path}: not a readable safetensors file ({err})") from err


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor | np.ndarray):  # an array's .item() only takes one element
        return obj.tolist()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
