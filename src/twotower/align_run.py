"""`twotower align RUN_DIR --out NEW_RUN`: a run's retrieval fine-tuned towards the run's own main ranker.

The run must have a ranker (``twotower train-ranker``). The new run is a copy of the old one whose
retrieval weights went through :func:`twotower.align.align_retrieval`: the retrieval loss on the run's
training pairs (plus, with an impression log, its clicks as positives weighted by
:mod:`twotower.debiased_labels`), and the enabled alignment terms - distillation, the ranker as reward -
on every user's candidate list. Logged clicks at or after a user's first test event are dropped
(``drop_test_period_clicks``; it needs timestamps in the run's log and in the impression log), so the
aligned run's test metrics do not count clicks on test items it was trained on.

The rankers are *not* copied: their pair features are the retrieval embeddings they were trained on,
and those just changed, so serving them on the new towers would feed them inputs they never saw (the
export refuses it by hash). Retrain them on the new run - ``twotower train-ranker NEW_RUN LOG`` - the
alignment itself is measured against the old ranker, which ``align.json`` names by hash.

The new run is built in a hidden sibling directory and renamed into place, so a failure leaves nothing.
"""

from __future__ import annotations

import fnmatch
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from twotower.align import AlignConfig, Teacher, align_retrieval, click_positives, concat_positives
from twotower.data.dataset import Interactions
from twotower.data.impressions import read_impressions
from twotower.debiased_labels import DebiasConfig, debiased_labels
from twotower.experiment import STALE_RESULTS
from twotower.history import history_positions
from twotower.recommender import Retriever
from twotower.reranker import RANKER_DIR, STAGES, RunRanker, sha256_file
from twotower.storage import load_tensors, save_tensors, staging_dir_beside, write_json

__all__ = ["AlignRunConfig", "align_run"]

log = logging.getLogger("twotower")


class AlignRunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    align: AlignConfig = Field(default_factory=AlignConfig)
    debias: DebiasConfig = Field(default_factory=DebiasConfig)
    batch_size: int = Field(512, ge=2, description="positives per step (the retrieval loss)")
    drop_test_period_clicks: bool = Field(
        True,
        description="drop logged clicks at or after the user's first test event (needs timestamps in the "
        "run and the log), so the aligned run's test metrics stay honest; false keeps them (for serving)",
    )


def _before_test(labels: pd.DataFrame, test_start: torch.Tensor | None, user_ids: np.ndarray) -> pd.DataFrame:
    """The rows of ``labels`` before their user's test period (all of them when that cannot be told)."""
    if test_start is None:
        return labels
    if "timestamp" not in labels.columns:
        log.warning(
            "the run's test split has timestamps but the impression log has none (the ranker's "
            "columns.timestamp): its clicks cannot be kept out of the test period, and evaluating the "
            "aligned run on that split may count clicks on test items it trained on"
        )
        return labels
    users = pd.Index(user_ids.astype(str)).get_indexer(labels["user_id"].astype(str))
    start = np.where(users >= 0, test_start.numpy()[np.maximum(users, 0)], np.iinfo(np.int64).max)
    keep = labels["timestamp"].to_numpy(np.int64) < start
    dropped = int((~keep & labels["clicked"].to_numpy(dtype=bool)).sum())
    if dropped:
        level = logging.WARNING if keep.sum() == 0 else logging.INFO
        log.log(level, "%d logged clicks fall in their user's test period; not used", dropped)
    return labels[keep]


def _log_clicks(
    path: Path,
    config: AlignRunConfig,
    ranker: RunRanker,
    retriever: Retriever,
    test_start: torch.Tensor | None = None,
) -> Interactions:
    # The columns the ranker was trained with: the same log format, its context column included, and
    # its bad-row policy (a log the ranker was trained on with on_bad_rows="skip" must not fail here).
    frame = read_impressions(path, ranker.config.columns, ranker.config.on_bad_rows).frame
    labels = debiased_labels(frame, ranker, config.debias)
    if config.drop_test_period_clicks:
        labels = _before_test(labels, test_start, retriever.user_ids)
    return click_positives(labels, retriever.user_ids, retriever.item_ids)


def align_run(
    run_dir: str | Path,
    out: str | Path,
    config: AlignRunConfig | None = None,
    impressions: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``out``: the run with its retrieval aligned to its ranker (see the module docstring)."""
    run_dir, out = Path(run_dir), Path(out)
    config = config or AlignRunConfig()
    if out.exists():
        raise FileExistsError(f"{out} exists: choose a new directory for the aligned run")
    ranker = RunRanker.load(run_dir, RANKER_DIR)
    if ranker is None:
        raise FileNotFoundError(f"{run_dir} has no ranker: `twotower train-ranker {run_dir} LOG` trains one")
    retriever = Retriever.load(run_dir)
    model = retriever.model.eval()
    teacher = Teacher(ranker, model.user_embeddings(), model.item_embeddings())
    pairs = load_tensors(run_dir / "train_pairs.safetensors")
    users = pairs["user_idx"].long()
    # A history model trained on events "before" each target needs each pair's history_end, saved with
    # the pairs (events of the same second are not before one another). Runs saved before it was kept:
    # the pairs are in the order the model's history holds them, so the user's count of earlier pairs.
    ends = pairs.get("history_end")
    ends = history_positions(users, model.num_users) if ends is None else ends.long()
    positives = Interactions(users, pairs["item_idx"].long(), history_end=ends)
    n_clicks = 0
    if impressions is not None:
        clicks = _log_clicks(Path(impressions), config, ranker, retriever, pairs.get("user_test_start"))
        # A logged click comes after the training log: the user's whole history precedes it.
        clicks.history_end = torch.bincount(users, minlength=model.num_users)[clicks.user_idx]
        n_clicks = len(clicks)
        positives = concat_positives(positives, clicks)
    history = align_retrieval(model, teacher, positives, config.align, config.batch_size, progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir_beside(out)
    try:
        # Rankers: see the module docstring. Metrics and reports: they describe the old weights.
        skip = {*STAGES, "checkpoints", "export", "metrics.json"}
        for entry in run_dir.iterdir():  # (hidden: staging folders, a ranker training's checkpoints)
            stale = any(fnmatch.fnmatch(entry.name, pattern) for pattern in STALE_RESULTS)
            if entry.name not in skip and not stale and not entry.name.startswith("."):
                (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, staging / entry.name)
        save_tensors(staging / "model.safetensors", model.state_dict())
        summary = {
            "source_run": str(run_dir.resolve()),
            "teacher_ranker_retrieval_sha256": ranker.retrieval_sha256,
            "source_model_sha256": sha256_file(run_dir / "model.safetensors"),
            "config": config.model_dump(mode="json"),
            "positives": len(positives),
            "click_positives": n_clicks,
            "history": history,
        }
        write_json(staging / "align.json", summary)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary
