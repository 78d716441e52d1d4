"""Funnel alignment: train an early stage (retrieval towers, a light ranker) towards the main ranker.

The main ranker sees every candidate the earlier stages hand it and scores them better than they can; the
earlier stages, trained on clicks alone, never learn what it would have preferred. These losses close
the loop on the candidate lists the ranker scored. Pure functions over tensors, no model code:

    student_logits  Tensor[B, M]          the student's scores of each query's M candidates: the two-tower
                                          similarity / temperature, or a light ranker's logits
    teacher_logits  Tensor[B, M]          the main ranker's scores of the same candidates. Use the relevance
                                          logit (``DebiasedRanker.score``), not p(click): p(click) carries the
                                          position bias the ranker's bias tower was built to keep out.
    mask            Tensor[B, M] | None   bool, True = a real candidate, False = padding. A masked slot
                                          changes neither a value nor a gradient (NaN or inf there is fine).
    weight          Tensor[B] | None      per-row weights

* :func:`distillation_loss` - ``kl``: listwise KL(teacher || student) of the tempered softmaxes, times T^2
  (Hinton et al. 2015); ``mse``: squared error between the logits, row-centred by default.
* :func:`reward_weighted_softmax_loss` - the ranker as a reward model: cross-entropy to softmax(r / tau)
  or a REINFORCE surrogate with a mean baseline.
* :class:`AlignmentConfig` + :func:`alignment_loss` - the enabled terms, weighted and summed.

Reduction follows ``twotower.losses``: sum_i w_i l_i / sum_i w_i (the plain mean without weights), with
one difference: rows that carry no information are left out of the sum and of the normaliser. A listwise
loss over fewer than 2 valid candidates is 0 whatever the student does (one candidate always has
probability 1), and such lists are the funnel's padding and truncation, not queries the student got
right; counting them would make the loss scale depend on how many short lists a batch happens to hold.
When no row contributes the loss is an exact 0 still attached to the student's graph.

The teacher (and the rewards) are targets: they are detached, so these losses never move the ranker.
Teacher values must be finite on valid slots; mark excluded candidates with the mask instead of -inf.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

__all__ = [
    "AlignmentConfig",
    "alignment_loss",
    "alignment_terms",
    "distillation_loss",
    "reward_weighted_softmax_loss",
]

DistillKind = Literal["kl", "mse"]
RewardForm = Literal["cross_entropy", "reinforce"]
Baseline = Literal["none", "mean"]


# --- helpers ---------------------------------------------------------------------------------------
def _check(student: Tensor, other: Tensor, mask: Tensor | None, other_name: str) -> Tensor:
    """Validate shapes and return the validity mask (all True when ``mask`` is None)."""
    if not student.is_floating_point() or student.dim() != 2:
        raise ValueError(
            f"student_logits must be a float [B, M] tensor, got {student.dtype} {tuple(student.shape)}"
        )
    if other.shape != student.shape:
        raise ValueError(
            f"{other_name} has shape {tuple(other.shape)}, student_logits {tuple(student.shape)}"
        )
    if mask is None:
        return torch.ones_like(student, dtype=torch.bool)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = valid candidate), got {mask.dtype}")
    if mask.shape != student.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, student_logits {tuple(student.shape)}")
    return mask


def _positive(name: str, value: float) -> None:
    if not value > 0 or value == float("inf"):  # `not >` also rejects NaN
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Row log-softmax over the valid slots; 0 (not -inf) at masked slots and in rows without any.

    -inf excludes a slot exactly. A row with no valid slot is filled with zeros first: log_softmax over
    a row of -inf is NaN, and a NaN in the forward pass turns into NaN gradients in backward even after
    it has been masked away. The 0 at masked slots keeps later products (0 * -inf) from making NaN too.
    """
    has_any = mask.any(dim=1, keepdim=True)
    logits = logits.masked_fill(~mask, float("-inf")).masked_fill(~has_any, 0.0)
    return torch.log_softmax(logits, dim=1).masked_fill(~mask, 0.0)


def _row_mean(values: Tensor, mask: Tensor) -> Tensor:
    """[B, 1] means over the valid slots (0 for a row without any); ``values`` already 0 at masked slots."""
    return values.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp_min(1).to(values)


