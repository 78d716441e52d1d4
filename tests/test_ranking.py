import math

import pytest
import torch
from torch import nn

from twotower.ranking import BiasTower, DebiasedRanker, RankerConfig


class _Fixed(nn.Module):
    """A stand-in bias tower that returns given logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, position, context):
        return self.logits


def _ranker(**config) -> DebiasedRanker:
    """Relevance tower = identity on feature 0 (no hidden layer, no item embedding)."""
    cfg = RankerConfig(layers=[], dropout=0.0, item_embedding_dim=0, **config)
    model = DebiasedRanker(num_features=2, num_items=0, num_positions=3, context={"device": 2}, config=cfg)
    lin = model.relevance.mlp[0]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0]]))
        lin.bias.zero_()
    return model


def _batch(r: list[float], clicks: list[float]) -> dict[str, torch.Tensor]:
    n = len(r)
    return {
        "features": torch.tensor([[[x, 0.0] for x in r]]),
        "position": torch.arange(1, n + 1).unsqueeze(0),
        "device": torch.tensor([0]),
        "mask": torch.ones(1, n, dtype=torch.bool),
        "clicks": torch.tensor([clicks]),
    }


def test_pal_and_additive_probabilities_by_hand():
    ln3 = math.log(3.0)
    batch = _batch([0.0, ln3, ln3], [1.0, 0.0, 1.0])
    pal = _ranker(combination="pal")
    pal.bias = _Fixed(torch.tensor([[0.0, 0.0, -ln3]])).eval()
    pal.eval()
    # sigmoid(0) * sigmoid(0) = .25; sigmoid(ln 3) = .75, * .5 = .375; .75 * sigmoid(-ln 3) = .75 * .25.
    assert pal.click_probability(batch)[0].tolist() == pytest.approx([0.25, 0.375, 0.1875])
    additive = _ranker(combination="additive")
    additive.bias = _Fixed(torch.tensor([[0.0, 0.0, -ln3]])).eval()
    additive.eval()
    # sigmoid(0) = .5; sigmoid(ln 3) = .75; sigmoid(ln 3 - ln 3) = .5.
    assert additive.click_probability(batch)[0].tolist() == pytest.approx([0.5, 0.75, 0.5])
    # Click BCE, averaged over the 3 slots: -(ln .25 + ln(1 - .375) + ln .1875) / 3.
    expected = -(math.log(0.25) + math.log(0.625) + math.log(0.1875)) / 3
    assert pal.compute_loss(batch).item() == pytest.approx(expected, rel=1e-5)
    none = _ranker(combination="none")
    assert none.click_probability(batch)[0].tolist() == pytest.approx([0.5, 0.75, 0.75])


def test_ipw_and_oracle_losses_by_hand():
    batch = _batch([0.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    batch["propensity"] = torch.tensor([[1.0, 0.5, 0.25]])
    batch["target"] = torch.tensor([[0.25, 1.0, 0.0]])
    batch["mask"] = torch.tensor([[True, True, False]])  # the third slot is empty
    ipw = _ranker(loss="ipw")
    # softmax over the two filled slots: each 1/2; the click has weight 1 / .5 = 2: loss 2 ln 2 per session.
    assert ipw.compute_loss(batch).item() == pytest.approx(2 * math.log(2.0))
    oracle = _ranker(loss="oracle")
    # BCE(logit 0, .25) = BCE(logit 0, 1) = ln 2 for any target at logit 0: mean ln 2.
    assert oracle.compute_loss(batch).item() == pytest.approx(math.log(2.0))


def test_bias_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    config = RankerConfig(combination="additive")
    assert (config.position_dropout, config.bias_dropout) == (0.1, 0.5)  # the defaults are on
    model = DebiasedRanker(2, 0, 3, {"device": 2}, config)
    n = 4000
    batch = {
        "features": torch.randn(n, 3, 2),
        "position": torch.arange(1, 4).expand(n, 3),
        "device": torch.randint(0, 2, (n,)),
    }
    with torch.no_grad():
        for p in model.bias.parameters():
            p.add_(0.5)  # no bias logit is exactly 0 on its own
        model.train()
        zeroed = (model.bias_logit(batch) == 0).all(dim=1).float()
        assert zeroed.mean().item() == pytest.approx(0.5, abs=0.04)  # whole sessions are dropped
        model.eval()
        assert (model.bias_logit(batch) != 0).all()


def test_position_dropout_hides_positions_in_training_only():
    torch.manual_seed(1)
    tower = BiasTower(5, {"device": 2}, RankerConfig(position_dropout=0.1))
    n = 20_000
    position = torch.full((n, 1), 3)
    device = {"device": torch.zeros(n, dtype=torch.long)}
    unknown = tower.eval()(torch.zeros(1, 1, dtype=torch.long), {"device": torch.zeros(1, dtype=torch.long)})
    with torch.no_grad():
        tower.train()
        hidden = torch.isclose(tower(position, device), unknown.expand(n, 1)).float().mean().item()
        assert hidden == pytest.approx(0.1, abs=0.01)
        tower.eval()
        assert not torch.isclose(tower(position, device), unknown.expand(n, 1)).any()


def test_inference_needs_no_position_or_bias_features():
    model = DebiasedRanker(4, 10, 5, {"device": 2}, RankerConfig(combination="pal")).eval()
    features, item = torch.randn(7, 4), torch.randint(0, 10, (7,))
    scores = model.score(features, item)
    assert scores.shape == (7,)
    assert torch.equal(scores, model.score(features, item))  # eval: deterministic
    with pytest.raises(ValueError, match="pass `item`"):
        model.score(features)


def test_position_feature_baseline_scores_at_its_inference_position():
    model = DebiasedRanker(
        3, 0, 4, {"device": 2}, RankerConfig(combination="none", position_feature=True, item_embedding_dim=0)
    ).eval()
    features = torch.randn(2, 4, 3)
    at_one = model.relevance_logit({"features": features}, torch.ones(2, 4, dtype=torch.long))
    assert torch.allclose(model.score(features), at_one)
    at_four = model.relevance_logit({"features": features}, torch.full((2, 4), 4))
    assert not torch.allclose(at_one, at_four)
    with pytest.raises(ValueError, match="no bias tower"):
        model.bias_logit({"position": torch.ones(1, 4, dtype=torch.long)})


def test_gradient_reversal_is_identity_forward_and_negated_scaled_backward():
    from twotower.ranking import gradient_reversal

    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = gradient_reversal(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [-0.5, -1.0, -1.5]


def test_adversary_loss_and_its_gradients_by_hand():
    """Adversary guess = 2 relu(b) + .5; loss = BCE + mean (guess - r)^2; the bias gets -lambda * d/db."""
    ln3 = math.log(3.0)
    batch = _batch([0.0, ln3, 1.0], [1.0, 0.0, 1.0])
    batch["mask"] = torch.tensor([[True, True, False]])
    model = _ranker(combination="additive", adversarial=0.25, adversary_hidden=1)
    b = torch.tensor([[0.0, -ln3, 1.0]], requires_grad=True)
    model.bias = _Fixed(b)
    first, second = model.adversary[0], model.adversary[2]
    with torch.no_grad():
        first.weight.fill_(1.0), first.bias.zero_(), second.weight.fill_(2.0), second.bias.fill_(0.5)
    model.eval()  # no dropout anywhere; the loss is the same function in train mode here
    # Slot 1: guess .5, r 0 -> .25; slot 2: relu(-ln 3) = 0, guess .5, r ln 3 -> (.5 - ln 3)^2; slot 3 masked.
    adv = (0.25 + (0.5 - ln3) ** 2) / 2
    # Clicks: sigmoid(0 + 0) = .5 clicked; sigmoid(ln 3 - ln 3) = .5 not clicked: ln 2 each.
    assert model.compute_loss(batch).item() == pytest.approx(math.log(2.0) + adv, rel=1e-6)
    model.compute_loss(batch).backward()
    # d BCE / d b = (p - c) / 2: -.25 (slot 1), .25 (slot 2), 0 (masked slot 3). The adversary adds
    # nothing here: relu'(b) = 0 at b = 0 (torch's convention) and at b = -ln 3.
    assert b.grad[0].tolist() == pytest.approx([-0.25, 0.25, 0.0])
    # The adversary itself descends its loss: d adv / d second.bias = mean 2 (guess - r) over the 2 slots.
    assert second.bias.grad.item() == pytest.approx((2 * 0.5 + 2 * (0.5 - ln3)) / 2)
    # The relevance tower gets no gradient from the adversary (r is detached there): only the BCE's.
    lin = model.relevance.mlp[0]
    assert lin.weight.grad[0, 0].item() == pytest.approx((-0.5 * 0.0 + 0.5 * ln3) / 2)


def test_adversary_reverses_into_the_bias_tower():
    """With b > 0 the adversary's gradient reaches the bias logit negated and scaled by lambda."""
    batch = _batch([0.0, 0.0], [0.0, 0.0])
    model = _ranker(combination="additive", adversarial=0.25, adversary_hidden=1)
    b = torch.tensor([[1.0, 2.0]], requires_grad=True)
    model.bias = _Fixed(b)
    first, second = model.adversary[0], model.adversary[2]
    with torch.no_grad():
        first.weight.fill_(1.0), first.bias.zero_(), second.weight.fill_(2.0), second.bias.zero_()
    model.eval()
    model.compute_loss(batch).backward()
    # guess = 2 b, r = 0: adv = mean (2 b)^2, d adv / d b = 8 b / 2 = 4 b -> reversed: -.25 * 4 b = -b.
    # BCE: d/db = sigmoid(b) / 2 (no clicks).
    sig = torch.sigmoid(torch.tensor([1.0, 2.0]))
    assert b.grad[0].tolist() == pytest.approx((sig / 2 - torch.tensor([1.0, 2.0])).tolist(), rel=1e-5)
    with pytest.raises(ValueError, match="needs a bias tower"):
        _ranker(combination="none", adversarial=1.0)


