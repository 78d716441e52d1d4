"""The fused in-batch softmax equals RetrievalTask's general path: loss and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from twotower.frequency import CountFrequency
from twotower.inbatch_loss import accidental_hits, inbatch_softmax, is_plain_inbatch
from twotower.negatives import UniformSampler
from twotower.tasks import RetrievalTask


def _inputs(b: int = 96, d: int = 16, n_items: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n_items, (b,), generator=g)  # many repeats: accidental hits everywhere
    query = F.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_()
    cand = F.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_()
    counts = torch.randint(1, 100, (n_items,), generator=g)
    weight = torch.rand(b, generator=g) + 0.1
    return query, cand, ids, counts, weight


def _loss_and_grads(fn, query, cand):
    query.grad = cand.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), query.grad.clone(), cand.grad.clone()


@pytest.mark.parametrize("logq", [False, True])
@pytest.mark.parametrize("hits", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_equals_the_general_retrieval_task(logq, hits, weighted):
    query, cand, ids, counts, weight = _inputs()
    freq = CountFrequency(counts) if logq else None
    task = RetrievalTask(temperature=0.2, remove_accidental_hits=hits, sampling_probability=freq, fused=False)
    w = weight if weighted else None
    want = _loss_and_grads(lambda: task(query, cand, ids, w), query, cand)
    got = _loss_and_grads(
        lambda: inbatch_softmax(
            query,
            cand,
            0.2,
            candidate_ids=ids if hits else None,
            log_q=freq.log_probability(ids) if logq else None,
            weight=w,
        ),
        query,
        cand,
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_positive_column_with_extra_candidates_equals_the_square_case():
    # Candidates gathered from elsewhere (e.g. other ranks) come before and after this batch's own.
    query, cand, ids, counts, _ = _inputs(b=32)
    g = torch.Generator().manual_seed(5)
    before, after = F.normalize(torch.randn(10, 16, generator=g), dim=-1), torch.zeros(0, 16)
    all_cand = torch.cat([before, cand, after])
    all_ids = torch.cat([torch.randint(0, 40, (10,), generator=g), ids])
    log_q = CountFrequency(counts).log_probability(all_ids)
    got = inbatch_softmax(
        query, all_cand, 0.1, positive_column=torch.arange(10, 42), candidate_ids=all_ids, log_q=log_q
    )
    # Reference: the definition, written out with a dense mask.
    z = query @ all_cand.T / 0.1 - log_q.float()[None, :]
    pos = torch.arange(10, 42)
    hit = (all_ids[None, :] == all_ids[pos][:, None]) & (torch.arange(42)[None, :] != pos[:, None])
    want = (torch.logsumexp(z.masked_fill(hit, float("-inf")), 1) - z[torch.arange(32), pos]).mean()
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="positive_column"):
        inbatch_softmax(query, all_cand, 0.1)


def test_accidental_hits_are_exactly_the_repeated_positive_items():
    ids = torch.tensor([7, 3, 7, 9, 3, 7])
    rows, cols = accidental_hits(ids, torch.arange(6))
    pairs = set(zip(rows.tolist(), cols.tolist(), strict=True))
    assert pairs == {(0, 2), (0, 5), (2, 0), (2, 5), (5, 0), (5, 2), (1, 4), (4, 1)}
    rows, _ = accidental_hits(torch.arange(5), torch.arange(5))
    assert rows.numel() == 0


def test_plain_inbatch_detection():
    assert is_plain_inbatch(RetrievalTask(temperature=0.1))
    sampled = RetrievalTask(temperature=0.1, sampler=UniformSampler(10), num_sampled=4)
    assert not is_plain_inbatch(sampled)
    assert not is_plain_inbatch(RetrievalTask(temperature=0.1, objective="hinge"))


def test_reused_workspace_is_never_shared_by_two_live_graphs():
    query, cand, ids, counts, _ = _inputs()
    log_q = CountFrequency(counts).log_probability(ids)

    def loss(scale: float):
        return inbatch_softmax(query * scale, cand, 0.2, candidate_ids=ids, log_q=log_q)

    want = []
    for scale in (1.0, 0.5):  # one graph at a time: the buffer is reused
        want.append(_loss_and_grads(lambda s=scale: loss(s), query, cand))
    # Both graphs alive at once (the second must not overwrite the first's softmax), then backward.
    first, second = loss(1.0), loss(0.5)
    query.grad = cand.grad = None
    second.backward()
    got_second = (second.detach(), query.grad.clone(), cand.grad.clone())
    query.grad = cand.grad = None
    first.backward()
    got_first = (first.detach(), query.grad.clone(), cand.grad.clone())
    for got, ref in ((got_first, want[0]), (got_second, want[1])):
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b)
    again = loss(1.0)
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        again.backward()
    with torch.no_grad():
        torch.testing.assert_close(loss(1.0), want[0][0])


@pytest.mark.parametrize("logq", ["counts", "streaming"])
def test_the_task_takes_the_fused_path_by_default_and_matches_the_general_one(logq, monkeypatch):
    import twotower.tasks as tasks_module
    from twotower.frequency import StreamingFrequencyEstimator

    query, cand, ids, counts, weight = _inputs()

    def estimator():
        if logq == "counts":
            return CountFrequency(counts)
        return StreamingFrequencyEstimator(num_buckets=64, num_hashes=2, alpha=0.05, seed=3)

    calls = []
    original = tasks_module.inbatch_softmax
    monkeypatch.setattr(tasks_module, "inbatch_softmax", lambda *a, **k: calls.append(1) or original(*a, **k))
    fused = RetrievalTask(temperature=0.2, sampling_probability=estimator())
    general = RetrievalTask(temperature=0.2, sampling_probability=estimator(), fused=False)
    for _ in range(3):  # the streaming estimator learns from every step on both paths alike
        got = _loss_and_grads(lambda: fused(query, cand, ids, weight), query, cand)
        want = _loss_and_grads(lambda: general(query, cand, ids, weight), query, cand)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(calls) == 3
    # A scheme beyond the plain in-batch softmax keeps the general path.
    sampled = RetrievalTask(temperature=0.2, sampler=UniformSampler(40), num_sampled=4)
    sampled(query, cand, ids, weight, embed_items=lambda i: F.normalize(torch.randn(len(i), 16), dim=-1))
    assert len(calls) == 3


def test_accidental_hits_equal_the_dense_definition_with_extra_candidates():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 30, (200,), generator=g)
    positive_column = torch.arange(40, 140)  # 100 rows; candidates before and after theirs
    rows, cols = accidental_hits(ids, positive_column)
    dense = (ids[None, :] == ids[positive_column][:, None]) & (
        torch.arange(200)[None, :] != positive_column[:, None]
    )
    want = torch.nonzero(dense, as_tuple=True)
    assert torch.equal(rows, want[0]) and torch.equal(cols, want[1])


def test_a_positive_far_below_the_others_keeps_a_finite_exact_loss():
    # Dot products at a low temperature: row 0's positive is ~200 nats below its best negative, so its
    # softmax probability underflows float32; its loss must still be logsumexp - z_pos, not inf.
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], requires_grad=True)
    cand = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    ids = torch.tensor([5, 6, 6])  # rows 1 and 2 share an item: an accidental hit either way
    got = inbatch_softmax(query, cand, 0.01, candidate_ids=ids)
    z = query @ cand.T / 0.01
    z[1, 2] = z[2, 1] = float("-inf")
    want = (torch.logsumexp(z, 1) - z.diagonal()).mean()
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want)
    got.backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(cand.grad).all()


def test_float16_underflowed_positive_keeps_the_exact_loss():
    # T = 0.05: row 0's logits are [-20, 20] with the positive at -20, loss 40 + log(1 + e^-40) = 40;
    # row 1's are [0, 0], loss log 2. Its softmax entry e^-40 ~ 4e-18 is 0 in float16, and the
    # float32 threshold 1e-30 is 0 in float16 too: the fallback has to use float16's own threshold.
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float16, requires_grad=True)
    cand = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float16, requires_grad=True)
    got = inbatch_softmax(query, cand, 0.05)
    assert got.dtype == torch.float16
    assert got.item() == pytest.approx((40.0 + math.log(2.0)) / 2, abs=0.02)
    got.backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(cand.grad).all()


@pytest.mark.parametrize("distinct_ids", [False, True])
def test_all_zero_weights_give_an_attached_zero_in_float16_too(distinct_ids):
    # sum(w * l) / max(sum(w), floor): a floor of 1e-12 is 0 in float16, and 0 / 0 was NaN.
    from twotower.unique_softmax import unique_inbatch_softmax

    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float16, requires_grad=True)
    cand = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float16)
    weight = torch.zeros(2, dtype=torch.float16)
    if distinct_ids:
        rows, counts = torch.tensor([0, 1]), torch.ones(2)
        got = unique_inbatch_softmax(query, rows, cand, rows, counts, 0.1, weight=weight)
    else:
        got = inbatch_softmax(query, cand, 0.1, weight=weight)
    assert got.item() == 0.0
    got.backward()
    assert torch.equal(query.grad, torch.zeros_like(query))


def test_the_workspace_keeps_one_buffer_whatever_the_shapes():
    # The distinct-id softmax asks for a new [users, items] shape every step: memory must stay that of
    # the largest step, not grow with the number of shapes seen.
    from twotower.inbatch_loss import _Workspace

    space, like = _Workspace(), torch.zeros(1)
    storages = set()
    for rows, cols in [(30, 40), (50, 20), (10, 10), (60, 70), (55, 65)]:
        buffer, token = space.acquire(rows, cols, like)
        assert buffer.shape == (rows, cols) and buffer.is_contiguous()
        storages.add(buffer.untyped_storage().data_ptr())
        del token  # the step's graph is gone: the buffer is free again
    assert len(space._buffers) == 1 and len(storages) == 2  # grown once, for (60, 70)
    held, token = space.acquire(60, 70, like)
    fresh, _ = space.acquire(60, 70, like)  # the first graph still holds it: a separate tensor
    assert fresh.untyped_storage().data_ptr() != held.untyped_storage().data_ptr()


def test_same_item_positive_for_two_users_hand_values():
    # Rows 0 and 1 both have item 5 as positive (columns 0 and 1); row 2 has item 7. T = 0.5.
    # Similarities q c^T: row 0 [1, 0, 0], row 1 [0, 1, 0], row 2 [1, 1, 0]; divided by T:
    #   z0 = [2, 0, 0], z1 = [0, 2, 0], z2 = [2, 2, 0].
    # Accidental hits: (0, 1) and (1, 0) only (item 5 is each row's positive); row 2 keeps all.
    #   l0 = log(e^2 + e^0) - 2 = log(1 + e^-2);  l1 = the same;  l2 = log(2 e^2 + 1) - 0.
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    cand = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    ids = torch.tensor([5, 5, 7])
    rows, cols = accidental_hits(ids, torch.arange(3))
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 1), (1, 0)]
    l0 = math.log(1 + math.exp(-2))
    l2 = math.log(2 * math.exp(2) + 1)
    got = inbatch_softmax(query, cand, 0.5, candidate_ids=ids)
    assert got.item() == pytest.approx((2 * l0 + l2) / 3, rel=1e-12)
    # Without removal, row 0 would also count column 1 (z = 0): log(e^2 + 2) - 2.
    plain = inbatch_softmax(query, cand, 0.5)
    assert plain.item() == pytest.approx((2 * math.log(1 + 2 * math.exp(-2)) + l2) / 3, rel=1e-12)
    # With logQ, Q = (1/2, 1/2, 1/4): the correction is added AFTER the temperature, z = s / T - log Q:
    #   z0 = [2 + log 2, (removed), log 4] -> l0 = log(2 e^2 + 4) - 2 - log 2 = log(1 + 2 e^-2)
    #   z2 = [2 + log 2, 2 + log 2, log 4] -> l2 = log(4 e^2 + 4) - log 4 = log(e^2 + 1)
    log_q = torch.tensor([0.5, 0.5, 0.25], dtype=torch.float64).log()
    got_q = inbatch_softmax(query, cand, 0.5, candidate_ids=ids, log_q=log_q)
    want_q = (2 * math.log(1 + 2 * math.exp(-2)) + math.log(math.exp(2) + 1)) / 3
    assert got_q.item() == pytest.approx(want_q, rel=1e-12)


def test_gradients_equal_autograd_of_the_dense_definition_with_duplicates_and_logq():
    # The hand-written backward against autograd through the dense definition: duplicates (hits),
    # a logQ column and a non-unit temperature, in float64.
    g = torch.Generator().manual_seed(4)
    q0 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    c0 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    ids = torch.tensor([1, 2, 1, 3, 2, 1])
    log_q = torch.rand(6, generator=g, dtype=torch.float64).log()
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0, 3.0], dtype=torch.float64)
    q1, c1 = q0.clone().requires_grad_(), c0.clone().requires_grad_()
    inbatch_softmax(q1, c1, 0.3, candidate_ids=ids, log_q=log_q, weight=weight).backward()
    q2, c2 = q0.clone().requires_grad_(), c0.clone().requires_grad_()
    z = q2 @ c2.T / 0.3 - log_q[None, :]
    hit = (ids[None, :] == ids[:, None]) & ~torch.eye(6, dtype=torch.bool)
    per_row = torch.logsumexp(z.masked_fill(hit, float("-inf")), 1) - z.diagonal()
    ((per_row * weight).sum() / weight.sum()).backward()
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c1.grad, c2.grad, rtol=1e-10, atol=1e-12)
