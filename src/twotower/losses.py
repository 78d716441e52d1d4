"""Pointwise, pairwise and listwise retrieval losses on score tensors.

Pure functions: no model code. Every loss takes the scores an anchor (query) gives its candidates,

    pos       Tensor[B]            s(a_i, b_i+), the score of anchor i with its positive
    neg       Tensor[B, N]         s(a_i, b_ij-), the scores of anchor i with N negatives
    neg_mask  Tensor[B, N] | None  bool, True = a valid negative. False = removed (padding, an accidental
                                   hit): it contributes nothing to the loss nor to any gradient, exactly
                                   as if it had been left out of ``neg``. None = all valid.
    weight    Tensor[B] | None     sample weights

and returns a scalar: the per-anchor losses l_i reduced as sum_i w_i * l_i / sum_i w_i (the plain mean
when ``weight`` is None). An anchor whose negatives are all masked still counts in that mean; its
negative terms are 0 (so the pairwise and listwise losses give it l_i = 0, the pointwise ones keep only
its positive term).

Scores are similarities (cosine or dot), already divided by a temperature if the caller wants one: the
losses never rescale them (except ``pointwise_bce``'s explicit ``scale`` and ``bias``). Every loss is
computed with ``softplus`` / ``logsumexp`` and masked values are replaced before any non-linearity, so
values and gradients stay finite for scores as large as +-1e4.

``LOSSES`` maps the config names to the functions; extra parameters (``margin``, ``sigma``, ...) are
passed as keywords: ``LOSSES[name](pos, neg, neg_mask=mask, weight=w, **params)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES",
    "get_loss",
    "listwise_softmax",
    "pointwise_bce",
    "pointwise_cosine_mse",
    "triplet_hinge",
    "triplet_logistic",
    "weighted_mean",
]


def _valid_mask(pos: Tensor, neg: Tensor, neg_mask: Tensor | None) -> Tensor:
    """Check shapes and return the validity mask as a bool tensor of ``neg``'s shape."""
    if pos.dim() != 1:
        raise ValueError(f"pos must be [B], got shape {tuple(pos.shape)}")
    if neg.dim() != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(f"neg must be [B, N] with B = {pos.shape[0]}, got shape {tuple(neg.shape)}")
    if neg_mask is None:
        return torch.ones_like(neg, dtype=torch.bool)
    if neg_mask.dtype != torch.bool:
        raise TypeError(f"neg_mask must be a bool tensor (True = valid negative), got {neg_mask.dtype}")
    if neg_mask.shape != neg.shape:
        raise ValueError(f"neg_mask has shape {tuple(neg_mask.shape)}, neg {tuple(neg.shape)}")
    return neg_mask


def weighted_mean(losses: Tensor, weight: Tensor | None) -> Tensor:
    """sum_i w_i * l_i / sum_i w_i, or the mean of ``losses`` when ``weight`` is None; 0 when every
    weight is 0. The denominator's floor is at least the dtype's smallest normal number: 1e-12 is 0 in
    float16, where all-zero weights would give 0 / 0 = NaN."""
    if weight is None:
        return losses.mean()
    weight = weight.to(losses)
    return (losses * weight).sum() / weight.sum().clamp_min(max(1e-12, torch.finfo(losses.dtype).tiny))


def _reduce(losses: Tensor, weight: Tensor | None) -> Tensor:
    if weight is not None and weight.shape != losses.shape:
        raise ValueError(f"weight must be [B] = {tuple(losses.shape)}, got {tuple(weight.shape)}")
    return weighted_mean(losses, weight)


def _masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Row sums of ``values`` over the valid entries (masked ones are zeroed, never multiplied)."""
    return values.masked_fill(~mask, 0.0).sum(dim=1)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Row means over the valid entries; 0 for a row without any."""
    return _masked_sum(values, mask) / mask.sum(dim=1).clamp_min(1).to(values)


def pointwise_bce(
    pos: Tensor,
    neg: Tensor,
    neg_mask: Tensor | None = None,
    weight: Tensor | None = None,
    scale: float = 1.0,
    bias: float = 0.0,
) -> Tensor:
    """Binary cross-entropy on the logits z = scale * s + bias, label 1 for positives, 0 for negatives.

        l_i = BCE(z_i+, 1) + sum_{j valid} BCE(z_ij-, 0)
            = softplus(-z_i+) + sum_{j valid} softplus(z_ij-)

    The negative terms are summed, not averaged: every (anchor, item) pair is one independent binary
    example, so the positive:negative ratio of the loss is exactly 1:N, the number of negatives passed
    (pass N = 1, 2, 3 ... to choose the ratio). ``scale`` and ``bias`` map a bounded similarity (cosine
    in [-1, 1]) onto a usable logit range, e.g. scale = 10, bias = -5.
    """
    mask = _valid_mask(pos, neg, neg_mask)
    z_pos = scale * pos + bias
    z_neg = scale * neg.masked_fill(~mask, 0.0) + bias
    return _reduce(F.softplus(-z_pos) + _masked_sum(F.softplus(z_neg), mask), weight)


