"""TaskConfig validation and build_task: the task, estimators and samplers a config describes."""

import math

import pytest
import torch

from twotower.config import parse_config
from twotower.frequency import CountFrequency, StreamingFrequencyEstimator
from twotower.negatives import PopularitySampler, UniformSampler
from twotower.task_config import TaskConfig, build_task

# Training pairs: item 0 three times, item 1 once, items 2 and 3 never.
USERS = torch.tensor([0, 1, 2, 0])
ITEMS = torch.tensor([0, 0, 1, 0])


def _build(**config):
    return build_task(TaskConfig.model_validate(config), 0.1, 3, 4, USERS, ITEMS, seed=7)


def test_config_validates_negative_schemes():
    with pytest.raises(Exception, match="sampler"):
        parse_config({"task": {"negatives": {"sampler": "uniform"}}})
    with pytest.raises(Exception, match="no negatives"):
        parse_config({"task": {"negatives": {"in_batch": False}}})
    with pytest.raises(Exception, match="objective"):
        parse_config({"task": {"objective": "pairwise"}})
    with pytest.raises(Exception, match="fused_inbatc"):  # a misspelt key is an error
        parse_config({"task": {"fused_inbatc": False}})


def test_logq_counts_are_the_training_frequencies():
    task = _build(logq="counts")
    assert isinstance(task.sampling_probability, CountFrequency)
    # counts [3, 1, 0, 0] over 4 pairs; an unseen item is counted once so log Q stays finite.
    got = task.sampling_probability.probability(torch.arange(4)).float()
    torch.testing.assert_close(got, torch.tensor([3 / 4, 1 / 4, 1 / 4, 1 / 4]))
    assert isinstance(_build(logq="streaming").sampling_probability, StreamingFrequencyEstimator)
    assert _build().sampling_probability is None


def test_samplers_follow_the_config():
    task = _build(negatives={"sampler": "popularity", "num_sampled": 5, "popularity_alpha": 0.5})
    assert isinstance(task.sampler, PopularitySampler) and task.num_sampled == 5
    # P(i) = c_i^0.5 / sum_j c_j^0.5 with c = max(count, 1) = [3, 1, 1, 1].
    norm = math.sqrt(3) + 3
    want = torch.tensor([math.sqrt(3) / norm, 1 / norm, 1 / norm, 1 / norm]).log()
    torch.testing.assert_close(task.sampler.log_probability(torch.arange(4)).float(), want)
    uniform = _build(negatives={"sampler": "uniform", "num_sampled": 2, "shared": False})
    assert isinstance(uniform.sampler, UniformSampler) and not uniform.shared


def test_hard_negatives_and_flags():
    task = _build(negatives={"hard": {"num": 9, "pool": 50, "refresh_every": 20}})
    # The pool is at most the catalogue's 4 items, and so is what a row can draw from it.
    assert (task.miner.k, task.miner.cap, task.miner.refresh_every, task.hard_num) == (4, 4, 20, 9)
    assert task.positives_items.tolist() == [0, 0, 0, 1]  # every user's training items, by user
    plain = _build(fused_inbatch=False, distinct_inbatch=False, remove_accidental_hits=False)
    assert not plain.fused and not plain.distinct and not plain.remove_accidental_hits
    assert _build().fused and _build().distinct


def test_impression_negatives_need_impressions():
    with pytest.raises(ValueError, match="clicked"):
        _build(negatives={"impressions": 2})
    task = build_task(
        TaskConfig.model_validate({"negatives": {"impressions": 2}}), 0.1, 3, 4, USERS, ITEMS,
        impressions=(torch.tensor([0, 1]), torch.tensor([2, 3])),
    )  # fmt: skip
    assert task.impressions is not None and task.impressions_num == 2


def test_streaming_alpha_is_refused_by_the_config_where_the_estimator_refuses_it():
    # StreamingFrequencyEstimator takes alpha in (0, 1): alpha = 1 used to pass the config and fail
    # only when build_task made the estimator.
    with pytest.raises(Exception, match="alpha"):
        parse_config({"task": {"logq": "streaming", "streaming": {"alpha": 1.0}}})
    assert _build(logq="streaming", streaming={"alpha": 0.5}).sampling_probability.alpha == 0.5
