"""The in-batch softmax over DISTINCT users and items: the same loss, a fraction of the products.

A batch of B (user, item) positives drawn from a log repeats both: on ML-100K a batch of 1024 holds
~500 distinct users and ~560 distinct items (a popularity head). The in-batch softmax of
:mod:`twotower.inbatch_loss` computes a B x B logit matrix whose repeated rows and columns are copies,
and its three B x B x d products are most of the training step. When each tower's output is a
function of the id alone (no history, no active dropout), the same loss comes from the [U_users, U_items]
matrix of distinct pairs, with each distinct item weighted by how often it occurs in the batch.

Row i (user u, positive item p, z_j = <q_u, c_j> / T - log Q(j), c_j the count of item j in the batch)
of the full B x B softmax has the loss

    L_i = -z_p + log( sum_j c_j e^{z_j} - (c_p - 1) e^{z_p} )     accidental hits removed
    L_i = -z_p + log( sum_j c_j e^{z_j} )                          hits kept as negatives

because the c_j equal columns of item j contribute c_j e^{z_j}, and removing the accidental hits
takes out the c_p - 1 copies of row i's positive that are not its own column. The count enters the
product as one more column (``[q / T, 1] @ [c, log c - log Q]^T``), so one softmax over the distinct
matrix gives P[u, j] = c_j e^{z_j} / S_u and with pp = P[u, p]:

    L_i = -log pp + log c_p + log(1 - pp (c_p - 1) / c_p)          (the last term only with hits removed)

The backward is that of the full matrix summed over the copies: d L_i / d Y[u, j] = r_i P[u, j] for
j != p and r_i P[u, p] / c_p - 1 at the positive, with r_i = 1 / (1 - pp (c_p - 1) / c_p) (1 with hits
kept), where Y is the product above. Summed over the rows of each user, that is one row scale per
distinct user and one correction per row. Tests (tests/test_unique_softmax.py) check the loss and the
gradients against :func:`twotower.inbatch_loss.inbatch_softmax` on the expanded batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from twotower.inbatch_loss import _WORKSPACE, _tiny
from twotower.losses import weighted_mean

__all__ = ["unique_inbatch_softmax"]


def unique_inbatch_softmax(
    query: Tensor,
    query_of_row: Tensor,
    candidates: Tensor,
    positive_of_row: Tensor,
    candidate_count: Tensor,
    temperature: float,
    *,
    log_q: Tensor | None = None,
    remove_accidental_hits: bool = True,
    weight: Tensor | None = None,
) -> Tensor:
    """The in-batch softmax loss of the B rows ``(query[query_of_row[i]], candidates[positive_of_row[i]])``
    against every row's positive, computed over the distinct queries and candidates.

    Args:
        query: [U, d] distinct query embeddings.
        query_of_row: [B] each row's query.
        candidates: [C, d] distinct candidate embeddings (the batch's positives, one per item).
        positive_of_row: [B] each row's positive candidate.
        candidate_count: [C] how many rows of the batch have each candidate as positive (>= 1).
        temperature: the logits are similarities / temperature.
        log_q: [C] log sampling probability of each candidate, subtracted from its logit.
        remove_accidental_hits: drop the other copies of a row's positive from its negatives.
        weight: [B] sample weights; the loss is sum_i w_i l_i / sum_i w_i (else the mean).
    """
    u, d = query.shape
    c = len(candidates)
    count = candidate_count.to(query.dtype)
    extra = count.log() if log_q is None else count.log() - log_q.to(query.dtype)
    # The temperature goes into the queries and log count - log Q into one extra column of the product.
    scaled = torch.cat([query * (1.0 / temperature), query.new_ones(u, 1)], dim=1)
    columns = torch.cat([candidates, extra.reshape(c, 1)], dim=1)
    losses = _UniqueSoftmax.apply(
        scaled, columns, query_of_row, positive_of_row, count, remove_accidental_hits
    )
    return weighted_mean(losses, weight)


class _UniqueSoftmax(torch.autograd.Function):
    """Per-row loss over the softmax of ``scaled @ columns^T`` (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        scaled: Tensor,
        columns: Tensor,
        rows: Tensor,
        positive: Tensor,
        count: Tensor,
        remove_hits: bool,
    ) -> Tensor:
        probs, token = _WORKSPACE.acquire(len(scaled), len(columns), scaled)
        torch.mm(scaled, columns.T, out=probs)
        torch.ops.aten._softmax.out(probs, 1, False, out=probs)  # in place, row by row in cache
        flat = rows * len(columns) + positive
        pp = probs.view(-1).index_select(0, flat)
        count_p = count.index_select(0, positive)
        # keep_p: the share of column p's mass that stays in the row's partition once the other
        # copies of its positive are removed (1 when they stay).
        keep_p = 1.0 - pp * (1.0 - 1.0 / count_p) if remove_hits else torch.ones_like(pp)
        losses = count_p.log() - pp.log() + keep_p.log()
        tiny = torch.nonzero(pp < _tiny(pp.dtype)).squeeze(1)
        if tiny.numel():  # the positive's probability underflowed: those rows from their logits
            rows_t, positive_t, count_t = rows[tiny], positive[tiny], count_p[tiny]
            losses[tiny] = _exact_rows(scaled, columns, rows_t, positive_t, count_t, remove_hits)
        ctx.save_for_backward(scaled, columns, rows, positive, pp, count_p, keep_p)
        ctx.probs, ctx.token, ctx.remove_hits, ctx.done = probs, token, remove_hits, False
        return losses

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor):
        if ctx.done:
            raise RuntimeError("unique_inbatch_softmax's backward runs once (retain_graph is not supported)")
        ctx.done = True
        scaled, columns, rows, positive, pp, count_p, keep_p = ctx.saved_tensors
        r = grad_rows / keep_p  # g_i * r_i
        grad = ctx.probs
        # Every row of user u scales its softmax by g_i r_i: one scale per distinct user ...
        user_scale = torch.zeros(len(scaled), dtype=grad.dtype, device=grad.device).index_add_(0, rows, r)
        grad.mul_(user_scale[:, None])
        # ... and each row's own positive entry: r_i P / c_p - r_i P - g_i (or -g_i with hits kept).
        own = -grad_rows
        if ctx.remove_hits:
            own = own + r * pp * (1.0 / count_p - 1.0)
        grad.view(-1).index_add_(0, rows * len(columns) + positive, own)
        grad_scaled = grad @ columns if ctx.needs_input_grad[0] else None
        grad_columns = grad.T @ scaled if ctx.needs_input_grad[1] else None
        ctx.probs = ctx.token = None  # the workspace is free for the next step
        return grad_scaled, grad_columns, None, None, None, None


def _exact_rows(
    scaled: Tensor, columns: Tensor, rows: Tensor, positive: Tensor, count_p: Tensor, remove_hits: bool
) -> Tensor:
    """The loss of the given rows recomputed from their own logits (log-sum-exp, no underflow)."""
    y = scaled.index_select(0, rows) @ columns.T  # y_j = z_j + log c_j
    at = torch.arange(len(rows), device=rows.device)
    target = y[at, positive] - count_p.log()  # z_p
    if remove_hits:
        y[at, positive] = target  # the positive's column once, not c_p times
    return torch.logsumexp(y, dim=1) - target
