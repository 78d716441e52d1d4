"""Negative candidate samplers for two-tower retrieval training.

Items are catalogue indices ``0..I-1``. Every sampler is an ``nn.Module`` (its state lives in buffers, so
checkpoints carry it and ``.to(device)`` moves it) and answers

    sample(batch, n, generator=None) -> Negatives(ids, log_q, mask)

``batch`` is the training batch dict (``"user_idx"``, ``"item_idx"``, ...). ``ids`` are candidate item
indices, ``[n]`` when shared by the whole batch or ``[B, n]`` when drawn per row; ``log_q`` has the
same shape and holds log Q(y), the log of the probability with which the sampler draws candidate y (one
draw), for the logQ correction of Yi et al. (RecSys 2019): the loss subtracts log(n Q(y)) from the
logit of y, n the number of draws (``twotower.tasks`` puts every kind of candidate on that
expected-count scale). ``mask`` is ``None`` when every candidate is valid (the corpus-wide samplers)
and a BoolTensor of ``ids``' shape otherwise (the per-user samplers): False marks a slot that holds no
candidate (its id is the padding id 0, a valid index so embedding lookups never fail, and its log_q
is 0).

``UniformSampler``     Q(y) = 1 / I, shared across the batch.
``PopularitySampler``  Q(y) = max(count_y, 1)^alpha / sum_j max(count_j, 1)^alpha, shared.
``MixedSampler``       Mixed negative sampling (Yang et al., WWW 2020 companion): the batch's own
                       positives plus B' extra candidates from a corpus sampler, with the mixture Q below.
``ImpressionSampler``  Per row, uniform over that user's impressed-but-not-clicked items.
``HardNegativeMiner``  Per row, uniform over the user's periodically mined top-scored non-positives.

``accidental_hit_mask`` marks candidates that are really positives (the row's own, or any known
positive of the row's user) so their logits can be masked.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from twotower.topk import CSR, topk_items

__all__ = [
    "HardNegativeMiner",
    "ImpressionSampler",
    "MixedSampler",
    "batch_log_count",
    "Negatives",
    "PAD_ID",
    "PopularitySampler",
    "UniformSampler",
    "accidental_hit_mask",
]

PAD_ID = 0  # id written into masked-out slots: a real index, so embedding lookups stay in range


class Negatives(NamedTuple):
    """Sampled candidates: ids, their log sampling probability, and a validity mask (None: all valid)."""

    ids: Tensor
    log_q: Tensor
    mask: Tensor | None = None


class LogProbability(Protocol):
    """A frequency estimator (``twotower.frequency``): log of each item's in-batch sampling probability."""

    def log_probability(self, ids: Tensor) -> Tensor: ...


