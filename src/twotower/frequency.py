"""Item sampling probabilities for the logQ correction: exact counts or a streaming estimate.

In-batch negatives are the other positives of the batch, so an item shows up as a negative in
proportion to how often it is a positive. The logQ correction (Yi et al., RecSys 2019, "Sampling-Bias-
Corrected Neural Modeling for Large Corpus Item Recommendations") subtracts log Q(y) from every logit.
Only differences of log Q between items matter to the softmax, so Q may be any quantity proportional
to the per-example sampling probability: counts / total, or occurrences per training step.

``CountFrequency``
    Q(y) = count(y) / total over the training log. Exact, but needs the whole log up front and
    cannot follow a drifting distribution.

``StreamingFrequencyEstimator`` (Algorithms 2 and 3 of the paper)
    Keeps, per hash bucket, A = the last step the bucket was seen and B = a moving average of the
    number of steps between two sightings. On seeing item y at step t:

        B[h(y)] <- (1 - alpha) * B[h(y)] + alpha * (t - A[h(y)]);   A[h(y)] <- t

    and estimates the item's rate as 1 / B[h(y)] occurrences per step. With several hash functions
    (Algorithm 3) each keeps its own (A, B); collisions only ever make a bucket look *more* frequent
    (shorter gaps), so the estimate takes the largest B, the least collided bucket.

    A batch is one step. An item that occurs c times in one batch is c sequential updates at the same
    t: the first sees the gap t - A, the others a gap of 0, which in closed form is

        B <- (1 - alpha)^c * B + (1 - alpha)^(c - 1) * alpha * (t - A)

    so the fixed point for an item seen c times every step is ~1/c steps, i.e. a rate of ~c per step.
    The state lives in buffers, so checkpoints carry it and a resumed run continues the same stream.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CountFrequency", "StreamingFrequencyEstimator"]

# A Mersenne prime above any id we hash: h(y) = ((a*y + b) mod P) mod num_buckets (universal hashing).
_PRIME = 2**31 - 1


class CountFrequency(nn.Module):
    """Exact sampling probability Q(y) = count(y) / total from training counts (indexed by item index)."""

    def __init__(self, counts: Tensor) -> None:
        super().__init__()
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.dim() != 1 or bool((counts < 0).any()):
            raise ValueError("counts must be a 1-D tensor of non-negative values")
        self.register_buffer("counts", counts)

    @classmethod
    def from_ids(cls, item_idx: Tensor, num_items: int) -> CountFrequency:
        return cls(torch.bincount(torch.as_tensor(item_idx, dtype=torch.long), minlength=num_items))

    def update(self, ids: Tensor) -> None:
        """Exact counts are fixed by the training log; the stream teaches them nothing."""

    def probability(self, ids: Tensor) -> Tensor:
        # An item never seen in training never appears in a batch; count it once so log Q stays finite.
        total = self.counts.sum().clamp_min(1.0)
        return self.counts[ids.long()].clamp_min(1.0) / total

    def log_probability(self, ids: Tensor) -> Tensor:
        return torch.log(self.probability(ids))


class StreamingFrequencyEstimator(nn.Module):
    """Yi et al.'s streaming frequency estimator with ``num_hashes`` hash functions (Alg. 2 for 1, Alg. 3).

    Args:
        num_buckets: size H of each hash array; ids are hashed, so the id space may be unbounded.
        num_hashes: number m of independent hash functions / arrays.
        alpha: learning rate of the moving average of the gap; larger follows changes faster,
            smaller gives a steadier estimate (the paper's default is 0.01).
        seed: fixes the hash functions.
    """

    def __init__(self, num_buckets: int = 2**16, num_hashes: int = 1, alpha: float = 0.01, seed: int = 0):
        super().__init__()
        if num_buckets < 1 or num_hashes < 1:
            raise ValueError("num_buckets and num_hashes must be >= 1")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        self.num_buckets, self.num_hashes, self.alpha = num_buckets, num_hashes, alpha
        generator = torch.Generator().manual_seed(seed)
        # a in [1, P), b in [0, P): a random member of the universal family per hash function.
        self.register_buffer("hash_a", torch.randint(1, _PRIME, (num_hashes, 1), generator=generator))
        self.register_buffer("hash_b", torch.randint(0, _PRIME, (num_hashes, 1), generator=generator))
        self.register_buffer("last_step", torch.zeros(num_hashes, num_buckets, dtype=torch.long))
        self.register_buffer("gap", torch.zeros(num_hashes, num_buckets, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def buckets(self, ids: Tensor) -> Tensor:
        """LongTensor[m, n]: the bucket of every id under every hash function."""
        ids = ids.long().reshape(1, -1) % _PRIME  # a * y stays below 2**62: no int64 overflow
        return ((self.hash_a * ids + self.hash_b) % _PRIME) % self.num_buckets

    @torch.no_grad()
    def update(self, ids: Tensor) -> None:
        """Consume one training step (a batch of candidate ids; repeats count as repeats)."""
        self.step += 1
        t = self.step.item()
        buckets = self.buckets(ids.to(self.gap.device))
        for h in range(self.num_hashes):
            touched, occurrences = torch.unique(buckets[h], return_counts=True)
            decay = 1.0 - self.alpha
            c = occurrences.to(torch.float64)
            last = self.last_step[h, touched]
            elapsed = (t - last).to(torch.float64)
            averaged = decay**c * self.gap[h, touched] + decay ** (c - 1) * self.alpha * elapsed
            # First sighting: the paper starts B at 0, which reads as "very frequent" for ~1/alpha
            # sightings. Starting from the observed gap (once in t steps) removes that warm-up bias.
            first = decay ** (c - 1) * elapsed
            self.gap[h, touched] = torch.where(last == 0, first, averaged)
            self.last_step[h, touched] = t

    def expected_gap(self, ids: Tensor) -> Tensor:
        """Estimated steps between two occurrences of each id: max over hash functions of B."""
        buckets = self.buckets(ids.to(self.gap.device))
        gaps = torch.gather(self.gap, 1, buckets)  # [hashes, n]
        # A bucket never seen has no estimate yet: it counts as seen once over the whole stream so far,
        # per hash and BEFORE the max, so one collided bucket cannot make an unseen id look frequent.
        whole_stream = torch.full_like(gaps, float(max(int(self.step), 1)))
        return torch.where(gaps <= 0, whole_stream, gaps).amax(dim=0)

    def probability(self, ids: Tensor) -> Tensor:
        """Estimated occurrences per step (proportional to the sampling probability)."""
        return 1.0 / self.expected_gap(ids)

    def log_probability(self, ids: Tensor) -> Tensor:
        return -torch.log(self.expected_gap(ids))
