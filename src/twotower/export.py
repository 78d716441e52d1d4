"""Export a trained run for serving: query tower, item embeddings and index, ids, vocabularies, manifest.

``export_run(RUN_DIR)`` writes ``RUN_DIR/export/`` (or ``out``):

    manifest.json            format, versions, similarity, temperature, dimensions, counts, the index
                             and its recall report, ranker presence, and the SHA-256 of every file
    query_tower.safetensors  user tower + history encoder weights, encoded user tables, stored histories
    items.safetensors        item embeddings [N, d], exactly as the trained item tower computes them
    seen.safetensors         each user's training items (CSR), for exclude_seen
    catalogue.json           raw user and item ids (index -> id) and both feature encoders (vocabularies)
    items.parquet            item metadata in catalogue order, when the run has an item table
    index/                   the item index (``twotower.index``), built with the training similarity
    ranker/                  the run's debiased ranker, when it has one (only its relevance tower runs)
    light_ranker/            the run's light ranker, when it has one (cuts candidates before the ranker)
    query_tower.onnx         optional, checked against PyTorch at export

The directory is assembled beside its destination and renamed into place, so a reader (e.g. a
server swapping models) never sees half an export; if that fails, the previous export stays. Since
the destination is replaced as a whole, it must be a previous export, an empty directory or new: the
run directory, a folder holding it, or any other existing path is refused. ``load_export`` verifies
the format, the hashes and that the index metric is the training similarity before anything is used.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from twotower import __version__
from twotower.chunked_export import write_item_embeddings
from twotower.features import FeatureEncoder
from twotower.index import IndexConfig, ItemIndex
from twotower.query_tower import QueryTower
from twotower.recommender import Retriever
from twotower.retrieval import ModelConfig
from twotower.storage import (
    load_tensors,
    read_json,
    save_tensors,
    sha256_file,
    staging_dir_beside,
    write_json,
)
from twotower.topk import CSR

__all__ = [
    "EXPORT_FORMAT",
    "ExportedRun",
    "export_run",
    "load_export",
    "resolve_export",
    "stale_export_reason",
]

EXPORT_FORMAT = "twotower.export/1"
log = logging.getLogger("twotower")


def export_run(
    run_dir: str | Path, out: str | Path | None = None, index: IndexConfig | None = None, onnx: bool = False
) -> Path:
    """Export the trained run in ``run_dir`` to ``out`` (default ``run_dir/export``); returns ``out``.

    Raises ValueError, before any work, when ``out`` is not a path an export may replace (see the
    module docstring).
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "export"
    _check_destination(run_dir, out)
    # The manifest's hash must name the weights the export was computed from: staleness checks trust it.
    retriever, retrieval_sha256 = Retriever.load_pinned(run_dir)
    model, config = retriever.model, retriever.config
    meta = read_json(run_dir / "model.json")
    user_encoder = FeatureEncoder.from_dict(meta["user_encoder"])
    query = QueryTower.from_model(model, user_encoder.fields())
    index_config = index or IndexConfig()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir_beside(out)
    try:
        save_tensors(staging / "query_tower.safetensors", query.state_dict())
        # Chunk by chunk into the file, then mapped back: a million-item catalogue never holds its
        # gathered features or a second copy of the matrix in memory.
        items = write_item_embeddings(model, staging / "items.safetensors")
        seen = retriever.seen
        save_tensors(staging / "seen.safetensors", {"indptr": seen.indptr, "indices": seen.indices})
        write_json(
            staging / "catalogue.json",
            {"user_ids": meta["user_ids"], "item_ids": meta["item_ids"],
             "user_encoder": meta["user_encoder"], "item_encoder": meta["item_encoder"]},
        )  # fmt: skip
        if (run_dir / "items.parquet").exists():
            shutil.copy2(run_dir / "items.parquet", staging / "items.parquet")
        t0 = time.perf_counter()
        built = ItemIndex.build(items, index_config, config.model.similarity, queries=model.user_embeddings())
        built.save(staging / "index")
        log.info(
            "index %s built in %.1fs: %s", index_config.backend, time.perf_counter() - t0, built.build_report
        )
        from twotower.reranker import STAGES, RunRanker

        # Loading checks each ranker sits on these very retrieval weights before it ships.
        stages = {stage: (run_dir / stage).is_dir() for stage in STAGES}
        for stage, present in stages.items():
            if present:
                RunRanker.load_dir(
                    run_dir / stage, model.item_tower.output_dim, model.num_items, retrieval_sha256
                )
                shutil.copytree(run_dir / stage, staging / stage)
        has_ranker = stages["ranker"]
        onnx_report = None
        if onnx:
            from twotower.onnx_export import export_onnx

            onnx_report = export_onnx(query, staging / "query_tower.onnx")
        history = query.history
        manifest = {
            "format": EXPORT_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run_dir": str(run_dir.resolve()),
            "versions": _versions(),
            "similarity": config.model.similarity,
            "temperature": config.model.temperature,
            "embedding_dim": int(items.shape[1]),
            "num_users": model.num_users,
            "num_items": model.num_items,
            "model_config": config.model.model_dump(mode="json"),
            "history": None
            if history is None
            else {
                "dim": history.dim,
                "actions": history.action_embedding.num_embeddings if history.action_embedding else None,
            },
            "index": {"backend": index_config.backend, "report": built.build_report},
            "ranker": has_ranker,
            "light_ranker": stages["light_ranker"],
            "retrieval_sha256": retrieval_sha256,
            "onnx": onnx_report,
            "files": _hashes(staging),
        }
        write_json(staging / "manifest.json", manifest)
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


