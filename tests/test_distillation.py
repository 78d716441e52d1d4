import math

import pytest
import torch
from pydantic import ValidationError

from twotower.distillation import (
    AlignmentConfig,
    alignment_loss,
    alignment_terms,
    distillation_loss,
    reward_weighted_softmax_loss,
)

LN2, LN3 = math.log(2), math.log(3)

# 2 rows x 3 candidates; row 1's last slot is padding (its values must never matter).
#   row 0: teacher [0, ln2, 0] -> p = [1, 2, 1] / 4;  student [0, 0, 0]  -> q = [1, 1, 1] / 3
#   row 1: teacher [ln3, 0, *] -> p = [3, 1] / 4;     student [0, 0, *]  -> q = [1, 1] / 2
TEACHER = torch.tensor([[0.0, LN2, 0.0], [LN3, 0.0, 99.0]])
STUDENT = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -50.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])
# KL(p || q) = sum p log(p / q)
KL0 = 0.25 * math.log(3 / 4) + 0.5 * math.log(3 / 2) + 0.25 * math.log(3 / 4)  # = 1/2 ln(9/8)
KL1 = 0.75 * math.log(3 / 2) + 0.25 * math.log(1 / 2)  # = 3/4 ln3 - ln2


def approx(x: float):
    return pytest.approx(x, rel=1e-5, abs=1e-7)


def every_loss():
    """Each loss configuration as f(student, teacher, mask, weight), for the generic tests."""
    return [
        pytest.param(lambda s, t, m, w=None: distillation_loss(s, t, m, "kl", 2.0, w), id="kl"),
        pytest.param(lambda s, t, m, w=None: distillation_loss(s, t, m, "mse", weight=w), id="mse"),
        pytest.param(
            lambda s, t, m, w=None: distillation_loss(s, t, m, "mse", weight=w, center=False), id="mse-raw"
        ),
        pytest.param(lambda s, t, m, w=None: reward_weighted_softmax_loss(s, t, m, 0.5, weight=w), id="ce"),
        pytest.param(
            lambda s, t, m, w=None: reward_weighted_softmax_loss(
                s, t, m, baseline="mean", form="reinforce", weight=w
            ),
            id="reinforce",
        ),
    ]


# --- distillation: kl ------------------------------------------------------------------------------
def test_kl_by_hand():
    assert math.isclose(KL0, 0.5 * math.log(9 / 8)) and math.isclose(KL1, 0.75 * LN3 - LN2)
    assert distillation_loss(STUDENT, TEACHER, MASK).item() == approx((KL0 + KL1) / 2)