def _reduce(losses: Tensor, contributes: Tensor, weight: Tensor | None) -> Tensor:
    """sum_i w_i l_i / sum_i w_i over the contributing rows; 0, attached to the graph, if there are none."""
    if weight is None:
        w = contributes.to(losses)
    else:
        if weight.shape != losses.shape:
            raise ValueError(f"weight must be [B] = {tuple(losses.shape)}, got {tuple(weight.shape)}")
        w = weight.to(losses) * contributes
    losses = losses.masked_fill(~contributes, 0.0)
    # The floor must be a normal number of the dtype: 1e-12 is 0 in float16, and no contributing row
    # would give 0 / 0 = NaN instead of the promised 0.
    return (losses * w).sum() / w.sum().clamp_min(max(1e-12, torch.finfo(losses.dtype).tiny))


# --- distillation ----------------------------------------------------------------------------------
def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    kind: DistillKind = "kl",
    temperature: float = 1.0,
    weight: Tensor | None = None,
    center: bool = True,
) -> Tensor:
    """Distil the teacher's scores of each candidate list into the student's.

    ``kl``, over the valid slots V_i of row i, with p = softmax(t / T), q = softmax(s / T):

        l_i = T^2 * KL(p || q) = T^2 * sum_{j in V_i} p_ij (log p_ij - log q_ij)        (rows with |V_i| >= 2)

    Its gradient is T (q - p) per logit; without the T^2 factor it would shrink like 1 / T^2 at high
    temperature, and every change of T would need a new learning rate (Hinton et al. 2015). As T grows,
    T^2 * KL tends to half the centred ``mse`` below: the high-temperature limit matches logit
    differences, a low T matches mostly the teacher's top candidates.

    ``mse``: l_i = mean_{j in V_i} (s_ij - t_ij)^2, after subtracting each row's mean over V_i from both
    when ``center`` (rows with |V_i| >= 2 then; >= 1 without centring). Beware the scales: the teacher's
    logits are the ranker's relevance logits (a BCE-trained sigmoid scale, a few units wide), the
    student's may be cosine / temperature (+-20 at temperature 0.05) and only their differences within
    a row matter to a softmax-trained student. Raw MSE would spend the student's capacity on an
    arbitrary per-row offset; centring removes the offset (both softmaxes are shift-invariant), not a
    difference of scale - when scales differ, prefer ``kl`` with a temperature, or rescale first.
    ``temperature`` has no effect on ``mse`` (T^2 * MSE(s / T, t / T) = MSE(s, t)), nor ``center`` on ``kl``.
    """
    mask = _check(student_logits, teacher_logits, mask, "teacher_logits")
    _choice("kind", kind, ("kl", "mse"))
    _positive("temperature", temperature)
    teacher = teacher_logits.detach().to(student_logits)
    n_valid = mask.sum(dim=1)
    if kind == "kl":
        log_p = _log_softmax(teacher / temperature, mask)
        log_q = _log_softmax(student_logits / temperature, mask)
        # p = 0 at masked slots and both logs are 0 there: those terms are exactly 0.
        per_row = (log_p.exp() * mask * (log_p - log_q)).sum(dim=1) * temperature**2
        return _reduce(per_row, n_valid >= 2, weight)
    s = student_logits.masked_fill(~mask, 0.0)
    t = teacher.masked_fill(~mask, 0.0)
    if center:
        s = (s - _row_mean(s, mask)).masked_fill(~mask, 0.0)
        t = (t - _row_mean(t, mask)).masked_fill(~mask, 0.0)
    per_row = (s - t).square().sum(dim=1) / n_valid.clamp_min(1).to(s)
    return _reduce(per_row, n_valid >= (2 if center else 1), weight)