def _csr_parts(csr: CSR | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    if isinstance(csr, CSR):
        return csr.indptr.long(), csr.indices.long()
    indptr, items = csr
    return torch.as_tensor(indptr).long(), torch.as_tensor(items).long()


def _is_member(indptr: Tensor, items: Tensor, users: Tensor, candidates: Tensor) -> Tensor:
    """Bool[B, n]: whether ``candidates[r, j]`` is in CSR row ``users[r]`` (rows need not be sorted)."""
    device = candidates.device
    indptr, items, users = indptr.to(device), items.to(device), users.to(device)
    start = indptr[users]
    lengths = indptr[users + 1] - start
    row = torch.repeat_interleave(torch.arange(len(users), device=device), lengths)
    if row.numel() == 0 or candidates.numel() == 0:  # nothing to look up (and .max() needs elements)
        return torch.zeros_like(candidates, dtype=torch.bool)
    offsets = torch.cumsum(lengths, 0) - lengths
    flat = start[row] + torch.arange(len(row), device=device) - offsets[row]
    values = items[flat]
    # One int64 key per (batch row, item): a sorted key array answers membership by binary search.
    width = max(int(values.max()), int(candidates.max())) + 1
    keys = torch.sort(row * width + values).values
    query = torch.arange(len(users), device=device)[:, None] * width + candidates
    pos = torch.searchsorted(keys, query.reshape(-1)).clamp_max(len(keys) - 1).view_as(query)
    return (keys[pos] == query) & (candidates >= 0)  # a negative id would alias the previous row's key


def accidental_hit_mask(
    positive_ids: Tensor,
    candidate_ids: Tensor,
    positives_of_user: CSR | tuple[Tensor, Tensor] | None = None,
    user_idx: Tensor | None = None,
) -> Tensor:
    """BoolTensor[B, n] ``valid``: False where a candidate is a positive of its row.

    Candidate ``candidate_ids[j]`` (shared, ``[n]``) or ``candidate_ids[r, j]`` (``[B, n]``) is invalid
    for row r when it equals ``positive_ids[r]`` and, if ``positives_of_user`` (a CSR or ``(indptr,
    items)`` of every known positive per user) is given, when it is any positive of the row's user. CSR
    rows are indexed by ``user_idx[r]``, or by r itself when ``user_idx`` is None (one CSR row per batch
    row). Note: for in-batch candidates the column of the row's own positive (the label) comes out
    False too; the loss keeps that column as the target and masks only the others.
    """
    positive_ids = positive_ids.long().reshape(-1)
    batch = len(positive_ids)
    if candidate_ids.dim() == 1:
        candidate_ids = candidate_ids.unsqueeze(0).expand(batch, -1)
    if candidate_ids.shape[0] != batch:
        raise ValueError(f"{candidate_ids.shape[0]} candidate rows for {batch} positives")
    candidate_ids = candidate_ids.long()
    valid = candidate_ids != positive_ids[:, None]
    if positives_of_user is not None:
        indptr, items = _csr_parts(positives_of_user)
        if user_idx is None:
            if len(indptr) - 1 != batch:
                raise ValueError("without user_idx the positives CSR needs one row per batch row")
            user_idx = torch.arange(batch)
        users = user_idx.long().to(indptr.device)
        valid &= ~_is_member(indptr, items, users, candidate_ids)
    return valid


class UniformSampler(nn.Module):
    """n candidates uniform over the whole corpus (with replacement), shared by the batch; Q = 1 / I."""

    def __init__(self, num_items: int) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = num_items
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)  # follows .to(device)

    def sample(self, batch: dict[str, Tensor], n: int, generator: torch.Generator | None = None) -> Negatives:
        ids = torch.randint(0, self.num_items, (n,), generator=generator, device=self._anchor.device)
        return Negatives(ids, self.log_probability(ids))

    def log_probability(self, ids: Tensor) -> Tensor:
        return torch.full(ids.shape, -math.log(self.num_items), dtype=torch.float64, device=ids.device)


class PopularitySampler(nn.Module):
    """n candidates drawn with replacement with P(i) = c_i^alpha / sum_j c_j^alpha, shared by the batch.

    ``c_i = max(counts[i], 1)``: an item with no training count is counted once (as ``CountFrequency``
    does), so every item can be drawn and log Q stays finite. alpha = 1 is the unigram distribution,
    0.75 the word2vec smoothing, 0 the uniform distribution. Counts must be finite. Draws use
    ``torch.multinomial`` up to its 2**24-category limit and inverse-CDF sampling (``searchsorted``)
    above it.
    """

    MULTINOMIAL_MAX = 2**24

    def __init__(self, counts: Tensor, alpha: float = 0.75) -> None:
        super().__init__()
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.dim() != 1 or counts.numel() == 0 or not bool(((counts >= 0) & counts.isfinite()).all()):
            raise ValueError("counts must be a non-empty 1-D tensor of finite, non-negative values")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
        self.alpha = alpha
        # c^alpha / sum c^alpha as a softmax of alpha * log c: c^alpha itself overflows for a large alpha.
        logits = alpha * torch.log(counts.clamp_min(1.0))
        self.register_buffer("probs", torch.softmax(logits, 0))
        # log Q from log_softmax, not log(probs): a probability that underflows to 0 (a huge alpha) still
        # has a finite log, so a logQ-corrected positive never gets an infinite logit (a NaN loss).
        self.register_buffer("log_probs", torch.log_softmax(logits, 0), persistent=False)
        self.register_buffer("cdf", torch.cumsum(self.probs, 0), persistent=False)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kw: Any) -> None:
        # Only ``probs`` is saved: the derived log Q and CDF must follow a loaded distribution, or the
        # sampler draws from the checkpoint's probs but reports (and inverse-CDF samples) the old ones.
        before = self.probs.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)
        if not torch.equal(self.probs, before):
            # An entry that underflowed to 0 is floored at the smallest normal number: log Q stays finite.
            tiny = torch.finfo(self.probs.dtype).tiny
            self.log_probs = torch.log(self.probs.clamp_min(tiny)).to(self.log_probs.dtype)
            self.cdf = torch.cumsum(self.probs, 0).to(self.cdf.dtype)

    @property
    def num_items(self) -> int:
        return len(self.probs)

    def sample(self, batch: dict[str, Tensor], n: int, generator: torch.Generator | None = None) -> Negatives:
        if n == 0:  # torch.multinomial refuses 0 draws; MixedSampler asks for none when n_extra = 0
            ids = torch.zeros(0, dtype=torch.long, device=self.probs.device)
        elif self.num_items <= self.MULTINOMIAL_MAX:
            ids = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        else:
            u = torch.rand(n, generator=generator, dtype=torch.float64, device=self.cdf.device)
            ids = torch.searchsorted(self.cdf, u * self.cdf[-1], right=True).clamp_max(self.num_items - 1)
        return Negatives(ids, self.log_probability(ids))

    def log_probability(self, ids: Tensor) -> Tensor:
        return self.log_probs[ids.long()]


