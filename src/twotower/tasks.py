"""The retrieval task: a layer that turns query and candidate embeddings into a loss (the TFRS design).

One task covers every training objective and negative scheme, chosen in config
(``twotower.task_config``: ``TaskConfig`` and ``build_task``):

objectives (``objective``), on similarities s = cos or dot, with z = s / temperature:
    softmax        listwise: the positive against all its negatives, softmax cross-entropy on z, with the
                   logQ correction (Yi et al. 2019). With in-batch negatives only this is the classic
                   in-batch softmax; with sampled ones, a sampled softmax; with both, mixed negative
                   sampling (Yang et al. 2020) whose correction uses the mixture's probability.
    pointwise_bce  binary cross-entropy on z: positive -> 1, each negative -> 0 (1:N with N negatives).
    pointwise_mse  regression of s to +1 for the positive and -1 for each negative.
    hinge          triplet hinge mean_j max(0, s_j- + margin - s+) on the similarity scale.
    logistic       triplet logistic mean_j log(1 + exp(sigma (z_j- - z+))); sigma = 1 is BPR.

negatives (``negatives``): the other positives of the batch (in-batch); ``num_sampled`` items drawn
uniformly or by popularity^alpha, shared by the whole batch or drawn per row; hard negatives (each
user's top-scored non-positives, re-mined every ``refresh_every`` steps). A negative equal to its
row's positive (an accidental hit) is removed in every scheme.

The logQ correction subtracts log E[n(y)], the log of how often y is expected among the row's drawn
candidates: B * p(y) for in-batch candidates (p the item frequency, from exact counts or the streaming
estimate, which counts per batch already), n * q(y) for n draws from a sampler with probability q, their
sum when the two are mixed (Yang et al. 2020). Within one kind of candidate this is Yi et al.'s
-log q(y) up to a constant, which the softmax ignores; across kinds the common scale matters. Hard and
impressed-not-clicked negatives are chosen, not drawn from a known q: each counts once (correction 0),
so they weigh like a drawn candidate expected once per batch, whichever frequency estimator is used.

Several training processes (``twotower.distributed``), each holding a shard of the global batch: while
training, the shared pool is every rank's (positives' embeddings and shared draws all-gathered WITH
gradients, ids too), so accidental hits and logQ use global ids, and the streaming estimator sees the
global batch on every rank (identical state). Rank r returns L'_r = L_r * N * W_r / W (weighted-mean loss,
rank and global weight totals), so mean_r L'_r is the global-batch loss L. The gather's backward sums
all ranks' gradients into the gathered rows, so the ranks' parameter gradients add up to
sum_r dL'_r/dtheta and DDP's average (1/N) sum_r dL'_r/dtheta is dL/dtheta, the one-process gradient.
Per-row negatives (unshared draws, hard, impressions) belong to the rank's own rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from twotower import distributed, losses
from twotower.frequency import StreamingFrequencyEstimator
from twotower.inbatch_loss import inbatch_softmax, is_plain_inbatch
from twotower.negatives import (
    HardNegativeMiner,
    ImpressionSampler,
    MixedSampler,
    PopularitySampler,
    UniformSampler,
    batch_log_count,
)
from twotower.task_config import Objective
from twotower.unique_softmax import unique_inbatch_softmax


class SamplingProbability(Protocol):
    """What the task needs from a frequency estimator (exact counts or the streaming sketch)."""

    def update(self, ids: Tensor) -> None: ...

    def log_probability(self, ids: Tensor) -> Tensor: ...


class RetrievalTask(nn.Module):
    """Loss of a batch of (query, positive) embeddings against the configured negatives.

    ``forward(query [B, d], candidates [B, d], candidate_ids [B], sample_weight [B] | None,
    batch=..., embed_items=...)``: ``candidates`` are the positives' embeddings; sampled and hard
    negatives are embedded through ``embed_items(ids) -> [n, d]`` (the item tower).
    """

    def __init__(
        self,
        temperature: float = 0.05,
        remove_accidental_hits: bool = True,
        sampling_probability: SamplingProbability | None = None,
        *,
        objective: Objective = "softmax",
        in_batch: bool = True,
        sampler: UniformSampler | PopularitySampler | None = None,
        num_sampled: int = 0,
        shared: bool = True,
        miner: HardNegativeMiner | None = None,
        hard_num: int = 0,
        positives: tuple[Tensor, Tensor] | None = None,
        impressions: ImpressionSampler | None = None,
        impressions_num: int = 0,
        margin: float = 0.2,
        sigma: float = 1.0,
        fused: bool = True,
        distinct: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if objective not in losses.LOSSES:
            raise ValueError(f"unknown objective {objective!r}; known: {sorted(losses.LOSSES)}")
        if (sampler is None) != (num_sampled == 0) or (miner is None) != (hard_num == 0):
            raise ValueError("a sampler needs num_sampled >= 1 and a miner hard_num >= 1 (and vice versa)")
        if miner is not None and positives is None:
            raise ValueError("hard negatives need the training positives (to never mine them)")
        self.temperature, self.remove_accidental_hits = temperature, remove_accidental_hits
        self.sampling_probability = sampling_probability
        self.objective, self.in_batch, self.shared = objective, in_batch, shared
        self.sampler, self.num_sampled = sampler, num_sampled
        self.miner, self.hard_num = miner, hard_num
        self.margin, self.sigma = margin, sigma
        # The plain in-batch softmax runs through twotower.inbatch_loss (same loss, a fraction of the
        # memory traffic); False keeps the general path, e.g. as the reference in tests.
        self.fused = fused
        # ... and over the batch's distinct users and items when the model can give them (forward_distinct).
        self.distinct = distinct
        if (impressions is None) != (impressions_num == 0):
            raise ValueError("impression negatives need an impression sampler and impressions_num >= 1")
        self.impressions, self.impressions_num = impressions, impressions_num
        # Training steps taken, for the hard-negative refresh schedule; a buffer so resuming continues it.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        if positives is not None:
            self.register_buffer("positives_indptr", positives[0].long())
            self.register_buffer("positives_items", positives[1].long())
        # The streaming estimator counts occurrences per (global) batch, exact counts give a probability.
        self.per_step = isinstance(sampling_probability, StreamingFrequencyEstimator)
        self.mixed: MixedSampler | None = None
        if in_batch and sampler is not None and shared and sampling_probability is not None:
            self.mixed = MixedSampler(sampler, num_sampled, sampling_probability, True, self.per_step)

    def logits(self, query: Tensor, candidates: Tensor, candidate_ids: Tensor) -> Tensor:
        """In-batch logit matrix [B, B]: z_ij = <q_i, c_j> / T - log(B p(y_j)), accidental hits at -1e9."""
        logits = query @ candidates.T / self.temperature
        if self.sampling_probability is not None:
            log_count = self._batch_log_count(candidate_ids.long(), len(candidate_ids))
            logits = logits - log_count.to(logits)[None, :]
        if self.remove_accidental_hits:
            same = candidate_ids[:, None] == candidate_ids[None, :]
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, -1e9)
        return logits

    def forward(
        self,
        query: Tensor,
        candidates: Tensor,
        candidate_ids: Tensor,
        sample_weight: Tensor | None = None,
        *,
        batch: dict[str, Tensor] | None = None,
        embed_items: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        # Cross-rank only while training: evaluation runs on rank 0 alone and must not wait for peers.
        shards = None
        if self.training and distributed.world_size() > 1:
            shards = distributed.batch_shards(len(query), sample_weight, query.device)
        self._observe(candidate_ids, shards)
        batch = batch if batch is not None else {"item_idx": candidate_ids}
        pos_ids = candidate_ids.long()
        if self.fused and is_plain_inbatch(self):  # (mixed negatives need a sampler: not plain)
            loss = self._fused_inbatch(query, candidates, pos_ids, sample_weight, shards)
            return loss if shards is None else loss * shards.loss_scale
        n_rows = len(query)
        pos = (query * candidates).sum(-1)
        neg, ids, log_q, mask, log_q_pos = self._negatives(
            query, candidates, pos_ids, batch, embed_items, shards
        )
        if self.remove_accidental_hits:
            mask = mask & (ids != pos_ids[:, None])
        assert neg.shape[0] == n_rows
        loss = self._loss(pos, neg, mask, sample_weight, log_q_pos, log_q)
        # This rank's share of the global loss, scaled for DDP's averaging (module docstring).
        return loss if shards is None else loss * shards.loss_scale

    def _observe(self, candidate_ids: Tensor, shards: distributed.Shards | None) -> None:
        """Count the training step and feed the batch's positives to a streaming logQ estimator."""
        if self.training:
            self.step += 1
            if self.sampling_probability is not None:
                # Streaming estimators learn from the stream of (global) training batches, so every
                # rank holds the same state; exact counts ignore it.
                global_ids = (
                    candidate_ids if shards is None else distributed.gather_rows(candidate_ids, shards.sizes)
                )
                self.sampling_probability.update(global_ids)

    def accepts_distinct(self) -> bool:
        """Whether :meth:`forward_distinct` applies: the fused plain in-batch softmax, in one process
        (across ranks the pool is gathered row by row)."""
        return (
            self.fused
            and self.distinct
            and is_plain_inbatch(self)
            and not (self.training and distributed.world_size() > 1)
        )

    def forward_distinct(
        self,
        query: Tensor,
        query_of_row: Tensor,
        candidates: Tensor,
        candidate_ids: Tensor,
        positive_of_row: Tensor,
        candidate_count: Tensor,
        sample_weight: Tensor | None = None,
    ) -> Tensor:
        """``forward`` of the batch ``(query[query_of_row], candidates[positive_of_row])`` given its
        distinct queries and candidates (ids and counts): the same loss, from a smaller product."""
        self._observe(candidate_ids[positive_of_row], None)
        correct = self.sampling_probability is not None
        return unique_inbatch_softmax(
            query,
            query_of_row,
            candidates,
            positive_of_row,
            candidate_count,
            self.temperature,
            log_q=self._batch_log_count(candidate_ids, len(positive_of_row)) if correct else None,
            remove_accidental_hits=self.remove_accidental_hits,
            weight=sample_weight,
        )

    def _fused_inbatch(
        self,
        query: Tensor,
        candidates: Tensor,
        pos_ids: Tensor,
        weight: Tensor | None,
        shards: distributed.Shards | None,
    ) -> Tensor:
        """The in-batch softmax over the (global) pool of positives in one fused pass; row i's positive
        is the pool's column offset + i, every other column a negative."""
        ids, emb, log_q = self._shared_pool(candidates, pos_ids, None, shards)
        first = 0 if shards is None else shards.offset
        return inbatch_softmax(
            query,
            emb,
            self.temperature,
            positive_column=torch.arange(first, first + len(query), device=query.device),
            candidate_ids=ids if self.remove_accidental_hits else None,
            log_q=log_q if self.sampling_probability is not None else None,
            weight=weight,
        )

    # --- negatives -------------------------------------------------------------------------------
    def _negatives(
        self,
        query: Tensor,
        candidates: Tensor,
        pos_ids: Tensor,
        batch: dict[str, Tensor],
        embed_items: Callable[[Tensor], Tensor] | None,
        shards: distributed.Shards | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Similarities, ids, log E[n] and validity [B, N] of every negative, plus log E[n] of each
        positive (the correction's scale, module docstring)."""
        n_rows = len(query)
        parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        log_q_pos = torch.zeros(n_rows, dtype=torch.float64, device=query.device)
        need_embed = self.num_sampled > 0 or self.hard_num > 0
        if need_embed and embed_items is None:
            raise ValueError("sampled or hard negatives need embed_items (the item tower)")
        correct = self.sampling_probability is not None
        # Per-row draws mixed with in-batch candidates: row i's candidates come from one pool (the
        # batch's positives and the row's draws), so all of them, its positive included, are corrected
        # by that pool's mixture count, as MixedSampler does for shared draws (not each part by its own q).
        row_mixture = None
        if correct and self.in_batch and self.num_sampled and not self.shared:
            row_mixture = MixedSampler(
                self.sampler, self.num_sampled, self.sampling_probability, True, self.per_step
            )
        if self.in_batch or (self.num_sampled and self.shared):
            pool_ids, pool_emb, pool_log_q = self._shared_pool(candidates, pos_ids, embed_items, shards)
            if row_mixture is not None:
                pool_log_q = row_mixture.log_expected_count(pool_ids, len(pool_ids)).to(query.device)
            sims = query @ pool_emb.T
            valid = torch.ones_like(sims, dtype=torch.bool)
            if self.in_batch:
                first = 0 if shards is None else shards.offset  # this rank's rows in the global pool
                valid[:, first : first + n_rows].fill_diagonal_(False)  # row i's own positive
                log_q_pos = pool_log_q[first : first + n_rows]
            elif correct:
                log_q_pos = self.sampler.log_probability(pos_ids).double() + math.log(len(pool_ids))
            parts.append((sims, pool_ids.expand(n_rows, -1), pool_log_q.expand(n_rows, -1), valid))
        if self.num_sampled and not self.shared:
            drawn = self.sampler.sample(batch, n_rows * self.num_sampled)
            row_ids = drawn.ids.view(n_rows, self.num_sampled).to(query.device)
            emb = embed_items(row_ids.reshape(-1)).view(n_rows, self.num_sampled, -1)
            row_log_q = torch.zeros(row_ids.shape).double()
            if correct:
                row_log_q = drawn.log_q.view(n_rows, -1).double() + math.log(self.num_sampled)
            if row_mixture is not None:
                log_count = row_mixture.log_expected_count(row_ids.reshape(-1), len(pool_ids))
                row_log_q = log_count.view(n_rows, -1)
            if correct and not self.in_batch:
                log_q_pos = self.sampler.log_probability(pos_ids).double() + math.log(self.num_sampled)
            parts.append(
                (
                    torch.einsum("bd,bnd->bn", query, emb),
                    row_ids,
                    row_log_q.to(query.device),
                    torch.ones_like(row_ids, dtype=torch.bool),
                )
            )
        # Hard and impressed-not-clicked negatives are chosen per user, not drawn from a known q: each
        # is in the row's candidates once, log E[n] = 0 on the scale of the drawn ones.
        for chooser, num in ((self.miner, self.hard_num), (self.impressions, self.impressions_num)):
            if not num:
                continue
            if embed_items is None:
                raise ValueError("per-user negatives need embed_items (the item tower)")
            chosen = chooser.sample(batch, num)
            emb = embed_items(chosen.ids.reshape(-1)).view(*chosen.ids.shape, -1)
            no_q = torch.zeros(chosen.ids.shape, dtype=torch.float64, device=query.device)
            parts.append((torch.einsum("bd,bnd->bn", query, emb), chosen.ids, no_q, chosen.mask))
        sims, ids, log_q, mask = (torch.cat([p[k] for p in parts], dim=1) for k in range(4))
        return sims, ids, log_q, mask, log_q_pos

    def _shared_pool(
        self,
        candidates: Tensor,
        pos_ids: Tensor,
        embed_items: Callable[[Tensor], Tensor] | None,
        shards: distributed.Shards | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Candidates shared by every row: [batch positives?, sampled?] with their log q. With several
        processes: every rank's positives, then every rank's draws - the pool one process would hold."""
        correct = self.sampling_probability is not None
        device = candidates.device
        world = 1 if shards is None else len(shards.sizes)
        # Each rank draws its share of the shared negatives from its own RNG stream (distinct streams,
        # see distributed.rank_seed): gathered, they are num_sampled independent draws, as in one process.
        draws = distributed.split_count(self.num_sampled if self.shared else 0, world)
        ids_parts, emb_parts = [], []
        if self.in_batch:
            ids_parts.append(pos_ids)
            emb_parts.append(candidates)
        n_local = draws[0 if shards is None else shards.rank]  # 0 on some ranks when num_sampled < N
        if sum(draws):
            extra = self.sampler.sample({}, n_local).ids.to(device) if n_local else pos_ids[:0]
            ids_parts.append(extra)
            emb_parts.append(embed_items(extra) if n_local else candidates[:0])
        ids, emb = torch.cat(ids_parts), torch.cat(emb_parts)
        if shards is not None:
            counts = [[n if self.in_batch else 0, d] for n, d in zip(shards.sizes, draws, strict=True)]
            totals = [sum(c) for c in counts]
            ids = distributed.regroup(distributed.gather_rows(ids, totals), counts)
            emb = distributed.regroup(distributed.gather_rows(emb, totals, grad=True), counts)
        n_pos, n_extra = len(ids) - sum(draws), sum(draws)
        if self.mixed is not None:  # mixed negatives: the mixture's expected count for the correction
            return ids, emb, self.mixed.log_expected_count(ids, n_pos, n_extra)
        log_q_parts = []
        if self.in_batch:
            log_q_parts.append(
                self._batch_log_count(ids[:n_pos], n_pos)
                if correct
                else torch.zeros(n_pos, dtype=torch.float64)
            )
        if n_extra:
            log_q_parts.append(
                self.sampler.log_probability(ids[n_pos:]).double() + math.log(n_extra)
                if correct
                else torch.zeros(n_extra).double()
            )
        return ids, emb, torch.cat([q.to(device) for q in log_q_parts])

    def _batch_log_count(self, ids: Tensor, batch_size: int) -> Tensor:
        assert self.sampling_probability is not None
        return batch_log_count(self.sampling_probability, ids, batch_size, self.per_step)

    # --- objectives ------------------------------------------------------------------------------
    def _loss(
        self, pos: Tensor, neg: Tensor, mask: Tensor, weight: Tensor | None, log_q_pos: Tensor, log_q: Tensor
    ) -> Tensor:
        t = self.temperature
        if self.objective == "softmax":
            if self.sampling_probability is None:
                return losses.listwise_softmax(pos / t, neg / t, mask, weight)
            return losses.listwise_softmax(pos / t, neg / t, mask, weight, log_q_pos.to(pos), log_q.to(neg))
        if self.objective == "pointwise_bce":
            return losses.pointwise_bce(pos / t, neg / t, mask, weight)
        if self.objective == "pointwise_mse":
            return losses.pointwise_cosine_mse(pos, neg, mask, weight)
        if self.objective == "hinge":
            return losses.triplet_hinge(pos, neg, self.margin, mask, weight)
        return losses.triplet_logistic(pos / t, neg / t, self.sigma, mask, weight)

    # --- hard negatives --------------------------------------------------------------------------
    @torch.no_grad()
    def maybe_refresh(self, embed_all: Callable[[], tuple[Tensor, Tensor]]) -> bool:
        """Re-mine hard negatives when due; ``embed_all() -> (user_emb, item_emb)`` in eval mode."""
        if self.miner is None or not self.miner.due(int(self.step)):
            return False
        users, items = embed_all()
        positives = (self.positives_indptr, self.positives_items)
        return self.miner.refresh(users, items, positives, int(self.step))
