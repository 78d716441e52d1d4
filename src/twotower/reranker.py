"""A debiased re-ranker that belongs to a retrieval run: trained on its impression log, served with it.

Serving retrieves the top N items with the retrieval towers, then re-orders them with the relevance
tower of a :class:`~twotower.ranking.DebiasedRanker` when the run has one (``run_dir/ranker/``).

* **Features** are the retrieval towers' *output* embeddings, frozen: ``[u, i, u * i]`` per (user,
  item) pair (:func:`pair_features`). Serving has them anyway (it just retrieved with them), they
  exist for any user the user tower can encode (cold-start users from features included), and the
  product carries the retrieval similarity itself. The relevance tower adds an item id embedding, so
  it can learn what clicks say about an item beyond its embedding.
* **Training data** is a real-format impression log (request, item, position, click, user, optional
  context such as device, see :mod:`twotower.data.impressions`). Raw user and item ids map to the
  run's catalogue: a slot with an unknown item is masked, a request with an unknown user (or with no
  known item left) is dropped; the counts go into the summary and a warning.
* **Bias**: the bias tower sees the position and the first context column (``device`` inside the
  model, whatever the file calls it). It only explains clicks during training; inference runs the
  relevance tower alone, so the context vocabulary is stored for the record, not for scoring.
* **Files** (``run_dir/ranker/``): ``ranker.safetensors`` (full state dict), ``config.yaml`` (the
  resolved :class:`RunRankerConfig`) and ``ranker.json`` (format, dimensions, context vocabulary,
  learned examination curves, training summary, and a hash of the retrieval weights the features
  came from). The directory is built beside the run and renamed into place, so a reader sees the old
  ranker or the new one, never a mix; a random token in both files catches one that slipped through.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import safe_open
from torch import Tensor, nn

from twotower.config import TrainConfig
from twotower.data.impressions import ImpressionColumns, read_impressions
from twotower.ranking import DebiasedRanker, RankerConfig
from twotower.ranking_metrics import click_log_likelihood
from twotower.recommender import Retriever
from twotower.storage import atomic_write_text, read_json, save_tensors, write_json
from twotower.train import fit

__all__ = [
    "RankerFormatError",
    "RunRanker",
    "RunRankerConfig",
    "fit_run_ranker",
    "pair_features",
    "sha256_file",
    "train_run_ranker",
]

log = logging.getLogger("twotower")

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


class RunRankerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    columns: ImpressionColumns = Field(default_factory=lambda: ImpressionColumns(user="user_id"))
    # PAL: p(click) = p(examined | position, device) * p(relevant | user, item). It was the best
    # method with the clicks loss in our ULTR benchmark, and its examination factor does not depend
    # on relevance, so the learned curve is a property of the UI that can be read and checked.
    ranker: RankerConfig = Field(default_factory=lambda: RankerConfig(combination="pal", loss="clicks"))
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=5, batch_size=256, lr=3e-3))
    max_position: int = Field(10, ge=1, description="slots per request; rows shown lower are ignored")
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
        target = run_dir / _stage_dir(stage)
        stage = Path(tempfile.mkdtemp(prefix=".ranker-", dir=run_dir))
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
                old = run_dir / f".ranker-old-{token}"
                os.replace(target, old)
                os.replace(stage, target)
                shutil.rmtree(old, ignore_errors=True)
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
        where = run_dir / _stage_dir(stage)
        if not where.exists():
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
            model = _build(dim, num_items, meta["num_positions"], len(vocab), config.ranker)
            model.load_state_dict(state, strict=True)
        except RankerFormatError as exc:
            raise RankerFormatError(f"{where}: {exc}; retrain it with train_run_ranker") from None
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


def _build(
    dim: int, num_items: int, num_positions: int, num_context: int, config: RankerConfig
) -> DebiasedRanker:
    model = DebiasedRanker(3 * dim, num_items, num_positions, {CONTEXT: num_context}, config)
    model.relevance = Standardised(model.relevance, 3 * dim)
    return model


def _stage_dir(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown ranker stage {stage!r}; choose one of {STAGES}")
    return stage


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _positions(catalogue: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Catalogue index of each raw id, -1 if unknown. Compared as text: a log and a run may disagree on
    whether an id column is int or str (the loaders make it int only when every value is canonical)."""
    return pd.Index(catalogue.astype(str)).get_indexer(np.asarray(ids).astype(str))


