"""A run's ranker as it is stored and served: :class:`RunRanker`, its config and the ``ranker/`` files.

Split from :mod:`twotower.reranker`, which trains one from an impression log: serving, export and the
funnel only load and score a ranker, so this module holds what they need (the model wrapper, the
pair features it scores, the directory format and its checks) without the training machinery.

* **Scoring** runs the relevance tower of a :class:`~twotower.ranking.DebiasedRanker` alone (no
  position, no bias tower) on ``[u, i, u * i]`` of the retrieval towers' frozen output embeddings
  (:func:`pair_features`), behind a fixed standardisation of those features (:class:`Standardised`).
* **Files** (``run_dir/ranker/``, or ``run_dir/light_ranker/`` for the light stage):
  ``ranker.safetensors`` (full state dict), ``config.yaml`` (the resolved :class:`RunRankerConfig`)
  and ``ranker.json`` (format, dimensions, context vocabulary, learned examination curves, training
  summary, and a hash of the retrieval weights the features came from). The directory is built beside
  the run and renamed into place, so a reader sees the old ranker or the new one, never a mix; a random
  token in both files catches one that slipped through.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import yaml
from pydantic import Field, ValidationError, model_validator
from safetensors import safe_open
from torch import Tensor, nn

from twotower.config import SectionDefaults, TrainConfig
from twotower.data.impressions import ImpressionColumns
from twotower.ranking import DebiasedRanker, RankerConfig
from twotower.storage import (
    atomic_write_text,
    read_json,
    save_tensors,
    sha256_file,
    staging_dir_beside,
    write_json,
)

__all__ = [
    "CONTEXT",
    "FORMAT",
    "RANKER_DIR",
    "STAGES",
    "RankerFormatError",
    "RunRanker",
    "RunRankerConfig",
    "Standardised",
    "build_ranker_model",
    "pair_features",
    "sha256_file",
    "stage_dir",
]

FORMAT = "twotower.ranker/1"
RANKER_DIR = "ranker"
# Funnel stages a run may hold a ranker for: the main ranker, and a light one run between retrieval and
# it (same model family, a smaller config) that cuts many retrieved candidates to a few.
STAGES = ("ranker", "light_ranker")
CONTEXT = "device"  # the bias tower's key for the context feature (file column names may not be valid keys)


class RankerFormatError(ValueError):
    """A ``ranker/`` directory that is unreadable or does not fit the run it sits in."""


def pair_features(user_emb: Tensor, item_emb: Tensor) -> Tensor:
    """``[..., N, 3d]``: user embedding (broadcast over the N items), item embedding, their product."""
    user, item = torch.broadcast_tensors(user_emb.unsqueeze(-2), item_emb)
    return torch.cat([user, item, user * item], dim=-1)


class RunRankerConfig(SectionDefaults):
    # PAL: p(click) = p(examined | position, device) * p(relevant | user, item). It was the best
    # method with the clicks loss in our ULTR benchmark, and its examination factor does not depend
    # on relevance, so the learned curve is a property of the UI that can be read and checked.
    # Both bias dropouts default to off here, not to RankerConfig's .1 / .5: a run's ranker is trained
    # on the log of a ranker over the same features, where the shown position is predictable from them,
    # and there each dropout hands part of the position effect to the relevance tower. ULTR bench,
    # headline protocol, PAL, 3 seeds (synthetic / MovieLens): nDCG@10 .669 / .622 without dropout,
    # .627 / .625 with position dropout .1, .439 / .605 with bias-logit dropout .5; the curve's largest
    # error .032 / .060, .096 / .082 and .351 / .220. They help only under strong confounding (the
    # sweep's w = 1), so they stay one setting away: --set ranker.bias_dropout=0.5.
    section_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "columns": {"user": "user_id"},
        "ranker": {"combination": "pal", "loss": "clicks", "position_dropout": 0.0, "bias_dropout": 0.0},
        "train": {"epochs": 5, "batch_size": 256, "lr": 3e-3},
    }
    columns: ImpressionColumns
    ranker: RankerConfig
    train: TrainConfig
    max_position: int = Field(
        10,
        ge=1,
        description="slots per request; rows shown lower are ignored (the bias tower covers the positions "
        "up to the deepest one the log shows, at most this)",
    )
    bias_refit: bool = Field(
        True,
        description="after training, fit the bias tower alone to the exact optimum of the training "
        "clicks' likelihood, the relevance tower frozen (so the served scores do not change): the "
        "learned examination curve, and the propensities derived from it, are then the maximum "
        "likelihood ones given the relevance tower instead of where minibatch training stopped",
    )
    on_bad_rows: Literal["raise", "skip"] = "raise"

    @model_validator(mode="after")
    def _servable(self) -> RunRankerConfig:
        if self.columns.user is None:
            raise ValueError(
                "columns.user must name the impression log's user id column: the ranker's features "
                "are the retrieval towers' user embeddings, so every request needs its user"
            )
        if self.ranker.loss != "clicks":
            raise ValueError(
                f"ranker.loss={self.ranker.loss!r} needs propensities or true labels that a click log "
                "does not have; use 'clicks'"
            )
        if self.ranker.position_feature:
            raise ValueError(
                "ranker.position_feature: the served relevance tower must score without a position"
            )
        stopping = self.train.early_stopping
        if stopping is not None and (stopping.metric != "click_loglik" or not self.train.valid_fraction):
            raise ValueError("train.early_stopping needs metric 'click_loglik' and train.valid_fraction > 0")
        return self


@dataclass
class RunRanker:
    """A trained ranker of a run; ``score`` runs the relevance tower only (no position, no bias)."""

    model: DebiasedRanker
    config: RunRankerConfig
    embedding_dim: int
    num_items: int
    context_column: str | None
    context_vocabulary: list[str]
    examination_curve: dict[str, list[float]] | None  # context value -> curve relative to position 1
    retrieval_sha256: str
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def relevance(self) -> nn.Module:
        """The relevance tower, ``relevance(features [..., 3d], item [...]) -> logits [...]`` (for export)."""
        return self.model.relevance

    @torch.no_grad()
    def score(self, user_emb: Tensor, item_idx: Tensor, item_emb: Tensor) -> Tensor:
        """Relevance logits ``[B, N]`` of the items ``item_idx [B, N]`` (catalogue indices; a negative
        index is padding and scores -inf) for users ``user_emb [B, d]``, items ``item_emb [B, N, d]``."""
        if self.model.training:  # eval() walks every submodule: only when needed (serving calls this)
            self.model.eval()
        if item_idx.numel() and int(item_idx.max()) >= self.num_items:
            raise ValueError(f"item index {int(item_idx.max())} is outside the catalogue")
        logits = self.model.score(pair_features(user_emb, item_emb), item_idx.clamp(min=0))
        return logits.masked_fill(item_idx < 0, float("-inf"))

    def save(self, run_dir: str | Path, stage: str = RANKER_DIR) -> Path:
        """Write ``run_dir/<stage>/`` whole: staged in a hidden sibling, then renamed into place."""
        run_dir = Path(run_dir)
        target = run_dir / stage_dir(stage)
        stage = staging_dir_beside(target, prefix=".ranker-")
        try:
            token = uuid.uuid4().hex
            save_tensors(
                stage / "ranker.safetensors", self.model.state_dict(), {"format": FORMAT, "token": token}
            )
            resolved = self.config.model_dump(mode="json")
            atomic_write_text(stage / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
            write_json(stage / "ranker.json", {
                "format": FORMAT, "token": token, "config": resolved,
                "num_features": 3 * self.embedding_dim, "embedding_dim": self.embedding_dim,
                "num_items": self.num_items, "num_positions": self.model.num_positions,
                "context": {"column": self.context_column, "vocabulary": self.context_vocabulary},
                "examination_curve": self.examination_curve, "retrieval_sha256": self.retrieval_sha256,
                "summary": self.summary,
            })  # fmt: skip
            if target.exists():  # a directory cannot be renamed over a full one: move the old aside first
                old = run_dir / f".{target.name}-old-{token}"
                os.replace(target, old)
                try:
                    os.replace(stage, target)
                except BaseException:
                    os.replace(old, target)  # the old ranker goes back: a failed save changes nothing
                    raise
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:  # a stray file where the ranker goes
                    old.unlink(missing_ok=True)
            else:
                os.replace(stage, target)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, run_dir: str | Path, stage: str = RANKER_DIR) -> RunRanker | None:
        """The run's ranker, or None when it has none; :class:`RankerFormatError` when it is broken."""
        run_dir = Path(run_dir)
        where = run_dir / stage_dir(stage)
        if not where.exists():
            # A crash between save's two renames leaves the previous ranker aside: say so, not "none".
            aside = sorted(run_dir.glob(f".{where.name}-old-*"))
            if aside:
                raise RankerFormatError(
                    f"{where} is missing but an interrupted save left the previous one in {aside[0]}: "
                    f"rename it to {where.name}, or retrain with `twotower train-ranker`"
                )
            return None
        try:
            run = read_json(run_dir / "model.json")
        except (OSError, ValueError) as exc:
            raise RankerFormatError(f"{run_dir}: unreadable model.json ({exc})") from exc
        return cls.load_dir(
            where, run["embedding_dim"], len(run["item_ids"]), sha256_file(run_dir / "model.safetensors")
        )

    @classmethod
    def load_dir(
        cls, where: str | Path, embedding_dim: int, num_items: int, retrieval_sha256: str
    ) -> RunRanker:
        """A ranker directory checked against the retrieval model it must sit on (e.g. in an export)."""
        where = Path(where)
        try:
            meta = read_json(where / "ranker.json")
            if meta.get("format") != FORMAT:
                raise RankerFormatError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            config = RunRankerConfig.model_validate(meta["config"])
            dim, num_items_saved, vocab = (
                meta["embedding_dim"],
                meta["num_items"],
                meta["context"]["vocabulary"],
            )
            if meta["num_features"] != 3 * dim or dim != embedding_dim or num_items_saved != num_items:
                raise RankerFormatError(
                    f"trained for {dim}-dim embeddings and {num_items_saved} items, the run has "
                    f"{embedding_dim} and {num_items}"
                )
            if meta["retrieval_sha256"] != retrieval_sha256:
                raise RankerFormatError("trained on other retrieval weights than the run's model.safetensors")
            with safe_open(str(where / "ranker.safetensors"), framework="pt") as handle:
                if (handle.metadata() or {}).get("token") != meta["token"]:
                    raise RankerFormatError("ranker.safetensors and ranker.json come from different saves")
                state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            model = build_ranker_model(dim, num_items, meta["num_positions"], len(vocab), config.ranker)
            model.load_state_dict(state, strict=True)
        except RankerFormatError as exc:
            raise RankerFormatError(
                f"{where}: {exc}; train it again (`twotower train-ranker RUN_DIR LOG`, --light for a light "
                f"ranker) or delete {where}"
            ) from None
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, ValidationError) as exc:
            raise RankerFormatError(f"{where}: unreadable ranker ({type(exc).__name__}: {exc})") from exc
        model.eval()
        return cls(model, config, dim, num_items, meta["context"]["column"], vocab, meta["examination_curve"],
                   meta["retrieval_sha256"], meta.get("summary", {}))  # fmt: skip