@dataclass
class ExportedRun:
    """An export loaded into memory: everything the serving pipeline needs, nothing it does not."""

    path: Path
    manifest: dict[str, Any]
    query: QueryTower
    item_embeddings: torch.Tensor
    user_ids: np.ndarray
    item_ids: np.ndarray
    user_encoder: FeatureEncoder
    item_encoder: FeatureEncoder
    items: pd.DataFrame | None
    seen: CSR
    index: ItemIndex
    ranker: Any  # twotower.reranker.RunRanker | None: the main ranker
    light_ranker: Any = None  # the light ranker between retrieval and the main one, when the run has it

    @property
    def similarity(self) -> str:
        return self.manifest["similarity"]

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])


def load_export(path: str | Path, verify: bool = True) -> ExportedRun:
    """Load an export directory; refuses a foreign format, a corrupted file or a metric mismatch."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"{path} is not an export (manifest.json missing): run `twotower export` first"
        )
    manifest = read_json(manifest_path)
    if manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, expected {EXPORT_FORMAT!r}")
    if verify:
        actual = _hashes(path)
        for name, digest in manifest["files"].items():
            if actual.get(name) != digest:
                raise ValueError(f"{path / name} is missing or does not match its hash in {manifest_path}")
    catalogue = read_json(path / "catalogue.json")
    user_encoder = FeatureEncoder.from_dict(catalogue["user_encoder"])
    history = manifest["history"]
    query = QueryTower(
        ModelConfig.model_validate(manifest["model_config"]),
        user_encoder.fields(),
        manifest["num_users"],
        manifest["num_items"],
        history["dim"] if history else None,
        history["actions"] if history else None,
    )
    query.load_state(load_tensors(path / "query_tower.safetensors"))
    items = load_tensors(path / "items.safetensors")["embeddings"]
    seen = load_tensors(path / "seen.safetensors")
    index = ItemIndex.load(path / "index", manifest["similarity"])
    from twotower.reranker import RunRanker

    rankers = {
        stage: RunRanker.load_dir(
            path / stage, manifest["embedding_dim"], manifest["num_items"], manifest["retrieval_sha256"]
        )
        if manifest.get(stage)
        else None
        for stage in ("ranker", "light_ranker")
    }
    metadata = pd.read_parquet(path / "items.parquet") if (path / "items.parquet").exists() else None
    return ExportedRun(
        path=path,
        manifest=manifest,
        query=query,
        item_embeddings=items,
        user_ids=np.asarray(catalogue["user_ids"]),
        item_ids=np.asarray(catalogue["item_ids"]),
        user_encoder=user_encoder,
        item_encoder=FeatureEncoder.from_dict(catalogue["item_encoder"]),
        items=metadata,
        seen=CSR(seen["indptr"], seen["indices"]),
        index=index,
        ranker=rankers["ranker"],
        light_ranker=rankers["light_ranker"],
    )


def resolve_export(path: str | Path, index: IndexConfig | None = None) -> Path:
    """The export directory for ``path``: an export itself, a run's ``export/``, or a new export of a run.

    A run's ``export/`` is derived data, so it is re-exported when it no longer matches the run: the
    retrieval weights changed, a ranker stage was trained, replaced or removed after the export, or
    ``index`` asks for another index than the one built. A re-export keeps the export's own index
    config (unless ``index`` is given) and its ONNX file. An export directory given directly is served
    as it is.
    """
    path = Path(path)
    if (path / "manifest.json").exists():
        return path
    if (path / "model.json").exists() and (path / "export" / "manifest.json").exists():
        export = path / "export"
        reason = stale_export_reason(path, export, index)
        if reason is None:
            return export
        onnx = False
        try:  # what the old export was built with, where it can still be read
            onnx = bool(read_json(export / "manifest.json").get("onnx"))
            if index is None:
                index = IndexConfig.model_validate(read_json(export / "index" / "index.json")["config"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        log.warning("%s is out of date (%s): exporting the run again", export, reason)
        return export_run(path, index=index, onnx=onnx)
    if (path / "export" / "manifest.json").exists():
        return path / "export"
    if (path / "model.json").exists():
        log.warning("%s has no export yet: exporting it to %s", path, path / "export")
        return export_run(path, index=index)
    raise FileNotFoundError(f"{path} is neither a run directory (model.json) nor an export (manifest.json)")


def stale_export_reason(run_dir: Path, export: Path, index: IndexConfig | None = None) -> str | None:
    """Why ``export`` no longer matches the run in ``run_dir``, or None when it still does."""
    from twotower.run_ranker import STAGES

    try:
        manifest = read_json(export / "manifest.json")
        built = read_json(export / "index" / "index.json")["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest or index description is unreadable"
    if manifest.get("retrieval_sha256") != sha256_file(run_dir / "model.safetensors"):
        return "the retrieval weights changed"
    files = manifest.get("files") or {}
    for stage in STAGES:
        present = (run_dir / stage).is_dir()
        if present != bool(manifest.get(stage)):
            return f"the run's {stage} was {'trained' if present else 'removed'} after the export"
        if present and _hashes(run_dir / stage) != {
            name.split("/", 1)[1]: digest for name, digest in files.items() if name.startswith(f"{stage}/")
        }:
            return f"the run's {stage} changed"
    if index is not None and IndexConfig.model_validate(built) != index:
        return f"another index was asked for ({index.backend})"
    return None


def _versions() -> dict[str, str]:
    versions = {"twotower": __version__, "torch": torch.__version__, "numpy": np.__version__}
    try:
        import faiss

        versions["faiss"] = faiss.__version__
    except ImportError:  # pragma: no cover - the exact backend needs no faiss
        pass
    return versions


def _hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file below ``root`` except the manifest, keyed by relative path."""
    out = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"):
        out[file.relative_to(root).as_posix()] = sha256_file(file)
    return out


