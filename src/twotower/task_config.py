"""Configuration of the retrieval task (objective, negatives, logQ) and the task it builds.

``TaskConfig`` is the ``task:`` section of a run's YAML; :func:`build_task` turns it into a
``twotower.tasks.RetrievalTask`` with its frequency estimator, samplers and hard-negative miner fitted
on the training pairs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from twotower.frequency import CountFrequency, StreamingFrequencyEstimator
from twotower.history import history_csr
from twotower.negatives import HardNegativeMiner, ImpressionSampler, PopularitySampler, UniformSampler

if TYPE_CHECKING:
    from twotower.tasks import RetrievalTask

__all__ = [
    "HardNegativesConfig",
    "NegativesConfig",
    "Objective",
    "StreamingConfig",
    "TaskConfig",
    "build_task",
]

Objective = Literal["softmax", "pointwise_bce", "pointwise_mse", "hinge", "logistic"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamingConfig(_Strict):
    num_buckets: int = Field(2**17, ge=1, description="hash buckets per hash function")
    num_hashes: int = Field(1, ge=1)
    alpha: float = Field(0.01, gt=0, lt=1, description="moving-average rate of the estimator, in (0, 1)")


class HardNegativesConfig(_Strict):
    num: int = Field(0, ge=0, description="hard negatives per row (0: off)")
    pool: int = Field(50, ge=1, description="top-scored non-positives kept per user to draw from")
    refresh_every: int = Field(500, ge=1, description="steps between two mining passes")


class NegativesConfig(_Strict):
    in_batch: bool = Field(True, description="the other positives of the batch are negatives")
    sampler: Literal["none", "uniform", "popularity"] = "none"
    num_sampled: int = Field(0, ge=0, description="candidates drawn from the sampler")
    shared: bool = Field(True, description="one sampled set for the whole batch, or num_sampled per row")
    popularity_alpha: float = Field(0.75, ge=0, description="popularity sampler: q(i) ~ count(i)^alpha")
    hard: HardNegativesConfig = Field(default_factory=HardNegativesConfig)
    impressions: int = Field(
        0, ge=0, description="impressed-not-clicked negatives per row (needs a clicked column in the data)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> NegativesConfig:
        if (self.sampler == "none") != (self.num_sampled == 0):
            raise ValueError("negatives.sampler and negatives.num_sampled go together (none with 0)")
        if not self.in_batch and self.num_sampled == 0 and self.hard.num == 0 and self.impressions == 0:
            raise ValueError("no negatives: enable in_batch, a sampler, or hard negatives")
        return self


class TaskConfig(_Strict):
    objective: Objective = "softmax"
    logq: Literal["none", "counts", "streaming"] = Field(
        "none",
        description="sampling-bias (logQ) correction of the softmax's candidates, in-batch ones by item "
        "frequency (exact counts or the streaming estimate), sampled ones by their sampler; none: off",
    )
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)
    remove_accidental_hits: bool = True
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)
    margin: float = Field(0.2, ge=0, description="hinge margin, on the similarity scale")
    sigma: float = Field(1.0, gt=0, description="logistic steepness")
    fused_inbatch: bool = Field(
        True, description="plain in-batch softmax through the fused kernel (twotower.inbatch_loss)"
    )
    distinct_inbatch: bool = Field(
        True,
        description="fused in-batch softmax over the batch's distinct users and items when the towers "
        "depend on the id alone (the same loss: twotower.unique_softmax)",
    )


def build_task(
    config: TaskConfig,
    temperature: float,
    num_users: int,
    num_items: int,
    train_users: Tensor,
    train_items: Tensor,
    seed: int = 0,
    impressions: tuple[Tensor, Tensor] | None = None,
) -> RetrievalTask:
    """The task a config describes, its estimators and samplers fitted on the training pairs."""
    # Imported here: twotower.tasks imports this module for its config types.
    from twotower.tasks import RetrievalTask  # noqa: F811

    counts = torch.bincount(train_items.long(), minlength=num_items)
    frequency: Any = None
    if config.logq == "counts":
        frequency = CountFrequency(counts)
    elif config.logq == "streaming":
        s = config.streaming
        frequency = StreamingFrequencyEstimator(s.num_buckets, s.num_hashes, s.alpha, seed=seed)
    neg = config.negatives
    sampler: Any = None
    if neg.sampler == "uniform":
        sampler = UniformSampler(num_items)
    elif neg.sampler == "popularity":
        sampler = PopularitySampler(counts, neg.popularity_alpha)
    miner = positives = None
    if neg.hard.num:
        pool = min(neg.hard.pool, num_items)
        miner = HardNegativeMiner(num_users, num_items, pool, neg.hard.refresh_every, min(neg.hard.num, pool))
        positives = history_csr(train_users, train_items, num_users)
    impression_sampler = None
    if neg.impressions:
        if impressions is None:
            raise ValueError(
                "task.negatives.impressions needs impressions: a 'clicked' column in the data "
                "(data.columns.clicked) whose 0 rows are items shown without a click"
            )
        impression_sampler = ImpressionSampler.from_pairs(impressions[0], impressions[1], num_users)
    return RetrievalTask(
        temperature, config.remove_accidental_hits, frequency, objective=config.objective,
        in_batch=neg.in_batch, sampler=sampler, num_sampled=neg.num_sampled, shared=neg.shared,
        miner=miner, hard_num=neg.hard.num, positives=positives,
        impressions=impression_sampler, impressions_num=neg.impressions,
        margin=config.margin, sigma=config.sigma, fused=config.fused_inbatch,
        distinct=config.distinct_inbatch,
    )  # fmt: skip
