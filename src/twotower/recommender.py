"""A trained run loaded for use: ``Retriever.load(run_dir).recommend(user_ids, k) -> (ids, scores)``.

Works in raw ids (the ids of the user's own log), not catalogue indices. The CLI's ``recommend``
and ``evaluate`` commands go through here, so they see exactly what was saved.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from twotower.config import RunConfig, parse_config
from twotower.data.dataset import build_retrieval_data
from twotower.experiment import build_model, evaluate_model
from twotower.features import FeatureEncoder
from twotower.ids import IdLookup
from twotower.retrieval import TwoTowerModel
from twotower.storage import load_tensors, read_json, sha256_file, write_json
from twotower.task_config import build_task
from twotower.topk import CSR

log = logging.getLogger(__name__)


class UnknownUserError(KeyError):
    """A user id that the run's catalogue does not contain."""


@dataclass
class Retriever:
    model: TwoTowerModel
    config: RunConfig
    user_ids: np.ndarray
    item_ids: np.ndarray
    item_titles: list[str | None] | None
    seen: CSR  # training items of each user index
    run_dir: Path

    @classmethod
    def load_pinned(cls, run_dir: str | Path) -> tuple[Retriever, str]:
        """The run's retriever and the SHA-256 of the weights it was loaded from. Hashed before and
        after the load: weights replaced meanwhile (a training writing into the run) are an error, not
        an export or ranker filed under the new weights' hash while computed from the old ones."""
        weights = Path(run_dir) / "model.safetensors"
        sha256 = sha256_file(weights)
        retriever = cls.load(run_dir)
        if sha256_file(weights) != sha256:
            raise RuntimeError(
                f"{weights} changed while it was being loaded (is a training writing into this run?); "
                "try again once it has finished"
            )
        return retriever, sha256

    @classmethod
    def load(cls, run_dir: str | Path) -> Retriever:
        run_dir = Path(run_dir)
        meta_path = run_dir / "model.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{run_dir} holds no trained model (model.json missing): train it first")
        meta = read_json(meta_path)
        config = parse_config(meta["config"], str(meta_path))
        tensors = load_tensors(run_dir / "model.safetensors")
        user_encoder = FeatureEncoder.from_dict(meta["user_encoder"])
        item_encoder = FeatureEncoder.from_dict(meta["item_encoder"])
        user_table = {k[len("user__") :]: v for k, v in tensors.items() if k.startswith("user__")}
        item_table = {k[len("item__") :]: v for k, v in tensors.items() if k.startswith("item__")}
        pairs = load_tensors(run_dir / "train_pairs.safetensors")
        num_users, num_items = len(meta["user_ids"]), len(meta["item_ids"])
        # Same modules as in training (their values come from the state dict below).
        impressions = None
        if "task.impressions.indptr" in tensors:  # rebuild the saved sampler's shape from its CSR
            indptr = tensors["task.impressions.indptr"]
            rows = torch.repeat_interleave(torch.arange(len(indptr) - 1), indptr.diff())
            impressions = (rows, tensors["task.impressions.items"])
        task = build_task(
            config.task,
            config.model.temperature,
            num_users,
            num_items,
            pairs["user_idx"],
            pairs["item_idx"],
            seed=config.train.seed,
            impressions=impressions,
        )
        history = None
        if config.model.history.enabled:
            history = (tensors["history.indptr"], tensors["history.items"], tensors.get("history.actions"))
        model = TwoTowerModel(
            config.model,
            user_encoder.fields(),
            item_encoder.fields(),
            user_table,
            item_table,
            task=task,
            history=history,
        )
        model.load_state_dict(tensors, strict=True)
        model.eval()
        seen = CSR.from_pairs(pairs["user_idx"], pairs["item_idx"], model.num_users)
        return cls(
            model,
            config,
            np.asarray(meta["user_ids"]),
            np.asarray(meta["item_ids"]),
            meta.get("item_titles"),
            seen,
            run_dir,
        )

    @cached_property
    def _user_lookup(self) -> IdLookup:
        return IdLookup(self.user_ids)

    def user_index(self, user_ids: Any) -> Tensor:
        """Catalogue indices of raw user ids (matched as the service matches them,
        :mod:`twotower.ids`); unknown ids raise ``UnknownUserError`` naming them."""
        # One id is not a list of ids: a string would be split into its characters ("42" -> users "4"
        # and "2"), each looked up as a user of its own.
        if (
            isinstance(user_ids, str | bytes)
            or not isinstance(user_ids, Iterable)
            or (isinstance(user_ids, np.ndarray) and user_ids.ndim != 1)
        ):
            raise TypeError(
                f"user_ids must be a 1-D sequence of user ids, got {type(user_ids).__name__} "
                f"{user_ids!r:.50}; for one user pass [user_id]"
            )
        values = user_ids.tolist() if isinstance(user_ids, np.ndarray) else list(user_ids)
        positions = self._user_lookup.positions(values)
        missing = [str(u) for u, p in zip(values, positions, strict=True) if p < 0]
        if missing:
            raise UnknownUserError(f"unknown user id(s): {', '.join(missing[:10])}")
        return torch.as_tensor(positions, dtype=torch.long)

    def recommend(
        self, user_ids: Any, k: int = 10, exclude_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k raw item ids and scores per user, ``(ids [U, k], scores [U, k])``."""
        idx = self.user_index(user_ids)
        exclude = _subset(self.seen, idx) if exclude_seen else None
        top, scores = self.model.recommend(idx, k, exclude=exclude)
        ids = np.where(top.numpy() >= 0, self.item_ids[top.clamp_min(0).numpy()], None)
        return ids, scores.numpy()

    def titles(self, item_ids: np.ndarray) -> list[str | None]:
        if self.item_titles is None:
            return [None] * len(item_ids)
        pos = pd.Index(self.item_ids).get_indexer(item_ids)
        return [self.item_titles[p] if p >= 0 else None for p in pos]


def evaluate_run(run_dir: str | Path, protocol: str | None = None) -> dict[str, Any]:
    """Re-create the run's split from its config and evaluate the saved model on its test part."""
    retriever = Retriever.load(run_dir)
    config = retriever.config
    if protocol is not None:
        config = config.model_copy(update={"eval": config.eval.model_copy(update={"protocol": protocol})})
    data = build_retrieval_data(config)
    # Users as well as items: the model's user embeddings are looked up by the data's user indices.
    for what, rebuilt, saved in (
        ("item", data.item_ids, retriever.item_ids),
        ("user", data.user_ids, retriever.user_ids),
    ):
        if len(rebuilt) != len(saved) or (rebuilt != saved).any():
            raise ValueError(
                f"the data no longer matches the catalogue saved in {run_dir} (its {what} ids differ)"
            )
    metrics = evaluate_model(retriever.model, config.eval.protocol, data.train, data.test, config.eval.ks)
    if protocol is not None and protocol != retriever.config.eval.protocol:
        # Each protocol draws its own split: this test split holds pairs the model was trained on.
        log.warning(
            "protocol %s: the model was trained on the %s split, whose training pairs the %s test "
            "split does not hold out; these metrics are optimistic (train with eval.protocol=%s for "
            "honest ones)", protocol, retriever.config.eval.protocol, protocol, protocol,
        )  # fmt: skip
    write_json(Path(run_dir) / f"metrics-{config.eval.protocol}.json", metrics)
    return metrics


def _subset(csr: CSR, rows: Tensor) -> CSR:
    """The CSR restricted to ``rows`` (in that order)."""
    cols = [csr.indices[csr.indptr[r] : csr.indptr[r + 1]] for r in rows.tolist()]
    if not cols:  # no rows (torch.cat refuses an empty list)
        return CSR.from_pairs(torch.zeros(0, dtype=torch.long), csr.indices[:0], 0)
    row_ids = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(cols)])
    return CSR.from_pairs(row_ids, torch.cat(cols), len(cols))


__all__ = ["Retriever", "UnknownUserError", "build_model", "evaluate_run"]
