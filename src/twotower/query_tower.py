"""The user side of a trained two-tower, on its own: features (+ history) -> query embedding.

Serving needs the user tower, the history encoder and the users' encoded feature tables, but not the
item tower (item embeddings are computed once at export) nor the training task. :class:`QueryTower`
is that part, built from a :class:`~twotower.retrieval.TwoTowerModel` with the SAME modules and
weights, so a known user's query embedding is bit-for-bit the one the trained model computes.

One change of form: when the history shares the item tower's id embedding, training looks an event's
vector up as ``item_tower.categorical[f](item_table[f][i])``. The exported history owns a table whose
row ``i`` is that very vector, precomputed, so the item tower need not ship.

Three ways in:

* :meth:`known` - catalogue users, from their stored feature rows and training history, optionally
  followed by recent events (``extra_events``) that happened after training;
* :meth:`from_features` - cold start: features encoded from raw values by the run's user
  ``FeatureEncoder`` (an unknown id maps to out-of-vocabulary), plus any recent events;
* :meth:`forward` - the pure-tensor form ``(features..., history ids, valid, recency) -> embedding``
  that ONNX export traces.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from twotower.features import FieldInfo
from twotower.history import HistoryEncoder
from twotower.retrieval import ModelConfig, TwoTowerModel, _with_norm
from twotower.towers import Tower

__all__ = ["QueryTower"]


class QueryTower(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        user_fields: list[FieldInfo],
        num_users: int,
        num_items: int,
        history_dim: int | None,
        history_actions: int | None = None,
    ) -> None:
        """Empty modules of the right shapes; weights come from ``load_state_dict``.

        ``history_dim`` is the event embedding size (None: the model has no history) and
        ``history_actions`` the size of the action table (None: events carry no action).
        """
        super().__init__()
        self.config = config
        self.user_fields = list(user_fields)
        self.history: HistoryEncoder | None = None
        if history_dim is not None:
            # Placeholder buffers of the right sizes are replaced by the loaded state.
            indptr = torch.zeros(num_users + 1, dtype=torch.long)
            actions = torch.zeros(1, dtype=torch.long) if history_actions is not None else None
            self.history = HistoryEncoder(
                config.history,
                indptr,
                torch.zeros(0, dtype=torch.long),
                actions,
                num_items,
                history_dim,
                True,
            )
            if history_actions is not None:
                self.history.action_embedding = nn.Embedding(history_actions, history_dim)
        extra = history_dim or 0
        self.user_tower = Tower(
            user_fields, _with_norm(config.user_tower, config.similarity == "cosine"), extra
        )
        for field in user_fields:
            dtype = torch.float32 if field.kind == "numeric" else torch.long
            shape = (num_users, 1) if field.kind == "multi_hot" else (num_users,)
            self.register_buffer(f"user__{field.name}", torch.zeros(shape, dtype=dtype))

    @classmethod
    def from_model(cls, model: TwoTowerModel, user_fields: list[FieldInfo]) -> QueryTower:
        """The query side of a trained model, with identical weights."""
        history = model.history
        dim = history.dim if history is not None else None
        actions = history.action_embedding.num_embeddings if history and history.action_embedding else None
        tower = cls(model.config, user_fields, model.num_users, model.num_items, dim, actions)
        state = {
            k: v for k, v in model.state_dict().items() if k.startswith(("user_tower.", "history.", "user__"))
        }
        if history is not None and history.item_embedding is None:
            # Row i = the item tower's embedding of catalogue item i, as training looked it up.
            with torch.no_grad():
                state["history.item_embedding.weight"] = model._history_item_embedding(
                    torch.arange(model.num_items)
                ).clone()
        tower.load_state(state)
        return tower

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Load weights and tables, resizing placeholder buffers to the saved ones."""
        for name, value in state.items():
            owner, _, leaf = name.rpartition(".")
            module = self.get_submodule(owner) if owner else self
            if leaf in module._buffers:
                module._buffers[leaf] = value.clone()
        self.load_state_dict(state, strict=True)
        self.eval()

    @property
    def num_users(self) -> int:
        return len(getattr(self, f"user__{self.user_fields[0].name}"))

    @property
    def output_dim(self) -> int:
        return self.user_tower.output_dim

    def stored_features(self, user_idx: Tensor) -> dict[str, Tensor]:
        return {f.name: getattr(self, f"user__{f.name}")[user_idx] for f in self.user_fields}

    def stored_events(self, user_idx: int) -> tuple[Tensor, Tensor | None]:
        """A catalogue user's training history (chronological) and its actions."""
        assert self.history is not None
        start, stop = int(self.history.indptr[user_idx]), int(self.history.indptr[user_idx + 1])
        actions = self.history.actions[start:stop] if self.history.action_embedding is not None else None
        return self.history.items[start:stop], actions

    @torch.no_grad()
    def known(
        self,
        user_idx: Tensor,
        extra_events: list[Tensor] | None = None,
        extra_actions: list[Tensor] | None = None,
    ) -> Tensor:
        """Query embeddings of catalogue users; ``extra_events[b]`` are appended to row b's history."""
        features = self.stored_features(user_idx)
        if self.history is None:
            return self.user_tower(features)
        if not extra_events or not any(len(e) for e in extra_events):
            return self.user_tower(features, self.history(user_idx))  # the training-time path
        sequences, actions = [], []
        for row, user in enumerate(user_idx.tolist()):
            items, acts = self.stored_events(user)
            sequences.append(torch.cat([items, extra_events[row].to(items.device)]))
            if acts is not None:
                # Events given without actions take action 0, as in from_features.
                extra = (
                    extra_actions[row]
                    if extra_actions
                    else torch.zeros(len(extra_events[row]), dtype=torch.long)
                )
                actions.append(torch.cat([acts, extra.to(acts.device)]))
        return self._with_events(features, sequences, actions or None)

    @torch.no_grad()
    def from_features(
        self,
        features: dict[str, Tensor],
        events: list[Tensor] | None = None,
        actions: list[Tensor] | None = None,
    ) -> Tensor:
        """Query embeddings from encoded features (cold start) and optional recent events."""
        if self.history is None:
            return self.user_tower(features)
        batch = len(next(iter(features.values())))
        sequences = events if events is not None else [torch.zeros(0, dtype=torch.long)] * batch
        return self._with_events(features, sequences, actions)

    def _with_events(
        self, features: dict[str, Tensor], sequences: list[Tensor], actions: list[Tensor] | None
    ) -> Tensor:
        assert self.history is not None
        if self.history.action_embedding is not None and actions is None:
            actions = [torch.zeros(len(s), dtype=torch.long) for s in sequences]
        ids, valid, recency, acts = self.history.event_rows(sequences, actions)
        return self.user_tower(features, self.history.encode(ids, valid, recency, acts))

    def forward(self, *inputs: Tensor) -> Tensor:
        """``(one tensor per user field, in order[, history ids, valid, recency[, actions]]) -> [B, d]``.

        The flat signature ONNX export needs; valid is a bool mask, the others long tensors.
        """
        n = len(self.user_fields)
        features = {f.name: t for f, t in zip(self.user_fields, inputs[:n], strict=True)}
        if self.history is None:
            return self.user_tower(features)
        ids, valid, recency = inputs[n : n + 3]
        actions = inputs[n + 3] if len(inputs) > n + 3 else None
        return self.user_tower(features, self.history.encode(ids, valid, recency, actions))
