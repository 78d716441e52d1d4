import math

import pytest
import torch

from twotower.frequency import CountFrequency, StreamingFrequencyEstimator


def test_counts_give_exact_probabilities():
    freq = CountFrequency.from_ids(torch.tensor([0, 0, 0, 1, 2, 2]), num_items=4)
    assert torch.allclose(
        freq.probability(torch.tensor([0, 1, 2])), torch.tensor([3 / 6, 1 / 6, 2 / 6]).double()
    )
    # An item never seen in training counts once, so log Q stays finite.
    assert freq.log_probability(torch.tensor([3])).item() == pytest.approx(math.log(1 / 6))
    freq.update(torch.tensor([3, 3, 3]))  # no-op
    assert freq.counts.tolist() == [3.0, 1.0, 2.0, 0.0]


def test_single_update_follows_the_paper_recurrence_by_hand():
    est = StreamingFrequencyEstimator(num_buckets=1000, num_hashes=1, alpha=0.5)
    ids = torch.tensor([7])
    est.update(ids)  # step 1, first sighting: gap = t - 0 = 1
    assert est.expected_gap(ids).item() == pytest.approx(1.0)
    est.update(torch.tensor([8]))  # step 2 (7 unseen)
    est.update(ids)  # step 3: B = 0.5 * 1 + 0.5 * (3 - 1) = 1.5
    assert est.expected_gap(ids).item() == pytest.approx(1.5)
    est.update(torch.tensor([7, 7]))  # step 4, twice: B = .25 * 1.5 + .5 * .5 * (4 - 3) = .625
    assert est.expected_gap(ids).item() == pytest.approx(0.25 * 1.5 + 0.5 * 0.5 * 1)
    # A repeat in one batch equals two sequential updates, the second with a gap of 0.
    assert est.probability(ids).item() == pytest.approx(1 / 0.625)
    assert est.log_probability(ids).item() == pytest.approx(-math.log(0.625))


def _stream(est, probs, steps, batch, generator):
    for _ in range(steps):
        est.update(torch.multinomial(probs, batch, replacement=True, generator=generator))


@pytest.mark.parametrize("num_hashes", [1, 3])
def test_converges_to_true_rates_on_a_known_stream(num_hashes):
    gen = torch.Generator().manual_seed(0)
    head = torch.tensor([0.30, 0.15, 0.08, 0.04])
    probs = torch.cat([head, torch.full((200,), (1 - head.sum().item()) / 200)])
    batch = 8
    # Fewer buckets than items: with several hashes, Algorithm 3's max undoes most collisions.
    est = StreamingFrequencyEstimator(num_buckets=512, num_hashes=num_hashes, alpha=0.02, seed=1)
    _stream(est, probs, 6000, batch, gen)
    ids = torch.arange(4)
    estimated = est.probability(ids).float()
    true_rate = batch * head
    assert torch.allclose(estimated, true_rate, rtol=0.2), (estimated, true_rate)
    # The ranking of item frequencies is recovered.
    assert torch.all(estimated[:-1] > estimated[1:])
    tail = est.probability(torch.arange(4, 204)).float().median()
    assert tail.item() == pytest.approx(batch * probs[4].item(), rel=0.35)


def test_multi_hash_beats_single_hash_under_heavy_collisions():
    probs = torch.full((400,), 1 / 400)
    errors = {}
    for m in (1, 4):
        est = StreamingFrequencyEstimator(num_buckets=128, num_hashes=m, alpha=0.02, seed=5)
        _stream(est, probs, 4000, 16, torch.Generator().manual_seed(3))
        est_rate = est.probability(torch.arange(400))
        errors[m] = (est_rate / (16 / 400)).log().abs().mean().item()
    assert errors[4] < errors[1]


