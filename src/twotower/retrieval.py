"""The retrieval two-tower model and its training task.

``RetrievalTask`` is a layer that turns query and candidate embeddings into a loss (the TFRS design):
in-batch softmax where every other positive in the batch is a negative, with

- the logQ correction of Yi et al. (RecSys 2019): in-batch negatives are sampled in proportion to
  item frequency, so popular items are over-represented as negatives; subtracting log Q(y) from each
  logit makes the sampled softmax an unbiased estimate of the full softmax's gradient.
  Q comes from exact training counts or the streaming estimator (``twotower.frequency``);
- removal of accidental hits: when item y is a row's positive and also appears as another row's
  candidate, that column is not a negative for the row, so its logit is masked.

``TwoTowerModel`` owns the two towers plus the encoded feature tables of all users and items (as
buffers, so one safetensors file carries everything needed to score), and answers
``recommend(users, k) -> (item indices, scores)`` by exact full-corpus search.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from twotower.features import FieldInfo
from twotower.history import HistoryConfig, MeanHistoryEncoder
from twotower.topk import CSR, topk_items
from twotower.towers import Tower, TowerConfig

# Large negative instead of -inf: a row whose every negative is masked must still give a finite loss.
_MASK = -1e9


class SamplingProbability(Protocol):
    """What the task needs from a frequency estimator (exact counts or the streaming sketch)."""

    def update(self, ids: Tensor) -> None: ...

    def log_probability(self, ids: Tensor) -> Tensor: ...


class RetrievalTask(nn.Module):
    """In-batch softmax loss with optional logQ correction and accidental-hit removal.

    For a batch of B (query, positive) pairs with embeddings q_i, c_i and candidate ids y_i:

        s_ij = <q_i, c_j> / temperature  -  log Q(y_j)     (logQ term only when Q is given)
        s_ij = -inf  if y_j == y_i and j != i             (accidental hits, when enabled)
        loss = sum_i w_i * CE(softmax(s_i), i) / sum_i w_i

    The correction is applied to every column, the positive's included, as in Yi et al.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        remove_accidental_hits: bool = True,
        sampling_probability: SamplingProbability | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.remove_accidental_hits = remove_accidental_hits
        self.sampling_probability = sampling_probability

    def logits(self, query: Tensor, candidates: Tensor, candidate_ids: Tensor) -> Tensor:
        logits = query @ candidates.T / self.temperature
        if self.sampling_probability is not None:
            logits = logits - self.sampling_probability.log_probability(candidate_ids).to(logits)[None, :]
        if self.remove_accidental_hits:
            same = candidate_ids[:, None] == candidate_ids[None, :]
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, _MASK)
        return logits

    def forward(
        self,
        query: Tensor,
        candidates: Tensor,
        candidate_ids: Tensor,
        sample_weight: Tensor | None = None,
    ) -> Tensor:
        if self.training and self.sampling_probability is not None:
            # Streaming estimators learn from the stream of training batches; exact counts ignore it.
            self.sampling_probability.update(candidate_ids)
        logits = self.logits(query, candidates, candidate_ids)
        labels = torch.arange(len(query), device=query.device)
        losses = F.cross_entropy(logits, labels, reduction="none")
        if sample_weight is None:
            return losses.mean()
        return (losses * sample_weight).sum() / sample_weight.sum().clamp_min(1e-12)


class ModelConfig(BaseModel):
    """Architecture and scoring of the retrieval model."""

    model_config = ConfigDict(extra="forbid")

    similarity: Literal["dot", "cosine"] = "cosine"
    temperature: float = Field(0.05, gt=0)
    user_tower: TowerConfig = Field(default_factory=TowerConfig)
    item_tower: TowerConfig = Field(default_factory=TowerConfig)
    history: HistoryConfig = Field(default_factory=HistoryConfig)