# --- the ranker as a reward model ------------------------------------------------------------------
def reward_weighted_softmax_loss(
    student_logits: Tensor,
    rewards: Tensor,
    mask: Tensor | None = None,
    reward_temperature: float = 1.0,
    baseline: Baseline = "none",
    form: RewardForm = "cross_entropy",
    weight: Tensor | None = None,
) -> Tensor:
    """Teach the student to put its probability mass on the candidates the ranker rewards.

    With p = softmax(s) over the valid slots V_i and the scaled rewards r' = r / tau (minus their row
    mean over V_i when ``baseline="mean"``):

    ``cross_entropy``: q = softmax(r') and l_i = -sum_{j in V_i} q_ij log p_ij = KL(q || p) + H(q). Its
    gradient is p - q: the student converges to q, and tau sets how peaked q is (tau -> 0: hard-label
    cross-entropy on the ranker's favourite; large tau: nearly uniform). The baseline cancels in the
    softmax (shift invariance), so it has no effect here.

    ``reinforce``: A_ij = r'_ij and l_i = -(1 / |V_i|) sum_{j in V_i} A_ij log p_ij, the score-function
    (policy-gradient) surrogate. Each candidate in the list is treated as one action the student took,
    so (1 / |V_i|) sum_j A_ij grad log p_ij estimates grad E_{j ~ p}[r'_j] when the list was sampled from
    the student itself (e.g. its softmax over the catalogue); the mean baseline reduces its variance
    (with sum_j A_ij = 0 the gradient is exactly -A_ij / |V_i| per logit). The value is a surrogate, not
    an objective: it is unbounded below, and left alone it drives p to the top-reward candidate.

    Which: when the ranker scored the whole list, the exact target is known and ``cross_entropy`` uses it
    with no estimator variance; its optimum q = softmax(r') is also the optimum of the entropy-regularised
    expected reward E_p[r'] + H(p) that policy gradient methods chase. ``reinforce`` is for lists drawn
    from the student (exploration, sampled slates) and for rewards that are observed for the chosen
    items only; there it needs the baseline and a small weight. tau scales its advantages (the step).
    Rows with fewer than 2 valid candidates contribute nothing and are excluded (module docstring).
    """
    mask = _check(student_logits, rewards, mask, "rewards")
    _choice("baseline", baseline, ("none", "mean"))
    _choice("form", form, ("cross_entropy", "reinforce"))
    _positive("reward_temperature", reward_temperature)
    r = rewards.detach().to(student_logits).masked_fill(~mask, 0.0) / reward_temperature
    if baseline == "mean":
        r = (r - _row_mean(r, mask)).masked_fill(~mask, 0.0)
    log_p = _log_softmax(student_logits, mask)
    n_valid = mask.sum(dim=1)
    if form == "cross_entropy":
        q = _log_softmax(r, mask).exp() * mask
        per_row = -(q * log_p).sum(dim=1)
    else:
        per_row = -(r * log_p).sum(dim=1) / n_valid.clamp_min(1).to(r)
    return _reduce(per_row, n_valid >= 2, weight)


# --- config and the combined loss ------------------------------------------------------------------
class AlignmentConfig(BaseModel):
    """The alignment terms added to a student's own loss; a weight of 0 turns a term off."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    distill_weight: float = Field(0.0, ge=0, description="weight of distillation_loss (0: off)")
    distill_kind: DistillKind = "kl"
    distill_temperature: float = Field(1.0, gt=0, description="softmax temperature of kind='kl'")
    distill_center: bool = Field(True, description="kind='mse': subtract each row's mean from both")
    reward_weight: float = Field(0.0, ge=0, description="weight of reward_weighted_softmax_loss (0: off)")
    reward_temperature: float = Field(1.0, gt=0, description="rewards are divided by it")
    reward_form: RewardForm = "cross_entropy"
    # "mean" by default: REINFORCE without a baseline is needlessly noisy, and cross_entropy ignores it.
    reward_baseline: Baseline = "mean"

    @property
    def enabled(self) -> bool:
        return self.distill_weight > 0 or self.reward_weight > 0


def alignment_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    config: AlignmentConfig,
    weight: Tensor | None = None,
) -> dict[str, Tensor]:
    """The enabled terms, unweighted, by name (``distill``, ``reward``): for logging beside the total."""
    terms: dict[str, Tensor] = {}
    if config.distill_weight > 0:
        terms["distill"] = distillation_loss(
            student_logits, teacher_logits, mask, config.distill_kind, config.distill_temperature,
            weight, center=config.distill_center,
        )  # fmt: skip
    if config.reward_weight > 0:
        terms["reward"] = reward_weighted_softmax_loss(
            student_logits, teacher_logits, mask, config.reward_temperature, config.reward_baseline,
            config.reward_form, weight,
        )  # fmt: skip
    return terms


def alignment_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    config: AlignmentConfig,
    weight: Tensor | None = None,
) -> Tensor:
    """distill_weight * distill + reward_weight * reward, the teacher's logits serving as the rewards.

    With no term enabled the result is an exact 0 computed from ``student_logits``, so it still requires
    grad: ``loss.backward()`` works, and every parameter behind the student gets a zero gradient rather
    than None (DistributedDataParallel without ``find_unused_parameters`` needs every parameter used).
    Shapes are validated whether or not a term is enabled, so a wiring error shows before it is switched on.
    """
    valid = _check(student_logits, teacher_logits, mask, "teacher_logits")
    # masked_fill first: a NaN or inf in a padding slot times 0 would still be NaN.
    total = (student_logits.masked_fill(~valid, 0.0) * 0.0).sum()
    terms = alignment_terms(student_logits, teacher_logits, mask, config, weight)
    for name, term in terms.items():
        total = total + getattr(config, f"{name}_weight") * term
    return total
