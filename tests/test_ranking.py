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
    model = DebiasedRanker(2, 0, 3, {"device": 2}, RankerConfig(combination="additive", bias_dropout=0.5))
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