def test_linear_adversary_is_the_squared_correlation_by_hand():
    """r = (0, 1, 2), b = (1, 0, 2): centred (-1, 0, 1), (0, -1, 1); cov 1/3, variances 2/3: corr^2 1/4."""
    batch = _batch([0.0, 1.0, 2.0, 5.0], [0.0, 0.0, 0.0, 0.0])
    batch["mask"] = torch.tensor([[True, True, True, False]])  # the 4th slot must not count
    model = _ranker(combination="pal", adversarial=2.0, adversary="linear")
    assert model.adversary is None  # nothing to train: the best linear adversary is closed-form
    b = torch.tensor([[1.0, 0.0, 2.0, -7.0]], requires_grad=True)
    model.bias = _Fixed(b)
    model.eval()
    r = model.relevance_logit(batch)
    penalty = model.adversary_loss(r, b, batch["mask"])
    assert penalty.item() == pytest.approx(2.0 * 0.25)
    penalty.backward()
    assert model.relevance.mlp[0].weight.grad is None  # r is detached: only the bias is pushed
    assert b.grad[0, 3].item() == 0.0 and b.grad[0, :3].abs().sum() > 0
    # In the training loss it is added to the click BCE.
    bce = model.compute_loss(batch).item() - penalty.item()
    model.config = model.config.model_copy(update={"adversarial": 0.0})
    assert model.compute_loss(batch).item() == pytest.approx(bce, rel=1e-6)