def test_kl_is_zero_when_student_equals_teacher():
    teacher = torch.tensor([[1.0, -2.0, 0.5], [3.0, 3.0, 0.0]])
    assert distillation_loss(teacher.clone(), teacher, MASK).item() == pytest.approx(0.0, abs=1e-7)
    # Shift-invariant: a per-row offset of the student changes nothing.
    shifted = teacher + torch.tensor([[5.0], [-7.0]])
    assert distillation_loss(shifted, teacher, MASK).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_temperature_squared_scaling():
    # T = 2: teacher [0, 2 ln2, 0] / 2 = [0, ln2, 0] -> the same p as row 0; student 0 -> q uniform.
    # loss = T^2 * KL0 = 4 * 1/2 ln(9/8) = 2 ln(9/8)
    teacher = torch.tensor([[0.0, 2 * LN2, 0.0]])
    loss = distillation_loss(torch.zeros(1, 3), teacher, kind="kl", temperature=2.0)
    assert loss.item() == approx(2 * math.log(9 / 8))
    # The T^2 factor keeps the gradient's scale: d loss / d s = T (q - p) = 2 ([1,1,1]/3 - [1,2,1]/4).
    s = torch.zeros(1, 3, requires_grad=True)
    distillation_loss(s, teacher, temperature=2.0).backward()
    expected = [2 * (1 / 3 - 1 / 4), 2 * (1 / 3 - 1 / 2), 2 * (1 / 3 - 1 / 4)]  # [1/6, -1/3, 1/6]
    assert s.grad[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_kl_high_temperature_limit_is_half_centred_mse():
    # Hinton et al. 2015: T^2 KL -> 1/2 mean_j ((s - mean s) - (t - mean t))^2 as T -> infinity.
    g = torch.Generator().manual_seed(0)
    s, t = (
        torch.randn(4, 6, generator=g, dtype=torch.float64),
        torch.randn(4, 6, generator=g, dtype=torch.float64),
    )
    kl = distillation_loss(s, t, kind="kl", temperature=1e3).item()
    mse = distillation_loss(s, t, kind="mse").item()
    assert kl == pytest.approx(mse / 2, rel=1e-3)


@pytest.mark.parametrize("temperature", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_identical_scores_are_a_minimum_with_zero_gradient(kind, temperature):
    teacher = torch.tensor([[1.0, -2.0, 0.5], [3.0, 3.0, 0.0]], dtype=torch.float64)
    s = teacher.clone().requires_grad_()
    loss = distillation_loss(s, teacher, MASK, kind, temperature)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and s.grad.abs().max().item() < 1e-12
    g = torch.Generator().manual_seed(5)
    for _ in range(5):  # every nearby student is worse
        moved = teacher + 0.1 * torch.randn(teacher.shape, generator=g, dtype=torch.float64)
        assert distillation_loss(moved, teacher, MASK, kind, temperature).item() > 0


# --- distillation: mse -----------------------------------------------------------------------------
def test_mse_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[0.0, 0.0, 3.0]])
    # raw: diffs [1, 2, 0] -> (1 + 4 + 0) / 3
    assert distillation_loss(s, t, kind="mse", center=False).item() == approx(5 / 3)
    # centred: s - 2 = [-1, 0, 1], t - 1 = [-1, -1, 2] -> diffs [0, 1, -1] -> 2 / 3
    assert distillation_loss(s, t, kind="mse").item() == approx(2 / 3)


def test_mse_masked_by_hand():
    # Row 1 valid slots only: s [0, 0], t [ln3, 0]. Raw: (ln3^2 + 0) / 2. Centred: s - 0 = [0, 0],
    # t - ln3/2 = [ln3/2, -ln3/2] -> (ln3^2 / 4 + ln3^2 / 4) / 2 = ln3^2 / 4.
    # Row 0: raw (0 + ln2^2 + 0) / 3; centred t - ln2/3 = [-ln2/3, 2ln2/3, -ln2/3] -> (1 + 4 + 1) ln2^2 / 27.
    raw = (LN2**2 / 3 + LN3**2 / 2) / 2
    centred = (6 * LN2**2 / 27 + LN3**2 / 4) / 2
    assert distillation_loss(STUDENT, TEACHER, MASK, "mse", center=False).item() == approx(raw)
    assert distillation_loss(STUDENT, TEACHER, MASK, "mse").item() == approx(centred)


def test_mse_centring_invariant_to_row_constants():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    base = distillation_loss(s, t, kind="mse").item()
    moved = distillation_loss(s + torch.tensor([[10.0], [-3.0], [0.5]]), t - 4.0, kind="mse").item()
    assert moved == pytest.approx(base, rel=1e-5)
    assert distillation_loss(s + 10.0, t, kind="mse", center=False).item() != pytest.approx(base)


def test_mse_ignores_temperature_and_kl_ignores_center():
    mse = distillation_loss(STUDENT, TEACHER, MASK, "mse")
    assert distillation_loss(STUDENT, TEACHER, MASK, "mse", temperature=3.0).item() == mse.item()
    kl = distillation_loss(STUDENT, TEACHER, MASK, "kl", center=False)
    assert kl.item() == distillation_loss(STUDENT, TEACHER, MASK, "kl").item()


