"""Feature specifications and the encoder that turns DataFrame columns into model-ready tensors.

A feature is declared by a small pydantic spec (``type`` picks the kind; a misspelt key is an error).
`FeatureEncoder.fit` learns vocabularies and statistics from a frame, `transform` produces
``dict[str, Tensor]`` batches, and `fields` tells a tower what embedding tables to build.

Index conventions (stable, relied upon by towers and serving):

- ``id``, ``categorical``: int64 ``[N]``; 0 = out-of-vocabulary or missing, 1.. = the values seen in the
  fit data at least ``min_count`` times, in sorted order (numbers before strings, each ascending), so
  refitting on the same data always gives the same indices. Cardinality = len(vocab) + 1.
- ``bucketized``: int64 ``[N]``; 0 = missing, then bucket ``i`` (1-based) holds values ``x`` with
  ``boundaries[i-2] <= x < boundaries[i-1]`` (open-ended at both ends). Cardinality = len(boundaries) + 2.
- ``multi_hot``: int64 ``[N, L]`` right-padded; 0 = padding, 1 = out-of-vocabulary, 2.. = values.
  Tokens are de-duplicated within a cell (a set), so a repeated genre does not weigh twice in a mean.
  Cardinality = len(vocab) + 2.
- ``numeric``: float32 ``[N]``, ``(x - mean) / std`` with mean/std (population) from the fit data; a
  missing value is replaced by ``fill`` *before* standardising (default: the mean, giving 0).
- ``hashed_id``: int64 ``[N]``; 0 = missing, else ``1 + stable_hash(value) % num_buckets``
  (``twotower.hashing``): nothing is fitted or stored, so the vocabulary may be any size.
  Cardinality = num_buckets + 1.

Vocabulary values keep their type where JSON can hold it: integers (including whole-number floats,
which is what an int column with gaps becomes in pandas) are stored as ``int``, other numbers as
``float``, everything else as ``str``. Lookups are type-sensitive: ``1`` and ``"1"`` are different
values, so fit and transform frames must agree on the id type (the loaders in `twotower.data` ensure
that). Missing means None, NaN, pd.NA or an empty/blank string.
"""

from __future__ import annotations

import copy
import functools
import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Self

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel

from twotower.feature_specs import (  # noqa: F401 - re-exported: specs are part of this module's API
    _SPECS,
    BucketizedFeature,
    CategoricalFeature,
    FeatureSpec,
    FieldInfo,
    HashedIdFeature,
    IdFeature,
    MultiHotFeature,
    NumericFeature,
    _canon,
    _count,
    _py,
    _tokens,
    _vocab,
)
from twotower.hashing import hash_keys, series_buckets, to_buckets

_FORMAT = "twotower.features/1"


