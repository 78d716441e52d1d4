import math

import pytest
import torch

from twotower.losses import (
    LOSSES,
    get_loss,
    listwise_softmax,
    pointwise_bce,
    pointwise_cosine_mse,
    triplet_hinge,
    triplet_logistic,
)

# B = 2 anchors, N = 2 negatives each.
POS = torch.tensor([0.8, 0.1])
NEG = torch.tensor([[0.5, -0.2], [0.3, 0.1]])


def sp(x: float) -> float:
    """softplus by hand: log(1 + e^x)."""
    return math.log(1 + math.exp(x))


def approx(x: float):
    return pytest.approx(x, rel=1e-5, abs=1e-7)


# Every loss with the parameters it needs, for the generic mask / weight / gradient tests.
ALL = [
    pytest.param(pointwise_bce, {}, id="bce"),
    pytest.param(pointwise_bce, {"scale": 5.0, "bias": -1.0}, id="bce-scaled"),
    pytest.param(pointwise_cosine_mse, {}, id="mse"),
    pytest.param(triplet_hinge, {"margin": 0.3}, id="hinge"),
    pytest.param(triplet_logistic, {"sigma": 2.0}, id="logistic"),
    pytest.param(listwise_softmax, {}, id="softmax"),
]


def test_pointwise_bce_by_hand():
    # BCE(z, 1) = log(1 + e^-z), BCE(z, 0) = log(1 + e^z); negatives summed (pos:neg = 1:2).
    row0 = sp(-0.8) + sp(0.5) + sp(-0.2)
    row1 = sp(-0.1) + sp(0.3) + sp(0.1)
    assert pointwise_bce(POS, NEG).item() == approx((row0 + row1) / 2)


def test_pointwise_bce_scale_and_bias_by_hand():
    # z = 10 s - 5
    row0 = sp(-(10 * 0.8 - 5)) + sp(10 * 0.5 - 5) + sp(10 * -0.2 - 5)
    row1 = sp(-(10 * 0.1 - 5)) + sp(10 * 0.3 - 5) + sp(10 * 0.1 - 5)
    assert pointwise_bce(POS, NEG, scale=10.0, bias=-5.0).item() == approx((row0 + row1) / 2)


def test_pointwise_bce_matches_torch_bce_with_logits():
    logits = torch.cat([POS, NEG.flatten()])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    total = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
    assert pointwise_bce(POS, NEG).item() == approx(total.item() / 2)


def test_pointwise_cosine_mse_by_hand():
    row0 = (0.8 - 1) ** 2 + (0.5 + 1) ** 2 + (-0.2 + 1) ** 2
    row1 = (0.1 - 1) ** 2 + (0.3 + 1) ** 2 + (0.1 + 1) ** 2
    assert pointwise_cosine_mse(POS, NEG).item() == approx((row0 + row1) / 2)
    assert LOSSES["pointwise_mse"] is pointwise_cosine_mse


def test_triplet_hinge_by_hand():
    m = 0.4
    row0 = (max(0, 0.5 + m - 0.8) + max(0, -0.2 + m - 0.8)) / 2  # (0.1 + 0) / 2
    row1 = (max(0, 0.3 + m - 0.1) + max(0, 0.1 + m - 0.1)) / 2  # (0.6 + 0.4) / 2
    assert triplet_hinge(POS, NEG, m).item() == approx((row0 + row1) / 2)


def test_triplet_hinge_margin_behaviour():
    pos = torch.tensor([1.0])
    m = 0.5
    # Exactly representable scores, so s+ - s- = m holds exactly.
    assert triplet_hinge(pos, torch.tensor([[0.25]]), m).item() == 0.0  # s+ - s- = 0.75 > m
    assert triplet_hinge(pos, torch.tensor([[0.5]]), m).item() == 0.0  # boundary: s+ - s- = m
    # Inside the margin the loss is linear in s-, with slope 1.
    inside = [triplet_hinge(pos, torch.tensor([[s]]), m).item() for s in (0.625, 0.75, 0.875)]
    assert inside == [approx(0.625 + m - 1.0), approx(0.75 + m - 1.0), approx(0.875 + m - 1.0)]
    neg = torch.tensor([[0.75]], requires_grad=True)
    pos_g = pos.clone().requires_grad_()
    triplet_hinge(pos_g, neg, m).backward()
    assert neg.grad.item() == 1.0 and pos_g.grad.item() == -1.0


