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
* **Files** and serving: :class:`RunRanker` and the ``run_dir/ranker/`` format live in
  :mod:`twotower.run_ranker` (loading and scoring need none of the training below); the names are
  re-exported here, where the rest of the package imports them from.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from twotower.data.impressions import read_impressions
from twotower.ranking import DebiasedRanker
from twotower.ranking_metrics import click_log_likelihood
from twotower.recommender import Retriever
from twotower.run_ranker import (
    CONTEXT,
    FORMAT,
    RANKER_DIR,
    STAGES,
    RankerFormatError,
    RunRanker,
    RunRankerConfig,
    build_ranker_model,
    pair_features,
    sha256_file,
    stage_dir,
)
from twotower.storage import read_json, write_json
from twotower.train import fit

__all__ = [
    "FORMAT",
    "RANKER_DIR",
    "STAGES",
    "RankerFormatError",
    "RunRanker",
    "RunRankerConfig",
    "fit_run_ranker",
    "pair_features",
    "sha256_file",
    "train_run_ranker",
]

log = logging.getLogger("twotower")


def _positions(catalogue: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Catalogue index of each raw id, -1 if unknown. Compared as text: a log and a run may disagree on
    whether an id column is int or str (the loaders make it int only when every value is canonical)."""
    return pd.Index(catalogue.astype(str)).get_indexer(np.asarray(ids).astype(str))


def training_dir(run_dir: str | Path, stage: str = RANKER_DIR) -> Path:
    """Where a stage's ranker training keeps its checkpoints until the ranker is saved."""
    return Path(run_dir) / f".{stage_dir(stage)}-training"


def _fingerprint(log_path: Path, config: RunRankerConfig, retrieval_sha256: str) -> dict[str, Any]:
    """What a checkpoint must have been trained on to be resumed: the same log, retrieval weights and
    config, except the settings a resumed run may change (epochs, early stopping, threads, lr)."""
    resolved = config.model_dump(mode="json")
    for key in ("epochs", "early_stopping", "threads", "lr", "weight_decay"):
        resolved["train"].pop(key, None)
    return {"log_sha256": sha256_file(log_path), "retrieval_sha256": retrieval_sha256, "config": resolved}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}


