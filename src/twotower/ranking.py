"""Debiased ranking: a deep relevance tower and a shallow bias tower, trained together on clicks.

Batches are ``dict[str, Tensor]`` over sessions of ``N`` shown slots:

    features [B, N, F] float   item [B, N] long (catalogue index, optional)   mask [B, N] bool
    position [B, N] long (1-based rank as shown)   <context> [B] long (e.g. device)
    clicks [B, N] float        propensity [B, N] float (IPW)   target [B, N] float (oracle)

* :class:`RelevanceTower` - an MLP over the query-document features (plus an item id embedding when
  the data has a catalogue): the relevance logit ``r``. It is the only part run at inference, and it
  takes no position.
* :class:`BiasTower` - shallow: embeddings of the position, of every bias-context feature and of each
  position x context cross, concatenated and mapped linearly to the bias logit ``b``.
  ``position_dropout`` replaces the position by an "unknown" index (0) for a share of slots in training,
  so the tower also learns a position-free fallback and leans less on position alone.
* :class:`DebiasedRanker` combines them:

      pal        p(click) = sigmoid(r) * sigmoid(b)          (p(seen | bias) * p(click | seen, x))
      additive   p(click) = sigmoid(r + b)                   (YouTube "Watch Next")
      none       p(click) = sigmoid(r)                       (baselines: no bias tower)

  ``bias_dropout`` zeroes the whole bias logit of a share of sessions in training (Zhang et al. 2023):
  those sessions must be explained by relevance alone, which keeps the bias tower from absorbing
  relevance when the logging policy is good. Zeroing means ``b = 0`` (so ``sigmoid(b) = 1/2`` under
  PAL); no rescaling, the bias logit is not an activation to be kept unbiased in expectation.
  Both dropouts act only in ``train()`` mode. Their defaults are .1 and .5 (the issue's, after Zhang et
  al.); a run's ranker (``RunRankerConfig``) turns both off: on a log from a ranker over the same
  features they cost nDCG (see the README's "How much bias-logit dropout?").

  ``adversarial`` (Zhang et al. 2023's other remedy) adds an adversary: a small MLP that predicts the
  relevance logit ``r`` (detached) from the bias logit ``b`` of the same slot, by squared error. The
  adversary minimises that error; a gradient-reversal layer between ``b`` and the adversary hands the
  bias tower the negated gradient times ``adversarial``, so the bias tower is trained to make ``b``
  useless for predicting ``r`` - to carry no relevance - while it still fits the clicks with ``r``.
  ``adversary="linear"`` replaces the min-max by its closed form for a linear adversary: the penalty
  ``adversarial * corr(b, r)^2`` over the batch's slots. Caveat (measured, see issue 4): when the shown
  rank is predictable from the relevance features (a logging ranker over the same features), both
  this and bias-logit dropout drive the relevance tower towards the naive click model.

The loss lives in :class:`RankingTask` (one per method): ``clicks`` (BCE of p(click) on the clicks),
``ipw`` (listwise softmax cross-entropy of ``r`` over the shown slots, each click weighted by
1 / propensity, Joachims et al. 2017 / Ai et al. 2018) and ``oracle`` (BCE of sigmoid(r) on the true
p(relevant | y)). ``position_feature`` (the "position as a feature" baseline) feeds a one-hot of the
position to the relevance tower itself, and scores at ``inference_position`` (1) when ranking.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

__all__ = [
    "BiasTower",
    "DebiasedRanker",
    "RankerConfig",
    "RankingTask",
    "RelevanceTower",
    "gradient_reversal",
]


class RankerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    combination: Literal["pal", "additive", "none"] = "additive"
    loss: Literal["clicks", "ipw", "oracle"] = "clicks"
    layers: list[int] = Field(default_factory=lambda: [128, 64], description="relevance MLP hidden sizes")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="relevance MLP dropout")
    item_embedding_dim: int = Field(16, ge=0, description="0: no item id embedding")
    bias_embedding_dim: int = Field(8, ge=1)
    position_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="share of slots with position hidden")
    bias_dropout: float = Field(
        0.5, ge=0.0, lt=1.0, description="share of sessions with the bias logit zeroed (Zhang et al. 2023)"
    )
    adversarial: float = Field(
        0.0, ge=0.0, description="gradient-reversal weight of the bias -> relevance adversary; 0: none"
    )
    adversary: Literal["mlp", "linear"] = Field(
        "mlp",
        description="mlp: a trained adversary behind gradient reversal; linear: the best linear adversary "
        "in closed form, i.e. the penalty adversarial * corr(b, r)^2 over the batch's slots",
    )
    adversary_hidden: int = Field(16, ge=1, description="hidden width of the adversary MLP")
    position_feature: bool = Field(False, description="baseline: position one-hot into the relevance tower")
    inference_position: int = Field(1, ge=1)


class _GradientReversal(torch.autograd.Function):
    """Identity forward; the backward pass multiplies the gradient by ``-scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return -ctx.scale * grad, None