@pytest.mark.parametrize("combination", ["pal", "additive"])
def test_fit_bias_recovers_planted_examination_logits_exactly(combination):
    """Click rates made from fixed relevance logits and known per-(position, device) bias logits: the
    exact fit gives those bias logits back (the bias tower can represent any such table), moves only
    the bias tower, and refuses a ranker without one."""
    torch.manual_seed(0)
    model = _ranker(combination=combination)
    sessions, n = 400, 3
    r = torch.randn(sessions, n)
    device = torch.randint(0, 2, (sessions,))
    planted = torch.tensor([[1.0, -0.3, -1.2], [0.4, -1.0, -2.0]])  # [device, position] logits
    beta = planted[device]
    rates = torch.sigmoid(r) * torch.sigmoid(beta) if combination == "pal" else torch.sigmoid(r + beta)
    mask = torch.ones(sessions, n, dtype=torch.bool)
    mask[::7, 2] = False  # a few empty slots: they must not count
    rates = rates.masked_fill(~mask, 0.0)
    batch = {"position": torch.arange(1, n + 1).expand(sessions, n), "device": device, "mask": mask}
    relevance = {k: v.clone() for k, v in model.relevance.state_dict().items()}
    model.fit_bias(r, batch, rates)
    with torch.no_grad():
        learned = model.bias(torch.arange(1, n + 1).unsqueeze(0).expand(2, n), {"device": torch.arange(2)})
    # float32 likelihoods are flat near the optimum: compare probabilities, to 5e-4
    torch.testing.assert_close(torch.sigmoid(learned), torch.sigmoid(planted), atol=5e-4, rtol=0)
    for k, v in model.relevance.state_dict().items():
        assert torch.equal(v, relevance[k])
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="no bias tower"):
        _ranker(combination="none").fit_bias(r, batch, rates)


