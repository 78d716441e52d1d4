"""The user's interaction history as an input of the user tower.

A user id embedding only knows what that user's own rows taught it; a pooled embedding of the items the
user interacted with shares strength across users (two users with similar histories get similar
vectors) and works for a user the model has never trained on, given their history. This is the
"watch history" input of YouTube's candidate generator (Covington et al., RecSys 2016).

Histories are stored as a CSR over user indices (``indptr``, ``items``), in log order (chronological
when the log has timestamps), as model buffers, so a saved model carries them.

Leakage: when a training pair (u, i) is scored, i is itself in u's history; a user vector that
contains e_i makes the pair trivially easy and teaches the model to copy, not to generalise. With
``exclude_target`` the positive is removed from its own row's history during training (leave-one-out),
which is the training-time view of the evaluation-time situation "predict an item not yet in history".
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

__all__ = ["HistoryConfig", "MeanHistoryEncoder", "history_csr"]


class HistoryConfig(BaseModel):
    """Whether and how the user tower sees the user's interaction history."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    pooling: Literal["mean"] = "mean"
    embedding_dim: int | None = Field(None, ge=1, description="None: the user tower's embedding_dim")
    max_len: int | None = Field(None, ge=1, description="keep only the most recent max_len items")
    exclude_target: bool = Field(True, description="drop a training positive from its own history")


def history_csr(
    user_idx: Tensor, item_idx: Tensor, num_users: int, max_len: int | None = None
) -> tuple[Tensor, Tensor]:
    """(indptr [U + 1], items [nnz]) of each user's items in the given (log) order, last ``max_len`` kept."""
    user_idx, item_idx = user_idx.long(), item_idx.long()
    order = torch.sort(user_idx, stable=True).indices  # stable: keeps log order within a user
    users, items = user_idx[order], item_idx[order]
    counts = torch.bincount(users, minlength=num_users)
    if max_len is not None:
        # Position from the end within each user's run; keep the last max_len.
        ends = torch.cumsum(counts, 0)[users]
        keep = ends - torch.arange(len(users)) <= max_len
        users, items = users[keep], items[keep]
        counts = torch.bincount(users, minlength=num_users)
    indptr = torch.zeros(num_users + 1, dtype=torch.long)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr, items


class MeanHistoryEncoder(nn.Module):
    """Mean of the embeddings of a user's history items, optionally leaving out one target item per row.

    ``forward(user_idx, exclude=None) -> Tensor[B, dim]``; a user with an empty history (or whose only
    item is excluded) gets the zero vector.
    """

    def __init__(self, indptr: Tensor, items: Tensor, num_items: int, dim: int, init_std: float = 0.05):
        super().__init__()
        self.register_buffer("indptr", indptr.long())
        self.register_buffer("items", items.long())
        self.embedding = nn.EmbeddingBag(num_items, dim, mode="sum")
        nn.init.normal_(self.embedding.weight, std=init_std)
        self.dim = dim

    def forward(self, user_idx: Tensor, exclude: Tensor | None = None) -> Tensor:
        start, stop = self.indptr[user_idx], self.indptr[user_idx + 1]
        lengths = stop - start
        offsets = torch.zeros_like(lengths)
        offsets[1:] = torch.cumsum(lengths, 0)[:-1]
        # Flat positions into self.items of every (row, history item) pair.
        row = torch.repeat_interleave(torch.arange(len(user_idx), device=lengths.device), lengths)
        flat = start[row] + torch.arange(len(row), device=lengths.device) - offsets[row]
        bag_items = self.items[flat]
        weights = torch.ones(len(bag_items), device=bag_items.device)
        if exclude is not None:
            weights = (bag_items != exclude[row]).float()
        summed = self.embedding(bag_items, offsets, per_sample_weights=weights)
        count = torch.zeros(len(user_idx), device=weights.device).index_add_(0, row, weights)
        return summed / count.clamp_min(1.0).unsqueeze(1)
