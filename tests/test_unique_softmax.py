"""The in-batch softmax over distinct users and items equals the one over the expanded batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from twotower.feature_specs import FieldInfo
from twotower.frequency import CountFrequency, StreamingFrequencyEstimator
from twotower.inbatch_loss import inbatch_softmax
from twotower.retrieval import ModelConfig, TwoTowerModel
from twotower.tasks import RetrievalTask
from twotower.unique_softmax import unique_inbatch_softmax


def _batch(b: int = 120, n_users: int = 25, n_items: int = 30, d: int = 16, seed: int = 0):
    """Rows with many repeated users, items and (user, item) pairs, as in a popularity-skewed log."""
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, n_users, (b,), generator=g)
    items = (torch.rand(b, generator=g) ** 2 * n_items).long()  # a head of popular items
    uq, q_of_row = torch.unique(users, return_inverse=True)
    ui, p_of_row, count = torch.unique(items, return_inverse=True, return_counts=True)
    query = F.normalize(torch.randn(len(uq), d, generator=g), dim=-1).requires_grad_()
    cand = F.normalize(torch.randn(len(ui), d, generator=g), dim=-1).requires_grad_()
    weight = torch.rand(b, generator=g) + 0.1
    item_counts = torch.randint(1, 100, (n_items,), generator=g)
    return query, q_of_row, cand, ui, p_of_row, count, weight, item_counts


def _grads(fn, *leaves):
    for leaf in leaves:
        leaf.grad = None
    loss = fn()
    loss.backward()
    return [loss.detach()] + [leaf.grad.clone() for leaf in leaves]


@pytest.mark.parametrize("logq", [False, True])
@pytest.mark.parametrize("hits", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_equals_the_softmax_over_the_expanded_batch(logq, hits, weighted):
    query, q_of_row, cand, ui, p_of_row, count, weight, item_counts = _batch()
    log_q = CountFrequency(item_counts).log_probability(ui) if logq else None
    w = weight if weighted else None
    got = _grads(
        lambda: unique_inbatch_softmax(
            query, q_of_row, cand, p_of_row, count, 0.1, log_q=log_q, remove_accidental_hits=hits, weight=w
        ),
        query,
        cand,
    )
    ids = ui[p_of_row]
    want = _grads(
        lambda: inbatch_softmax(
            query[q_of_row],
            cand[p_of_row],
            0.1,
            candidate_ids=ids if hits else None,
            log_q=log_q[p_of_row] if logq else None,
            weight=w,
        ),
        query,
        cand,
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hand_computed_losses():
    # Rows (u0, a), (u0, a), (u1, b); T = 1; <u0, a> = 1, <u0, b> = 0, <u1, a> = 0, <u1, b> = 1.
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cand = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rows, pos, count = torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), torch.tensor([2, 1])
    e = math.e
    # Hits removed: rows 0 and 1 see their own a and b; row 2 sees a twice and b.
    removed = (2 * math.log(1 + 1 / e) + math.log((2 + e) / e)) / 3
    # Hits kept: rows 0 and 1 also see the other copy of a.
    kept = (2 * math.log(2 + 1 / e) + math.log((2 + e) / e)) / 3
    got = unique_inbatch_softmax(query, rows, cand, pos, count, 1.0)
    assert got.item() == pytest.approx(removed, rel=1e-6)
    got = unique_inbatch_softmax(query, rows, cand, pos, count, 1.0, remove_accidental_hits=False)
    assert got.item() == pytest.approx(kept, rel=1e-6)


@pytest.mark.parametrize("hits", [False, True])
def test_a_positive_far_below_the_others_keeps_a_finite_exact_loss(hits):
    # Row 0's positive is ~200 nats below its best negative at T = 0.01: its softmax entry underflows.
    query = torch.tensor([[1.0, 0.0], [0.7, 0.7]], requires_grad=True)
    cand = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    rows, pos, count = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 2, 2]), torch.tensor([1, 1, 2])
    got = unique_inbatch_softmax(query, rows, cand, pos, count, 0.01, remove_accidental_hits=hits)
    ids = torch.tensor([0, 1, 2])[pos]
    want = inbatch_softmax(query[rows], cand[pos], 0.01, candidate_ids=ids if hits else None)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want)
    got.backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(cand.grad).all()


@pytest.mark.parametrize("hits", [False, True])
def test_float16_underflowed_positive_keeps_the_exact_loss(hits):
    # Rows (user 0, item 0), (user 1, item 1), T = 0.05: user 0's logits are [-20, 20], its positive at
    # -20: loss 40 + log(1 + e^-40) = 40; user 1's are [0, 0]: log 2. e^-40 is 0 in float16, and so is
    # the float32 threshold 1e-30: the fallback has to use float16's own threshold.
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float16, requires_grad=True)
    cand = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float16, requires_grad=True)
    rows = pos = torch.tensor([0, 1])
    got = unique_inbatch_softmax(
        query, rows, cand, pos, torch.tensor([1, 1]), 0.05, remove_accidental_hits=hits
    )
    assert got.item() == pytest.approx((40.0 + math.log(2.0)) / 2, abs=0.02)
    got.backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(cand.grad).all()


def _model(distinct: bool, logq: str, dropout: float = 0.0, seed: int = 0) -> TwoTowerModel:
    torch.manual_seed(seed)
    n_users, n_items = 40, 50
    estimator = (
        CountFrequency(torch.arange(1, n_items + 1))
        if logq == "counts"
        else StreamingFrequencyEstimator(num_buckets=64, num_hashes=2, alpha=0.05, seed=3)
    )
    task = RetrievalTask(temperature=0.1, sampling_probability=estimator, distinct=distinct)
    tower = {"embedding_dim": 16, "layers": [32, 16], "dropout": dropout}
    config = ModelConfig.model_validate({"temperature": 0.1, "user_tower": tower, "item_tower": tower})
    users = [FieldInfo("user_id", "categorical", n_users, None)]
    items = [FieldInfo("item_id", "categorical", n_items, None)]
    return TwoTowerModel(
        config,
        users,
        items,
        {"user_id": torch.arange(n_users)},
        {"item_id": torch.arange(n_items)},
        task=task,
    )


@pytest.mark.parametrize("logq", ["counts", "streaming"])
def test_the_model_takes_the_distinct_path_and_trains_as_the_expanded_one(logq, monkeypatch):
    import twotower.tasks as tasks_module

    calls = []
    original = tasks_module.unique_inbatch_softmax
    monkeypatch.setattr(
        tasks_module, "unique_inbatch_softmax", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    g = torch.Generator().manual_seed(1)
    batches = [
        {
            "user_idx": torch.randint(0, 40, (64,), generator=g),
            "item_idx": torch.randint(0, 12, (64,), generator=g),
        }
        for _ in range(3)
    ]
    trained = {}
    for distinct in (True, False):
        model = _model(distinct, logq)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for batch in batches:  # three steps: the streaming estimator learns from each on both paths
            optimizer.zero_grad()
            model.compute_loss(batch).backward()
            optimizer.step()
        trained[distinct] = model.state_dict()
    assert len(calls) == 3
    for name, value in trained[True].items():
        torch.testing.assert_close(value, trained[False][name], rtol=1e-4, atol=1e-5, msg=name)


def test_towers_with_dropout_keep_the_row_by_row_path(monkeypatch):
    import twotower.tasks as tasks_module

    calls = []
    monkeypatch.setattr(tasks_module, "unique_inbatch_softmax", lambda *a, **k: calls.append(1))
    model = _model(True, "counts", dropout=0.2)
    batch = {"user_idx": torch.tensor([0, 0, 1]), "item_idx": torch.tensor([3, 3, 4])}
    loss = model.compute_loss(batch)  # training mode: repeated ids get different dropout masks
    assert torch.isfinite(loss) and not calls
    model.eval()  # no dropout at evaluation: the distinct path is exact again
    model.compute_loss(batch)
    assert len(calls) == 1
