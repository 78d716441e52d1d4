"""What a run may resume from: the checkpoint's config and the data it was trained on.

``twotower train --resume`` continues a run from its last checkpoint only when that checkpoint belongs
to the config and data given now. The config sections that shape the model or draw the training split
must be unchanged (compared with the run's config.yaml), and so must the content of every data file
the config reads: a fresh run records their SHA-256 in ``data_fingerprint.json`` (:func:`data_fingerprint`),
and :func:`check_resumable` compares. Refusals are ConfigErrors, raised before the run directory is
touched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from twotower import distributed
from twotower.config import (
    ConfigError,
    FileSource,
    MovieLensSource,
    RunConfig,
    config_to_dict,
    load_config,
    with_absolute_paths,
)
from twotower.data import movielens
from twotower.storage import read_json, sha256_file

__all__ = ["DATA_FINGERPRINT", "check_resumable", "data_fingerprint"]

log = logging.getLogger(__name__)


# Sections whose change makes the last checkpoint another model (shapes, vocabularies, split, task
# state): resuming with them changed is an error, not a torch state-dict traceback after config.yaml
# was already overwritten. train.* (epochs, lr, ...) may change on resume, except the optimizer and what
# draws the training split (eval.protocol, train.valid_fraction and, with a holdout, train.seed).
_RESUME_FIXED = ("data", "features", "model", "task")
# The same data section can name files edited in place: their SHA-256 when the run started.
DATA_FINGERPRINT = "data_fingerprint.json"


def check_resumable(config: RunConfig, run_dir: Path) -> bool:
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
    edited = distributed.from_main(_changed_data(config, run_dir) if distributed.is_main() else None)
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


def data_fingerprint(config: RunConfig) -> dict[str, Any]:
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