def batch_log_count(frequency: LogProbability, ids: Tensor, batch_size: int, per_step: bool) -> Tensor:
    """log(B * p_batch(ids)): how often each id is expected among a batch's B positives. A per-step
    estimator (``StreamingFrequencyEstimator``) counts occurrences per batch already; exact counts give
    the probability p_batch."""
    log_q = frequency.log_probability(ids).double()
    return log_q if per_step else log_q + math.log(batch_size)


class MixedSampler(nn.Module):
    """Mixed negative sampling (Yang et al. 2020): in-batch positives plus B' corpus-sampled candidates.

    The candidates of a batch of B positives are ``[item_idx (B), extra (B')]``, every one a negative
    for every row but its own. A candidate picked from that pool is an in-batch positive with
    probability B / (B + B'), drawn from the batch distribution p_batch (item frequency, given by
    ``frequency.log_probability``), or an extra with probability B' / (B + B'), drawn from p_extra
    (``extra.log_probability``), so its sampling probability is the mixture

        q(y) = (B * p_batch(y) + B' * p_extra(y)) / (B + B')

    computed in log space (logaddexp). With ``per_step=True`` the estimator gives occurrences per
    batch (``StreamingFrequencyEstimator``: rate(y) ~ B * p_batch(y)) and the numerator uses it as is.
    With ``in_batch=False`` the pool is the extras alone and q = p_extra; with B' = 0, q = p_batch.
    """

    def __init__(
        self,
        extra: UniformSampler | PopularitySampler,
        n_extra: int,
        frequency: LogProbability | None = None,
        in_batch: bool = True,
        per_step: bool = False,
    ) -> None:
        super().__init__()
        if n_extra < 0 or (not in_batch and n_extra < 1):
            raise ValueError(f"n_extra must be >= 0 (>= 1 without in-batch candidates), got {n_extra}")
        if in_batch and frequency is None:
            raise ValueError("in-batch candidates need a frequency estimator for p_batch")
        self.extra, self.n_extra, self.in_batch, self.per_step = extra, n_extra, in_batch, per_step
        self.frequency = frequency  # an nn.Module estimator becomes a submodule: its state is saved too

    def log_probability(self, ids: Tensor, batch_size: int, n_extra: int | None = None) -> Tensor:
        """log q(ids) of the mixture for a pool of ``batch_size`` in-batch and ``n_extra`` extra items."""
        n_extra = self.n_extra if n_extra is None else n_extra
        pool = (batch_size if self.in_batch else 0) + n_extra
        return self.log_expected_count(ids, batch_size, n_extra) - math.log(pool)

    def log_expected_count(self, ids: Tensor, batch_size: int, n_extra: int | None = None) -> Tensor:
        """log of how often each id is expected in the pool: B * p_batch + B' * p_extra = (B + B') q.

        The scale the retrieval task corrects every candidate on, so that candidates that were not
        drawn at all (hard negatives, impressions: count 1) weigh the same as drawn ones."""
        n_extra = self.n_extra if n_extra is None else n_extra
        if not self.in_batch or batch_size == 0:
            return self.extra.log_probability(ids).double() + math.log(n_extra)
        assert self.frequency is not None
        log_batch = batch_log_count(self.frequency, ids, batch_size, self.per_step)
        if n_extra == 0:
            return log_batch
        log_extra = self.extra.log_probability(ids).double().to(log_batch.device) + math.log(n_extra)
        return torch.logaddexp(log_batch, log_extra)

    def candidates(
        self, batch_item_ids: Tensor, generator: torch.Generator | None = None, n_extra: int | None = None
    ) -> Negatives:
        """Pool ``[batch_item_ids, extras]`` (ids [B + B'], log_q [B + B']); mask None."""
        n_extra = self.n_extra if n_extra is None else n_extra
        batch_item_ids = batch_item_ids.long()
        extra = self.extra.sample({}, n_extra, generator).ids.to(batch_item_ids.device)
        ids = torch.cat([batch_item_ids, extra]) if self.in_batch else extra
        batch_size = len(batch_item_ids) if self.in_batch else 0
        return Negatives(ids, self.log_probability(ids, batch_size, n_extra))

    def sample(
        self, batch: dict[str, Tensor], n: int | None = None, generator: torch.Generator | None = None
    ) -> Negatives:
        """``candidates(batch["item_idx"])`` with ``n`` (default ``n_extra``) extras: [B + n] ids."""
        return self.candidates(batch["item_idx"], generator, n)