# --- rewards -----------------------------------------------------------------------------------------
def test_reward_cross_entropy_by_hand():
    # rewards [0, ln2, 0] -> q = [1, 2, 1] / 4; student [ln2, 0, 0] -> p = [2, 1, 1] / 4
    # CE = -(1/4 ln(1/2) + 1/2 ln(1/4) + 1/4 ln(1/4)) = (1/4 + 1 + 1/2) ln2 = 7/4 ln2
    s = torch.tensor([[LN2, 0.0, 0.0]])
    assert reward_weighted_softmax_loss(s, torch.tensor([[0.0, LN2, 0.0]])).item() == approx(1.75 * LN2)
    # tau = 2 on rewards [0, 2 ln2, 0] gives the same q.
    r2 = torch.tensor([[0.0, 2 * LN2, 0.0]])
    assert reward_weighted_softmax_loss(s, r2, reward_temperature=2.0).item() == approx(1.75 * LN2)
    # The mean baseline cancels in the softmax.
    assert reward_weighted_softmax_loss(s, r2, None, 2.0, "mean").item() == approx(1.75 * LN2)


def test_reward_cross_entropy_is_kl_plus_entropy():
    g = torch.Generator().manual_seed(2)
    s, r = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    tau = 0.7
    ce = reward_weighted_softmax_loss(s, r, MASK, reward_temperature=tau).item()
    kl = distillation_loss(s, r / tau, MASK, "kl", temperature=1.0).item()
    q = [torch.softmax(r[0] / tau, 0), torch.softmax(r[1, :2] / tau, 0)]
    entropy = sum(-(qi * qi.log()).sum().item() for qi in q) / 2
    assert ce == pytest.approx(kl + entropy, rel=1e-5)


def test_reinforce_mean_baseline_by_hand():
    # student [ln2, 0, 0] -> log p = [-ln2, -ln4, -ln4]; rewards [1, 2, 3] -> A = [-1, 0, 1]
    # l = -(1/3) (-1 * -ln2 + 0 + 1 * -ln4) = -(1/3) (ln2 - 2 ln2) = ln2 / 3
    s = torch.tensor([[LN2, 0.0, 0.0]], requires_grad=True)
    r = torch.tensor([[1.0, 2.0, 3.0]])
    loss = reward_weighted_softmax_loss(s, r, baseline="mean", form="reinforce")
    assert loss.item() == approx(LN2 / 3)
    # sum A = 0, so d l / d s_k = -(1/3) (A_k - p_k sum A) = -A_k / 3 = [1/3, 0, -1/3]
    loss.backward()
    assert s.grad[0].tolist() == pytest.approx([1 / 3, 0.0, -1 / 3], abs=1e-6)


def test_reinforce_without_baseline_by_hand():
    # A = r = [1, 2, 4]: l = -(1/3) (1 * -ln2 + 2 * -ln4 + 4 * -ln4) = (1 + 4 + 8) ln2 / 3 = 13 ln2 / 3
    s = torch.tensor([[LN2, 0.0, 0.0]])
    loss = reward_weighted_softmax_loss(s, torch.tensor([[1.0, 2.0, 4.0]]), form="reinforce")
    assert loss.item() == approx(13 * LN2 / 3)


@pytest.mark.parametrize("baseline", ["none", "mean"])
def test_reinforce_step_moves_mass_to_the_rewarded_candidate(baseline):
    # Rewards [0, 0, 3] with the mean baseline: A = [-1, -1, 2]; one descent step must raise p of the
    # third candidate (the sign of the surrogate), and with no baseline all rewards >= 0 still push
    # the best one up the most.
    s = torch.zeros(1, 3, requires_grad=True)
    r = torch.tensor([[0.0, 0.0, 3.0]])
    reward_weighted_softmax_loss(s, r, baseline=baseline, form="reinforce").backward()
    after = torch.softmax(s.detach() - 0.5 * s.grad, dim=1)[0]
    assert after[2] > 1 / 3 and after[0] < 1 / 3 and after[1] < 1 / 3


def test_reward_cross_entropy_gradient_is_p_minus_q():
    s = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)
    r = torch.tensor([[1.0, 0.0, -1.0]])
    reward_weighted_softmax_loss(s, r, reward_temperature=0.5).backward()
    expected = torch.softmax(s.detach(), 1) - torch.softmax(r / 0.5, 1)
    assert s.grad[0].tolist() == pytest.approx(expected[0].tolist(), abs=1e-6)


