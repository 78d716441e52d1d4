"""The in-batch softmax loss in a few passes over one reused B x B buffer, for the common training setup.

``twotower.tasks.RetrievalTask`` serves every objective and negative scheme through one general path:
for the [B, B] block it materialises the similarities, an expanded float64 log Q, the candidate ids,
a validity mask and an accidental-hit comparison, concatenates them with the other negative kinds,
then masks, divides, subtracts and reduces - some twenty passes over B x B values per step, forward
and backward, each into a freshly allocated tensor. For the in-batch softmax alone (no sampled, hard
or impression negatives: every config in ``configs/``) that is most of the training step. At
B = 4096 a B x B float32 tensor is 64 MB, above glibc's mmap threshold: each new one is mapped from
the kernel and page-faulted in on first write (on a 2-core EPYC, ``torch.exp`` into a new 64 MB
tensor takes 39 ms, in place 12 ms; the logits product 43 ms into a new tensor, 18 ms into an old one).

:func:`inbatch_softmax` computes the same loss with:

- ONE matrix product for the logits, the temperature folded into the queries and the logQ correction
  folded in as an extra column (``[q / T, 1] @ [c, -log Q]^T``), written into a B x B workspace that
  is reused from step to step (:class:`_Workspace`), so nothing of size B x B is allocated per step;
- accidental hits found from the ids that repeat in the batch (``torch.unique``): only those entries
  are set to -inf, no B x B comparison or mask;
- the softmax in place by ATen's row-wise kernel, the loss -log softmax[i, positive] (rows whose
  positive underflowed recomputed from their logits), and a backward that turns the same buffer into
  ``softmax - one_hot`` for the two gradient products, the per-row gradient scale applied to their
  [B, d] factors.

The loss equals the general path's up to float rounding (the positive's logit comes from the product
instead of a row-wise dot product); tests/test_inbatch_loss.py checks loss and gradients against
``RetrievalTask``. ``positive_column`` lets the candidates be more than the rows' own positives (e.g.
gathered from other processes: row i's positive is then column ``offset + i``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from twotower.losses import weighted_mean

__all__ = ["accidental_hits", "inbatch_softmax", "is_plain_inbatch"]


def accidental_hits(candidate_ids: Tensor, positive_column: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, columns) where column j holds row i's positive item but is not its positive column.

    Only ids that occur more than once can produce a hit. The pairs are enumerated group by group from
    the columns sorted by id, so the work is the number of pairs within repeated ids (a few thousand
    even for a heavy popularity head), not rows x columns: on ML-100K batches of 1024, where most rows'
    items repeat, a dense comparison of the repeated rows and columns cost 1.5 ms of a 11 ms step.
    """
    empty = torch.zeros(0, dtype=torch.long, device=candidate_ids.device)
    _, group, count = torch.unique(candidate_ids, return_inverse=True, return_counts=True)
    row_group = group[positive_column]
    rows = torch.nonzero(count[row_group] > 1).squeeze(1)
    if rows.numel() == 0:
        return empty, empty
    by_group = torch.argsort(group, stable=True)  # columns grouped by id, ascending within a group
    group_start = torch.cumsum(count, 0) - count
    groups = row_group[rows]
    per_row = count[groups]  # every column of the row's group, its own positive column included
    pair_row = torch.repeat_interleave(rows, per_row)
    first_pair = torch.cumsum(per_row, 0) - per_row
    within = torch.arange(len(pair_row), device=rows.device) - torch.repeat_interleave(first_pair, per_row)
    pair_col = by_group[torch.repeat_interleave(group_start[groups], per_row) + within]
    keep = pair_col != positive_column[pair_row]
    return pair_row[keep], pair_col[keep]


class _Workspace:
    """One reusable logits buffer per (dtype, device), handed to one live autograd graph at a time.

    The buffer is flat and grows to the largest [rows, cols] asked for; each step gets a contiguous
    view of its first rows * cols values, so steps whose shape varies (the distinct-id softmax: the
    number of distinct users and items changes every batch) reuse it too, and memory is bounded by the
    largest step, not by the number of shapes seen. A graph holds a token tensor; the buffer is free
    again once that token is gone (the graph ran its backward or was dropped), so two graphs alive at
    once (e.g. a loss kept for later) never share a buffer: the second gets a fresh tensor, which is
    only slower.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], tuple[Tensor, Any]] = {}

    def acquire(self, rows: int, cols: int, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (like.dtype, like.device)
        token = torch.empty(0)
        need = rows * cols
        held = self._buffers.get(key)
        if held is not None and held[1]() is not None:  # in use by a live graph: a fresh tensor
            return torch.empty(rows, cols, dtype=like.dtype, device=like.device), token
        if held is None or held[0].numel() < need:
            held = (torch.empty(need, dtype=like.dtype, device=like.device), None)
        self._buffers[key] = (held[0], weakref.ref(token))
        return held[0][:need].view(rows, cols), token

    def clear(self) -> None:
        self._buffers.clear()


_WORKSPACE = _Workspace()


# Below this, a softmax entry has lost its float32 precision (the smallest normal is 1.2e-38).
_TINY = 1e-30


def _tiny(dtype: torch.dtype) -> float:
    """The underflow threshold for softmax entries of ``dtype``: ``_TINY``, or the smallest normal
    number where that is larger. Compared with a float16 tensor, 1e-30 rounds to 0, so the exact-row
    fallback would never fire and an underflowed positive (any row whose positive is ~17 nats below its
    best negative) would give an infinite loss; float16's smallest normal is 6.1e-5."""
    return max(_TINY, torch.finfo(dtype).tiny)