def test_follows_a_switch_in_distribution():
    gen = torch.Generator().manual_seed(2)
    before = torch.tensor([0.7, 0.1, 0.1, 0.1])
    after = torch.tensor([0.1, 0.1, 0.1, 0.7])
    est = StreamingFrequencyEstimator(num_buckets=64, num_hashes=2, alpha=0.05)
    _stream(est, before, 1000, 1, gen)
    assert est.probability(torch.tensor([0])).item() == pytest.approx(0.7, rel=0.2)
    assert est.probability(torch.tensor([3])).item() == pytest.approx(0.1, rel=0.35)
    _stream(est, after, 1000, 1, gen)
    assert est.probability(torch.tensor([3])).item() == pytest.approx(0.7, rel=0.2)
    assert est.probability(torch.tensor([0])).item() == pytest.approx(0.1, rel=0.35)


def test_state_round_trips_through_state_dict():
    a = StreamingFrequencyEstimator(num_buckets=32, num_hashes=2, alpha=0.1, seed=0)
    a.update(torch.tensor([1, 2, 3, 1]))
    b = StreamingFrequencyEstimator(num_buckets=32, num_hashes=2, alpha=0.1, seed=99)
    b.load_state_dict(a.state_dict())
    ids = torch.tensor([1, 2, 3, 4])
    assert torch.equal(a.expected_gap(ids), b.expected_gap(ids))


def test_unseen_ids_are_treated_as_rare_and_bad_args_rejected():
    est = StreamingFrequencyEstimator(num_buckets=1 << 20, num_hashes=1, alpha=0.1)
    for _ in range(10):
        est.update(torch.tensor([1]))
    assert est.expected_gap(torch.tensor([123456])).item() == 10.0
    with pytest.raises(ValueError):
        StreamingFrequencyEstimator(alpha=1.5)
    with pytest.raises(ValueError):
        StreamingFrequencyEstimator(num_buckets=0)


def _distinct_buckets(est, ids):
    b = est.buckets(torch.tensor(ids))
    return all(len(set(row)) == len(ids) for row in b.tolist())


def test_periodic_stream_gives_the_exact_gaps_and_converges_geometrically():
    # Item 0 every step, item 1 on even steps, item 2 every third step, item 3 on odd steps.
    # Items 0, 1, 2 are first seen at steps 1, 2, 3: their first gap is t - 0 = 1, 2, 3 and every later
    # gap equals it, so B = 1, 2, 3 exactly. Item 3 (steps 1, 3, 5, ...) starts at B = 1 < 2: with
    # alpha = 1/2, B_n = B_{n-1} / 2 + 2 / 2 -> 1, 1.5, 1.75, 1.875, ... = 2 - 2^-(n-1) after n sightings.
    est = StreamingFrequencyEstimator(num_buckets=1 << 16, num_hashes=1, alpha=0.5, seed=0)
    assert _distinct_buckets(est, [0, 1, 2, 3])
    for t in range(1, 13):
        ids = [0] + [1] * (t % 2 == 0) + [2] * (t % 3 == 0) + [3] * (t % 2 == 1)
        est.update(torch.tensor(ids))
    # 12 steps: item 3 seen at 1, 3, ..., 11, i.e. n = 6 sightings -> 2 - 2^-5 = 1.96875.
    assert est.expected_gap(torch.arange(4)).tolist() == [1.0, 2.0, 3.0, 2 - 2**-5]


def test_a_hash_collision_looks_more_frequent_by_the_sequential_recurrence():
    # One bucket for everything: items 0 and 1 every step are c = 2 updates of the same bucket per step.
    # alpha = 1/2, B <- (1/2)^2 B + (1/2)(1/2)(t - A):
    #   step 1 (first sighting): (1/2)^(2-1) * 1 = 0.5
    #   step 2: 0.25 * 0.5 + 0.25 = 0.375;  step 3: 0.25 * 0.375 + 0.25 = 0.34375
    # The fixed point a(1-a)/(1-(1-a)^2) = 1/3: both look 3x as frequent as once per step.
    est = StreamingFrequencyEstimator(num_buckets=1, num_hashes=1, alpha=0.5)
    for want in (0.5, 0.375, 0.34375):
        est.update(torch.tensor([0, 1]))
        assert est.expected_gap(torch.tensor([0, 1])).tolist() == [want, want]
    for _ in range(60):
        est.update(torch.tensor([0, 1]))
    assert est.probability(torch.tensor([0])).item() == pytest.approx(3.0, rel=1e-12)


