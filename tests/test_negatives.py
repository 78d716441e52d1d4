"""Tests for twotower.negatives: sampler distributions, exact log Q, masks, mining and determinism."""

from __future__ import annotations

import math

import pytest
import torch

from twotower.frequency import CountFrequency
from twotower.negatives import (
    PAD_ID,
    HardNegativeMiner,
    ImpressionSampler,
    MixedSampler,
    Negatives,
    PopularitySampler,
    UniformSampler,
    accidental_hit_mask,
)
from twotower.topk import CSR

DRAWS = 200_000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_distribution(ids: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square goodness of fit at the 0.999 level, plus a 6-sigma bound on every frequency."""
    probs = probs.double()
    draws = ids.numel()
    observed = torch.bincount(ids.reshape(-1), minlength=len(probs)).double()
    assert len(observed) == len(probs), "drew an id outside the support"
    support = probs > 0
    assert observed[~support].sum() == 0
    expected = probs[support] * draws
    chi2 = float(((observed[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    # Wilson-Hilferty approximation of the chi-square 0.999 quantile (z = 3.09).
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < critical, (chi2, critical)
    sigma = torch.sqrt(probs * (1 - probs) / draws)
    assert bool(((observed / draws - probs).abs() <= 6 * sigma + 1e-12).all())


def test_uniform_distribution_log_q_and_determinism():
    sampler = UniformSampler(10)
    neg = sampler.sample({}, DRAWS, gen())
    assert isinstance(neg, Negatives) and neg.mask is None
    assert neg.ids.shape == (DRAWS,) and neg.ids.dtype == torch.long
    assert_distribution(neg.ids, torch.full((10,), 0.1))
    assert bool((neg.log_q == -math.log(10)).all())
    again = sampler.sample({}, DRAWS, gen())
    assert torch.equal(neg.ids, again.ids)
    assert not torch.equal(neg.ids[:100], sampler.sample({}, 100, gen(1)).ids)


@pytest.mark.parametrize("large_path", [False, True])
def test_popularity_distribution_and_exact_log_q(monkeypatch, large_path):
    if large_path:  # exercise the inverse-CDF path used above torch.multinomial's category limit
        monkeypatch.setattr(PopularitySampler, "MULTINOMIAL_MAX", 0)
    counts = torch.tensor([0, 1, 5, 20, 100, 3])
    sampler = PopularitySampler(counts, alpha=0.75)
    weights = [max(c, 1) ** 0.75 for c in counts.tolist()]
    probs = torch.tensor([w / sum(weights) for w in weights], dtype=torch.float64)
    neg = sampler.sample({}, DRAWS, gen())
    assert neg.mask is None and neg.ids.shape == (DRAWS,)
    assert_distribution(neg.ids, probs)
    torch.testing.assert_close(neg.log_q, torch.log(probs)[neg.ids], rtol=1e-12, atol=0)
    torch.testing.assert_close(sampler.log_probability(torch.arange(6)).exp().sum().item(), 1.0)
    assert torch.equal(neg.ids, sampler.sample({}, DRAWS, gen()).ids)
    # alpha = 0 is the uniform distribution, whatever the counts.
    flat = PopularitySampler(counts, alpha=0.0)
    neg = flat.sample({}, DRAWS, gen(2))
    assert_distribution(neg.ids, torch.full((6,), 1 / 6))
    torch.testing.assert_close(neg.log_q, torch.full((DRAWS,), -math.log(6), dtype=torch.float64))


def test_popularity_state_round_trips_and_rejects_bad_input():
    sampler = PopularitySampler(torch.tensor([4.0, 0.0, 9.0]), alpha=0.5)
    clone = PopularitySampler(torch.ones(3), alpha=0.5)
    clone.load_state_dict(sampler.state_dict())
    assert torch.equal(clone.probs, sampler.probs)
    with pytest.raises(ValueError):
        PopularitySampler(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError):
        PopularitySampler(torch.tensor([1.0]), alpha=-0.5)


@pytest.mark.parametrize("large_path", [False, True])
def test_popularity_state_load_carries_log_q_and_the_cdf(monkeypatch, large_path):
    # counts (4, 0, 9), alpha 0.5: weights (2, 1, 3) (the 0 floored at 1), so Q = (1/3, 1/6, 1/2) and
    # the CDF (1/3, 1/2, 1). A sampler built on other counts (uniform) and loaded from this state must
    # report that log Q and draw from it, on both the multinomial and the inverse-CDF path.
    if large_path:
        monkeypatch.setattr(PopularitySampler, "MULTINOMIAL_MAX", 0)
    clone = PopularitySampler(torch.ones(3), alpha=0.5)
    clone.load_state_dict(PopularitySampler(torch.tensor([4.0, 0.0, 9.0]), alpha=0.5).state_dict())
    hand = torch.tensor([1 / 3, 1 / 6, 1 / 2], dtype=torch.float64)
    torch.testing.assert_close(clone.log_probability(torch.arange(3)), hand.log(), rtol=1e-12, atol=0)
    torch.testing.assert_close(clone.cdf, torch.tensor([1 / 3, 1 / 2, 1.0], dtype=torch.float64))
    neg = clone.sample({}, DRAWS, gen())
    assert_distribution(neg.ids, hand)
    torch.testing.assert_close(neg.log_q, hand.log()[neg.ids], rtol=1e-12, atol=0)


def test_mixed_sampler_mixture_probability_by_hand():
    freq = CountFrequency(torch.tensor([3.0, 1.0, 0.0, 4.0]))  # p_batch = [3, 1, 1, 4] / 8 (floor at 1)
    sampler = MixedSampler(UniformSampler(4), n_extra=2, frequency=freq)
    neg = sampler.candidates(torch.tensor([0, 3]), gen())
    assert neg.ids.shape == (4,) and neg.ids[:2].tolist() == [0, 3] and neg.mask is None
    # q(y) = (B p_batch(y) + B' p_extra(y)) / (B + B') with B = B' = 2, p_extra = 1/4
    hand = {
        0: (2 * 3 / 8 + 2 / 4) / 4,
        1: (2 * 1 / 8 + 2 / 4) / 4,
        2: (2 * 1 / 8 + 2 / 4) / 4,
        3: (1 + 0.5) / 4,
    }
    assert hand == {0: 0.3125, 1: 0.1875, 2: 0.1875, 3: 0.375}
    expected = torch.tensor([math.log(hand[i]) for i in neg.ids.tolist()], dtype=torch.float64)
    torch.testing.assert_close(neg.log_q, expected, rtol=1e-12, atol=1e-15)
    full = sampler.log_probability(torch.arange(4), batch_size=2).exp()
    torch.testing.assert_close(full, torch.tensor([hand[i] for i in range(4)], dtype=torch.float64))
    # sample() reads the batch's positives; n overrides n_extra.
    assert sampler.sample({"item_idx": torch.tensor([1, 2, 1])}, 5, gen()).ids.shape == (8,)
    # Without in-batch candidates q = p_extra; with no extras q = p_batch.
    only_extra = MixedSampler(UniformSampler(4), n_extra=3, in_batch=False)
    neg = only_extra.candidates(torch.tensor([0, 3]), gen())
    assert neg.ids.shape == (3,) and bool((neg.log_q == -math.log(4)).all())
    no_extra = MixedSampler(UniformSampler(4), n_extra=0, frequency=freq)
    neg = no_extra.candidates(torch.tensor([0, 3]), gen())
    torch.testing.assert_close(neg.log_q, torch.log(torch.tensor([3 / 8, 4 / 8], dtype=torch.float64)))


def test_mixed_sampler_per_step_rates_give_the_same_mixture():
    freq = CountFrequency(torch.tensor([3.0, 1.0, 2.0, 4.0]))  # no zero count: p_batch sums to 1

    class Rate:  # a streaming-style estimator: occurrences per batch of B = 2, i.e. 2 * p_batch
        def log_probability(self, ids):
            return freq.log_probability(ids) + math.log(2)

    extra = PopularitySampler(torch.tensor([1.0, 2.0, 3.0, 4.0]), alpha=1.0)
    a = MixedSampler(extra, n_extra=3, frequency=freq).log_probability(torch.arange(4), 2)
    b = MixedSampler(extra, n_extra=3, frequency=Rate(), per_step=True).log_probability(torch.arange(4), 2)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.exp().sum().item(), 1.0)


def test_mixed_sampler_pool_is_distributed_as_the_mixture():
    # Positives drawn from p_batch, extras from a popularity sampler: an item picked uniformly from the
    # pool of B + B' candidates follows q. Pool all candidates of many batches and compare.
    counts = torch.tensor([5.0, 1.0, 2.0, 8.0, 4.0])
    freq = CountFrequency(counts)
    sampler = MixedSampler(PopularitySampler(counts, alpha=0.5), n_extra=12, frequency=freq)
    g, batches, batch_size = gen(5), 4_000, 24
    p_batch = freq.probability(torch.arange(5))
    positives = torch.multinomial(p_batch, batches * batch_size, replacement=True, generator=g)
    pools = [sampler.candidates(b, g).ids for b in positives.view(batches, batch_size)]
    q = sampler.log_probability(torch.arange(5), batch_size).exp()
    assert_distribution(torch.cat(pools), q)


def test_impression_sampler_draws_only_the_users_impressions():
    # user 0: {2, 5, 7} (7 listed twice), user 1: none, user 2: {4}
    sampler = ImpressionSampler(torch.tensor([0, 4, 4, 5]), torch.tensor([7, 2, 5, 7, 4]))
    assert sampler.items.tolist() == [2, 5, 7, 4]  # de-duplicated, so Q is exactly 1 / 3
    neg = sampler.sample({"user_idx": torch.tensor([0, 1, 2, 0])}, 50, gen())
    assert neg.ids.shape == neg.log_q.shape == neg.mask.shape == (4, 50)
    assert set(neg.ids[[0, 3]].flatten().tolist()) == {2, 5, 7}
    assert neg.mask[[0, 2, 3]].all() and not neg.mask[1].any()
    assert bool((neg.ids[1] == PAD_ID).all()) and bool((neg.log_q[1] == 0).all())
    assert bool((neg.ids[2] == 4).all()) and bool((neg.log_q[2] == 0).all())  # log(1 / 1)
    assert bool((neg.log_q[0] == -math.log(3)).all())
    big = sampler.sample({"user_idx": torch.tensor([0])}, DRAWS, gen(3))
    assert_distribution(big.ids, torch.tensor([0, 0, 1, 0, 0, 1, 0, 1]) / 3)
    assert torch.equal(big.ids, sampler.sample({"user_idx": torch.tensor([0])}, DRAWS, gen(3)).ids)
    lp = sampler.log_probability(torch.tensor([0, 1, 2]), torch.tensor([[5, 4], [5, 4], [5, 4]]))
    assert lp.tolist() == [[-math.log(3), -math.inf], [-math.inf, -math.inf], [-math.inf, 0.0]]
    empty = ImpressionSampler.from_pairs(torch.tensor([], dtype=torch.long), torch.tensor([]), num_users=2)
    neg = empty.sample({"user_idx": torch.tensor([0, 1])}, 3)
    assert not neg.mask.any() and bool((neg.ids == PAD_ID).all())


def _hand_case():
    # Items on a line: user 0 = [1, 0] scores items 6, 5, 4, 3, 2, 1; user 1 = [-1, 0] the reverse.
    items = torch.tensor([[6.0, 0.0], [5.0, 0.0], [4.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    users = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    # positives: user 0 {0, 2}, user 1 {5}, user 2 every item but 3
    positives = CSR.from_pairs(
        torch.tensor([0, 0, 1, 2, 2, 2, 2, 2]), torch.tensor([0, 2, 5, 0, 1, 2, 4, 5]), 3
    )
    return users, items, positives


def test_hard_negative_miner_mines_top_non_positives_on_schedule():
    users, items, positives = _hand_case()
    miner = HardNegativeMiner(num_users=3, num_items=6, k=3, refresh_every=10, cap=2)
    batch = {"user_idx": torch.tensor([0, 1, 2])}
    neg = miner.sample(batch, 5, gen())  # never mined yet: every slot masked
    assert neg.ids.shape == (3, 2) and not neg.mask.any()
    assert miner.refresh(users, items, positives, step=0)
    assert miner.mined.tolist() == [[1, 3, 4], [4, 3, 2], [3, -1, -1]]
    assert not miner.refresh(-users, items, positives, step=9)  # not due: unchanged
    assert miner.mined[0].tolist() == [1, 3, 4]
    neg = miner.sample(batch, 5, gen())
    assert neg.ids.shape == (3, 2)
    assert neg.mask[:2].all() and neg.mask[2].tolist() == [True, False] and neg.ids[2].tolist() == [3, PAD_ID]
    for row in range(2):
        assert len(set(neg.ids[row].tolist())) == 2  # without replacement
        assert set(neg.ids[row].tolist()) <= set(miner.mined[row].tolist())
    torch.testing.assert_close(neg.log_q[:2], torch.full((2, 2), -math.log(3), dtype=torch.float64))
    assert neg.log_q[2].tolist() == [0.0, 0.0]
    # Due again at step 10: new embeddings, new lists; the positives are still excluded.
    assert miner.refresh(-users, items, (positives.indptr, positives.indices), step=10)
    assert miner.mined.tolist() == [[5, 4, 3], [0, 1, 2], [3, -1, -1]]
    assert int(miner.last_refresh) == 10 and not miner.due(19) and miner.due(20)
    # Never a positive, each row uniform over its list; a batch positive is masked.
    many = {"user_idx": torch.tensor([0, 1, 2]).repeat(2000)}
    neg = miner.sample(many, 5, gen(1))
    valid = accidental_hit_mask(torch.full((6000,), -1), neg.ids, positives, many["user_idx"])
    assert bool((valid | ~neg.mask).all())
    assert_distribution(neg.ids[0::3][neg.mask[0::3]], torch.tensor([0, 0, 0, 1, 1, 1]) / 3)
    hit = miner.sample({"user_idx": torch.tensor([0]), "item_idx": torch.tensor([5])}, 3, gen())
    assert hit.ids.shape == (1, 2) and hit.mask.tolist() == [[i != 5 for i in hit.ids[0].tolist()]]
    clone = HardNegativeMiner(num_users=3, num_items=6, k=3, refresh_every=10, cap=2)
    clone.load_state_dict(miner.state_dict())
    assert torch.equal(clone.mined, miner.mined) and int(clone.last_refresh) == 10
    assert torch.equal(clone.sample(many, 2, gen(4)).ids, miner.sample(many, 2, gen(4)).ids)


def test_accidental_hit_mask_against_brute_force():
    g = gen(7)
    batch, n, num_items, num_users = 16, 12, 9, 5
    positive = torch.randint(0, num_items, (batch,), generator=g)
    user_idx = torch.randint(0, num_users, (batch,), generator=g)
    shared = torch.randint(0, num_items, (n,), generator=g)
    per_row = torch.randint(0, num_items, (batch, n), generator=g)
    rows, cols = (
        torch.randint(0, num_users, (20,), generator=g),
        torch.randint(0, num_items, (20,), generator=g),
    )
    known = CSR.from_pairs(rows, cols, num_users)
    for cand in (shared, per_row):
        c = cand.expand(batch, -1)
        valid = accidental_hit_mask(positive, cand)
        assert torch.equal(valid, c != positive[:, None])
        assert not bool((c[valid] == positive[:, None].expand(-1, n)[valid]).any())
        valid = accidental_hit_mask(positive, cand, known, user_idx)
        expected = [
            [int(c[r, j]) != int(positive[r]) and int(c[r, j]) not in known.row(int(user_idx[r])).tolist()
             for j in range(n)]
            for r in range(batch)
        ]  # fmt: skip
        assert valid.tolist() == expected
    # Without user_idx the CSR rows are the batch rows; an (indptr, items) tuple works the same.
    csr = CSR.from_pairs(torch.tensor([0, 1]), torch.tensor([3, 4]), 2)
    valid = accidental_hit_mask(torch.tensor([1, 1]), torch.tensor([1, 3, 4]), (csr.indptr, csr.indices))
    assert valid.tolist() == [[False, False, True], [False, True, False]]
    with pytest.raises(ValueError):
        accidental_hit_mask(torch.tensor([1, 1, 1]), torch.tensor([1]), csr)


def _chi2(ids: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(ids, minlength=len(probs)).double()
    expected = probs.double() * ids.numel()
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_popularity_follows_the_documented_power_of_counts(alpha):
    # Counts over 4 decades; the zero count is floored at 1. assert_distribution checks the 0.999
    # chi-square quantile (df = 9: ~28). The same draws must REJECT alpha +- 0.05: at 100k draws the
    # expected chi-square of that mismatch is 230-1140, so the test has power against a wrong exponent.
    counts = torch.tensor([0, 1, 2, 5, 10, 50, 100, 500, 1000, 5000])
    sampler = PopularitySampler(counts, alpha=alpha)

    def probs(a: float) -> torch.Tensor:
        w = counts.double().clamp_min(1.0) ** a
        return w / w.sum()

    torch.testing.assert_close(sampler.probs, probs(alpha), rtol=1e-12, atol=0)
    ids = sampler.sample({}, 100_000, gen(11)).ids
    assert_distribution(ids, probs(alpha))
    for wrong in (alpha - 0.05, alpha + 0.05):
        assert _chi2(ids, probs(wrong)) > 100, wrong


def test_popularity_floors_zero_and_fractional_counts_at_one():
    sampler = PopularitySampler(torch.tensor([0.0, 0.25, 1.0, 4.0]), alpha=0.5)
    torch.testing.assert_close(sampler.probs, torch.tensor([1, 1, 1, 2], dtype=torch.float64) / 5)
    assert torch.equal(PopularitySampler(torch.zeros(3)).probs, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_every_sampler_is_deterministic_under_a_seed():
    counts = torch.tensor([5.0, 1.0, 0.0, 3.0, 2.0])
    miner = HardNegativeMiner(num_users=2, num_items=5, k=4)
    miner.refresh(
        torch.tensor([[1.0], [-1.0]]),
        torch.arange(5.0)[:, None],
        (torch.tensor([0, 1, 1]), torch.tensor([4])),
        0,
    )
    batch = {"user_idx": torch.tensor([0, 1, 0, 1] * 8), "item_idx": torch.tensor([1, 2, 3, 0] * 8)}
    samplers = [
        UniformSampler(5),
        PopularitySampler(counts),
        MixedSampler(PopularitySampler(counts), n_extra=3, frequency=CountFrequency(counts)),
        ImpressionSampler.from_pairs(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([1, 2, 3, 0, 4]), 2),
        miner,
    ]
    for sampler in samplers:
        a, b, c = (sampler.sample(batch, 16, gen(seed)) for seed in (3, 3, 4))
        assert torch.equal(a.ids, b.ids) and torch.equal(a.log_q, b.log_q), type(sampler).__name__
        assert not torch.equal(a.ids, c.ids), type(sampler).__name__


def test_accidental_hits_are_caught_for_every_sampler():
    # A small catalogue makes hits frequent. For each sampler's candidates, no slot that is valid after
    # the sampler's mask and accidental_hit_mask holds the row's positive or a known positive of its user.
    g, num_users, num_items, batch_size = gen(9), 4, 6, 32
    users = torch.randint(0, num_users, (batch_size,), generator=g)
    known = CSR.from_pairs(torch.tensor([0, 0, 1, 2, 3, 3]), torch.tensor([0, 1, 2, 3, 4, 5]), num_users)
    positives = torch.tensor([int(known.row(int(u))[0]) for u in users])  # each row's own positive
    miner = HardNegativeMiner(num_users, num_items, k=3)
    miner.refresh(torch.randn(num_users, 2, generator=g), torch.randn(num_items, 2, generator=g), known, 0)
    samplers = [
        UniformSampler(num_items),
        PopularitySampler(torch.arange(num_items).double()),
        MixedSampler(UniformSampler(num_items), n_extra=5, frequency=CountFrequency(torch.ones(num_items))),
        ImpressionSampler.from_pairs(torch.arange(24) % num_users, torch.arange(24) % num_items, num_users),
        miner,
    ]
    batch = {"user_idx": users, "item_idx": positives}
    for sampler in samplers:
        neg = sampler.sample(batch, 8, g)
        ids = neg.ids.expand(batch_size, -1)
        valid = accidental_hit_mask(positives, neg.ids, known, users)
        if neg.mask is not None:
            valid &= neg.mask
        hits = [
            [int(i) == int(p) or int(i) in known.row(int(u)).tolist() for i in row]
            for row, p, u in zip(ids, positives, users, strict=True)
        ]
        assert not (valid & torch.tensor(hits)).any(), type(sampler).__name__
        assert torch.tensor(hits).any() or isinstance(sampler, HardNegativeMiner), "no hits to catch"
        if isinstance(sampler, HardNegativeMiner):  # mined lists exclude positives by construction
            assert not (neg.mask & torch.tensor(hits)).any()


def test_accidental_hit_mask_negative_ids_and_an_unsorted_tuple_csr():
    # Row keys are row * width + item: a -1 candidate of row 1 would alias row 0's item width - 1 (5).
    csr = CSR.from_pairs(torch.tensor([0, 1]), torch.tensor([5, 3]), 2)
    valid = accidental_hit_mask(torch.tensor([9, 9]), torch.tensor([[5, 1], [-1, 3]]), csr)
    assert valid.tolist() == [[False, True], [True, False]]
    # (indptr, items) rows need be neither sorted nor de-duplicated.
    valid = accidental_hit_mask(
        torch.tensor([9]), torch.tensor([1, 2, 3, 4]), (torch.tensor([0, 4]), torch.tensor([3, 3, 1, 3]))
    )
    assert valid.tolist() == [[False, True, False, True]]


def test_popularity_sampler_draws_zero_and_mixed_sampler_works_without_extras():
    counts = torch.tensor([3.0, 1.0, 0.0, 4.0])
    neg = PopularitySampler(counts).sample({}, 0)
    assert neg.ids.shape == (0,) and neg.ids.dtype == torch.long and neg.log_q.shape == (0,)
    mixed = MixedSampler(PopularitySampler(counts), n_extra=0, frequency=CountFrequency(counts))
    neg = mixed.candidates(torch.tensor([0, 3]))  # documented: with B' = 0, q = p_batch
    assert neg.ids.tolist() == [0, 3]
    torch.testing.assert_close(neg.log_q, torch.log(torch.tensor([3 / 8, 4 / 8], dtype=torch.float64)))


def test_accidental_hit_mask_with_no_candidates_is_empty():
    csr = CSR.from_pairs(torch.tensor([0]), torch.tensor([1]), 1)
    valid = accidental_hit_mask(torch.tensor([1]), torch.zeros(1, 0, dtype=torch.long), csr)
    assert valid.shape == (1, 0) and valid.dtype == torch.bool


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_popularity_sampler_rejects_non_finite_counts(bad):
    with pytest.raises(ValueError, match="finite"):
        PopularitySampler(torch.tensor([bad, 1.0]))


def test_popularity_sampler_large_alpha_stays_finite():
    sampler = PopularitySampler(torch.tensor([1e4, 1.0]), alpha=100.0)  # 1e4**100 overflows float64
    torch.testing.assert_close(sampler.probs, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert sampler.sample({}, 5, gen(0)).ids.tolist() == [0] * 5
    # log Q of the item drawn with probability 0.0 in float64 is still finite: 100 * (log 1 - log 1e4).
    log_q = sampler.log_probability(torch.tensor([0, 1]))
    assert log_q[0].item() == 0.0 and log_q[1].item() == pytest.approx(-100 * math.log(1e4))
