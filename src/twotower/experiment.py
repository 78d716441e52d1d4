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
    FileSource,
    MovieLensSource,
    RunConfig,
    config_to_dict,
    load_config,
    save_config,
    with_absolute_paths,
)
from twotower.data import movielens
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
from twotower.retrieval import TwoTowerModel
from twotower.storage import read_json, save_tensors, sha256_file, write_json, write_parquet
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
    resuming = resume and _check_resumable(config, run_dir)
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
        fingerprint = None if resuming else _data_fingerprint(config)
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
    if main:  # evaluation and files on rank 0; the others wait in broadcast_json for its metrics
        # `recommend` / `serve` use RUN_DIR/export when it exists: one built from the previous weights
        # (before --resume, or a run trained again into the same directory) would be served silently.
        # It is derived data, re-exported on first use.
        stale_export = run_dir / "export"
        if (stale_export / "manifest.json").exists():
            log.info("removing %s: it was exported from the previous weights", stale_export)
            shutil.rmtree(stale_export)
        remove_stale_results(run_dir)
        # The model first: an evaluation that fails (memory on a large catalogue, an interrupt, the
        # other ranks' collective timing out while rank 0 evaluates) must not lose the trained weights.
        save_model(model, data, config, run_dir)
        write_json(run_dir / "history.json", result.history)
        metrics = evaluate_model(model, config.eval.protocol, data.train, data.test, config.eval.ks)
        metrics.update(_fit_summary(result, time.perf_counter() - t0))
        write_json(run_dir / "metrics.json", metrics)
    return distributed.broadcast_json(metrics)


# What a run directory holds about the previous weights besides the export (rebuilt on demand): the
# report, metrics of other protocols (`evaluate --protocol`), the demo's funnel and summary.
# metrics.json and history.json are rewritten with the new weights.
STALE_RESULTS = ("report.html", "report", "funnel.json", "demo_summary.json", "metrics-*.json")


def remove_stale_results(run_dir: Path) -> None:
    """Remove STALE_RESULTS from ``run_dir``: new weights are being saved there (a run trained again into
    the same directory, or resumed), and a report or metrics of the old ones would pass for theirs."""
    for pattern in STALE_RESULTS:
        for path in Path(run_dir).glob(pattern):
            log.info("removing %s: it describes the previous weights", path)
            (shutil.rmtree if path.is_dir() else Path.unlink)(path)


# Sections whose change makes the last checkpoint another model (shapes, vocabularies, split, task
# state): resuming with them changed is an error, not a torch state-dict traceback after config.yaml
# was already overwritten. train.* (epochs, lr, ...) may change on resume, except the optimizer and what
# draws the training split (eval.protocol, train.valid_fraction and, with a holdout, train.seed).
_RESUME_FIXED = ("data", "features", "model", "task")
# The same data section can name files edited in place: their SHA-256 when the run started.
DATA_FINGERPRINT = "data_fingerprint.json"


def _check_resumable(config: RunConfig, run_dir: Path) -> bool:
    """Refuse (ConfigError) a resume whose checkpoint was trained on another config or data; False when
    there is nothing to resume from (training starts afresh)."""
    saved_path = run_dir / "config.yaml"
    if not (run_dir / "checkpoints" / "last.json").exists():
        # Nothing to resume from (e.g. stopped before its first checkpoint): training starts afresh,
        # as fit does - said out loud, since the user asked for something else.
        log.warning("--resume: %s has no checkpoint to resume from; training starts from scratch", run_dir)
        return False
    if not saved_path.exists():
        # A checkpoint of an unknown config: fit would load it unchecked (a state-dict traceback, or
        # weights of another model) after config.yaml was written anew - refused, the checkpoint kept.
        raise ConfigError(
            f"cannot resume {run_dir}: it has a checkpoint but no config.yaml to check the config against; "
            "put the run's config.yaml back, or train into a new --run-dir"
        )
    saved = config_to_dict(with_absolute_paths(load_config(saved_path)))
    new = config_to_dict(config)
    changed = [key for key in _RESUME_FIXED if saved[key] != new[key]]
    if saved["train"]["optimizer"] != new["train"]["optimizer"]:
        changed.append("train.optimizer")
    # The training split (and the id vocabularies fitted on it) follows the protocol's split and the
    # valid_fraction holdout, which is drawn with train.seed.
    if saved["eval"]["protocol"] != new["eval"]["protocol"]:
        changed.append("eval.protocol")
    if saved["train"]["valid_fraction"] != new["train"]["valid_fraction"]:
        changed.append("train.valid_fraction")
    elif new["train"]["valid_fraction"] > 0 and saved["train"]["seed"] != new["train"]["seed"]:
        changed.append("train.seed")
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir}: {', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'} "
            "from its config.yaml "
            "(its checkpoint belongs to that config); train into a new --run-dir instead"
        )
    # The config names the same files; their content may still have been edited in place. Rank 0
    # hashes (files can be GBs: once, not once per process) and every rank gets its verdict, so all
    # of them refuse together.
    edited = distributed.broadcast_json(_changed_data(config, run_dir) if distributed.is_main() else None)
    if edited:
        raise ConfigError(
            f"cannot resume {run_dir}: {'; '.join(edited)} since the run started (its checkpoint was "
            "trained on the data as it was then); train into a new --run-dir instead"
        )
    return True


def _data_files(config: RunConfig) -> list[Path]:
    """The files the config's data is read from (its paths are absolute: ``with_absolute_paths``)."""
    data = config.data
    if isinstance(data, FileSource):
        return [Path(p) for p in (data.interactions, data.users, data.items) if p is not None]
    if isinstance(data, MovieLensSource) and data.path is not None:
        # A local copy is read as it is, never checked against a digest: fingerprinted like any file.
        return movielens.local_files(data.name, data.path)
    # None to hash: synthetic data is generated from data.world (compared with the config), and a
    # MovieLens release without data.path is the cached archive, which was only ever stored once it
    # matched the digest GroupLens publishes for data.name (also compared with the config).
    return []


def _data_fingerprint(config: RunConfig) -> dict[str, Any]:
    # sha256_file streams (1 MiB chunks): a log of GBs is never held in memory to be hashed.
    return {"sha256": {str(path): sha256_file(path) for path in _data_files(config)}}


def _changed_data(config: RunConfig, run_dir: Path) -> list[str]:
    """What differs between the data files now and those the run started on, one phrase per file."""
    try:
        recorded = read_json(run_dir / DATA_FINGERPRINT)["sha256"]
    except FileNotFoundError:
        # A run trained before fingerprints were recorded: its data cannot be checked, but refusing
        # would leave it impossible to resume. Like a resume without a checkpoint, it goes on and says so.
        log.warning(
            "--resume: %s records no fingerprint of its data (trained by an older version); resuming "
            "without checking that the data files are those it started on",
            run_dir,
        )
        return []
    changed = []
    for name in sorted(recorded.keys() | {str(path) for path in _data_files(config)}):
        path = Path(name)
        if name not in recorded:  # e.g. an optional MovieLens file added to the folder
            changed.append(f"data file {name} was added")
        elif not path.is_file():
            changed.append(f"data file {name} was removed")
        elif sha256_file(path) != recorded[name]:
            changed.append(f"data file {name} changed")
    return changed


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
    """Write the servable model: weights + tables (safetensors) and everything else (JSON)."""
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
