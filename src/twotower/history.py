"""The user's interaction history as an input of the user tower: mean pooling or stacked self-attention.

A user id embedding only knows what that user's own rows taught it; an encoding of the items the user
interacted with shares strength across users (similar histories give similar vectors) and serves a
user the model never trained on, given their history: the "watch history" input of YouTube's candidate
generator (Covington et al. 2016). Each event's vector is C_i = e(item_i) [+ e(action_i)], where e(item)
is by default the item tower's own id embedding (shared, so both towers speak one language) and the
optional action (e.g. the rating level) gets its own small table.

Histories are stored once, as a CSR over user indices in chronological order (``indptr``, ``items``,
optional ``actions``), as model buffers, so a saved model carries them. Every training row carries its
``history_end``: how many of its user's events came strictly before it. With the default training
view ``before`` a row sees only those events, never its target or anything later, which is exactly
the situation at evaluation time (predict what comes next from what came before). The view
``all_but_target`` shows every other training event of the user (leave-one-out), which suits random,
non-temporal splits. At evaluation and serving time the whole training history is used.

Encoders see the last ``max_len`` events, padded on the right and masked. Self-attention adds a learned
embedding of each event's recency (0 = most recent), so the output does not depend on how much padding
a batch happens to need; a Transformer encoder (padding mask, no causal mask: all events are in the past)
is followed by a masked mean over the events.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

__all__ = ["HistoryConfig", "HistoryEncoder", "history_csr", "history_positions"]


class HistoryConfig(BaseModel):
    """Whether and how the user tower sees the user's interaction history."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    pooling: Literal["mean", "attention"] = "mean"
    max_len: int = Field(50, ge=1, description="the most recent max_len events are encoded")
    training_view: Literal["before", "all_but_target"] = Field(
        "before", description="before: only events strictly before the target; all_but_target: leave-one-out"
    )
    item_feature: str | None = Field(
        "item_id", description="item feature whose embedding is shared with the history; None: own table"
    )
    embedding_dim: int | None = Field(None, ge=1, description="own table only; None: user tower default")
    action_column: str | None = Field(None, description="per-event action (e.g. rating) embedded and added")
    num_layers: int = Field(2, ge=1, description="attention: stacked encoder layers")
    num_heads: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    event_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="training only: share of history events hidden at random (the input "
        "dropout of Mult-VAE), against a model that memorises each training row's history",
    )


def history_csr(
    user_idx: Tensor, item_idx: Tensor, num_users: int, actions: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(indptr [U + 1], items [nnz], actions [nnz] | None): each user's events in the given (log) order."""
    order = torch.sort(user_idx.long(), stable=True).indices  # stable: keeps log order within a user
    counts = torch.bincount(user_idx.long(), minlength=num_users)
    indptr = torch.zeros(num_users + 1, dtype=torch.long)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr, item_idx.long()[order], None if actions is None else actions.long()[order]


def history_positions(user_idx: Tensor, num_users: int, timestamps: Tensor | None = None) -> Tensor:
    """For each row of a log, how many rows of the same user come before it (its ``history_end``).

    With ``timestamps`` (of a chronological log, the order :func:`history_csr` keeps), rows of a user
    that share a timestamp do not count as before one another: only events strictly earlier in time
    do. Without them, the log order alone decides, so of two events in the same second the one listed
    first is in the other's history.
    """
    user_idx = user_idx.long()
    order = torch.sort(user_idx, stable=True).indices
    counts = torch.bincount(user_idx, minlength=num_users)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(user_idx), device=user_idx.device)
    if timestamps is not None:
        if len(timestamps) != len(user_idx):
            raise ValueError(f"{len(timestamps)} timestamps for {len(user_idx)} rows")
        # A tie keeps the position of the first row of its (user, timestamp) run: the running maximum
        # of the indices where a run starts.
        users, times = user_idx[order], timestamps.to(user_idx.device)[order]
        new_run = torch.ones_like(users, dtype=torch.bool)
        new_run[1:] = (users[1:] != users[:-1]) | (times[1:] != times[:-1])
        rank = torch.cummax(torch.where(new_run, rank, 0), dim=0).values
    position = torch.empty_like(user_idx)
    position[order] = rank - starts[user_idx[order]]
    return position