def gradient_reversal(x: Tensor, scale: float) -> Tensor:
    return _GradientReversal.apply(x, scale)


class RelevanceTower(nn.Module):
    def __init__(self, num_features: int, num_items: int, config: RankerConfig, extra_dim: int = 0) -> None:
        super().__init__()
        self.item = (
            nn.Embedding(num_items, config.item_embedding_dim)
            if num_items and config.item_embedding_dim
            else None
        )
        if self.item is not None:
            nn.init.normal_(self.item.weight, std=0.05)
        width = num_features + extra_dim + (config.item_embedding_dim if self.item is not None else 0)
        layers: list[nn.Module] = []
        for size in config.layers:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: Tensor, item: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
        parts = [features]
        if self.item is not None:
            if item is None:
                raise ValueError("this relevance tower has an item embedding; pass `item`")
            parts.append(self.item(item))
        if extra is not None:
            parts.append(extra)
        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)


class BiasTower(nn.Module):
    """Position (1..num_positions, 0 = unknown) and context features -> one bias logit per slot."""

    def __init__(self, num_positions: int, context: dict[str, int], config: RankerConfig) -> None:
        super().__init__()
        dim = config.bias_embedding_dim
        self.num_positions = num_positions
        self.position = nn.Embedding(num_positions + 1, dim)
        self.context = nn.ModuleDict({name: nn.Embedding(card, dim) for name, card in context.items()})
        # One cross table per context feature: index = value * (num_positions + 1) + position.
        self.cross = nn.ModuleDict(
            {name: nn.Embedding(card * (num_positions + 1), dim) for name, card in context.items()}
        )
        self.out = nn.Linear(dim * (1 + 2 * len(context)), 1)
        self.position_dropout = config.position_dropout
        for table in [self.position, *self.context.values(), *self.cross.values()]:
            nn.init.normal_(table.weight, std=0.05)

    def forward(self, position: Tensor, context: dict[str, Tensor]) -> Tensor:
        position = position.clamp(max=self.num_positions)
        if self.training and self.position_dropout:
            hide = torch.rand(position.shape, device=position.device) < self.position_dropout
            position = position.masked_fill(hide, 0)
        parts = [self.position(position)]
        for name, table in self.context.items():
            value = context[name].unsqueeze(-1).expand_as(position)
            parts.append(table(value))
            parts.append(self.cross[name](value * (self.num_positions + 1) + position))
        return self.out(torch.cat(parts, dim=-1)).squeeze(-1)


