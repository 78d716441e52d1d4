"""A retrieval run end to end: config -> data -> model -> fit -> full-corpus evaluation -> run directory.

A run directory holds everything needed to evaluate again, recommend, or resume:

    config.yaml          the resolved config (every default spelled out)
    data_fingerprint.json  SHA-256 of each data file the config reads, taken when the run started:
                         --resume refuses data edited in place since
    checkpoints/         per-epoch training checkpoints (safetensors + JSON), for --resume
    model.safetensors    final weights + encoded feature tables
    model.json           feature encoders, id maps, architecture - everything but the tensors
    train_pairs.safetensors  training (user, item) indices, to exclude seen items when recommending, each
                         pair's history_end and each user's test start time (when the log has times)
    items.parquet        item metadata (the item table's columns) in catalogue order, for serving
    history.json         per-epoch loss, speed, validation metrics
    metrics.json         test metrics of the named protocol

Under torchrun (RANK / WORLD_SIZE set) ``train_run`` joins the process group itself; every rank loads
the data and trains its shard (``twotower.train.fit``), rank 0 alone writes the run directory and
evaluates, and every rank returns rank 0's metrics.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from twotower import __version__, distributed
from twotower.config import (
    ConfigError,
    RunConfig,
    config_to_dict,
    save_config,
    with_absolute_paths,
)
from twotower.data.dataset import (
    Interactions,
    RetrievalData,
    batch_count,
    build_retrieval_data,
    iterate_batches,
)
from twotower.data.prefetch import prefetched
from twotower.evaluate import PROTOCOLS, evaluate_embeddings, result_keys
from twotower.history import history_csr
from twotower.resume import DATA_FINGERPRINT, check_resumable, data_fingerprint
from twotower.retrieval import TwoTowerModel
from twotower.storage import save_tensors, write_json, write_parquet
from twotower.task_config import build_task
from twotower.train import FitResult, fit

log = logging.getLogger("twotower")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(config: RunConfig, data: RetrievalData) -> TwoTowerModel:
    task = build_task(
        config.task,
        config.model.temperature,
        data.num_users,
        data.num_items,
        data.train.user_idx,
        data.train.item_idx,
        seed=config.train.seed,
        impressions=None
        if data.impressions is None
        else (data.impressions.user_idx, data.impressions.item_idx),
    )
    history = None
    if config.model.history.enabled:
        # The training log is the history the model may see: test items never leak into it.
        history = history_csr(data.train.user_idx, data.train.item_idx, data.num_users, data.train.action)
    return TwoTowerModel(
        config.model,
        data.user_encoder.fields(),
        data.item_encoder.fields(),
        data.user_table,
        data.item_table,
        task=task,
        history=history,
    )


def evaluate_model(
    model: TwoTowerModel,
    protocol_name: str,
    train: Interactions,
    test: Interactions,
    ks: list[int] | None = None,
) -> dict[str, Any]:
    """Full-corpus evaluation of ``model`` on ``test`` under a named protocol."""
    protocol = PROTOCOLS[protocol_name]
    model.eval()
    return evaluate_embeddings(
        protocol,
        model.user_embeddings(),
        model.item_embeddings(),
        test.user_idx,
        test.item_idx,
        train.user_idx if protocol.exclude_train else None,
        train.item_idx if protocol.exclude_train else None,
        ks=tuple(ks) if ks else None,
    )


def train_run(
    config: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    data: RetrievalData | None = None,
) -> dict[str, Any]:
    """Train and evaluate one run; returns the test metrics (also written to ``metrics.json``)."""
    owned = distributed.init_from_env()  # launched by torchrun: join its process group
    try:
        return _train_run(config, Path(run_dir), resume, progress, data)
    finally:
        distributed.teardown(owned)


def _train_run(
    config: RunConfig, run_dir: Path, resume: bool, progress: bool, data: RetrievalData | None
) -> dict[str, Any]:
    main = distributed.is_main()
    config = with_absolute_paths(config)  # config.yaml must find the data from any directory
    # Before config.yaml is replaced by one the weights don't fit (or the data fingerprint by one of
    # data they were not trained on).
    resuming = resume and check_resumable(config, run_dir)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    seed_everything(config.train.seed)
    t0 = time.perf_counter()
    data = data or build_retrieval_data(config)  # every rank: the batches are built from it
    _check_early_stopping(config, data)
    (log.info if main else log.debug)(
        "data: %d users, %d items, %d train / %d test interactions",
        data.num_users,
        data.num_items,
        len(data.train),
        len(data.test),
    )
    seed_everything(config.train.seed)  # model init does not depend on how much data loading drew
    model = build_model(config, data)
    if main:
        # Only once the data has loaded and the model is built: a bad data path or tower shape is an
        # error that leaves no run directory holding a lone config.yaml, and does not replace the
        # config.yaml of a run already in run_dir with one its weights do not fit.
        # A resumed run keeps the fingerprint of the data it started on (equal to the data now, or
        # absent in a run older than fingerprints: today's data would be recorded unverified).
        fingerprint = None if resuming else data_fingerprint(config)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        if fingerprint is not None:
            write_json(run_dir / DATA_FINGERPRINT, fingerprint)
    if config.train.compile:
        # In place (nn.Module.compile): the parameters and state-dict keys stay those of the towers.
        model.user_tower.compile(dynamic=True)
        model.item_tower.compile(dynamic=True)

    validate = None
    if data.valid is not None:

        def validate() -> dict[str, float]:
            metrics = evaluate_model(model, config.eval.protocol, data.train, data.valid, config.eval.ks)
            return {k: v for k, v in metrics.items() if isinstance(v, float)}

    def batches(epoch: int):
        return iterate_batches(data.train, config.train.batch_size, config.train.seed, epoch)

    result = fit(
        model,
        # With train.prefetch, batches are gathered on a background thread, that many ahead of the step
        # (same batches, same order).
        prefetched(batches, depth=config.train.prefetch) if config.train.prefetch else batches,
        config.train,
        run_dir,
        validate=validate,
        resume=resume,
        progress=progress,
        batches_per_epoch=batch_count(len(data.train), config.train.batch_size),
    )
    metrics: dict[str, Any] = {}
    if main:  # evaluation and files on rank 0; the others wait in from_main for its metrics
        remove_stale_results(run_dir)
        # The model first: an evaluation that fails (memory on a large catalogue, an interrupt, the
        # other ranks' collective timing out while rank 0 evaluates) must not lose the trained weights.
        save_model(model, data, config, run_dir)
        write_json(run_dir / "history.json", result.history)
        metrics = evaluate_model(model, config.eval.protocol, data.train, data.test, config.eval.ks)
        metrics.update(_fit_summary(result, time.perf_counter() - t0))
        write_json(run_dir / "metrics.json", metrics)
    return distributed.from_main(metrics)


# What a run directory holds about the previous weights besides the export (rebuilt on demand): the
# report, metrics of other protocols (`evaluate --protocol`), the demo's funnel and summary.
STALE_RESULTS = ("report.html", "report", "funnel.json", "demo_summary.json", "metrics-*.json")
# Rewritten with the new weights, and so removed before they are saved: an evaluation that fails after
# the save would otherwise leave the old ones beside the new model, passing for its.
REWRITTEN = ("metrics.json", "history.json")


def remove_stale_results(run_dir: Path) -> None:
    """Remove the export, STALE_RESULTS and REWRITTEN from ``run_dir``: new weights are being saved
    there (a run trained again into the same directory, or resumed), and what was derived from the old
    ones would pass for theirs. ``recommend`` / ``serve`` use RUN_DIR/export when it exists, so an old
    export would be served silently; it is re-exported on first use."""
    export = Path(run_dir) / "export"
    if (export / "manifest.json").exists():  # an export, not a folder of the user's that has the name
        log.info("removing %s: it was exported from the previous weights", export)
        shutil.rmtree(export)
    for pattern in (*STALE_RESULTS, *REWRITTEN):
        for path in Path(run_dir).glob(pattern):
            log.info("removing %s: it describes the previous weights", path)
            (shutil.rmtree if path.is_dir() else Path.unlink)(path)


def _check_early_stopping(config: RunConfig, data: RetrievalData) -> None:
    """Reject, before any training, an early-stopping setting that could not work: without a validation
    split it was silently ignored; an unknown metric failed with a KeyError after the first epoch."""
    stopping = config.train.early_stopping
    if stopping is None:
        return
    if data.valid is None:
        raise ConfigError(
            f"train.early_stopping needs a validation split: protocol {config.eval.protocol!r} has none "
            "of its own; set train.valid_fraction > 0"
        )
    ks = tuple(config.eval.ks) if config.eval.ks else None
    known = [key for key, _, _ in result_keys(PROTOCOLS[config.eval.protocol], ks)]
    if stopping.metric not in known:
        raise ConfigError(f"train.early_stopping.metric {stopping.metric!r} is not one of {known}")


def _fit_summary(result: FitResult, total_seconds: float) -> dict[str, Any]:
    return {
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "train_seconds": round(result.seconds, 3),
        "train_examples_per_s": round(result.examples_per_s, 1),
        "total_seconds": round(total_seconds, 3),
    }


def save_model(model: TwoTowerModel, data: RetrievalData, config: RunConfig, run_dir: Path) -> None:
    """Write the servable model: weights + tables (safetensors) and everything else (JSON).

    ``model.json`` is the commit record, as ``last.json`` is for checkpoints: the old one goes first and
    the new one is written last, so a crash in between leaves no model to load rather than the old
    model.json (ids, vocabularies, config) beside the new weights."""
    (run_dir / "model.json").unlink(missing_ok=True)
    save_tensors(run_dir / "model.safetensors", model.state_dict())
    pairs = {"user_idx": data.train.user_idx, "item_idx": data.train.item_idx}
    if data.train.history_end is not None:  # what each pair's history may see (ties in time excluded)
        pairs["history_end"] = data.train.history_end
    if data.test_start is not None:  # [num_users]: where each user's test period starts (align)
        pairs["user_test_start"] = data.test_start
    save_tensors(run_dir / "train_pairs.safetensors", pairs)
    titles = None
    if data.items is not None:
        save_item_table(data.items, data.item_ids, run_dir / "items.parquet")
    if data.items is not None and "title" in data.items.columns:
        by_id = data.items.set_index("item_id")["title"]
        titles = [None if pd_isna(t) else str(t) for t in by_id.reindex(data.item_ids).tolist()]
    write_json(
        run_dir / "model.json",
        {
            "format": "twotower.retrieval/1",
            "twotower_version": __version__,
            "config": config_to_dict(config),
            "user_encoder": data.user_encoder.to_dict(),
            "item_encoder": data.item_encoder.to_dict(),
            "user_ids": data.user_ids.tolist(),
            "item_ids": data.item_ids.tolist(),
            "item_titles": titles,
            "embedding_dim": model.user_tower.output_dim,
            "similarity": model.config.similarity,
        },
    )


def save_item_table(items: pd.DataFrame, item_ids: np.ndarray, path: Path) -> None:
    """The item table's rows in catalogue order (one per item index), atomically, as Parquet."""
    table = items.drop_duplicates("item_id").set_index("item_id").reindex(item_ids)
    table = table.reset_index().rename(columns={"index": "item_id"})
    for column in table.columns:
        # Parquet needs one type per column; a mixed object column (ids "7" and 7) becomes text.
        if table[column].dtype == object and table[column].map(type).nunique() > 1:
            table[column] = table[column].map(lambda v: None if pd_isna(v) else str(v))
    write_parquet(path, table)


def pd_isna(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))
