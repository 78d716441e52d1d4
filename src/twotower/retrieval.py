"""The retrieval two-tower model: user tower x item tower, scored by similarity / temperature.

``TwoTowerModel`` owns the two towers, the optional history encoder of the user tower, and the
encoded feature tables of all users and items (as buffers, so one safetensors file carries everything
needed to score). Its loss comes from a task object (``twotower.tasks.RetrievalTask``: objectives and
negatives), and it answers ``recommend(users, k) -> (item indices, scores)`` by exact full-corpus search.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from twotower.features import FieldInfo
from twotower.history import HistoryConfig, HistoryEncoder
from twotower.tasks import RetrievalTask
from twotower.topk import CSR, topk_items
from twotower.towers import Tower, TowerConfig


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
        history: tuple[Tensor, Tensor, Tensor | None] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        cosine = config.similarity == "cosine"
        self.history = _history_encoder(config, item_fields, item_table, history)
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

    def encode_users(
        self, user_idx: Tensor, history_end: Tensor | None = None, exclude_items: Tensor | None = None
    ) -> Tensor:
        """User embeddings from features and history: the first ``history_end[b]`` events of row b's
        user (all when None), without ``exclude_items[b]``."""
        extra = None
        if self.history is not None:
            extra = self.history(user_idx, history_end, exclude_items, self._history_item_embedding)
        return self.user_tower(self.user_features(user_idx), extra)

    def _history_item_embedding(self, item_idx: Tensor) -> Tensor:
        """The item tower's own embedding of the shared item feature (catalogue index -> vector)."""
        name = self.config.history.item_feature
        return self.item_tower.categorical[name](getattr(self, f"item__{name}")[item_idx])

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Loss of a batch ``{"user_idx", "item_idx", optional "weight", "history_end"}`` of positives."""
        if self.training and self.task.miner is not None:
            self.task.maybe_refresh(self._embed_all)
        if self._distinct_ok():
            return self._distinct_loss(batch)
        end = exclude = None
        if self.history is not None:
            if self.config.history.training_view == "before":
                if "history_end" not in batch:
                    raise KeyError("a history seen 'before' the target needs batch['history_end']")
                end = batch["history_end"]  # only events strictly before this one: no leakage
            else:
                exclude = batch["item_idx"]
        query = self.encode_users(batch["user_idx"], end, exclude)
        candidates = self.item_tower(self.item_features(batch["item_idx"]))
        return self.task(
            query,
            candidates,
            batch["item_idx"],
            batch.get("weight"),
            batch=batch,
            embed_items=lambda ids: self.item_tower(self.item_features(ids)),
        )

    def _distinct_ok(self) -> bool:
        """True when each tower's output is a function of the user or item id alone (no history, no
        active dropout), so a batch's repeated ids are repeated embeddings and the task may compute
        its loss over the distinct ones."""
        return (
            self.history is None
            and self.task.accepts_distinct()
            and not (self.training and (_has_dropout(self.user_tower) or _has_dropout(self.item_tower)))
        )

    def _distinct_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The in-batch softmax over the batch's distinct users and items (``twotower.unique_softmax``):
        each tower runs once per distinct id and the logit matrix is distinct users x distinct items."""
        users, query_of_row = torch.unique(batch["user_idx"], return_inverse=True)
        items, positive_of_row, count = torch.unique(
            batch["item_idx"], return_inverse=True, return_counts=True
        )
        return self.task.forward_distinct(
            self.encode_users(users),
            query_of_row,
            self.item_tower(self.item_features(items)),
            items,
            positive_of_row,
            count,
            batch.get("weight"),
        )

    def _embed_all(self) -> tuple[Tensor, Tensor]:
        """Every user's and item's embedding in eval mode (no dropout), e.g. to mine hard negatives."""
        was_training = self.training
        self.eval()
        try:
            return self.user_embeddings(), self.item_embeddings()
        finally:
            self.train(was_training)

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


def _history_encoder(
    config: ModelConfig,
    item_fields: list[FieldInfo],
    item_table: dict[str, Tensor],
    history: tuple[Tensor, Tensor, Tensor | None] | None,
) -> HistoryEncoder | None:
    hc = config.history
    if not hc.enabled:
        return None
    if history is None:
        raise ValueError("model.history.enabled needs the users' histories (indptr, items)")
    num_items = len(next(iter(item_table.values())))
    if hc.item_feature is None:
        dim = hc.embedding_dim or config.user_tower.embedding_dim
    else:
        field = next((f for f in item_fields if f.name == hc.item_feature and f.kind == "categorical"), None)
        if field is None:
            raise ValueError(
                f"model.history.item_feature {hc.item_feature!r} is not a categorical/id item "
                f"feature; item features: {[f.name for f in item_fields]}"
            )
        dim = field.embedding_dim or config.item_tower.embedding_dim
    return HistoryEncoder(
        hc, *history, num_items, dim, own_table=hc.item_feature is None, init_std=config.user_tower.init_std
    )


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


def _has_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())