# --- masks, weights, reduction, stability (every loss) -----------------------------------------------
@pytest.mark.parametrize("loss_fn", every_loss())
def test_masked_values_change_nothing(loss_fn):
    s, t = STUDENT.clone().requires_grad_(), TEACHER.clone()
    base = loss_fn(s, t, MASK)
    base.backward()
    s2 = STUDENT.clone()
    s2[1, 2], t[1, 2] = float("nan"), float("inf")
    s2.requires_grad_()
    moved = loss_fn(s2, t, MASK)
    moved.backward()
    assert moved.item() == approx(base.item())
    assert torch.equal(s2.grad, s.grad) and s2.grad[1, 2] == 0


@pytest.mark.parametrize("loss_fn", every_loss())
def test_fully_masked_row_is_finite_and_excluded(loss_fn):
    s = torch.tensor([[0.3, -1.0, 2.0], [float("nan"), 1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, -1.0], [5.0, float("-inf"), 0.0]])
    mask = torch.tensor([[True, True, True], [False, False, False]])
    loss = loss_fn(s, t, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and (s.grad[1] == 0).all()
    # The empty row is excluded from the mean, not averaged in as a 0.
    assert loss.item() == approx(loss_fn(s[:1].detach(), t[:1], mask[:1]).item())


@pytest.mark.parametrize("loss_fn", every_loss())
def test_no_contributing_row_gives_attached_zero(loss_fn):
    s = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[False, False, False], [False, False, False]])
    loss = loss_fn(s, torch.randn(2, 3), mask)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (s.grad == 0).all()