def _is_export(path: Path) -> bool:
    try:
        manifest = read_json(path / "manifest.json")
    except (OSError, ValueError):  # missing, unreadable or not JSON
        return False
    return isinstance(manifest, dict) and manifest.get("format") == EXPORT_FORMAT


def _check_destination(run_dir: Path, out: Path) -> None:
    """Refuse an ``out`` whose replacement (``_replace_dir`` deletes what was there) would delete
    anything but a previous export or an empty directory: above all the run being exported."""
    run, target = run_dir.resolve(), out.resolve()
    if target == run or target in run.parents:
        raise ValueError(
            f"cannot export to {out}: it is the run directory {run_dir} or holds it, and an export "
            "replaces its destination as a whole; choose another --out"
        )
    empty_dir = out.is_dir() and not any(out.iterdir())
    if (out.exists() or out.is_symlink()) and not empty_dir and not _is_export(out):
        raise ValueError(
            f"cannot export to {out}: it exists and is not an export (no manifest.json of format "
            f"{EXPORT_FORMAT!r}), and an export replaces its destination as a whole; remove it or "
            "choose another --out"
        )


def _replace_dir(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out``; an existing ``out`` is swapped away first and deleted once the new
    one is in place. If that final rename fails, the old ``out`` is moved back before re-raising."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{time.time_ns()}")
        out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        if old is not None:  # or the previous export would be lost, hidden as .NAME.old-*
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
