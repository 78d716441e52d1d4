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