def test_triplet_hinge_averages_over_negatives():
    # Same per-triplet value repeated: the mean does not grow with N.
    pos = torch.tensor([1.0])
    one = triplet_hinge(pos, torch.tensor([[0.75]]), 0.5)
    three = triplet_hinge(pos, torch.tensor([[0.75, 0.75, 0.75]]), 0.5)
    assert one.item() == approx(three.item())


def test_triplet_logistic_by_hand():
    sigma = 2.0
    row0 = (sp(sigma * (0.5 - 0.8)) + sp(sigma * (-0.2 - 0.8))) / 2
    row1 = (sp(sigma * (0.3 - 0.1)) + sp(sigma * (0.1 - 0.1))) / 2
    assert triplet_logistic(POS, NEG, sigma=sigma).item() == approx((row0 + row1) / 2)


def test_triplet_logistic_sigma_one_is_bpr():
    def log_sigmoid(x: float) -> float:
        return math.log(1 / (1 + math.exp(-x)))

    bpr0 = (-log_sigmoid(0.8 - 0.5) - log_sigmoid(0.8 - -0.2)) / 2
    bpr1 = (-log_sigmoid(0.1 - 0.3) - log_sigmoid(0.1 - 0.1)) / 2
    assert triplet_logistic(POS, NEG).item() == approx((bpr0 + bpr1) / 2)
    assert LOSSES["logistic"] is triplet_logistic


def test_listwise_softmax_by_hand():
    row0 = -math.log(math.exp(0.8) / (math.exp(0.8) + math.exp(0.5) + math.exp(-0.2)))
    row1 = -math.log(math.exp(0.1) / (math.exp(0.1) + math.exp(0.3) + math.exp(0.1)))
    assert listwise_softmax(POS, NEG).item() == approx((row0 + row1) / 2)


def test_listwise_softmax_logq_by_hand():
    q_pos = torch.tensor([0.5, 0.25])
    q_neg = torch.tensor([[0.125, 0.25], [0.5, 0.125]])
    z0 = [0.8 - math.log(0.5), 0.5 - math.log(0.125), -0.2 - math.log(0.25)]
    z1 = [0.1 - math.log(0.25), 0.3 - math.log(0.5), 0.1 - math.log(0.125)]
    row0 = -math.log(math.exp(z0[0]) / sum(math.exp(z) for z in z0))
    row1 = -math.log(math.exp(z1[0]) / sum(math.exp(z) for z in z1))
    loss = listwise_softmax(POS, NEG, log_q_pos=q_pos.log(), log_q_neg=q_neg.log())
    assert loss.item() == approx((row0 + row1) / 2)


def test_listwise_softmax_logq_shared_negatives_broadcast():
    log_q = torch.tensor([-1.0, -2.0])  # [N], the same negatives for every anchor
    shared = listwise_softmax(POS, NEG, log_q_neg=log_q)
    assert shared.item() == approx(listwise_softmax(POS, NEG, log_q_neg=log_q.expand(2, 2)).item())


