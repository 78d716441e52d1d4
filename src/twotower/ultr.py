"""Unbiased learning to rank end to end: simulate a click log, train a method, evaluate against the truth.

Every method is a :class:`~twotower.ranking.DebiasedRanker` configuration (:data:`METHODS`), trained by
the common fit loop on the same logged sessions:

    naive                         relevance tower on clicks, position ignored
    position-feature              position one-hot inside the relevance tower, ranked at position 1
    ipw-true / ipw-estimated      listwise IPW with the simulator's examination probabilities / with
                                  the curve estimated from the RandTop-N sessions
    two-tower-{pal,additive}[+position-dropout|+bias-dropout]
    two-tower-additive+adversarial  an adversary predicts the relevance logit from the bias logit, its
                                  gradient reversed into the bias tower (Zhang et al. 2023)
    oracle                        relevance tower on the true p(relevant | y) of the same shown slots

With ``UltrConfig.bias_refit_epochs`` training ends with :func:`refit_bias`: the bias tower alone,
the relevance tower frozen, fitted to the exact optimum of the click likelihood (full batch, L-BFGS)
over that many click draws of the training sessions. Why: the relevance tower overfits long before the
small bias tower converges, so a validated (short) training length leaves the curve short of the
likelihood's optimum given ``r``; and minibatch Adam only hovers around that optimum. Measured (issue 4,
synthetic world, PAL, 3 seeds): Adam refit curve errors .066 / .051 / .062, the exact optimum on the
logged clicks .036 / .049 / .053, on the expected clicks .019 / .046 / .020.

Evaluation (:func:`evaluate_ranker`), all on held-out queries:

* nDCG@{1,3,5,10} and MRR@10 of the relevance tower over all documents of each query, against the
  TRUE labels;
* the learned examination curve per device relative to rank 1 - the expected click rate of the same
  held-out shown documents placed at rank k over placed at rank 1, which for PAL is exactly
  ``sigmoid(b_k) / sigmoid(b_1)`` - against the simulator's ``theta(k) / theta(1)``, and its largest
  absolute error over ranks (position-based model only: elsewhere examination is not a per-rank constant);
* click log-likelihood and AUC on held-out sessions, for the methods that model clicks.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from twotower.config import EarlyStoppingConfig, SectionDefaults, TrainConfig
from twotower.data.click_log import ClickLog, SimulationConfig, estimate_propensities
from twotower.data.click_models import ClickModel, relevance_click_probability
from twotower.data.ltr import RankingData
from twotower.ranking import DebiasedRanker, RankerConfig
from twotower.ranking_metrics import click_log_likelihood, ranking_metrics, roc_auc
from twotower.train import fit

__all__ = [
    "METHODS",
    "UltrConfig",
    "UltrResult",
    "evaluate_ranker",
    "held_out_queries",
    "mean_clicks",
    "refit_bias",
    "session_batches",
    "train_ranker",
]

_PAL, _ADD = {"combination": "pal"}, {"combination": "additive"}
# What a method starts from, under the shared `ranker` section and its own settings: no bias dropout
# unless its name says so (or the shared section sets a rate, as bench/ultr.py's rates part does), not
# RankerConfig's defaults (.1 / .5).
_BASE = {"position_dropout": 0.0, "bias_dropout": 0.0}
METHODS: dict[str, dict] = {
    "naive": {"combination": "none"},
    "position-feature": {"combination": "none", "position_feature": True},
    "ipw-true": {"combination": "none", "loss": "ipw"},
    "ipw-estimated": {"combination": "none", "loss": "ipw"},
    "two-tower-pal": _PAL,
    "two-tower-pal+position-dropout": {**_PAL, "position_dropout": 0.1},
    "two-tower-pal+bias-dropout": {**_PAL, "bias_dropout": 0.5},
    "two-tower-additive": _ADD,
    "two-tower-additive+position-dropout": {**_ADD, "position_dropout": 0.1},
    "two-tower-additive+bias-dropout": {**_ADD, "bias_dropout": 0.5},
    "two-tower-additive+adversarial": {**_ADD, "adversarial": 1.0},
    "oracle": {"combination": "none", "loss": "oracle"},
}


class UltrConfig(SectionDefaults):
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    ranker: dict = Field(default_factory=dict, description="RankerConfig fields shared by every method")
    section_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "train": {"epochs": 8, "batch_size": 256, "lr": 3e-3}
    }
    train: TrainConfig
    test_share: float = Field(0.2, gt=0.0, lt=1.0)
    test_sessions_per_query: int = Field(2, ge=1)
    fresh_clicks: bool = Field(
        True, description="redraw the training clicks every epoch (ULTRA: clicks simulated per batch)"
    )
    valid_share: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of the training queries whose sessions are held out to choose the training "
        "length: the weights of the epoch with the lowest held-out training objective (the method's own "
        "loss: clicks for the click models, without an adversary's term, true labels only for the "
        "oracle), at most train.epochs",
    )
    patience: int = Field(3, ge=1, description="with valid_share: epochs without improvement before stopping")
    bias_refit_epochs: int = Field(
        0,
        ge=0,
        description="after training, fit the bias tower alone to the exact optimum of the click likelihood "
        "over this many epochs of the training sessions (each with freshly drawn clicks when the log is "
        "simulated and fresh_clicks is on; a real log's clicks count that many times, which changes "
        "nothing), the relevance tower frozen in eval mode: the bias tower converges slower than the "
        "relevance tower overfits, so a validated length leaves it short of that optimum; 0: no refit",
    )


@dataclass
class UltrResult:
    method: str
    metrics: dict[str, float]
    curves: dict[str, list[float]] = field(default_factory=dict)  # device -> learned relative curve
    seconds: float = 0.0


def method_config(method: str, shared: dict | None = None) -> RankerConfig:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return RankerConfig.model_validate({**_BASE, **(shared or {}), **METHODS[method]})


def _tensors(
    data: RankingData, log: ClickLog, propensity: np.ndarray | None, epsilon: float
) -> dict[str, Tensor]:
    """Every session of ``log`` as tensors (document features are gathered per batch)."""
    n = log.docs.shape[1]
    out = {
        "docs": torch.from_numpy(np.maximum(log.docs, 0)),
        "mask": torch.from_numpy(log.mask),
        "position": torch.arange(1, n + 1).expand(log.num_sessions, n).contiguous(),
        "device": torch.from_numpy(log.device),
        "clicks": torch.from_numpy(log.clicks.astype(np.float32)),
        "target": torch.from_numpy(
            relevance_click_probability(log.labels, data.max_label, epsilon).astype(np.float32)
        ),
    }
    if propensity is not None:
        out["propensity"] = torch.from_numpy(np.where(log.mask, propensity, 1.0).astype(np.float32))
    return out


def _gather(data_t: dict[str, Tensor], sessions: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    batch = {k: v[index] for k, v in sessions.items()}
    docs = batch.pop("docs")
    batch["features"] = data_t["features"][docs]
    if "item" in data_t:
        batch["item"] = data_t["item"][docs]
    return batch


def _data_tensors(data: RankingData) -> dict[str, Tensor]:
    out = {"features": torch.from_numpy(data.features)}
    if data.item_index is not None:
        out["item"] = torch.from_numpy(data.item_index)
    return out


def session_batches(data: RankingData, log: ClickLog, propensity: np.ndarray | None, batch_size: int,
                    seed: int, epsilon: float = 0.1, click_model: ClickModel | None = None):  # fmt: skip
    """A ``batches(epoch)`` callable for :func:`twotower.train.fit`: shuffled session batches.

    With ``click_model`` every epoch after the first sees clicks redrawn for the same shown lists
    (seeded by epoch), as ULTRA simulates clicks per batch; the first epoch uses the logged ones.
    """
    data_t, sessions = _data_tensors(data), _tensors(data, log, propensity, epsilon)

    def batches(epoch: int):
        if click_model is not None and epoch > 1:
            rng = np.random.default_rng([seed, epoch, 32])
            sessions["clicks"] = torch.from_numpy(click_model.simulate(log.labels, log.device, rng))
        order = torch.from_numpy(np.random.default_rng([seed, epoch, 31]).permutation(log.num_sessions))
        for start in range(0, len(order), batch_size):
            yield _gather(data_t, sessions, order[start : start + batch_size])

    return batches


def _propensity(method: str, log: ClickLog, fitted_on: ClickLog | None = None) -> np.ndarray | None:
    """[S, N] propensities of ``log``'s slots; estimated ones from ``fitted_on``'s (default: ``log``'s)
    RandTop-N sessions."""
    if method == "ipw-true":
        if not log.simulated:  # its examination is unknown (zero): every weight would be the clip's 1000
            raise ValueError("ipw-true needs the simulator's examination probabilities, which a real log "
                             "does not have; use ipw-estimated or a click model (two-tower-pal)")  # fmt: skip
        return log.examination
    if method == "ipw-estimated":
        curves = estimate_propensities(log if fitted_on is None else fitted_on)
        return curves[log.device][:, : log.docs.shape[1]]
    return None


def train_ranker(
    method: str, train: RankingData, log: ClickLog, config: UltrConfig, seed: int, progress: bool = False,
    run_dir: Path | None = None,
) -> DebiasedRanker:  # fmt: skip
    """Train one method on the logged sessions of the training queries."""
    torch.manual_seed(seed)
    ranker_config = method_config(method, config.ranker)
    model = DebiasedRanker(
        train.num_features,
        train.num_items,
        log.docs.shape[1],
        {"device": len(log.device_names)},
        ranker_config,
    )
    sim = config.simulation
    fresh = config.fresh_clicks and log.simulated  # a real log's clicks are what they are
    click_model = ClickModel(sim.click_model, train.max_label, sim.top_n) if fresh else None
    train_config = config.train.model_copy(update={"seed": seed})
    validate = None
    if config.valid_share > 0:
        held = held_out_queries(log, config.valid_share, seed)
        held_log, log = log.take(np.flatnonzero(held)), log.take(np.flatnonzero(~held))
        # Estimated curves come from the trained sessions only, for the held-out ones too.
        held_propensity = _propensity(method, held_log, fitted_on=log)
        valid = _session_batch(train, held_log, held_propensity, sim.click_model.epsilon)

        def validate() -> dict[str, float]:  # fit puts the model in eval mode first
            with torch.no_grad():  # the adversary's term is no fit to the clicks: left out
                return {"objective": -float(model.compute_loss(valid, adversary=False))}  # higher is better

        stopping = EarlyStoppingConfig(metric="objective", patience=config.patience)
        train_config = train_config.model_copy(update={"early_stopping": stopping})
    propensity = _propensity(method, log)  # estimated curves come from every trained session
    batches = session_batches(train, log, propensity, config.train.batch_size, seed,
                              sim.click_model.epsilon, click_model)  # fmt: skip
    if run_dir is not None:
        fit(model, batches, train_config, run_dir, validate=validate, progress=progress)
    else:
        with tempfile.TemporaryDirectory(prefix="twotower-ultr-") as tmp:
            fit(model, batches, train_config, Path(tmp), validate=validate, progress=progress)
    if config.bias_refit_epochs and model.bias is not None:
        draws = config.bias_refit_epochs if click_model is not None else 1
        refit_bias(model, train, log, mean_clicks(log, click_model, draws, seed))
    model.eval()
    return model


def mean_clicks(log: ClickLog, click_model: ClickModel | None, draws: int, seed: int) -> np.ndarray:
    """[S, N] click rate of every shown slot over ``draws`` fresh draws (seeded apart from training's);
    the logged clicks themselves without a click model."""
    if click_model is None:
        return log.clicks.astype(np.float32)
    total = np.zeros(log.clicks.shape, dtype=np.float64)
    for draw in range(draws):
        total += click_model.simulate(log.labels, log.device, np.random.default_rng([seed, draw, 33]))
    return (total / draws).astype(np.float32)


def refit_bias(model: DebiasedRanker, data: RankingData, log: ClickLog, clicks: np.ndarray) -> None:
    """Fit the bias tower alone to the optimum of the click likelihood of ``log``'s sessions with
    ``clicks`` ([S, N], rates in [0, 1]), the relevance tower frozen and evaluated once in eval mode
    (:meth:`DebiasedRanker.fit_bias`). The adversary, if any, is not involved (``r`` is fixed)."""
    if model.bias is None:  # checked by fit_bias too, but before the relevance pass below
        raise ValueError("this ranker has no bias tower (combination='none')")
    model.eval()
    batch = _session_batch(data, log)
    with torch.no_grad():
        r = model.relevance_logit(batch, batch["position"] if model.config.position_feature else None)
    model.fit_bias(r, batch, torch.from_numpy(clicks))


def held_out_queries(log: ClickLog, share: float, seed: int) -> np.ndarray:
    """[S] bool: the sessions of a seeded ``share`` of the log's queries (all sessions of a query go
    together, so no held-out document list was also trained on)."""
    queries = np.unique(log.query)
    rng = np.random.default_rng([seed, 41])
    # At least one query is held out, and at least one is left to train on.
    n = min(max(1, round(share * len(queries))), len(queries) - 1) if len(queries) > 1 else 0
    return np.isin(log.query, rng.choice(queries, size=n, replace=False))


def _session_batch(
    data: RankingData, log: ClickLog, propensity: np.ndarray | None = None, epsilon: float = 0.1
) -> dict[str, Tensor]:
    """Every session of ``log`` as one batch (evaluation, held-out validation)."""
    sessions = _tensors(data, log, propensity, epsilon)
    return _gather(_data_tensors(data), sessions, torch.arange(log.num_sessions))


@torch.no_grad()
def learned_curves(model: DebiasedRanker, batch: dict[str, Tensor], log: ClickLog) -> np.ndarray:
    """[devices, N]: expected click rate of the held-out shown documents at rank k over at rank 1."""
    n, n_dev = log.docs.shape[1], len(log.device_names)
    r = model.relevance_logit(batch)[torch.from_numpy(log.mask)]
    out = np.empty((n_dev, n))
    for d in range(n_dev):
        ctx = {"device": torch.full((1,), d, dtype=torch.long)}
        b = model.bias(torch.arange(1, n + 1).unsqueeze(0), ctx).squeeze(0)  # [N]
        if model.config.combination == "pal":
            ctr = torch.sigmoid(r).mean() * torch.sigmoid(b)
        else:
            ctr = torch.sigmoid(r.unsqueeze(1) + b.unsqueeze(0)).mean(0)
        out[d] = (ctr / ctr[0]).numpy()
    return out


@torch.no_grad()
def evaluate_ranker(
    model: DebiasedRanker, test: RankingData, test_log: ClickLog, true_curves: np.ndarray | None
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Metrics against the truth (see the module doc) and the learned curves per device."""
    model.eval()
    item = torch.from_numpy(test.item_index) if test.item_index is not None else None
    scores = model.score(torch.from_numpy(test.features), item).numpy()
    metrics = ranking_metrics(scores, test.labels, test.query_offsets, ks=(1, 3, 5, 10))
    curves: dict[str, list[float]] = {}
    batch = _session_batch(test, test_log)
    if model.bias is not None:
        learned = learned_curves(model, batch, test_log)
        curves = {name: learned[d].tolist() for d, name in enumerate(test_log.device_names)}
        if true_curves is not None:
            truth = true_curves[:, : learned.shape[1]] / true_curves[:, :1]
            metrics["curve_max_abs_error"] = float(np.abs(learned - truth).max())
    if model.config.loss == "clicks":
        probs = model.click_probability(batch).numpy()
        mask = test_log.mask
        metrics["click_loglik"] = click_log_likelihood(probs[mask], test_log.clicks[mask])
        metrics["click_auc"] = roc_auc(probs[mask], test_log.clicks[mask])
    return metrics, curves