def _mismatch(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the fingerprint of a checkpoint and that of this training, in words."""
    out = []
    if saved.get("log_sha256") != now["log_sha256"]:
        out.append("the impression log (another file, or edited since)")
    if saved.get("retrieval_sha256") != now["retrieval_sha256"]:
        out.append("the run's retrieval weights")
    old, new = _flat(saved.get("config", {})), _flat(now["config"])
    keys = sorted(k.rstrip(".") for k in set(old) | set(new) if old.get(k) != new.get(k))
    if keys:
        out.append("config " + ", ".join(keys))
    return out


def _checkpoints(where: Path, fingerprint: dict[str, Any], resume: bool) -> bool:
    """Prepare the checkpoint folder; True when training continues from what is in it.

    Resuming from checkpoints of another log, retrieval model or config is refused (a ValueError
    naming what differs, the checkpoints kept), as ``train --resume`` refuses: the user asked to
    continue, and silently starting over would throw away the training done."""
    mark = where / "fingerprint.json"
    if resume and mark.exists():
        try:
            saved = read_json(mark)
        except ValueError as exc:  # a damaged mark: nothing in the folder can be trusted
            raise ValueError(
                f"cannot resume from {where}: its fingerprint.json is unreadable ({exc}); delete the "
                "folder, or train without --resume"
            ) from exc
        differs = _mismatch(saved, fingerprint)
        if not differs:
            return True
        raise ValueError(
            f"cannot resume from {where}: its checkpoints were trained on other data or settings; differing: "
            f"{'; '.join(differs)}; "
            "train without --resume to start over (the checkpoints are then replaced)"
        )
    if resume:
        log.warning("no ranker checkpoint in %s: training from scratch", where)
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    write_json(mark, fingerprint)
    return False


def fit_run_ranker(
    run_dir: str | Path,
    impressions_path: str | Path,
    config: RunRankerConfig,
    progress: bool = False,
    checkpoints: Path | None = None,
    resume: bool = False,
) -> tuple[RunRanker, dict[str, Any]]:
    """Train a ranker for the run on the impression log without saving it: ``(ranker, summary)``.

    ``checkpoints``: a folder for the epoch checkpoints (default: a temporary one, dropped); with
    ``resume``, training continues from the last checkpoint there, which must have been made from the
    same log, retrieval weights and config (else a ValueError says what differs)."""
    run_dir, path = Path(run_dir), Path(impressions_path)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    retriever, retrieval_sha256 = Retriever.load_pinned(run_dir)  # what the features are computed with
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
        hint = (
            f"are its user and item ids those of the run {run_dir}?"
            if len(users)
            else f"it has no row at a position <= max_position ({config.max_position})"
        )
        raise ValueError(f"{path}: no request left to train on ({counts}): {hint}")
    if counts["dropped_unknown_user"] or counts["masked_unknown_item"]:
        log.warning("%s: ids outside the run's catalogue: %s", path, counts)
    clicked = (lists.clicks[keep] * known[keep]).any(axis=1)  # per kept request
    if not clicked.any():
        # Without a click the likelihood is maximised by p(click) = 0 everywhere: a ranker that ranks
        # nothing and an examination curve that means nothing.
        raise ValueError(f"{path}: no click on a known item in the requests left to train on ({counts})")

    rng = np.random.default_rng([config.train.seed, 41])
    order = rng.permutation(int(keep.sum()))
    n_valid = min(len(order) - 1, int(np.ceil(config.train.valid_fraction * len(order))))
    valid, train = order[:n_valid], order[n_valid:]
    if not clicked[train].any():  # every click went to the validation split: the same dead ranker
        raise ValueError(
            f"{path}: no click on a known item in the requests left to train on: all "
            f"{int(clicked.sum())} clicked requests fell in the validation split (train.valid_fraction="
            f"{config.train.valid_fraction}); lower it or log more requests"
        )

    if config.columns.context:
        column = config.columns.context[0]
        if len(config.columns.context) > 1:
            log.warning(
                "the ranker's bias tower uses context %r only; %s ignored", column, config.columns.context[1:]
            )
        values = lists.context[column][keep]
        vocab = pd.factorize(values[train], sort=True)[1]  # the values trained on
        codes = pd.Index(vocab).get_indexer(values)
        # A value only validation requests have would meet an untrained bias embedding: leave them out.
        unseen = valid[codes[valid] < 0]
        if len(unseen):
            log.warning("%d validation requests have a %s value no training request has; not used",
                        len(unseen), column)  # fmt: skip
            valid = valid[codes[valid] >= 0]
            n_valid = len(valid)
        codes = np.maximum(codes, 0)
        vocabulary = [str(v) for v in vocab]
    else:
        column, codes, vocabulary = None, np.zeros(int(keep.sum()), dtype=np.int64), ["all"]

    # Positions up to the deepest one a kept request shows, not max_position: deeper ones were never
    # trained on, and their curve values would be those of random embeddings (a deeper position is
    # served the last one's value, as any position past the bias tower's table is).
    n = int(np.flatnonzero(known[keep].any(axis=0)).max()) + 1
    sessions = {
        "user": torch.from_numpy(users[keep]),
        "item": torch.from_numpy(np.where(known, items, 0)[keep][:, :n]),
        "mask": torch.from_numpy(known[keep][:, :n]),
        "position": torch.arange(1, n + 1).expand(int(keep.sum()), n).contiguous(),
        CONTEXT: torch.from_numpy(codes.astype(np.int64)),
        "clicks": torch.from_numpy(lists.clicks[keep][:, :n]),
    }

    def batch(index: np.ndarray) -> dict[str, Tensor]:
        out = {k: v[torch.from_numpy(index)] for k, v in sessions.items()}
        # Features are gathered per batch: [B, N, 3d] for the whole log could be large.
        out["features"] = pair_features(user_emb[out.pop("user")], item_emb[out["item"]])
        return out

    def batches(epoch: int) -> Iterator[dict[str, Tensor]]:
        shuffled = train[np.random.default_rng([config.train.seed, epoch, 42]).permutation(len(train))]
        for start in range(0, len(shuffled), config.train.batch_size):
            yield batch(shuffled[start : start + config.train.batch_size])

    @torch.no_grad()
    def validate() -> dict[str, float]:
        probs, clicks = [], []
        for start in range(0, len(valid), 4096):
            b = batch(valid[start : start + 4096])
            probs.append(model.click_probability(b)[b["mask"]])
            clicks.append(b["clicks"][b["mask"]])
        return {"click_loglik": click_log_likelihood(torch.cat(probs).numpy(), torch.cat(clicks).numpy())}

    torch.manual_seed(config.train.seed)
    model = build_ranker_model(user_emb.shape[1], len(item_emb), n, len(vocabulary), config.ranker)
    # A random sample of training sessions (``train`` is shuffled): feature statistics now, the
    # additive model's curves later.
    sample = train[:8192]
    features = batch(sample)["features"][sessions["mask"][torch.from_numpy(sample)]]
    std = features.std(0, correction=0)
    model.relevance.mean.copy_(features.mean(0))
    model.relevance.scale.copy_(torch.where(std > 1e-6, 1.0 / std, 1.0))  # constant: nothing to scale
    del features
    validation = validate if n_valid else None
    per_epoch = math.ceil(len(train) / config.train.batch_size)  # every batch of `batches`, the tail too
    if checkpoints is None:
        with tempfile.TemporaryDirectory(prefix="twotower-ranker-") as tmp:  # checkpoints are not kept
            result = fit(model, batches, config.train, Path(tmp), validation, progress=progress,
                         batches_per_epoch=per_epoch)  # fmt: skip
    else:
        resume = _checkpoints(checkpoints, _fingerprint(path, config, retrieval_sha256), resume)
        result = fit(model, batches, config.train, checkpoints, validation, resume, progress, per_epoch)
    model.eval()

    summary = {
        **counts, "sessions": len(train), "valid_sessions": n_valid, "epochs": result.epochs_run,
        "final_loss": result.history[-1]["loss"], "seconds": round(result.seconds, 3),
    }  # fmt: skip
    if result.best_epoch is not None:  # early stopping put the best epoch's weights back: its metrics
        summary["best_epoch"] = result.best_epoch
    served = next((h for h in result.history if h["epoch"] == result.best_epoch), result.history[-1])
    summary.update({k: v for k, v in served.items() if k.startswith("valid_")})
    if config.bias_refit and model.bias is not None:
        with torch.no_grad():  # the frozen relevance logits of every training slot, in chunks
            r = torch.cat(
                [model.relevance_logit(batch(train[i : i + 4096])) for i in range(0, len(train), 4096)]
            )
        index = torch.from_numpy(train)
        cells = {k: sessions[k][index] for k in ("position", CONTEXT, "mask")}
        model.fit_bias(r, cells, sessions["clicks"][index])
        if n_valid:
            summary["valid_click_loglik_after_bias_refit"] = validate()["click_loglik"]
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
    resume: bool = False,
) -> dict[str, Any]:
    """Train one of the run's rankers (``stage``: "ranker" or "light_ranker") on an impression log and
    save it to ``run_dir/<stage>/``; returns the training summary. Epoch checkpoints live in
    :func:`training_dir` until the ranker is saved; ``resume`` continues from the last one."""
    stage_dir(stage)  # an unknown stage fails before the training, not after
    checkpoints = training_dir(run_dir, stage)
    ranker, summary = fit_run_ranker(run_dir, impressions_path, config, progress, checkpoints, resume)
    where = ranker.save(run_dir, stage)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the saved ranker supersedes them
    log.info("%s saved to %s: %s", stage, where, summary)
    return {**summary, "ranker_dir": str(where)}
