"""Position-debiased training labels for retrieval, from an impression log and its examination curve.

Retrieval learns from clicks, and a click says "seen and liked": items the logger put on top are
seen more, so raw clicks credit them for their slot. Given p(seen | position, context) - from a
run's debiased ranker (:func:`examination_propensity`) or supplied by the caller - each impression
gets a label and a weight with the part of the engagement that position and context explain taken
out (:func:`debiased_labels`):

* ``ipw`` (inverse propensity weighting, Joachims et al. 2017): a click at a slot seen with
  probability p stands for 1/p clicks, so clicked rows weigh ``min(clip, 1 / p)``. In expectation
  the weighted click rate of an item is its click rate *when seen*, whatever slot it was shown in.
* ``residual``: ``label = click - c * p``, where ``c * p`` is the click the slot alone predicts: p
  from the examination curve and ``c = sum(clicks) / sum(p)`` per context value, the click rate of a
  *seen* impression in that context (the ratio estimator; it makes the labels sum to zero per
  context). A click where the slot predicted few scores near +1, a skip at a slot surely seen scores
  ``-c``, a skip at a slot hardly seen scores near 0 (it says little). Its expectation for an item is
  ``p * (relevance - c)``: the sign is right in every slot, the size shrinks with p. Bounded in
  [-1, 1] and invariant to the scale of p, so prefer it to IPW when propensities are small or
  uncertain (deep lists, steep mobile curves: 1/p explodes, and clipping brings back bias), when the
  PAL ranker's level sigmoid(b_1) is poorly identified, or for a pointwise/regression consumer that
  can use signed targets and so also learns from skips. IPW is the one for a softmax over positives
  (what twotower's retrieval trains): it is unbiased there, and residual weights of clicks are ~1
  when the click-through rate is low, so they barely correct position.
* ``none``: raw clicks, weight 1 (a baseline with the same format).

Output and how retrieval reads it: one row per impression, in the log's order and index, with
``user_id, item_id, clicked`` (bool), ``weight`` (float, >= 0) and, for ``residual``, ``label``; a
``timestamp`` column is passed through (the temporal protocol needs it). Written to CSV/Parquet, it
is a :class:`~twotower.data.loader.InteractionColumns` log with ``columns: {clicked: clicked,
weight: weight}``: ``load_raw`` makes the clicked rows the positives, each with its ``weight`` as
the sample weight of the loss, and the other rows impressed-not-clicked candidates that
``task.negatives.impressions: N`` samples uniformly per user. Those are unweighted there, so
non-clicked rows carry weight 1 in every method (the loader rejects a row without a weight).
The losses reduce as ``sum(w * loss) / sum(w)`` per batch, so a global scale of the weights changes
nothing in twotower; ``normalize`` matters to consumers that average ``w * loss``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from twotower.reranker import RunRanker

__all__ = ["DebiasConfig", "Propensities", "debiased_labels", "examination_propensity"]

log = logging.getLogger("twotower")

# Explicit propensities: one per log row, or p(position, context value or None), called once per
# distinct (position, context) pair of the log.
Propensities = np.ndarray | Sequence[float] | Callable[[int, str | None], float]

_REQUIRED = ("user_id", "item_id", "position", "click")


class DebiasConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["ipw", "residual", "none"] = "ipw"
    # Largest IPW weight (on the raw 1/p, before normalisation). A click at a slot the curve says is
    # seen 2 % of the time would otherwise count 50x and one lucky click would dominate its batch:
    # clipping trades a little bias for bounded variance (Joachims et al. 2017; Ai et al. 2018).
    # At 10 it bites only below p = 0.1. float("inf") turns it off.
    clip: float = Field(10.0, ge=1.0, description="max inverse-propensity weight, on 1/p")
    # Floor under p before it is used: a slot the model thinks is never seen must not give 1/0.
    min_propensity: float = Field(1e-3, gt=0.0, le=1.0, description="p is raised to at least this")
    # Rescale the clicked rows' weights to mean 1 (IPW weights average well above 1), so a loss that
    # averages w * loss keeps the effective learning rate of unweighted training.
    normalize: bool = Field(True, description="clicked rows' weights rescaled to mean 1")
    # The log's bias-context column (e.g. device); None: the ranker's context column, if any.
    context: str | None = None


def _propensity_table(ranker: RunRanker) -> np.ndarray:
    """``[contexts, positions]``: p(seen) per context code (the ranker's vocabulary) and position 1..P."""
    model = ranker.model
    if model.bias is None:
        raise ValueError("this ranker has no bias tower (combination='none'): it has no examination curve")
    if model.config.combination == "pal":
        # PAL: p(click) = sigmoid(r) * sigmoid(b), and sigmoid(b) is p(seen | position, context) itself.
        bias = model.bias
        names = list(bias.context)
        count = bias.context[names[0]].num_embeddings if names else 1
        positions = torch.arange(1, model.num_positions + 1).expand(count, -1)
        training = bias.training
        bias.eval()  # position dropout acts in train() mode only
        try:
            with torch.no_grad():
                logits = bias(positions, {name: torch.arange(count) for name in names})
        finally:
            bias.train(training)
        return torch.sigmoid(logits).double().numpy()
    # Additive: sigmoid(r + b) does not factor, b is no probability. The ranker's examination_curve is
    # the expected click rate at k over that at position 1 on its training slots: the examination
    # ratio relative to position 1, which is what a propensity means here (p = 1 at position 1).
    curves = ranker.examination_curve
    if curves is None:
        raise ValueError("this ranker has no examination curve")
    return np.array([curves[value] for value in ranker.context_vocabulary], dtype=np.float64)


def _check_positions(positions: np.ndarray | Sequence[int]) -> np.ndarray:
    values = np.asarray(positions)
    if values.ndim != 1:
        raise ValueError(f"positions must be 1-D, got shape {values.shape}")
    if not len(values):
        return values.astype(np.int64)
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"positions must be numbers, got dtype {values.dtype}")
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(values) & (values >= 1) & (np.mod(values, 1) == 0))
    if bad.any():
        raise ValueError(
            f"positions must be whole numbers >= 1 (1 = top slot), got {values[bad][0].item()!r}"
        )
    return values.astype(np.int64)