class DebiasedRanker(nn.Module):
    def __init__(
        self,
        num_features: int,
        num_items: int,
        num_positions: int,
        context: dict[str, int],
        config: RankerConfig,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_positions = num_positions
        self.context_names = list(context)
        extra = num_positions if config.position_feature else 0
        self.relevance = RelevanceTower(num_features, num_items, config, extra_dim=extra)
        self.bias = BiasTower(num_positions, context, config) if config.combination != "none" else None
        self.adversary: nn.Module | None = None
        if config.adversarial > 0 and self.bias is None:
            raise ValueError("the adversary needs a bias tower (combination 'pal' or 'additive')")
        if config.adversarial > 0 and config.adversary == "mlp":
            hidden = config.adversary_hidden
            self.adversary = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.task = RankingTask(config.loss)

    def _position_onehot(self, position: Tensor) -> Tensor:
        return F.one_hot(position.clamp(1, self.num_positions) - 1, self.num_positions).float()

    def relevance_logit(self, batch: dict[str, Tensor], position: Tensor | None = None) -> Tensor:
        """The relevance logit; needs no position (the position-feature baseline falls back to its own)."""
        extra = None
        if self.config.position_feature:
            if position is None:
                features = batch["features"]
                position = torch.full(
                    features.shape[:-1],
                    self.config.inference_position,
                    dtype=torch.long,
                    device=features.device,
                )
            extra = self._position_onehot(position)
        return self.relevance(batch["features"], batch.get("item"), extra)

    def raw_bias_logit(self, batch: dict[str, Tensor]) -> Tensor:
        """The bias tower's logit before bias-logit dropout (position dropout applies in training)."""
        if self.bias is None:
            raise ValueError("this ranker has no bias tower (combination='none')")
        return self.bias(batch["position"], {n: batch[n] for n in self.context_names})

    def _drop_bias(self, logit: Tensor) -> Tensor:
        if self.training and self.config.bias_dropout:
            keep = torch.rand(logit.shape[0], 1, device=logit.device) >= self.config.bias_dropout
            logit = logit * keep
        return logit

    def bias_logit(self, batch: dict[str, Tensor]) -> Tensor:
        return self._drop_bias(self.raw_bias_logit(batch))

    def adversary_loss(self, r: Tensor, raw_bias: Tensor, mask: Tensor) -> Tensor:
        """mlp: masked mean squared error of the adversary's guess of ``r`` from ``b`` (reversed into
        ``b``); linear: ``adversarial * corr(b, r)^2`` over the masked slots, the share of the variance
        of ``r`` that the best linear function of ``b`` explains (``r`` detached in both)."""
        if self.config.adversarial <= 0:
            raise ValueError("this ranker has no adversary (adversarial=0)")
        if self.config.adversary == "linear":
            b, t = raw_bias[mask], r.detach()[mask]
            b, t = b - b.mean(), t - t.mean()
            cov = (b * t).mean()
            return self.config.adversarial * cov**2 / ((b * b).mean() * (t * t).mean()).clamp(min=1e-12)
        assert self.adversary is not None
        guess = self.adversary(gradient_reversal(raw_bias, self.config.adversarial).unsqueeze(-1)).squeeze(-1)
        mask = mask.float()
        return (((guess - r.detach()) ** 2) * mask).sum() / mask.sum().clamp(min=1.0)

    def click_log_probs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(log p(click), log(1 - p(click)))`` of every slot, computed stably."""
        return self._click_log_probs(batch)[0]

    def _click_log_probs(
        self, batch: dict[str, Tensor]
    ) -> tuple[tuple[Tensor, Tensor], Tensor, Tensor | None]:
        """The click log-probabilities, the relevance logit and the bias logit before dropout."""
        r = self.relevance_logit(batch, batch["position"] if self.config.position_feature else None)
        if self.config.combination == "none":
            return (F.logsigmoid(r), F.logsigmoid(-r)), r, None
        raw = self.raw_bias_logit(batch)
        return self.combine(r, self._drop_bias(raw)), r, raw

    def combine(self, r: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``(log p(click), log(1 - p(click)))`` from the relevance and the bias logits."""
        if self.config.combination == "additive":
            return F.logsigmoid(r + b), F.logsigmoid(-(r + b))
        log_p = F.logsigmoid(r) + F.logsigmoid(b)
        # 1 - sigmoid(r) sigmoid(b) = sigmoid(-r) + sigmoid(r) sigmoid(-b): exact (and with gradients) even
        # where p rounds to 1, unlike log1p(-exp(log p)).
        return log_p, torch.logaddexp(F.logsigmoid(-r), F.logsigmoid(r) + F.logsigmoid(-b))

    def click_probability(self, batch: dict[str, Tensor]) -> Tensor:
        return self.click_log_probs(batch)[0].exp()

    def fit_bias(self, r: Tensor, batch: dict[str, Tensor], clicks: Tensor, max_iter: int = 500) -> None:
        """Fit the bias tower alone to the optimum of the click likelihood of ``batch``'s slots (its
        ``position``, context and ``mask``), given their fixed relevance logits ``r``; ``clicks`` may be
        rates in [0, 1] (a rate p counts as p clicks and 1 - p skips).

        Full batch, L-BFGS with a strong-Wolfe line search: the bias tower has a few hundred
        parameters, so this reaches the optimum that minibatch training only hovers around. The tower
        runs once per step on the distinct (position, context) cells, not per slot, so a log of
        millions of slots costs a few [slots] vectors. It runs in eval mode (no position dropout;
        the "unknown position" embedding is left as it is)."""
        if self.bias is None:
            raise ValueError("this ranker has no bias tower (combination='none')")
        self.eval()
        mask = batch["mask"]
        position = batch["position"].expand_as(mask)[mask]
        context = [batch[n].unsqueeze(-1).expand_as(mask)[mask] for n in self.context_names]
        cells, slot_cell = torch.unique(torch.stack([position, *context], dim=1), dim=0, return_inverse=True)
        cell_inputs = (cells[:, :1], {n: cells[:, i + 1] for i, n in enumerate(self.context_names)})
        r, target = r.detach()[mask], clicks[mask]
        params = list(self.bias.parameters())
        optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=50,
                                      tolerance_grad=1e-9, tolerance_change=1e-12,
                                      line_search_fn="strong_wolfe")  # fmt: skip

        def closure() -> Tensor:
            optimizer.zero_grad()
            b = self.bias(*cell_inputs).squeeze(-1)[slot_cell]
            log_p, log_not = self.combine(r, b)
            loss = -(target * log_p + (1.0 - target) * log_not).mean()
            loss.backward()
            return loss

        optimizer.step(closure)
        for p in params:
            p.grad = None

    def compute_loss(self, batch: dict[str, Tensor], adversary: bool = True) -> Tensor:
        """The training loss; ``adversary=False`` leaves out the adversary's term (model selection)."""
        return self.task(self, batch, adversary)

    @torch.no_grad()
    def score(self, features: Tensor, item: Tensor | None = None) -> Tensor:
        """Inference: the relevance logit of documents ``[..., F]``; no position, no bias features."""
        return self.relevance_logit({"features": features, **({"item": item} if item is not None else {})})