@pytest.mark.parametrize(("loss", "kw"), ALL)
def test_masked_negative_equals_removing_it(loss, kw):
    # Anchor 0 has negatives [0.5, 9.0, -0.2] with the 9.0 (an accidental hit) masked out; anchor 1 has
    # [0.3, 0.1, 7.0] with the 7.0 masked: same as passing NEG without those columns.
    neg = torch.tensor([[0.5, 9.0, -0.2], [0.3, 0.1, 7.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    masked = loss(POS, neg, neg_mask=mask, **kw)
    removed = loss(POS, NEG, **kw)
    assert masked.item() == approx(removed.item())
    masked.backward()
    assert neg.grad[0, 1].item() == 0.0 and neg.grad[1, 2].item() == 0.0


@pytest.mark.parametrize(("loss", "kw"), ALL)
def test_garbage_in_masked_slot_is_ignored(loss, kw):
    # A padded slot may hold anything (inf, nan): it must not leak into the value or the gradients.
    neg = torch.tensor([[0.5, float("nan"), -0.2], [0.3, 0.1, float("inf")]], requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    value = loss(POS, neg, neg_mask=mask, **kw)
    value.backward()
    assert value.item() == approx(loss(POS, NEG, **kw).item())
    assert torch.isfinite(neg.grad).all()


@pytest.mark.parametrize(("loss", "kw"), ALL)
def test_all_negatives_masked_gives_no_nan(loss, kw):
    pos = torch.tensor([0.8, 0.1], requires_grad=True)
    neg = torch.tensor([[0.5, -0.2], [0.3, 0.1]], requires_grad=True)
    mask = torch.tensor([[False, False], [True, True]])
    value = loss(pos, neg, neg_mask=mask, **kw)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(pos.grad).all() and torch.isfinite(neg.grad).all()
    assert (neg.grad[0] == 0).all()
    # Anchor 0 keeps only the terms that do not involve a negative; the mean still counts it.
    only_anchor1 = loss(POS[1:], NEG[1:], **kw).item()
    if loss in (pointwise_bce, pointwise_cosine_mse):
        s, b = kw.get("scale", 1.0), kw.get("bias", 0.0)
        pos_term = sp(-(s * 0.8 + b)) if loss is pointwise_bce else (0.8 - 1) ** 2
        assert value.item() == approx((pos_term + only_anchor1) / 2)
    else:
        assert value.item() == approx((0.0 + only_anchor1) / 2)
        assert pos.grad[0].item() == 0.0


@pytest.mark.parametrize(("loss", "kw"), ALL)
def test_every_negative_masked_is_zero_for_pairwise_and_listwise(loss, kw):
    mask = torch.zeros(2, 2, dtype=torch.bool)
    value = loss(POS, NEG, neg_mask=mask, **kw).item()
    if loss is pointwise_bce:
        s, b = kw.get("scale", 1.0), kw.get("bias", 0.0)
        assert value == approx((sp(-(s * 0.8 + b)) + sp(-(s * 0.1 + b))) / 2)
    elif loss is pointwise_cosine_mse:
        assert value == approx(((0.8 - 1) ** 2 + (0.1 - 1) ** 2) / 2)
    else:
        assert value == 0.0


def test_weights_by_hand():
    w = torch.tensor([3.0, 1.0])
    row0 = -math.log(math.exp(0.8) / (math.exp(0.8) + math.exp(0.5) + math.exp(-0.2)))
    row1 = -math.log(math.exp(0.1) / (math.exp(0.1) + math.exp(0.3) + math.exp(0.1)))
    assert listwise_softmax(POS, NEG, weight=w).item() == approx((3 * row0 + 1 * row1) / (3 + 1))
    m = 0.4
    h0, h1 = (0.1 + 0) / 2, (0.6 + 0.4) / 2
    assert triplet_hinge(POS, NEG, m, weight=w).item() == approx((3 * h0 + 1 * h1) / 4)


@pytest.mark.parametrize(("loss", "kw"), ALL)
def test_all_zero_weights_give_zero_in_float16_as_in_float32(loss, kw):
    # The denominator's floor was 1e-12, which is 0 in float16: 0 / 0 = NaN.
    for dtype in (torch.float32, torch.float16):
        got = loss(POS.to(dtype), NEG.to(dtype), weight=torch.zeros(2, dtype=dtype), **kw)
        assert got.item() == 0.0, dtype


@pytest.mark.parametrize(("loss", "kw"), ALL)
def test_weights_generic(loss, kw):
    per_anchor = [loss(POS[i : i + 1], NEG[i : i + 1], **kw).item() for i in range(2)]
    w = torch.tensor([0.25, 2.0])
    expected = (0.25 * per_anchor[0] + 2.0 * per_anchor[1]) / 2.25
    assert loss(POS, NEG, weight=w, **kw).item() == approx(expected)
    # Unit weights are the plain mean; a zero weight drops the anchor.
    assert loss(POS, NEG, weight=torch.ones(2), **kw).item() == approx(loss(POS, NEG, **kw).item())
    assert loss(POS, NEG, weight=torch.tensor([0.0, 1.0]), **kw).item() == approx(per_anchor[1])


@pytest.mark.parametrize(("loss", "kw"), ALL)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradients_finite_for_extreme_scores(loss, kw, sign):
    pos = torch.tensor([sign * 1e4, -sign * 1e4], requires_grad=True)
    neg = torch.tensor([[-sign * 1e4, sign * 1e4], [sign * 1e4, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    log_q = {"log_q_pos": torch.tensor([-3.0, -1.0])} if loss is listwise_softmax else {}
    value = loss(pos, neg, neg_mask=mask, weight=torch.tensor([1.0, 2.0]), **kw, **log_q)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(pos.grad).all() and torch.isfinite(neg.grad).all()


def test_extreme_scores_values():
    pos = torch.tensor([1e4])
    neg = torch.tensor([[-1e4]])
    assert triplet_logistic(pos, neg).item() == 0.0  # log(1 + e^-2e4) underflows to 0
    assert triplet_logistic(neg[0], pos[:, None]).item() == approx(2e4)  # log(1 + e^2e4) ~ 2e4
    assert listwise_softmax(neg[0], pos[:, None]).item() == approx(2e4)
    assert pointwise_bce(neg[0], pos[:, None]).item() == approx(1e4 + 1e4)


def test_registry_and_validation():
    assert set(LOSSES) == {"pointwise_bce", "pointwise_mse", "hinge", "logistic", "softmax"}
    assert get_loss("hinge") is triplet_hinge
    assert LOSSES["hinge"](POS, NEG, margin=0.4).item() == approx(triplet_hinge(POS, NEG, 0.4).item())
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("nope")
    with pytest.raises(TypeError, match="bool"):
        listwise_softmax(POS, NEG, neg_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="neg must be"):
        listwise_softmax(POS, NEG[:1])
    with pytest.raises(ValueError, match="weight"):
        listwise_softmax(POS, NEG, weight=torch.ones(3))


def test_triplet_hinge_gradient_is_zero_exactly_at_the_margin():
    # Docstring: the triplet is zero once s+ - s- >= margin, "at the boundary exactly". Exactly
    # representable: 1.0 - 0.5 = 0.5 = margin, so relu(0.5 + 0.5 - 1.0) = relu(0) with gradient 0;
    # just inside (s- = 0.5 + 2^-10) the slopes are +1 for s- and -1 for s+.
    for s_neg, grad_neg in ((0.5, 0.0), (0.5 + 2**-10, 1.0)):
        pos = torch.tensor([1.0], requires_grad=True)
        neg = torch.tensor([[s_neg]], requires_grad=True)
        loss = triplet_hinge(pos, neg, 0.5)
        loss.backward()
        assert loss.item() == approx(s_neg + 0.5 - 1.0)
        assert neg.grad.item() == grad_neg and pos.grad.item() == -grad_neg


def test_listwise_softmax_logq_only_differences_matter_and_the_sign_penalises_popular_items():
    # Q may be any quantity proportional to the sampling probability: adding log c to every log Q
    # (positive and negatives alike) leaves the loss unchanged.
    log_q_pos = torch.tensor([-1.0, -2.0])
    log_q_neg = torch.tensor([[-0.5, -3.0], [-1.5, -1.0]])
    base = listwise_softmax(POS, NEG, log_q_pos=log_q_pos, log_q_neg=log_q_neg)
    shifted = listwise_softmax(POS, NEG, log_q_pos=log_q_pos + 7.0, log_q_neg=log_q_neg + 7.0)
    assert shifted.item() == approx(base.item())
    # Sign (Yi et al. 2019, s_c = s - log p): one anchor, pos 0, one negative 0. A positive sampled
    # with Q = 1/2 and a negative with Q = 1/8: z+ = 0 - log(1/2) = log 2, z- = log 8;
    # l = log(2 + 8) - log 2 = log 5. The reversed sign would give log((1/2 + 1/8) / (1/2)) = log 1.25.
    one = listwise_softmax(
        torch.zeros(1),
        torch.zeros(1, 1),
        log_q_pos=torch.tensor([math.log(1 / 2)]),
        log_q_neg=torch.tensor([[math.log(1 / 8)]]),
    )
    assert one.item() == approx(math.log(5))


def test_mixed_negative_logits_use_the_mixture_probability_for_the_uniform_part():
    # Mixed negatives (Yang et al. 2020): B = 2 in-batch candidates drawn with p_batch = (3/4, 1/4, 0, 0)
    # and B' = 2 uniform candidates over I = 4 items; q(y) = (B p_batch(y) + B' / I) / (B + B').
    #   item 0: (2 * 3/4 + 2/4) / 4 = 1/2;   item 1: (2 * 1/4 + 2/4) / 4 = 1/4;
    #   items 2, 3 (uniform part only): (0 + 2/4) / 4 = 1/8.
    from twotower.negatives import MixedSampler, UniformSampler

    class Exact:  # p_batch as given, log 0 = -inf for the items never in a batch
        def log_probability(self, ids):
            return torch.tensor([0.75, 0.25, 0.0, 0.0], dtype=torch.float64)[ids].log()

    log_q = MixedSampler(UniformSampler(4), 2, Exact()).log_probability(torch.arange(4), batch_size=2)
    assert log_q.exp().tolist() == approx([1 / 2, 1 / 4, 1 / 8, 1 / 8])
    # Anchor with positive item 0 and negatives 1, 2, 3, all scores 0, so z = -log q:
    #   z+ = log 2, z- = log 4, log 8, log 8; l = log(2 + 4 + 8 + 8) - log 2 = log 11.
    loss = listwise_softmax(torch.zeros(1), torch.zeros(1, 3), log_q_pos=log_q[:1], log_q_neg=log_q[1:])
    assert loss.item() == approx(math.log(11))