class ImpressionSampler(nn.Module):
    """Per row, n candidates uniform (with replacement) over the user's impressed-not-clicked items.

    Built from a CSR ``(indptr [U + 1], items)`` of those items per user; duplicates are dropped so
    Q(y | u) = 1 / (number of distinct impressions of u) exactly. ``sample`` returns ids [B, n] with
    log_q = -log(that number) and a mask that is False on every slot of a user without impressions.
    """

    def __init__(self, indptr: Tensor, items: Tensor) -> None:
        super().__init__()
        csr = CSR(*_csr_parts((indptr, items)))
        rows = torch.repeat_interleave(torch.arange(csr.n_rows, device=csr.indptr.device), csr.lengths())
        csr = CSR.from_pairs(rows, csr.indices, csr.n_rows)  # sorted, de-duplicated rows
        self.register_buffer("indptr", csr.indptr)
        self.register_buffer("items", csr.indices)

    @classmethod
    def from_pairs(cls, user_idx: Tensor, item_idx: Tensor, num_users: int) -> ImpressionSampler:
        csr = CSR.from_pairs(user_idx, item_idx, num_users)
        return cls(csr.indptr, csr.indices)

    def sample(self, batch: dict[str, Tensor], n: int, generator: torch.Generator | None = None) -> Negatives:
        users = batch["user_idx"].long().to(self.indptr.device)
        start = self.indptr[users]
        lengths = self.indptr[users + 1] - start
        u = torch.rand((len(users), n), generator=generator, dtype=torch.float64, device=users.device)
        offset = (u * lengths[:, None]).long().clamp_max((lengths - 1).clamp_min(0)[:, None])
        mask = (lengths > 0)[:, None].expand(-1, n)
        if self.items.numel() == 0:
            ids = torch.full_like(offset, PAD_ID)
        else:
            picked = self.items[(start[:, None] + offset).clamp_max(self.items.numel() - 1)]
            ids = torch.where(mask, picked, PAD_ID)
        log_q = -torch.log(lengths.clamp_min(1).double())[:, None].expand(-1, n)
        return Negatives(ids, torch.where(mask, log_q, 0.0), mask)

    def log_probability(self, user_idx: Tensor, ids: Tensor) -> Tensor:
        """log Q(ids[r, j] | user_idx[r]): -log(#impressions) for an impression of the user, else -inf."""
        users = user_idx.long().to(self.indptr.device)
        ids = ids.long().to(users.device)
        ids = ids.unsqueeze(0).expand(len(users), -1) if ids.dim() == 1 else ids
        lengths = (self.indptr[users + 1] - self.indptr[users]).clamp_min(1).double()
        member = _is_member(self.indptr, self.items, users, ids)
        return torch.where(member, -torch.log(lengths)[:, None], float("-inf"))


