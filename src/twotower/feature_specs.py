"""Feature specifications: what a feature is, declared in config (``type`` picks the kind), and the
rules for what a cell value is as a key (``_canon``: missing, integer, float or string).

Each spec is a strict pydantic model (a misspelt key is an error). :class:`~twotower.features.
FeatureEncoder` fits and applies them; :class:`FieldInfo` is what a tower needs to know about one
encoded feature. See :mod:`twotower.features` for the index conventions of every kind.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

__all__ = [
    "BucketizedFeature",
    "CategoricalFeature",
    "FeatureSpec",
    "FieldInfo",
    "HashedIdFeature",
    "IdFeature",
    "MultiHotFeature",
    "NumericFeature",
]


class _FeatureBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="key of the feature in batches and in the model")
    column: str | None = Field(None, description="DataFrame column to read; defaults to `name`")

    @model_validator(mode="after")
    def _default_column(self) -> Self:
        if self.column is None:
            self.column = self.name
        return self


class IdFeature(_FeatureBase):
    """The entity's own id (user id on the user side, item id on the item side)."""

    type: Literal["id"] = "id"
    embedding_dim: int | None = Field(None, ge=1, description="None: the tower's default")
    min_count: int = Field(1, ge=1)


class HashedIdFeature(_FeatureBase):
    """The entity's id mapped to one of ``num_buckets`` by a stable hash (``twotower.hashing``).

    For vocabularies too large to build or store (millions of users): nothing is fitted, an id never
    seen in training still gets a trained bucket, and distinct ids may share one (a collision).
    """

    type: Literal["hashed_id"] = "hashed_id"
    num_buckets: int = Field(ge=1, description="buckets 1..num_buckets; 0 is missing")
    embedding_dim: int | None = Field(None, ge=1, description="None: the tower's default")


class CategoricalFeature(_FeatureBase):
    """A single categorical value per row (gender, occupation, ...)."""

    type: Literal["categorical"] = "categorical"
    embedding_dim: int | None = Field(None, ge=1)
    min_count: int = Field(1, ge=1)


class MultiHotFeature(_FeatureBase):
    """A set of values per row: a separator-joined string (``"Action|Comedy"``) or a list."""

    type: Literal["multi_hot"] = "multi_hot"
    separator: str = Field("|", min_length=1)
    max_len: int | None = Field(None, ge=1, description="keep the first max_len tokens; None: no limit")
    embedding_dim: int | None = Field(None, ge=1)
    min_count: int = Field(1, ge=1)


class NumericFeature(_FeatureBase):
    """A real number, standardised with the fit data's mean and standard deviation."""

    type: Literal["numeric"] = "numeric"
    fill: float | None = Field(
        None, allow_inf_nan=False, description="raw value used for missing cells; None: the mean"
    )


class BucketizedFeature(_FeatureBase):
    """A real number mapped to a bucket, embedded like a categorical value."""

    type: Literal["bucketized"] = "bucketized"
    boundaries: list[float] | None = Field(None, description="explicit, strictly increasing")
    num_buckets: int | None = Field(None, ge=2, description="quantile buckets fitted on the data")
    embedding_dim: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.boundaries is None) == (self.num_buckets is None):
            raise ValueError(f"feature {self.name!r}: give exactly one of 'boundaries' and 'num_buckets'")
        if self.boundaries is not None:
            b = self.boundaries
            ok = bool(b) and all(math.isfinite(x) for x in b) and all(np.diff(b) > 0)
            if not ok:
                raise ValueError(f"feature {self.name!r}: boundaries must be finite and strictly increasing")
        return self


FeatureSpec = Annotated[
    IdFeature | HashedIdFeature | CategoricalFeature | MultiHotFeature | NumericFeature | BucketizedFeature,
    Field(discriminator="type"),
]
_SPECS = TypeAdapter(list[FeatureSpec])


@dataclass(frozen=True)
class FieldInfo:
    """What a tower needs to know about one encoded feature."""

    name: str
    kind: Literal["categorical", "multi_hot", "numeric"]
    cardinality: int  # rows of the embedding table, reserved indices included; 0 for numeric
    embedding_dim: int | None


# --- value helpers --------------------------------------------------------------------------------


def _canon(value: Any) -> int | float | str | None:
    """The vocabulary key of a cell value, or None when the value counts as missing."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, bool | np.bool_ | int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        value = float(value)
        # An infinite category is no key a saved vocabulary can hold (JSON has no inf; write_json
        # writes null), so it counts as missing in training and at serving alike.
        if not math.isfinite(value):
            return None
        return int(value) if value.is_integer() else value
    text = str(value)
    return text if text.strip() else None


def _sort_key(value: int | float | str) -> tuple[int, Any]:
    return (1, value) if isinstance(value, str) else (0, value)


def _vocab(counts: Counter, min_count: int) -> list[Any]:
    return [v for v in sorted(counts, key=_sort_key) if counts[v] >= min_count]


def _count(series: pd.Series) -> Counter:
    # Factorize first so the Python-level canonicalisation runs once per distinct value, not per row.
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    freq = np.bincount(codes[codes >= 0], minlength=len(uniques))
    counts: Counter = Counter()
    for value, n in zip(uniques, freq, strict=True):
        key = _canon(value)
        if key is not None:
            counts[key] += int(n)
    return counts


def _tokens(cell: Any, separator: str) -> list[Any]:
    if isinstance(cell, str):
        parts: Iterable[Any] = (p.strip() for p in cell.split(separator))
    elif isinstance(cell, list | tuple | np.ndarray | pd.Series):
        parts = (p.strip() if isinstance(p, str) else p for p in cell)
    elif isinstance(cell, set | frozenset):  # no order of its own (str hashes are salted per process):
        keys = {_canon(p.strip() if isinstance(p, str) else p) for p in cell} - {None}
        return sorted(keys, key=_sort_key)  # sorted, so max_len keeps the same tokens in every run
    else:
        parts = [cell]
    keys = (_canon(p) for p in parts)
    return list(dict.fromkeys(k for k in keys if k is not None))  # de-duplicate, keep order


def _py(value: Any) -> Any:
    """A numpy scalar as the Python value, so error messages read `7`, not `np.int64(7)`."""
    return value.item() if isinstance(value, np.generic) else value