class FeatureEncoder:
    """Fits vocabularies/statistics for a list of feature specs and encodes frames into tensors."""

    def __init__(self, specs: list[FeatureSpec] | list[dict[str, Any]]) -> None:
        # Accept plain dicts too (as read from YAML): validation goes through the discriminated union.
        self.specs: list[FeatureSpec] = _SPECS.validate_python(
            [s.model_dump() if isinstance(s, BaseModel) else s for s in specs]
        )
        if not self.specs:
            raise ValueError("FeatureEncoder needs at least one feature spec")
        names = [s.name for s in self.specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate feature names: {dupes}")
        if sum(isinstance(s, IdFeature | HashedIdFeature) for s in self.specs) > 1:
            raise ValueError("at most one IdFeature or HashedIdFeature per encoder (one entity per tower)")
        self._state: dict[str, dict[str, Any]] = {}
        self._index: dict[str, dict[Any, int]] = {}

    # --- fitting ----------------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        return len(self._state) == len(self.specs)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def fit(self, df: pd.DataFrame, id_values: Iterable[Any] | None = None) -> Self:
        """Learn vocabularies and statistics from ``df``.

        ``id_values`` (the ids of the TRAINING interactions, repeats included) replaces ``df`` as the
        source of the IdFeature's vocabulary, so ids that never occur in training map to OOV (0) and
        ``min_count`` counts training interactions.
        """
        id_spec = next((s for s in self.specs if isinstance(s, IdFeature | HashedIdFeature)), None)
        if id_values is not None and id_spec is None:
            raise ValueError("id_values was given but no IdFeature is declared")
        state: dict[str, dict[str, Any]] = {}
        for spec in self.specs:
            if isinstance(spec, HashedIdFeature):  # nothing to learn: the hash is the vocabulary
                state[spec.name] = {"num_buckets": spec.num_buckets}
                continue
            if spec is id_spec and id_values is not None:
                array_like = isinstance(id_values, pd.Series | pd.Index | np.ndarray)
                ids = pd.Series(id_values if array_like else list(id_values))
                state[spec.name] = {"vocab": _vocab(_count(ids), spec.min_count)}
                continue
            series = self._column(df, spec)
            if isinstance(spec, IdFeature | CategoricalFeature):
                state[spec.name] = {"vocab": _vocab(self._hashable(spec, _count, series), spec.min_count)}
            elif isinstance(spec, MultiHotFeature):
                counts: Counter = Counter()
                for cell in series.tolist():
                    counts.update(_tokens(cell, spec.separator))
                state[spec.name] = {"vocab": _vocab(counts, spec.min_count)}
            elif isinstance(spec, NumericFeature):
                values = self._numbers(series, spec)
                present = values[~np.isnan(values)]
                # Computed on the values scaled by a power of two (exact: the same digits) to at most 1 in
                # magnitude: the squares of values beyond 1e154 overflow, and an inf std encodes all as 0.
                scale = math.ldexp(1.0, int(np.frexp(np.abs(present).max())[1])) if present.size else 1.0
                mean = float((present / scale).mean()) * scale if present.size else 0.0
                std = float((present / scale).std()) * scale if present.size else 1.0
                # A constant column would divide by zero; scaling by 1 keeps it a harmless constant 0. Test
                # it exactly: the float mean of n copies of a large value is off by rounding, so the std is
                # tiny but not 0 (and would blow a difference of 1 up to millions). A near-constant column
                # (a spread at rounding level, relative to the magnitude) is scaled by 1 as well.
                if present.size and present.max() == present.min():
                    mean, std = float(present[0]), 1.0
                state[spec.name] = {"mean": mean, "std": std if std > 1e-12 * max(abs(mean), 1.0) else 1.0}
            else:
                state[spec.name] = {"boundaries": self._fit_boundaries(series, spec)}
        self._state = state
        self._rebuild_index()
        return self

    def _fit_boundaries(self, series: pd.Series, spec: BucketizedFeature) -> list[float]:
        if spec.boundaries is not None:
            return [float(b) for b in spec.boundaries]
        values = self._numbers(series, spec)
        present = values[~np.isnan(values)]
        if not present.size:
            raise ValueError(f"feature {spec.name!r}: column {spec.column!r} has no values to fit buckets on")
        assert spec.num_buckets is not None  # guaranteed by the spec validator
        cuts = np.quantile(present, np.arange(1, spec.num_buckets) / spec.num_buckets)
        # Ties (many equal values) produce repeated cut points; duplicates would create empty buckets.
        return [float(b) for b in np.unique(cuts)]

    def _rebuild_index(self) -> None:
        self._index = {}
        for spec in self.specs:
            if isinstance(spec, IdFeature | CategoricalFeature | MultiHotFeature):
                offset = 2 if isinstance(spec, MultiHotFeature) else 1
                self._index[spec.name] = {
                    v: i + offset for i, v in enumerate(self._state[spec.name]["vocab"])
                }

    # --- encoding ---------------------------------------------------------------------------------

    def transform(self, df: pd.DataFrame) -> dict[str, torch.Tensor]:
        """Encode every feature of ``df``; see the module docstring for shapes and index conventions."""
        if not self.is_fitted:
            raise RuntimeError("FeatureEncoder.transform called before fit (or from_dict)")
        out: dict[str, torch.Tensor] = {}
        for spec in self.specs:
            series = self._column(df, spec)
            state = self._state[spec.name]
            if isinstance(spec, IdFeature | CategoricalFeature):
                codes, uniques = self._hashable(spec, pd.factorize, series)
                index = self._index[spec.name]
                # The extra trailing 0 is where code -1 (missing) lands.
                lut = np.array([index.get(_canon(u), 0) for u in uniques] + [0], dtype=np.int64)
                out[spec.name] = torch.from_numpy(lut[codes])
            elif isinstance(spec, HashedIdFeature):
                hashed = functools.partial(series_buckets, num_buckets=spec.num_buckets, canon=_canon)
                buckets = self._hashable(spec, hashed, series)
                out[spec.name] = torch.from_numpy(buckets)
            elif isinstance(spec, MultiHotFeature):
                out[spec.name] = torch.from_numpy(self._multi_hot(series, spec))
            elif isinstance(spec, NumericFeature):
                values = self._numbers(series, spec)
                fill = state["mean"] if spec.fill is None else spec.fill
                values = np.where(np.isnan(values), fill, values)
                with np.errstate(over="ignore"):
                    encoded = ((values - state["mean"]) / state["std"]).astype(np.float32)
                _check_float32(encoded, spec, series)
                out[spec.name] = torch.from_numpy(encoded)
            else:
                values = self._numbers(series, spec)
                idx = np.searchsorted(np.asarray(state["boundaries"]), values, side="right") + 1
                out[spec.name] = torch.from_numpy(np.where(np.isnan(values), 0, idx).astype(np.int64))
        return out

    def transform_record(self, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Encode ONE row given as ``{column: raw value}`` (absent columns are missing), exactly as
        :meth:`transform` encodes it in a frame, without building one: the serving path, where a
        DataFrame per request would cost milliseconds."""
        if not self.is_fitted:
            raise RuntimeError("FeatureEncoder.transform_record called before fit (or from_dict)")
        out: dict[str, torch.Tensor] = {}
        for spec in self.specs:
            value, state = record.get(spec.column), self._state[spec.name]
            if isinstance(spec, IdFeature | CategoricalFeature):
                if isinstance(value, list | tuple | dict | set | np.ndarray):
                    raise ValueError(
                        f"feature {spec.name!r} (column {spec.column!r}) takes one value, got {value!r}"
                    )
                # An id is never a bool (True == 1 would be user 1): unknown, as in twotower.ids, which sends
                # a bool user id here as one the catalogue lacks.
                bool_id = isinstance(spec, IdFeature) and isinstance(value, bool | np.bool_)
                key = None if bool_id else _canon(value)
                out[spec.name] = torch.tensor([0 if key is None else self._index[spec.name].get(key, 0)])
            elif isinstance(spec, HashedIdFeature):
                if isinstance(value, list | tuple | dict | set | np.ndarray):
                    raise ValueError(
                        f"feature {spec.name!r} (column {spec.column!r}) takes one value, got {value!r}"
                    )
                key = None if isinstance(value, bool | np.bool_) else _canon(value)  # never a bool, as above
                bucket = 0 if key is None else int(to_buckets(hash_keys([key]), spec.num_buckets)[0])
                out[spec.name] = torch.tensor([bucket])
            elif isinstance(spec, MultiHotFeature):
                row = (
                    [self._index[spec.name].get(t, 1) for t in _tokens(value, spec.separator)]
                    if value is not None
                    else []
                )
                width = spec.max_len or max(len(row), 1)
                codes = np.zeros((1, width), dtype=np.int64)
                codes[0, : len(row[:width])] = row[:width]
                out[spec.name] = torch.from_numpy(codes)
            else:
                number = self._record_number(value, spec)
                if isinstance(spec, NumericFeature):
                    fill = state["mean"] if spec.fill is None else spec.fill
                    x = fill if math.isnan(number) else number
                    encoded = torch.tensor([(x - state["mean"]) / state["std"]], dtype=torch.float32)
                    if not bool(torch.isfinite(encoded).all()):  # 1e308 is finite, not in float32
                        raise ValueError(
                            f"feature {spec.name!r}, column {spec.column!r}: {value!r} is out of range "
                            f"(its standardised value overflows float32)"
                        )
                    out[spec.name] = encoded
                else:
                    bucket = int(np.searchsorted(np.asarray(state["boundaries"]), number, side="right")) + 1
                    out[spec.name] = torch.tensor([0 if math.isnan(number) else bucket])
        return out

    @staticmethod
    def _record_number(value: Any, spec: FeatureSpec) -> float:
        """A cell as a float, NaN when missing; the same rules as :meth:`_numbers`."""
        if value is None or value is pd.NA or (isinstance(value, str) and not value.strip()):
            return math.nan
        try:
            # A string is parsed as a frame parses it (pd.to_numeric): float() would also take "1_000" and
            # non-ASCII digits, and read "nan" as missing where a frame refuses it as no number.
            number = float(pd.to_numeric(value) if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ValueError(
                f"feature {spec.name!r}, column {spec.column!r}: not a finite number: {value!r}"
            ) from None
        if math.isinf(number) or (isinstance(value, str) and math.isnan(number)):
            raise ValueError(f"feature {spec.name!r}, column {spec.column!r}: not a finite number: {value!r}")
        return number

    def _multi_hot(self, series: pd.Series, spec: MultiHotFeature) -> np.ndarray:
        index = self._index[spec.name]
        rows = [[index.get(t, 1) for t in _tokens(cell, spec.separator)] for cell in series.tolist()]
        width = spec.max_len or max([len(r) for r in rows] + [1])
        out = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            row = row[:width]
            out[i, : len(row)] = row
        return out

    def fields(self) -> list[FieldInfo]:
        """One `FieldInfo` per feature, in spec order: what a tower builds its input layers from."""
        if not self.is_fitted:
            raise RuntimeError("FeatureEncoder.fields called before fit (or from_dict)")
        infos = []
        for spec in self.specs:
            state = self._state[spec.name]
            if isinstance(spec, IdFeature | CategoricalFeature):
                infos.append(FieldInfo(spec.name, "categorical", len(state["vocab"]) + 1, spec.embedding_dim))
            elif isinstance(spec, HashedIdFeature):
                infos.append(FieldInfo(spec.name, "categorical", spec.num_buckets + 1, spec.embedding_dim))
            elif isinstance(spec, MultiHotFeature):
                infos.append(FieldInfo(spec.name, "multi_hot", len(state["vocab"]) + 2, spec.embedding_dim))
            elif isinstance(spec, NumericFeature):
                infos.append(FieldInfo(spec.name, "numeric", 0, None))
            else:
                cardinality = len(state["boundaries"]) + 2
                infos.append(FieldInfo(spec.name, "categorical", cardinality, spec.embedding_dim))
        return infos

    def vocabulary(self, name: str) -> list[Any]:
        """The fitted values of a categorical-like feature; value ``v`` has index ``position + offset``
        (offset 1 for id/categorical, 2 for multi_hot)."""
        if name not in self._index:
            raise KeyError(f"{name!r} is not a fitted id/categorical/multi_hot feature")
        return list(self._state[name]["vocab"])

    # --- persistence ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: specs, vocabularies and statistics."""
        if not self.is_fitted:
            raise RuntimeError("FeatureEncoder.to_dict called before fit")
        return {
            "format": _FORMAT,
            "specs": [s.model_dump(mode="json") for s in self.specs],
            "state": copy.deepcopy(self._state),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureEncoder:
        """Rebuild a fitted encoder from `to_dict` output (e.g. after a JSON round trip)."""
        if data.get("format") != _FORMAT:
            raise ValueError(
                f"not a feature-encoder state (format {data.get('format')!r}, expected {_FORMAT!r})"
            )
        encoder = cls(data["specs"])
        state = data.get("state", {})
        missing = [n for n in encoder.names if n not in state]
        if missing:
            raise ValueError(f"feature-encoder state lacks the fitted state of {missing}")
        # A deep copy: the caller's dict (its vocabulary lists) must not alias the encoder's state.
        encoder._state = {n: copy.deepcopy(state[n]) for n in encoder.names}
        encoder._rebuild_index()
        return encoder

    # --- input checks -----------------------------------------------------------------------------

    @staticmethod
    def _column(df: pd.DataFrame, spec: FeatureSpec) -> pd.Series:
        if spec.column not in df.columns:
            raise ValueError(
                f"feature {spec.name!r} reads column {spec.column!r}, which is not in the frame "
                f"(columns: {list(df.columns)})"
            )
        return df[spec.column]

    @staticmethod
    def _hashable(spec: FeatureSpec, fn: Callable[[pd.Series], Any], series: pd.Series) -> Any:
        """``fn(series)``; unhashable cells (lists in a categorical column) become a clear ValueError."""
        try:
            return fn(series)
        except TypeError as exc:
            raise ValueError(
                f"feature {spec.name!r} (column {spec.column!r}) holds unhashable values; "
                "use a multi_hot feature for list-valued cells"
            ) from exc

    @staticmethod
    def _numbers(series: pd.Series, spec: FeatureSpec) -> np.ndarray:
        """float64 values with NaN for missing; any other non-number is an error naming its row."""
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        missing = series.isna().to_numpy()
        if not pd.api.types.is_numeric_dtype(series):
            missing = missing | series.astype(str).str.strip().eq("").to_numpy()
        bad = (np.isnan(values) & ~missing) | np.isinf(values)
        if bad.any():
            where, value = _first_bad(series, bad)
            raise ValueError(
                f"feature {spec.name!r}, column {spec.column!r}, {where}: not a finite number: {value!r}"
            )
        return values


def _check_float32(encoded: np.ndarray, spec: FeatureSpec, series: pd.Series) -> None:
    """Standardised values must fit float32: 1e308 is a finite float64 but an infinite float32, which
    would turn the tower's output into NaN."""
    bad = ~np.isfinite(encoded)
    if bad.any():
        where, value = _first_bad(series, bad)
        raise ValueError(
            f"feature {spec.name!r}, column {spec.column!r}, {where}: {value!r} is out of range "
            f"(its standardised value overflows float32)"
        )


def _first_bad(series: pd.Series, bad: np.ndarray) -> tuple[str, Any]:
    """(where, raw value) of the first ``bad`` cell. A named index is the entity key (a user or item
    table): its id says where, a row of the catalogue-ordered frame would not."""
    pos = int(np.flatnonzero(bad)[0])
    label, value = _py(series.index[pos]), _py(series.iloc[pos])
    where = f"{series.index.name} {label!r}" if series.index.name else f"row {pos + 1} (index {label!r})"
    return where, value
