"""Stable 64-bit hashing of ids into buckets, for vocabularies too large to build or store.

A ``hashed_id`` feature (``twotower.feature_specs.HashedIdFeature``) maps each raw id to
``1 + hash(id) % num_buckets``; 0 stays "missing", as for every other categorical kind. The hash must
be the same in every process, on every machine and in every run - training, several DDP ranks,
export and serving all have to agree - so Python's ``hash()`` is out: it is salted per process for
strings (``PYTHONHASHSEED``). Instead:

- integers (the canonical key of ``7``, ``np.int64(7)`` and ``7.0`` alike, see ``twotower.features``)
  go through the SplitMix64 finaliser of their two's-complement 64-bit value: a fixed bijection of
  uint64 with full avalanche, vectorised in numpy, so 10M ids hash in well under a second;
- strings hash the UTF-8 bytes with BLAKE2b (8-byte digest, read little-endian); the standard
  library implements it in C and its output is specified, so it never changes across versions;
- other numbers (non-integer floats) hash the tagged ``repr`` the same way, so ``0.5`` and ``"0.5"``
  stay different keys, as they are different vocabulary keys.

Keys are typed exactly like vocabulary keys: ``1`` and ``"1"`` are different ids with different
buckets. The functions here take canonical keys (see ``twotower.feature_specs._canon``) or int64 arrays;
:meth:`twotower.features.FeatureEncoder.transform` does the canonicalisation of DataFrame columns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["hash_key", "hash_keys", "int_buckets", "mix64", "series_buckets", "to_buckets"]

# SplitMix64 (Steele, Lea & Flood 2014; the finaliser also used by java.util.SplittableRandom).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1


def mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 of each int64 value (as its two's-complement uint64), as uint64.

    numpy wraps uint64 arithmetic modulo 2**64 on arrays without warnings, which is the definition.
    """
    z = np.asarray(values, dtype=np.int64).view(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _mix64_int(value: int) -> int:
    """The same function on one Python int (any size is reduced to its low 64 bits first)."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _blake(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def hash_key(key: int | float | str) -> int:
    """The stable 64-bit hash of one canonical key (an int, a non-integer float or a str)."""
    if isinstance(key, np.generic):  # np.float64 is a float whose repr is "np.float64(0.5)": unwrap
        key = key.item()
    if isinstance(key, bool):  # bool is an int subclass; canonical keys never hold it, be explicit
        key = int(key)
    if isinstance(key, float) and key.is_integer():  # 7.0 is the integer key 7, as in twotower.features
        key = int(key)
    if isinstance(key, int):
        return _mix64_int(key)
    if isinstance(key, float):
        return _blake(b"\x00float:" + repr(key).encode("ascii"))
    if isinstance(key, str):
        return _blake(key.encode("utf-8"))
    raise TypeError(f"cannot hash a key of type {type(key).__name__}: {key!r}")


def hash_keys(keys: Iterable[int | float | str]) -> np.ndarray:
    """:func:`hash_key` of each key, as a uint64 array (integers vectorised)."""
    keys = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)  # numpy scalars as Python ones
    out = np.empty(len(keys), dtype=np.uint64)
    is_int = np.fromiter((isinstance(k, int) for k in keys), dtype=bool, count=len(keys))
    if is_int.any():
        ints = [keys[i] for i in np.flatnonzero(is_int)]
        if all(-(2**63) <= k < 2**63 for k in ints):
            out[is_int] = mix64(np.asarray(ints, dtype=np.int64))
        else:  # ids beyond int64 (rare): exact, one at a time
            out[is_int] = np.asarray([_mix64_int(k) for k in ints], dtype=np.uint64)
    for i in np.flatnonzero(~is_int):
        out[i] = hash_key(keys[i])
    return out


def to_buckets(hashes: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket indices ``1 + hash % num_buckets`` (int64 in ``[1, num_buckets]``; 0 is left for missing)."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    hashes = np.asarray(hashes, dtype=np.uint64)
    return (hashes % np.uint64(num_buckets)).astype(np.int64) + 1


def int_buckets(ids: np.ndarray, num_buckets: int) -> np.ndarray:
    """Buckets of an integer id array (no missing values): the fast path of streaming readers.

    Equal to what a ``hashed_id`` feature gives the same integer ids in a DataFrame.
    """
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"int_buckets takes integer ids, got dtype {ids.dtype}")
    if ids.dtype == np.uint64 and ids.size and int(ids.max()) >= 2**63:
        raise ValueError("uint64 ids beyond the int64 range: hash them with hash_keys")
    return to_buckets(mix64(ids.astype(np.int64, copy=False)), num_buckets)


def series_buckets(series: pd.Series, num_buckets: int, canon: Callable[[Any], Any]) -> np.ndarray:
    """Buckets of a DataFrame column, 0 for missing cells; ``canon`` maps a cell to its key (None when
    missing): the vocabulary rule of ``twotower.features``, so hashed and vocabulary ids agree on what
    a key is."""
    if pd.api.types.is_signed_integer_dtype(series) and not series.hasnans:
        return int_buckets(series.to_numpy(dtype=np.int64), num_buckets)  # vectorised fast path
    # Factorize first so canonicalisation and hashing run once per distinct value, not per row.
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    keys = [canon(u) for u in uniques]
    present = np.array([k is not None for k in keys] + [False], dtype=bool)
    lut = np.zeros(len(keys) + 1, dtype=np.int64)  # the trailing 0 is where code -1 (missing) lands
    if present.any():
        lut[present] = to_buckets(hash_keys([k for k in keys if k is not None]), num_buckets)
    return lut[codes]