class RankingTask(nn.Module):
    """Turns a ranker's outputs on a session batch into the loss of one training method."""

    def __init__(self, loss: Literal["clicks", "ipw", "oracle"]) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, model: DebiasedRanker, batch: dict[str, Tensor], adversary: bool = True) -> Tensor:
        """``adversary=False``: the click loss alone, without the adversary's term. That term is a
        min-max game's (the adversary's squared error, which the bias tower is paid to raise), not a
        measure of how well the clicks are explained: it must not choose the training length."""
        mask = batch["mask"].float()
        if self.loss == "clicks":
            (log_p, log_not), r, raw_bias = model._click_log_probs(batch)
            clicks = batch["clicks"]
            nll = -(clicks * log_p + (1.0 - clicks) * log_not)
            loss = (nll * mask).sum() / mask.sum().clamp(min=1.0)
            if adversary and model.config.adversarial > 0 and raw_bias is not None:
                loss = loss + model.adversary_loss(r, raw_bias, batch["mask"])
            return loss
        r = model.relevance_logit(batch, batch["position"] if model.config.position_feature else None)
        if self.loss == "oracle":
            bce = F.binary_cross_entropy_with_logits(r, batch["target"], reduction="none")
            return (bce * mask).sum() / mask.sum().clamp(min=1.0)
        # IPW: softmax over the shown slots; each clicked slot is a positive weighted 1 / propensity.
        log_softmax = torch.log_softmax(r.masked_fill(~batch["mask"], float("-inf")), dim=-1)
        weights = batch["clicks"] * mask / batch["propensity"].clamp(min=1e-3)
        loss = -(weights * log_softmax.masked_fill(~batch["mask"], 0.0)).sum()
        return loss / batch["mask"].shape[0]