class TwoTowerModel(nn.Module):
    """User tower + item tower over encoded feature tables; score = similarity / temperature."""

    def __init__(
        self,
        config: ModelConfig,
        user_fields: list[FieldInfo],
        item_fields: list[FieldInfo],
        user_table: dict[str, Tensor],
        item_table: dict[str, Tensor],
        task: RetrievalTask | None = None,
        history: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        cosine = config.similarity == "cosine"
        self.history: MeanHistoryEncoder | None = None
        if config.history.enabled:
            if history is None:
                raise ValueError("model.history.enabled needs the users' histories (indptr, items)")
            dim = config.history.embedding_dim or config.user_tower.embedding_dim
            num_items = len(next(iter(item_table.values())))
            self.history = MeanHistoryEncoder(*history, num_items, dim, config.user_tower.init_std)
        extra = self.history.dim if self.history is not None else 0
        # Cosine similarity is the dot product of L2-normalised embeddings, so the index can always use
        # inner product and the metric at serving time equals the metric at training time.
        self.user_tower = Tower(user_fields, _with_norm(config.user_tower, cosine), extra_dim=extra)
        self.item_tower = Tower(item_fields, _with_norm(config.item_tower, cosine))
        if self.user_tower.output_dim != self.item_tower.output_dim:
            raise ValueError(
                f"user tower outputs {self.user_tower.output_dim} dims but item tower "
                f"{self.item_tower.output_dim}: set the last entry of both towers' layers to the same size"
            )
        self.user_names = _register_table(self, "user", user_table)
        self.item_names = _register_table(self, "item", item_table)
        self.task = task or RetrievalTask(temperature=config.temperature)

    @property
    def num_users(self) -> int:
        return len(getattr(self, f"user__{self.user_names[0]}"))

    @property
    def num_items(self) -> int:
        return len(getattr(self, f"item__{self.item_names[0]}"))

    def user_features(self, user_idx: Tensor) -> dict[str, Tensor]:
        return {name: getattr(self, f"user__{name}")[user_idx] for name in self.user_names}

    def item_features(self, item_idx: Tensor) -> dict[str, Tensor]:
        return {name: getattr(self, f"item__{name}")[item_idx] for name in self.item_names}

    def encode_users(self, user_idx: Tensor, exclude_items: Tensor | None = None) -> Tensor:
        """User embeddings; ``exclude_items[b]`` is left out of row b's history (training positives)."""
        extra = None if self.history is None else self.history(user_idx, exclude_items)
        return self.user_tower(self.user_features(user_idx), extra)

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Loss of a batch ``{"user_idx", "item_idx", optional "weight"}`` of positive pairs."""
        leave_out = batch["item_idx"] if self.config.history.exclude_target else None
        query = self.encode_users(batch["user_idx"], leave_out)
        candidates = self.item_tower(self.item_features(batch["item_idx"]))
        return self.task(query, candidates, batch["item_idx"], batch.get("weight"))

    @torch.no_grad()
    def user_embeddings(self, user_idx: Tensor | None = None, batch_size: int = 8192) -> Tensor:
        idx = torch.arange(self.num_users) if user_idx is None else user_idx
        return torch.cat([self.encode_users(c) for c in idx.split(batch_size)])

    @torch.no_grad()
    def item_embeddings(self, item_idx: Tensor | None = None, batch_size: int = 8192) -> Tensor:
        idx = torch.arange(self.num_items) if item_idx is None else item_idx
        return torch.cat([self.item_tower(self.item_features(c)) for c in idx.split(batch_size)])

    @torch.no_grad()
    def recommend(self, user_idx: Tensor, k: int = 10, exclude: CSR | None = None) -> tuple[Tensor, Tensor]:
        """Top-k item indices and scores (similarity / temperature) by exact full-corpus search."""
        was_training = self.training
        self.eval()
        try:
            queries = self.user_embeddings(user_idx) / self.config.temperature
            return topk_items(queries, self.item_embeddings(), k, exclude=exclude)
        finally:
            self.train(was_training)


def _with_norm(tower: TowerConfig, cosine: bool) -> TowerConfig:
    return tower.model_copy(update={"normalize": tower.normalize or cosine})


def _register_table(module: nn.Module, prefix: str, table: dict[str, Tensor]) -> list[str]:
    if not table:
        raise ValueError(f"the {prefix} feature table is empty")
    lengths = {name: len(t) for name, t in table.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{prefix} feature columns have different lengths: {lengths}")
    for name, tensor in table.items():
        # Tables are buffers: they move with .to(device) and are saved with the weights.
        module.register_buffer(f"{prefix}__{name}", tensor)
    return sorted(table)