def test_algorithm_3_max_over_hashes_undoes_a_collision_exactly():
    # Pick the first seed whose hash 0 puts items 0 and 1 in the same bucket and hash 1 does not.
    seed = next(
        s
        for s in range(1000)
        if (lambda b: b[0][0] == b[0][1] and b[1][0] != b[1][1])(
            StreamingFrequencyEstimator(num_buckets=2, num_hashes=2, seed=s)
            .buckets(torch.tensor([0, 1]))
            .tolist()
        )
    )
    est = StreamingFrequencyEstimator(num_buckets=2, num_hashes=2, alpha=0.5, seed=seed)
    for t in range(1, 5):  # item 0 every step, item 1 on even steps
        est.update(torch.tensor([0, 1] if t % 2 == 0 else [0]))
    # Hash 0's shared bucket (alpha = 1/2): t1 c=1 first: 1; t2 c=2: .25*1 + .25*1 = .5;
    # t3 c=1: .5*.5 + .5*1 = .75; t4 c=2: .25*.75 + .25*1 = .4375 -- shorter than either true gap.
    b0 = est.buckets(torch.tensor([0]))[0, 0]
    assert est.gap[0, b0].item() == 0.4375
    # Hash 1 alone: item 0 gap 1 (steps 1, 2, 3, 4), item 1 gap 2 (first seen at 2, then 4): exact.
    assert est.expected_gap(torch.tensor([0, 1])).tolist() == [1.0, 2.0]


def test_mixture_probability_with_the_streaming_estimator_per_step():
    # MixedSampler(per_step=True) reads the estimator's occurrences per batch as B * p_batch.
    # Stream: batch [0, 1] for 3 steps -> items 0 and 1 at rate 1 per step (gap 1 exactly);
    # item 2 unseen -> gap = 3 steps so far, rate 1/3. B = 2, B' = 2 uniform over I = 4:
    #   q(0) = q(1) = (1 + 2/4) / 4 = 0.375;   q(2) = (1/3 + 2/4) / 4 = 5/24.
    from twotower.negatives import MixedSampler, UniformSampler

    est = StreamingFrequencyEstimator(num_buckets=1 << 16, num_hashes=2, alpha=0.1, seed=0)
    assert _distinct_buckets(est, [0, 1, 2])
    for _ in range(3):
        est.update(torch.tensor([0, 1]))
    mixed = MixedSampler(UniformSampler(4), n_extra=2, frequency=est, per_step=True)
    q = mixed.log_probability(torch.arange(3), batch_size=2).exp()
    assert q.tolist() == pytest.approx([0.375, 0.375, 5 / 24], rel=1e-12)


def _collide_in_hash0_only(num_buckets: int) -> int:
    for seed in range(1000):
        b = StreamingFrequencyEstimator(num_buckets=num_buckets, num_hashes=2, seed=seed).buckets(
            torch.tensor([0, 1])
        )
        if b[0, 0] == b[0, 1] and b[1, 0] != b[1, 1]:
            return seed
    raise AssertionError("no seed found")


def test_unseen_id_is_rare_even_when_one_of_its_buckets_collides():
    # Item 0 on every one of 10 steps; item 1 never. Item 1 shares hash 0's bucket with item 0 but has
    # its own, never-touched bucket under hash 1. The code comment: "A bucket never seen has no estimate
    # yet: treat it as seen once over the whole stream so far" (gap = 10), and Algorithm 3 takes the
    # max over hashes = the least collided bucket -> max(1, 10) = 10. The code takes the max FIRST
    # (max(1, 0) = 1) and applies the unseen rule only when every bucket is 0, so the never-seen item 1
    # is reported as frequent as item 0 (rate 1 per step instead of 1/10).
    est = StreamingFrequencyEstimator(num_buckets=4, num_hashes=2, alpha=0.5, seed=_collide_in_hash0_only(4))
    for _ in range(10):
        est.update(torch.tensor([0]))
    assert est.expected_gap(torch.tensor([0])).item() == 1.0
    assert est.expected_gap(torch.tensor([1])).item() == 10.0