def pointwise_cosine_mse(
    pos: Tensor,
    neg: Tensor,
    neg_mask: Tensor | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """Squared error of the similarity to +1 for positives and -1 for negatives.

        l_i = (s_i+ - 1)^2 + sum_{j valid} (s_ij- + 1)^2

    The "positive -> 1, negative -> -1" regression for cosine scores (pass them without a temperature).
    As in ``pointwise_bce`` the negative terms are summed, so the positive:negative ratio is 1:N.
    """
    mask = _valid_mask(pos, neg, neg_mask)
    neg = neg.masked_fill(~mask, 0.0)  # before the square: a nan / inf in a masked slot has no gradient
    return _reduce((pos - 1.0).square() + _masked_sum((neg + 1.0).square(), mask), weight)


def triplet_hinge(
    pos: Tensor,
    neg: Tensor,
    margin: float,
    neg_mask: Tensor | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """Triplet margin (hinge) loss, averaged over the anchor's valid negatives.

        l_i = (1 / |V_i|) * sum_{j in V_i} max(0, s_ij- + margin - s_i+)      (l_i = 0 when V_i is empty)

    V_i is the set of valid negatives of anchor i. Mean rather than sum over negatives, so the loss
    scale and the useful learning rate do not depend on N or on how many negatives a mask removed. A
    triplet is zero once s+ - s- >= margin (at the boundary exactly) and linear inside the margin.
    """
    mask = _valid_mask(pos, neg, neg_mask)
    hinge = F.relu(neg.masked_fill(~mask, 0.0) + margin - pos[:, None])
    return _reduce(_masked_mean(hinge, mask), weight)


def triplet_logistic(
    pos: Tensor,
    neg: Tensor,
    sigma: float = 1.0,
    neg_mask: Tensor | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """Logistic (soft-margin) pairwise loss, averaged over the anchor's valid negatives.

        l_i = (1 / |V_i|) * sum_{j in V_i} log(1 + exp(sigma * (s_ij- - s_i+)))    (0 when V_i is empty)
            = mean_j -log sigmoid(sigma * (s_i+ - s_ij-))

    computed as softplus, so it never overflows. sigma = 1 is BPR (Rendle et al., UAI 2009); the mean over
    negatives follows ``triplet_hinge``.
    """
    mask = _valid_mask(pos, neg, neg_mask)
    diff = sigma * (neg.masked_fill(~mask, 0.0) - pos[:, None])
    return _reduce(_masked_mean(F.softplus(diff), mask), weight)


def listwise_softmax(
    pos: Tensor,
    neg: Tensor,
    neg_mask: Tensor | None = None,
    weight: Tensor | None = None,
    log_q_pos: Tensor | None = None,
    log_q_neg: Tensor | None = None,
) -> Tensor:
    """Softmax cross-entropy of the positive against its valid negatives (sampled softmax).

        z_i+  = s_i+  - log Q(b_i+)          z_ij- = s_ij- - log Q(b_ij-)     (logQ terms only when given)
        l_i   = -log( exp(z_i+) / (exp(z_i+) + sum_{j valid} exp(z_ij-)) )
              = logsumexp(z_i+, z_i1-, ..., z_iN-) - z_i+

    The logQ correction (Yi et al., RecSys 2019) subtracts the log sampling probability from every
    logit, the positive's included; ``log_q_pos`` is [B] and ``log_q_neg`` is [B, N] (or [N] for
    negatives shared by the batch). Masked negatives get the logit -inf, i.e. they are excluded from
    the normaliser, so an anchor without valid negatives has l_i = -log 1 = 0.
    """
    mask = _valid_mask(pos, neg, neg_mask)
    if log_q_pos is not None:
        pos = pos - log_q_pos.to(pos)
    if log_q_neg is not None:
        neg = neg - log_q_neg.to(neg).expand_as(neg)
    # -inf is safe: the positive's column is always finite, so logsumexp is finite and the masked
    # columns get exactly zero softmax weight and zero gradient.
    logits = torch.cat([pos[:, None], neg.masked_fill(~mask, float("-inf"))], dim=1)
    return _reduce(torch.logsumexp(logits, dim=1) - pos, weight)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "pointwise_bce": pointwise_bce,
    "pointwise_mse": pointwise_cosine_mse,
    "hinge": triplet_hinge,
    "logistic": triplet_logistic,
    "softmax": listwise_softmax,
}


def get_loss(name: str) -> Callable[..., Tensor]:
    """The loss function registered under ``name`` in ``LOSSES``."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