class _SoftmaxRows(torch.autograd.Function):
    """Per-row softmax cross-entropy of ``scaled @ candidates^T`` with hits removed (see the module)."""

    @staticmethod
    def forward(ctx: Any, scaled: Tensor, candidates: Tensor, target: Tensor, hits: tuple[Tensor, Tensor]):
        logits, token = _WORKSPACE.acquire(len(scaled), len(candidates), scaled)
        torch.mm(scaled, candidates.T, out=logits)
        if hits[0].numel():
            logits.index_put_(hits, torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))
        # ATen's softmax kernel works row by row in cache (max, exp and sum, scale): one read and one
        # write of the buffer where separate max / subtract / exp / sum calls stream it four times.
        torch.ops.aten._softmax.out(logits, 1, False, out=logits)
        positive = logits.gather(1, target[:, None]).squeeze(1)
        losses = -positive.log()
        tiny = torch.nonzero(positive < _tiny(positive.dtype)).squeeze(1)
        if tiny.numel():  # the positive's probability underflowed: those rows' loss from their logits
            losses[tiny] = _exact_rows(scaled, candidates, target, hits, tiny)
        ctx.save_for_backward(scaled, candidates, target)
        ctx.probs, ctx.token, ctx.done = logits, token, False
        return losses

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor):
        if ctx.done:
            raise RuntimeError("inbatch_softmax's backward runs once (retain_graph is not supported)")
        ctx.done = True
        scaled, candidates, target = ctx.saved_tensors
        # d loss_i / d z_ij = g_i * (softmax_ij - [j == target_i]); the per-row g_i is applied to the
        # [b, d] factors of the two products rather than to the [b, n] buffer (one pass fewer).
        grad = ctx.probs
        grad[torch.arange(len(grad), device=grad.device), target] -= 1.0
        row_scale = grad_rows[:, None]
        grad_scaled = (grad @ candidates) * row_scale if ctx.needs_input_grad[0] else None
        grad_candidates = grad.T @ (scaled * row_scale) if ctx.needs_input_grad[1] else None
        ctx.probs = ctx.token = None  # the workspace is free for the next step
        return grad_scaled, grad_candidates, None, None


def _exact_rows(
    scaled: Tensor, candidates: Tensor, target: Tensor, hits: tuple[Tensor, Tensor], rows: Tensor
) -> Tensor:
    """logsumexp - positive logit of the given rows, recomputed from their own logits."""
    z = scaled[rows] @ candidates.T
    if hits[0].numel():
        local = torch.full((len(scaled),), -1, dtype=torch.long, device=rows.device)
        local[rows] = torch.arange(len(rows), device=rows.device)
        keep = local[hits[0]] >= 0
        z[local[hits[0][keep]], hits[1][keep]] = float("-inf")
    return torch.logsumexp(z, dim=1) - z.gather(1, target[rows][:, None]).squeeze(1)


def inbatch_softmax(
    query: Tensor,
    candidates: Tensor,
    temperature: float,
    *,
    positive_column: Tensor | None = None,
    candidate_ids: Tensor | None = None,
    log_q: Tensor | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """Softmax cross-entropy of each row's positive against every other candidate.

    Args:
        query: [b, d] query embeddings.
        candidates: [n, d] candidate embeddings; row i's positive is ``candidates[positive_column[i]]``
            (default: ``candidates[i]``, the classic in-batch case with n == b).
        temperature: the logits are similarities / temperature.
        candidate_ids: [n] item ids; given, a candidate equal to the row's positive item (other than
            the positive column itself) is removed from that row: an accidental hit.
        log_q: [n] log sampling probability of each candidate, subtracted from its logit, the
            positive's included (Yi et al. 2019), as ``twotower.losses.listwise_softmax`` does.
        weight: [b] sample weights; the loss is sum_i w_i l_i / sum_i w_i (else the mean).
    """
    b, n = len(query), len(candidates)
    if positive_column is None:
        if n != b:
            raise ValueError(f"{b} queries but {n} candidates: pass positive_column")
        positive_column = torch.arange(b, device=query.device)
    scaled = query * (1.0 / temperature)
    if log_q is not None:
        # One extra column folds the correction into the product: <[q/T, 1], [c, -log q]>.
        ones = torch.ones(b, 1, dtype=query.dtype, device=query.device)
        scaled = torch.cat([scaled, ones], dim=1)
        candidates = torch.cat([candidates, -log_q.to(candidates).reshape(n, 1)], dim=1)
    empty = torch.zeros(0, dtype=torch.long, device=query.device)
    hits = accidental_hits(candidate_ids, positive_column) if candidate_ids is not None else (empty, empty)
    losses = _SoftmaxRows.apply(scaled, candidates, positive_column, hits)
    return weighted_mean(losses, weight)


def is_plain_inbatch(task: Any) -> bool:
    """True when a ``RetrievalTask`` computes exactly :func:`inbatch_softmax`: the softmax objective
    over in-batch negatives only (no sampled, hard or impression negatives)."""
    return (
        task.objective == "softmax"
        and task.in_batch
        and task.sampler is None
        and task.miner is None
        and task.impressions is None
    )