def examination_propensity(
    ranker: RunRanker, positions: np.ndarray | Sequence[int], contexts: np.ndarray | Sequence | None = None
) -> np.ndarray:
    """p(seen | position, context) per row from the ranker's bias tower, float64 ``[n]``.

    PAL: ``sigmoid(b)``. Additive: ``ranker.examination_curve`` (relative to position 1, so exactly 1
    there). Positions past the ranker's last one (the deepest its log showed, at most ``max_position``)
    get the last one's value: they were not trained on. A context value the ranker never saw (or
    ``contexts=None`` for a ranker trained with a context) gets the curve averaged over the known
    values, unweighted: the ranker
    keeps no traffic shares, and a plain mean is what a new device is likeliest to be near.
    Values are clipped to at most 1 (an estimated relative curve can pass 1 by noise).
    """
    positions = _check_positions(positions)
    table = _propensity_table(ranker)
    table = np.vstack([table, table.mean(axis=0, keepdims=True)])  # last row: the unknown-context mean
    unknown = len(table) - 1
    if ranker.context_column is None:
        codes = np.zeros(len(positions), dtype=np.int64)  # one curve for everything; contexts ignored
    elif contexts is None:
        codes = np.full(len(positions), unknown, dtype=np.int64)
    else:
        values = np.asarray(contexts, dtype=object).astype(str)
        if values.shape != positions.shape:
            raise ValueError(f"{len(values)} contexts for {len(positions)} positions")
        codes = pd.Index(ranker.context_vocabulary).get_indexer(values)
        if (codes < 0).any():
            log.warning(
                "context values unknown to the ranker get the curve averaged over %s: %s (%d rows)",
                ranker.context_vocabulary, sorted(set(values[codes < 0]))[:5], int((codes < 0).sum()),
            )  # fmt: skip
            codes = np.where(codes < 0, unknown, codes)
    columns = np.minimum(positions.astype(np.int64), table.shape[1]) - 1
    return np.minimum(table[codes, columns], 1.0)