class Standardised(nn.Module):
    """A relevance tower behind a fixed per-feature standardisation (buffers, saved with the weights).

    Under cosine similarity the towers' outputs are unit vectors: a coordinate is ~1/sqrt(d) and a
    product of two ~1/d, far below the scale a freshly initialised MLP expects, so it would spend
    many steps just growing its first layer. Statistics of the training pairs fix that; inside the
    module, an export of the relevance tower still takes the raw pair features.
    """

    def __init__(self, tower: nn.Module, num_features: int) -> None:
        super().__init__()
        self.tower = tower
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("scale", torch.ones(num_features))

    def forward(self, features: Tensor, item: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
        return self.tower((features - self.mean) * self.scale, item, extra)


def build_ranker_model(
    dim: int, num_items: int, num_positions: int, num_context: int, config: RankerConfig
) -> DebiasedRanker:
    """An untrained ranker over ``[u, i, u * i]`` features, its relevance tower standardised."""
    model = DebiasedRanker(3 * dim, num_items, num_positions, {CONTEXT: num_context}, config)
    model.relevance = Standardised(model.relevance, 3 * dim)
    return model


def stage_dir(stage: str) -> str:
    """The directory name of a funnel stage's ranker; an error for an unknown stage."""
    if stage not in STAGES:
        raise ValueError(f"unknown ranker stage {stage!r}; choose one of {STAGES}")
    return stage