class HardNegativeMiner(nn.Module):
    """Per-user hard negatives: the top-``k`` scored items that are not known positives, mined offline.

    ``refresh(user_emb [U, d], item_emb [I, d], positives, step)`` recomputes the ``[U, k]`` buffer
    ``mined`` by exact chunked search (``twotower.topk.topk_items`` with each user's positives
    excluded) when ``step`` is the first refresh or at least ``refresh_every`` steps after the last one;
    it returns whether it refreshed. Slots it cannot fill hold -1. ``sample(batch, n)`` draws
    m = min(n, cap) of the user's mined items per row uniformly WITHOUT replacement: ids [B, m],
    log_q = -log(L_u) with L_u the length of the user's mined list (each slot is uniform over it), and
    a mask that is False for unfilled slots, for rows whose user was never mined, and for a candidate
    equal to the row's ``batch["item_idx"]`` when the batch has one.
    """

    def __init__(
        self, num_users: int, num_items: int, k: int, refresh_every: int = 1000, cap: int | None = None
    ):
        super().__init__()
        cap = k if cap is None else cap
        if min(num_users, num_items, k, refresh_every) < 1 or not 1 <= cap <= k:
            raise ValueError("num_users, num_items, k, refresh_every must be >= 1 and 1 <= cap <= k")
        self.num_users, self.num_items, self.k, self.refresh_every, self.cap = (
            num_users,
            num_items,
            k,
            refresh_every,
            cap,
        )
        self.register_buffer("mined", torch.full((num_users, k), -1, dtype=torch.long))
        self.register_buffer("last_refresh", torch.tensor(-1, dtype=torch.long))  # -1: never refreshed

    def due(self, step: int) -> bool:
        last = int(self.last_refresh)
        return last < 0 or step - last >= self.refresh_every

    @torch.no_grad()
    def refresh(
        self,
        user_emb: Tensor,
        item_emb: Tensor,
        positives: CSR | tuple[Tensor, Tensor],
        step: int,
        force: bool = False,
        **topk_kwargs: Any,
    ) -> bool:
        """Re-mine every user's list if due (or ``force``); ``topk_kwargs`` go to ``topk_items``."""
        if not (force or self.due(step)):
            return False
        if user_emb.shape[0] != self.num_users or item_emb.shape[0] != self.num_items:
            raise ValueError(
                f"expected {self.num_users} user and {self.num_items} item embeddings, "
                f"got {user_emb.shape[0]} and {item_emb.shape[0]}"
            )
        exclude = positives if isinstance(positives, CSR) else CSR(*_csr_parts(positives))
        ids, _ = topk_items(user_emb, item_emb, self.k, exclude=exclude, **topk_kwargs)
        self.mined.fill_(-1)
        self.mined[:, : ids.shape[1]] = ids.to(self.mined.device)  # k > I: topk returns only I columns
        self.last_refresh.fill_(step)
        return True

    def sample(self, batch: dict[str, Tensor], n: int, generator: torch.Generator | None = None) -> Negatives:
        users = batch["user_idx"].long().to(self.mined.device)
        lists = self.mined[users]
        keys = torch.rand(lists.shape, generator=generator, dtype=torch.float64, device=lists.device)
        order = keys.masked_fill(lists < 0, 2.0).argsort(dim=1)[:, : min(n, self.cap)]  # -1 slots last
        ids = torch.gather(lists, 1, order)
        mask = ids >= 0
        if "item_idx" in batch:
            mask &= ids != batch["item_idx"].long().to(ids.device)[:, None]
        lengths = (lists >= 0).sum(dim=1).clamp_min(1).double()
        log_q = torch.where(mask, -torch.log(lengths)[:, None], 0.0)
        return Negatives(ids.masked_fill(ids < 0, PAD_ID), log_q, mask)