def _explicit(propensities: Propensities, positions: np.ndarray, contexts: np.ndarray | None) -> np.ndarray:
    if callable(propensities):
        if contexts is None:
            # Positions alone: a MultiIndex level of None reads back as NaN, and the callable was
            # promised None (``c is None`` tests, ``curves.get(c)`` lookups would miss NaN).
            codes, uniques = pd.factorize(positions)
            pairs = [(p, None) for p in uniques]
        else:
            codes, pairs = pd.MultiIndex.from_arrays([positions, contexts]).factorize()
        values = np.array([float(propensities(int(p), c)) for p, c in pairs], dtype=np.float64)
        p = values[codes] if len(codes) else np.zeros(0)
    else:
        p = np.asarray(propensities, dtype=np.float64)
        if p.shape != positions.shape:
            raise ValueError(f"propensities has shape {p.shape}, the log has {len(positions)} rows")
    bad = ~(np.isfinite(p) & (p >= 0.0) & (p <= 1.0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"propensities must be probabilities in [0, 1]: {float(p[row])!r} for log row {row} "
            f"(position {positions[row]})"
        )
    return p


def _normalise(weight: np.ndarray, clicked: np.ndarray) -> np.ndarray:
    mean = weight[clicked].mean() if clicked.any() else 0.0
    return np.where(clicked, weight / mean, weight) if mean > 0 else weight


def debiased_labels(
    log_frame: pd.DataFrame,
    ranker: RunRanker | None,
    config: DebiasConfig | None = None,
    propensities: Propensities | None = None,
) -> pd.DataFrame:
    """Per-impression retrieval labels (see the module docstring): ``user_id, item_id, clicked, weight``
    (+ ``label`` for residual, + ``timestamp`` when the log has one), in the log's order and index.

    ``log_frame`` has ``user_id, item_id, position, click`` (e.g. ``read_impressions(...).frame``;
    ``request_id`` and other columns are not needed) and the context column. ``ipw`` and
    ``residual`` need exactly one of ``ranker`` (its bias tower, :func:`examination_propensity`) and
    ``propensities``; ``none`` uses neither.
    """
    config = config or DebiasConfig()
    if config.method != "none" and (ranker is None) == (propensities is None):
        raise ValueError(
            f"method={config.method!r} needs p(seen | position, context): pass a trained ranker or "
            f"explicit propensities{'' if ranker is None else ', not both'}"
        )
    missing = [c for c in _REQUIRED if c not in log_frame.columns]
    if missing:
        raise ValueError(f"the log has no column {missing} (columns: {list(log_frame.columns)})")
    click = log_frame["click"].to_numpy()
    if not np.isin(click, (0, 1)).all():
        raise ValueError(f"click must be 0/1 or bool, got values {sorted(set(click.tolist()) - {0, 1})[:5]}")
    clicked = click.astype(bool)
    positions = _check_positions(log_frame["position"].to_numpy())
    out = pd.DataFrame(
        {"user_id": log_frame["user_id"].to_numpy(), "item_id": log_frame["item_id"].to_numpy(),
         "clicked": clicked, "weight": np.ones(len(log_frame))},
        index=log_frame.index,
    )  # fmt: skip
    if "timestamp" in log_frame.columns:
        out["timestamp"] = log_frame["timestamp"].to_numpy()
    if config.method == "none":
        return out
    if not len(out):  # the same columns as a non-empty log's (residual promises ``label``)
        return out.assign(label=np.zeros(0)) if config.method == "residual" else out

    column = config.context if config.context is not None else ranker.context_column if ranker else None
    contexts = None
    if column is not None:
        if column in log_frame.columns:
            contexts = log_frame[column].to_numpy(dtype=object).astype(str)
        elif config.context is not None:
            raise ValueError(f"config.context={column!r} is not a column of the log")
        else:  # the ranker's column, absent here: every row is an unknown context
            log.warning("the log has no %r column (the ranker's context): using its averaged curve", column)
    if ranker is not None:
        p = examination_propensity(ranker, positions, contexts)
    else:
        p = _explicit(propensities, positions, contexts)
    p = np.maximum(p, config.min_propensity)

    if config.method == "ipw":
        weight = np.where(clicked, np.minimum(config.clip, 1.0 / p), 1.0)
        out["weight"] = _normalise(weight, clicked) if config.normalize else weight
        return out

    # residual: the slot's expected click c * p, c per context value (one group without contexts).
    groups = pd.factorize(contexts)[0] if contexts is not None else np.zeros(len(p), dtype=np.int64)
    rate = np.bincount(groups, clicked.astype(np.float64)) / np.bincount(groups, p)
    label = clicked.astype(np.float64) - np.minimum(rate[groups] * p, 1.0)
    # A click's weight is the part of it the slot does not explain; skips keep 1 (see the docstring).
    weight = np.where(clicked, label, 1.0)
    out["weight"] = _normalise(weight, clicked) if config.normalize else weight
    out["label"] = label
    return out