def fit_run_ranker(
    run_dir: str | Path, impressions_path: str | Path, config: RunRankerConfig, progress: bool = False
) -> tuple[RunRanker, dict[str, Any]]:
    """Train a ranker for the run on the impression log without saving it: ``(ranker, summary)``."""
    run_dir, path = Path(run_dir), Path(impressions_path)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    retriever = Retriever.load(run_dir)
    retrieval_sha256 = sha256_file(run_dir / "model.safetensors")  # what the features were computed with
    retriever.model.eval()
    user_emb, item_emb = retriever.model.user_embeddings(), retriever.model.item_embeddings()
    lists = read_impressions(path, config.columns, config.on_bad_rows).to_lists(config.max_position)

    users = _positions(retriever.user_ids, lists.user_ids)
    items = _positions(retriever.item_ids, lists.items.ravel()).reshape(lists.items.shape)
    known = lists.mask & (items >= 0)
    keep = (users >= 0) & known.any(axis=1)
    counts = {
        "requests": len(users),  # with a row at position <= max_position
        "dropped_unknown_user": int((users < 0).sum()),  # requests
        "masked_unknown_item": int((lists.mask & (items < 0)).sum()),  # shown slots, whole file
        "dropped_no_known_item": int(((users >= 0) & ~known.any(axis=1)).sum()),  # requests
    }
    if not keep.any():
        raise ValueError(
            f"{path}: no request left to train on ({counts}): are its user and item ids those of the "
            f"run {run_dir}?"
        )
    if counts["dropped_unknown_user"] or counts["masked_unknown_item"]:
        log.warning("%s: ids outside the run's catalogue: %s", path, counts)

    if config.columns.context:
        column = config.columns.context[0]
        if len(config.columns.context) > 1:
            log.warning(
                "the ranker's bias tower uses context %r only; %s ignored", column, config.columns.context[1:]
            )
        codes, vocab = pd.factorize(lists.context[column][keep], sort=True)  # values trained on
        vocabulary = [str(v) for v in vocab]
    else:
        column, codes, vocabulary = None, np.zeros(int(keep.sum()), dtype=np.int64), ["all"]

    n = lists.mask.shape[1]
    sessions = {
        "user": torch.from_numpy(users[keep]),
        "item": torch.from_numpy(np.where(known, items, 0)[keep]),
        "mask": torch.from_numpy(known[keep]),
        "position": torch.arange(1, n + 1).expand(int(keep.sum()), n).contiguous(),
        CONTEXT: torch.from_numpy(codes.astype(np.int64)),
        "clicks": torch.from_numpy(lists.clicks[keep]),
    }
    rng = np.random.default_rng([config.train.seed, 41])
    order = rng.permutation(int(keep.sum()))
    n_valid = min(len(order) - 1, int(np.ceil(config.train.valid_fraction * len(order))))
    valid, train = order[:n_valid], order[n_valid:]

    def batch(index: np.ndarray) -> dict[str, Tensor]:
        out = {k: v[torch.from_numpy(index)] for k, v in sessions.items()}
        # Features are gathered per batch: [B, N, 3d] for the whole log could be large.
        out["features"] = pair_features(user_emb[out.pop("user")], item_emb[out["item"]])
        return out

    def batches(epoch: int) -> Iterator[dict[str, Tensor]]:
        shuffled = train[np.random.default_rng([config.train.seed, epoch, 42]).permutation(len(train))]
        for start in range(0, len(shuffled), config.train.batch_size):
            yield batch(shuffled[start : start + config.train.batch_size])

    def validate() -> dict[str, float]:
        probs, clicks = [], []
        for start in range(0, len(valid), 4096):
            b = batch(valid[start : start + 4096])
            probs.append(model.click_probability(b)[b["mask"]])
            clicks.append(b["clicks"][b["mask"]])
        return {"click_loglik": click_log_likelihood(torch.cat(probs).numpy(), torch.cat(clicks).numpy())}

    torch.manual_seed(config.train.seed)
    model = _build(user_emb.shape[1], len(item_emb), n, len(vocabulary), config.ranker)
    # A random sample of training sessions (``train`` is shuffled): feature statistics now, the
    # additive model's curves later.
    sample = train[:8192]
    features = batch(sample)["features"][sessions["mask"][torch.from_numpy(sample)]]
    std = features.std(0, correction=0)
    model.relevance.mean.copy_(features.mean(0))
    model.relevance.scale.copy_(torch.where(std > 1e-6, 1.0 / std, 1.0))  # constant: nothing to scale
    del features
    with tempfile.TemporaryDirectory(prefix="twotower-ranker-") as tmp:  # checkpoints are not kept
        result = fit(
            model, batches, config.train, Path(tmp), validate if n_valid else None, progress=progress
        )
    model.eval()

    summary = {
        **counts, "sessions": len(train), "valid_sessions": n_valid, "epochs": result.epochs_run,
        "final_loss": result.history[-1]["loss"], "seconds": round(result.seconds, 3),
        **{k: v for k, v in result.history[-1].items() if k.startswith("valid_")},
    }  # fmt: skip
    curves = _curves(model, batch(sample))
    ranker = RunRanker(model, config, user_emb.shape[1], len(item_emb), column, vocabulary,
                       None if curves is None else dict(zip(vocabulary, curves, strict=True)),
                       retrieval_sha256, summary)  # fmt: skip
    return ranker, summary


@torch.no_grad()
def _curves(model: DebiasedRanker, sample: dict[str, Tensor]) -> list[list[float]] | None:
    """Per context value: expected click rate at position k over at position 1 (as ``ultr.learned_curves``).

    Under PAL that is ``sigmoid(b_k) / sigmoid(b_1)`` whatever the items; under the additive model it
    depends on relevance, so it is averaged over a sample of the training slots.
    """
    if model.bias is None:
        return None
    r = model.relevance_logit(sample)[sample["mask"]]
    positions = torch.arange(1, model.num_positions + 1).unsqueeze(0)
    out = []
    for value in range(model.bias.context[CONTEXT].num_embeddings):
        b = model.bias(positions, {CONTEXT: torch.tensor([value])}).squeeze(0)
        if model.config.combination == "pal":
            ctr = torch.sigmoid(b)
        else:
            ctr = torch.sigmoid(r.unsqueeze(1) + b.unsqueeze(0)).mean(0)
        out.append((ctr / ctr[0]).tolist())
    return out


def train_run_ranker(
    run_dir: str | Path,
    impressions_path: str | Path,
    config: RunRankerConfig,
    progress: bool = False,
    stage: str = RANKER_DIR,
) -> dict[str, Any]:
    """Train one of the run's rankers (``stage``: "ranker" or "light_ranker") on an impression log and
    save it to ``run_dir/<stage>/``; returns the training summary."""
    _stage_dir(stage)  # an unknown stage fails before the training, not after
    ranker, summary = fit_run_ranker(run_dir, impressions_path, config, progress)
    where = ranker.save(run_dir, stage)
    log.info("%s saved to %s: %s", stage, where, summary)
    return {**summary, "ranker_dir": str(where)}
