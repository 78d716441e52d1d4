"""Towers: an embedding per feature, concatenated, then an MLP, then optional L2 normalisation.

A tower is built from the `FieldInfo` list of a fitted `FeatureEncoder`, so the same class serves the
user side and the item side, and every feature kind the data layer produces has exactly one input
layer here:

- ``categorical`` (ids, categorical side features, bucketised numerics): ``nn.Embedding``;
- ``multi_hot`` (e.g. genres): ``nn.EmbeddingBag(mode="mean", padding_idx=0)`` - one fused lookup
  whose mean ignores the padding slots, so a row's result does not depend on how much it was padded;
- ``numeric`` (standardised upstream): the raw value, one input column each.

With ``sparse: true`` the tables produce sparse gradients: a dense gradient of a million-row table is
a full-size tensor written, read and updated by the optimizer at every step, although a batch touches
a few thousand rows; that, not the towers' arithmetic, then dominates the training step.

Batches are plain ``dict[str, Tensor]`` keyed by feature name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from twotower.features import FieldInfo


class TowerConfig(BaseModel):
    """Shape of one tower. ``layers`` empty means the tower's output is the concatenated embeddings."""

    model_config = ConfigDict(extra="forbid")

    embedding_dim: int = Field(32, ge=1, description="default embedding size of every feature")
    layers: list[int] = Field(default_factory=list, description="MLP sizes; the last one is the output")
    activation: str = Field("relu", pattern="^(relu|gelu|silu|tanh)$")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    normalize: bool = Field(False, description="L2-normalise the output (cosine similarity)")
    init_std: float = Field(0.05, gt=0.0, description="std of the normal init of embedding tables")
    sparse: bool = Field(
        False,
        description="sparse gradients for the embedding tables: a step touches only the looked-up rows "
        "(needs train.optimizer adagrad and weight_decay 0); pays for tables of millions of rows",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: the MLP runs under bfloat16 autocast (for GPUs; works on CPU, slowly "
        "without bf16 instructions); lookups, the output and its normalisation stay float32",
    )


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Tower(nn.Module):
    """Maps a feature batch ``{name: Tensor[B] | Tensor[B, L]}`` to embeddings ``Tensor[B, out_dim]``."""

    def __init__(self, fields: Sequence[FieldInfo], config: TowerConfig, extra_dim: int = 0) -> None:
        super().__init__()
        if not fields:
            raise ValueError("a tower needs at least one feature")
        self.config = config
        self.categorical = nn.ModuleDict()
        self.multi_hot = nn.ModuleDict()
        self.numeric_names: list[str] = []
        width = 0
        for field in fields:
            dim = field.embedding_dim or config.embedding_dim
            if field.kind == "categorical":
                self.categorical[field.name] = nn.Embedding(field.cardinality, dim, sparse=config.sparse)
                width += dim
            elif field.kind == "multi_hot":
                self.multi_hot[field.name] = nn.EmbeddingBag(
                    field.cardinality, dim, mode="mean", padding_idx=0, sparse=config.sparse
                )
                width += dim
            elif field.kind == "numeric":
                self.numeric_names.append(field.name)
                width += 1
            else:  # pragma: no cover - FieldInfo.kind is a Literal
                raise ValueError(f"unknown feature kind {field.kind!r} for {field.name!r}")
        # ``extra`` inputs (e.g. the pooled history) are computed outside and concatenated last.
        width += extra_dim
        self.input_dim = width
        self.mlp = _mlp(width, config.layers, config.activation, config.dropout)
        self.output_dim = config.layers[-1] if config.layers else width
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small normal init keeps initial dot products near zero, so a low softmax temperature does
        # not start training with saturated logits.
        for table in [*self.categorical.values(), *self.multi_hot.values()]:
            nn.init.normal_(table.weight, std=self.config.init_std)
            if table.padding_idx is not None:
                with torch.no_grad():
                    table.weight[table.padding_idx].zero_()

    def forward(self, features: dict[str, Tensor], extra: Tensor | None = None) -> Tensor:
        parts = [self.categorical[name](features[name]) for name in self.categorical]
        for name, bag in self.multi_hot.items():
            parts.append(bag(features[name]))
        # Numeric columns join the embeddings in their dtype (float32, or that of a ``.half()`` model).
        dtype = parts[0].dtype if parts else next((p.dtype for p in self.mlp.parameters()), torch.float32)
        parts.extend(features[name].to(dtype).unsqueeze(-1) for name in self.numeric_names)
        if extra is not None:
            parts.append(extra)
        inputs = torch.cat(parts, dim=-1)
        if self.config.precision == "bf16":
            # Only the MLP's products run in bfloat16; the result comes back as float32 so the
            # similarity, the softmax and everything downstream keep their precision.
            with torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16):
                hidden = self.mlp(inputs)
            hidden = hidden.float()
        else:
            hidden = self.mlp(inputs)
        return F.normalize(hidden, dim=-1) if self.config.normalize else hidden


def _mlp(width: int, layers: Sequence[int], activation: str, dropout: float) -> nn.Module:
    """Linear layers with activations between them; the last layer stays linear (it is the embedding)."""
    modules: list[nn.Module] = []
    for i, size in enumerate(layers):
        modules.append(nn.Linear(width, size))
        if i < len(layers) - 1:
            modules.append(_ACTIVATIONS[activation]())
            if dropout:
                modules.append(nn.Dropout(dropout))
        width = size
    return nn.Sequential(*modules)