class HistoryEncoder(nn.Module):
    """``forward(user_idx, end=None, exclude=None, embed_items=None) -> Tensor[B, dim]``.

    Row b encodes the last ``max_len`` of user u's first ``end[b]`` events (all events when ``end`` is
    None) that are not equal to ``exclude[b]``: the window is taken after the exclusion, with recency
    counted over the events kept, so a leave-one-out training row looks like a served history.
    ``embed_items(idx)`` embeds catalogue indices when the item embedding is shared with the item tower;
    otherwise the encoder's own table does. A row without events gets the zero vector.
    """

    def __init__(
        self,
        config: HistoryConfig,
        indptr: Tensor,
        items: Tensor,
        actions: Tensor | None,
        num_items: int,
        dim: int,
        own_table: bool,
        init_std: float = 0.05,
    ) -> None:
        super().__init__()
        self.config, self.dim = config, dim
        self.register_buffer("indptr", indptr.long())
        self.register_buffer("items", items.long())
        self.item_embedding = nn.Embedding(num_items, dim) if own_table else None
        self.action_embedding = None
        if actions is not None:
            self.register_buffer("actions", actions.long())
            self.action_embedding = nn.Embedding(int(actions.max()) + 1 if len(actions) else 1, dim)
        for table in (self.item_embedding, self.action_embedding):
            if table is not None:
                nn.init.normal_(table.weight, std=init_std)
        self.encoder = None
        if config.pooling == "attention":
            self.recency = nn.Embedding(config.max_len, dim)
            nn.init.normal_(self.recency.weight, std=init_std)
            layer = nn.TransformerEncoderLayer(
                dim,
                config.num_heads,
                dim_feedforward=2 * dim,
                dropout=config.dropout,
                batch_first=True,
                norm_first=True,
            )
            self.encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)

    def padded(
        self, user_idx: Tensor, end: Tensor | None = None, width: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(positions into ``items`` [B, L], valid [B, L], recency [B, L]) of each row's last L events
        (L = ``width``, default ``max_len``), oldest first and left-aligned."""
        start, stop = self.indptr[user_idx], self.indptr[user_idx + 1]
        if end is not None:
            stop = torch.minimum(start + end.long(), stop)
        width = self.config.max_len if width is None else width
        n = torch.clamp(stop - start, max=width)
        slot = torch.arange(width, device=start.device)
        valid = slot[None, :] < n[:, None]
        positions = torch.where(valid, (stop - n)[:, None] + slot[None, :], 0)
        recency = torch.where(valid, n[:, None] - 1 - slot[None, :], 0)
        return positions, valid, recency

    def forward(
        self,
        user_idx: Tensor,
        end: Tensor | None = None,
        exclude: Tensor | None = None,
        embed_items: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        # Indices may come from the CPU (a data loader, ``torch.arange``) while the model sits on a GPU.
        device = self.indptr.device
        user_idx = user_idx.to(device)
        end = None if end is None else end.to(device)
        exclude = None if exclude is None else exclude.to(device)
        if exclude is None:
            positions, valid, recency = self.padded(user_idx, end)
            ids = self.items[positions] if len(self.items) else torch.zeros_like(positions)
        else:
            positions, valid, recency, ids = self._without(user_idx, end, exclude)
        if self.training and self.config.event_dropout:
            valid = valid & (torch.rand(valid.shape, device=valid.device) >= self.config.event_dropout)
        actions = self.actions[positions] if self.action_embedding is not None else None
        return self.encode(ids, valid, recency, actions, embed_items)

    def _without(self, user_idx: Tensor, end: Tensor | None, exclude: Tensor) -> tuple[Tensor, ...]:
        """``padded``'s layout of the last ``max_len`` events that are not ``exclude``: one slot more is
        read (an excluded event is usually there once, the row's own target), the excluded dropped and the
        rest packed to the left, recency recounted. A row whose excluded item occurs more often in that
        window (a repeated interaction) reads a wider one, until it keeps ``max_len`` events or has none
        older left."""
        width = self.config.max_len
        read = width + 1
        while True:
            positions, valid, _ = self.padded(user_idx, end, read)
            ids = self.items[positions] if len(self.items) else torch.zeros_like(positions)
            keep = valid & (ids != exclude[:, None])
            # Short of `width` kept events while the window is full: older events may fill the gap.
            short = (keep.sum(1) < width) & (valid.sum(1) == read)
            if short.is_meta or not bool(short.any()):  # (a meta tensor has shapes but no values)
                break
            read *= 2
        keep &= keep.flip(1).cumsum(1).flip(1) <= width  # the most recent `width` kept events
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        positions, ids, valid = positions.gather(1, order), ids.gather(1, order), keep.gather(1, order)
        slot = torch.arange(width, device=positions.device)
        recency = torch.where(valid, valid.sum(1, keepdim=True) - 1 - slot[None, :], 0)
        return positions, valid, recency, ids

    def encode(
        self,
        ids: Tensor,
        valid: Tensor,
        recency: Tensor,
        actions: Tensor | None = None,
        embed_items: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Pool explicit event rows ``ids [B, L]`` (oldest first, ``valid`` marks real events, ``recency``
        counts back from the most recent): the path of events that are not in the stored histories,
        such as a serving request's recent items."""
        if self.item_embedding is not None:
            events = self.item_embedding(ids)
        elif embed_items is not None:
            flat = embed_items(ids.reshape(-1))
            events = flat.view(*ids.shape, flat.shape[-1])  # (not -1: ambiguous for an empty batch)
        else:
            raise ValueError("a history sharing the item embedding needs embed_items")
        if self.action_embedding is not None:
            if actions is None:
                raise ValueError("this history encoder embeds actions; pass them with the events")
            events = events + self.action_embedding(actions)
        empty = ~valid.any(dim=1)
        if self.encoder is not None:
            events = events + self.recency(recency)
            # An all-padding row would make attention NaN: let it attend to its (zeroed) first slot.
            mask = valid.clone()
            mask[empty, 0] = True
            events = self.encoder(events * mask[..., None], src_key_padding_mask=~mask)
        weights = valid.to(events.dtype)[..., None]
        pooled = (events * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return pooled.masked_fill(empty[:, None], 0.0)

    def event_rows(
        self, sequences: list[Tensor], actions: list[Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(ids, valid, recency, actions)`` of the last ``max_len`` events of each sequence (oldest
        first), laid out exactly as :meth:`padded` lays out stored histories."""
        width = self.config.max_len
        ids = torch.zeros(len(sequences), width, dtype=torch.long, device=self.indptr.device)
        acts = torch.zeros_like(ids) if actions is not None else None
        valid = torch.zeros(len(sequences), width, dtype=torch.bool, device=ids.device)
        recency = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            seq = seq[-width:]
            n = len(seq)
            ids[row, :n] = seq
            valid[row, :n] = True
            recency[row, :n] = torch.arange(n - 1, -1, -1, device=ids.device)
            if acts is not None and actions is not None:
                acts[row, :n] = actions[row][-width:]
        return ids, valid, recency, acts