@pytest.mark.parametrize("loss_fn", every_loss())
def test_no_contributing_row_gives_attached_zero_in_float16(loss_fn):
    # No valid slot anywhere: the weight sum is 0 and the loss is 0 / floor. The floor 1e-12 is 0 in
    # float16, which made the loss 0 / 0 = NaN (and NaN gradients) instead of the exact 0.
    s = torch.randn(2, 3).half().requires_grad_()
    loss = loss_fn(s, torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.dtype == torch.float16 and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (s.grad == 0).all()


@pytest.mark.parametrize("loss_fn", every_loss())
def test_row_weights(loss_fn):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    l0, l1 = loss_fn(s[:1], t[:1], MASK[:1]).item(), loss_fn(s[1:], t[1:], MASK[1:]).item()
    w = torch.tensor([1.0, 3.0])
    assert loss_fn(s, t, MASK, w).item() == approx((1 * l0 + 3 * l1) / 4)
    # A row with a single valid candidate is excluded whatever its weight (kl/ce/reinforce: it carries no
    # information; mse-raw still counts it, being pointwise).
    one = torch.tensor([[True, True, True], [True, False, False]])
    solo = loss_fn(s[1:], t[1:], one[1:]).item()
    counted = loss_fn(s, t, one, torch.tensor([1.0, 5.0])).item()
    assert counted == approx((l0 + 5 * solo) / 6 if solo else l0)


@pytest.mark.parametrize("loss_fn", every_loss())
def test_teacher_is_detached_and_large_logits_stay_finite(loss_fn):
    s = (torch.tensor([[1.0, -1.0, 0.5], [-0.3, 0.2, 0.0]]) * 1e4).requires_grad_()
    t = (torch.tensor([[-1.0, 1.0, 0.0], [0.4, -0.2, 0.1]]) * 1e4).requires_grad_()
    loss = loss_fn(s, t, None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and t.grad is None


# --- validation -------------------------------------------------------------------------------------
def test_argument_errors():
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"float \[B, M\]"):
        distillation_loss(torch.zeros(6), torch.zeros(6))
    with pytest.raises(TypeError, match="bool"):
        distillation_loss(STUDENT, TEACHER, MASK.float())
    with pytest.raises(ValueError, match="mask has shape"):
        distillation_loss(STUDENT, TEACHER, MASK[:, :2])
    with pytest.raises(ValueError, match="weight must be"):
        distillation_loss(STUDENT, TEACHER, weight=torch.ones(3))
    with pytest.raises(ValueError, match="kind"):
        distillation_loss(STUDENT, TEACHER, kind="kld")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            distillation_loss(STUDENT, TEACHER, temperature=bad)
    with pytest.raises(ValueError, match="rewards has shape"):
        reward_weighted_softmax_loss(STUDENT, TEACHER[:1])
    with pytest.raises(ValueError, match="form"):
        reward_weighted_softmax_loss(STUDENT, TEACHER, form="ppo")
    with pytest.raises(ValueError, match="baseline"):
        reward_weighted_softmax_loss(STUDENT, TEACHER, baseline="median")
    with pytest.raises(ValueError, match="reward_temperature"):
        reward_weighted_softmax_loss(STUDENT, TEACHER, reward_temperature=0.0)


def test_config_validation():
    with pytest.raises(ValidationError, match="distil_weight"):
        AlignmentConfig.model_validate({"distil_weight": 1.0})
    for bad in ({"distill_weight": -1}, {"distill_kind": "l2"}, {"reward_temperature": 0},
                {"reward_form": "ppo"}, {"reward_weight": float("inf")}):  # fmt: skip
        with pytest.raises(ValidationError):
            AlignmentConfig.model_validate(bad)
    assert not AlignmentConfig().enabled and AlignmentConfig(reward_weight=0.1).enabled


# --- the combined loss ------------------------------------------------------------------------------
def test_alignment_loss_is_the_weighted_sum():
    config = AlignmentConfig(
        distill_weight=0.5, distill_temperature=2.0, reward_weight=3.0, reward_temperature=0.5,
        reward_form="reinforce", reward_baseline="mean",
    )  # fmt: skip
    w = torch.tensor([2.0, 1.0])
    distill = distillation_loss(STUDENT, TEACHER, MASK, "kl", 2.0, w)
    reward = reward_weighted_softmax_loss(STUDENT, TEACHER, MASK, 0.5, "mean", "reinforce", w)
    total = alignment_loss(STUDENT, TEACHER, MASK, config, w)
    assert total.item() == approx(0.5 * distill.item() + 3.0 * reward.item())
    terms = alignment_terms(STUDENT, TEACHER, MASK, config, w)
    assert set(terms) == {"distill", "reward"} and terms["distill"].item() == approx(distill.item())
    only = alignment_loss(STUDENT, TEACHER, MASK, AlignmentConfig(distill_weight=2.0, distill_kind="mse"))
    assert only.item() == approx(2.0 * distillation_loss(STUDENT, TEACHER, MASK, "mse").item())


def test_alignment_loss_disabled_is_an_attached_zero():
    s = STUDENT.clone()
    s[1, 2] = float("nan")  # padding garbage must not turn the zero into NaN
    s.requires_grad_()
    loss = alignment_loss(s, TEACHER, MASK, AlignmentConfig())
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert s.grad is not None and (s.grad == 0).all()
    with pytest.raises(ValueError, match="teacher_logits has shape"):  # wiring checked even when off
        alignment_loss(STUDENT, TEACHER[:, :2], None, AlignmentConfig())


# --- training ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_gradient_descent_learns_the_teachers_order(kind):
    teacher = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0], [0.1, 0.4, -0.3, 0.2, 9.0, 9.0]])
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # row 1 has 4 candidates and padding that outranks them all
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 6, generator=g).requires_grad_()
    opt = torch.optim.SGD([s], lr=2.0)
    for _ in range(300):
        opt.zero_grad()
        distillation_loss(s, teacher, mask, kind, temperature=1.0).backward()
        opt.step()
    assert s.detach()[0].argsort().tolist() == teacher[0].argsort().tolist()
    assert s.detach()[1, :4].argsort().tolist() == teacher[1, :4].argsort().tolist()
    assert distillation_loss(s, teacher, mask, kind).item() < 1e-4