def test_pal_no_click_likelihood_is_exact_and_has_gradients_where_p_rounds_to_1():
    """r = b = 20: p = sigmoid(20)^2 is 1 in float32, but 1 - p = sigmoid(-20) (1 + sigmoid(20)) ~ 2 e^-20
    and d(-log(1 - p)) / dr = sigmoid(20)^2 / (1 + sigmoid(20)) ~ 1/2 (same for b): an unclicked slot the
    model is sure of must still be pushed down. (The old log1p(-exp(log p)) clamped p: -13.8, no gradient.)"""
    s, s_neg = 1.0 / (1.0 + math.exp(-20.0)), 1.0 / (1.0 + math.exp(20.0))
    model = _ranker(combination="pal")
    r = torch.tensor([20.0, 10.0], requires_grad=True)
    b = torch.tensor([20.0, 10.0], requires_grad=True)
    log_p, log_not = model.combine(r, b)
    assert log_p[0].item() == pytest.approx(2 * math.log(s), abs=1e-7)
    assert log_not[0].item() == pytest.approx(math.log(s_neg * (1.0 + s)), rel=1e-6)
    # p = sigmoid(10)^2: 1 - p = 2 e^-10 - e^-20 + ...; log1p(-exp) in float32 was off by 1.7e-4 here.
    s10 = 1.0 / (1.0 + math.exp(-10.0))
    assert log_not[1].item() == pytest.approx(math.log1p(-s10 * s10), rel=1e-6)
    (-log_not[0]).backward()
    assert r.grad[0].item() == pytest.approx(s * s / (1.0 + s), rel=1e-5)
    assert b.grad[0].item() == pytest.approx(s * s / (1.0 + s), rel=1e-5)


def test_position_feature_inference_position_is_made_on_the_features_device():
    """score() builds the fixed inference position itself: on the features' device, not always the CPU."""
    cfg = RankerConfig(combination="none", position_feature=True, item_embedding_dim=0)
    model = DebiasedRanker(3, 0, 4, {"device": 2}, cfg).to("meta").eval()
    assert model.score(torch.empty(2, 4, 3, device="meta")).shape == (2, 4)
