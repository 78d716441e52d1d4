"""The measured jobs of bench/throughput.py, each run in a process of its own so its peak RSS is its own.

    python bench/throughput_worker.py generate DATA_DIR --size full
    python bench/throughput_worker.py stream DATA_DIR --out r.json
    python bench/throughput_worker.py scale-train DATA_DIR --steps 200 --out r.json
    torchrun --standalone --nproc-per-node 2 bench/throughput_worker.py scale-train DATA_DIR ...

The 1M-item model (``scale_model("full")``): the user is a ``hashed_id`` of its sparse 62-bit id
(2**20 buckets: no user vocabulary), the item its id (1M rows), category and tags (multi-hot,
EmbeddingBag); 64-dim embeddings, towers [256, 64], cosine / 0.1, in-batch softmax with the streaming
logQ estimate, global batch 4096, Adagrad with sparse embedding gradients. Batches stream from the
Parquet log (``twotower.data.streaming``, shuffle buffer 262,144 rows) through a background
prefetcher into the library's own fit loop. With several processes (torchrun, ``twotower.distributed``)
every rank streams the same global batches and ``fit`` trains each rank on its shard of every batch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from twotower.config import TrainConfig
from twotower.data.prefetch import Prefetcher
from twotower.data.scale import ScaleConfig, generate_scale_dataset, open_scale_dataset
from twotower.data.streaming import ParquetStream, StreamConfig
from twotower.features import FeatureEncoder
from twotower.hashing import int_buckets
from twotower.retrieval import ModelConfig, TwoTowerModel
from twotower.task_config import TaskConfig, build_task

SIZES = {
    "full": ScaleConfig(),  # 10M interactions, 1M items, 200k users
    "quick": ScaleConfig(num_interactions=400_000, num_items=50_000, num_users=20_000, row_group_size=32_768),
}


def scale_model(size: str = "full") -> dict[str, Any]:
    """The model of the 1M-item rows (``full``), or a small one for --quick smoke runs."""
    full = size == "full"
    buckets = 2**20 if full else 2**16
    tower = {"embedding_dim": 64, "layers": [256, 64] if full else [64], "sparse": True}
    return {
        "model": {"similarity": "cosine", "temperature": 0.1, "user_tower": tower, "item_tower": tower},
        "task": {"logq": "streaming", "streaming": {"num_buckets": buckets}},
        "train": {"batch_size": 4096 if full else 1024, "optimizer": "adagrad", "lr": 0.05},
        "features": {
            "user": [{"type": "hashed_id", "name": "user_id", "num_buckets": buckets}],
            "item": [
                {"type": "id", "name": "item_id"},
                {"type": "categorical", "name": "category", "embedding_dim": 16},
                {"type": "multi_hot", "name": "tags", "embedding_dim": 16, "max_len": 3},
            ],
        },
        "stream": {"shuffle_buffer": 262_144 if full else 32_768, "prefetch": 4},
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream(data_dir: Path, spec: dict[str, Any], seed: int = 0) -> ParquetStream:
    dataset = open_scale_dataset(data_dir)
    if dataset is None:
        raise SystemExit(f"no scale dataset in {data_dir}: run the generate job first")
    buckets = spec["features"]["user"][0]["num_buckets"]

    def encode(table: pa.Table) -> dict[str, np.ndarray]:
        # A row group -> model indices: the user's hash bucket (its index in a user table of one row
        # per bucket) and the item id, which is the catalogue index in this dataset.
        return {
            "user_idx": int_buckets(table.column("user_id").to_numpy(), buckets),
            "item_idx": table.column("item_id").to_numpy(),
        }

    cfg = StreamConfig(
        batch_size=spec["train"]["batch_size"],
        shuffle_buffer=spec["stream"]["shuffle_buffer"],
        drop_last=True,
        seed=seed,
    )
    return ParquetStream(dataset.interactions, cfg, encode=encode)


def build_scale_model(data_dir: Path, spec: dict[str, Any]) -> tuple[TwoTowerModel, float]:
    """The model over the dataset's item table; returns it and the seconds spent encoding items."""
    t0 = time.perf_counter()
    items = pd.read_parquet(Path(data_dir) / "items.parquet")
    item_encoder = FeatureEncoder(spec["features"]["item"]).fit(items, id_values=items["item_id"])
    item_table = item_encoder.transform(items)
    del items
    user_encoder = FeatureEncoder(spec["features"]["user"]).fit(pd.DataFrame({"user_id": []}))
    buckets = spec["features"]["user"][0]["num_buckets"]
    user_table = {"user_id": torch.arange(buckets + 1)}  # user index = its bucket
    model_cfg = ModelConfig.model_validate(spec["model"])
    num_items = len(item_table["item_id"])
    task = build_task(
        TaskConfig.model_validate(spec["task"]),
        model_cfg.temperature,
        buckets + 1,
        num_items,
        torch.zeros(0, dtype=torch.long),  # the streaming logQ estimate learns from the batches
        torch.zeros(0, dtype=torch.long),
    )
    model = TwoTowerModel(
        model_cfg, user_encoder.fields(), item_encoder.fields(), user_table, item_table, task=task
    )
    return model, time.perf_counter() - t0


# --- jobs -------------------------------------------------------------------------------------------


def job_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """Nothing but the imports every job makes: the RSS floor under the other jobs' numbers."""
    return {}


def job_generate(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the dataset, or find it generated; the generation's own measurement is kept beside
    the files (generation.json), so a run that reuses them still reports how generating went."""
    config = SIZES[args.size]
    record = Path(args.data_dir) / "generation.json"
    if open_scale_dataset(args.data_dir, config) is not None and record.exists():
        return {**json.loads(record.read_text()), "cached": True}
    t0 = time.perf_counter()
    dataset = generate_scale_dataset(args.data_dir, config)
    size = sum(f.stat().st_size for f in Path(dataset.root).glob("*.parquet"))
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = {"seconds": time.perf_counter() - t0, "bytes_on_disk": size, "peak_rss_mb_self": peak_rss_mb(),
           "created": created, "config": config.model_dump()}  # fmt: skip
    record.write_text(json.dumps(out, indent=2))
    return {**out, "cached": False}


def job_stream(args: argparse.Namespace) -> dict[str, Any]:
    """One full epoch through the reader and the prefetcher, no model: the data path alone."""
    spec = scale_model(args.size)
    source = stream(args.data_dir, spec)
    rows, t0 = 0, time.perf_counter()
    for batch in Prefetcher(source.epoch(1), depth=spec["stream"]["prefetch"]):
        rows += len(batch["item_idx"])
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "examples_per_s": rows / seconds,
            "peak_buffered_rows": source.peak_buffered_rows, "file_rows": source.num_rows}  # fmt: skip


def job_scale_train(args: argparse.Namespace) -> dict[str, Any]:
    from twotower import distributed
    from twotower.train import fit

    owned = distributed.init_from_env()
    try:
        spec = scale_model(args.size)
        torch.manual_seed(0)
        model, setup_seconds = build_scale_model(args.data_dir, spec)
        model.task.fused = not args.general_loss
        model.task.distinct = not args.row_by_row
        source = stream(args.data_dir, spec)
        depth = spec["stream"]["prefetch"]
        seen: list[tuple[Any, Any]] = []  # each batch's ids, counted after training (off the timed loop)

        def batches(epoch: int):
            # ``steps`` batches of the epoch, then the prefetcher is closed at once (its thread stopped),
            # not whenever the abandoned iterator happens to be collected.
            prefetched = iter(Prefetcher(source.epoch(epoch), depth=depth))
            try:
                for batch in itertools.islice(prefetched, args.steps):
                    seen.append((batch["user_idx"], batch["item_idx"]))
                    yield batch
            finally:
                prefetched.close()

        train = TrainConfig.model_validate({**spec["train"], "epochs": args.epochs})
        with tempfile.TemporaryDirectory() as run_dir:
            result = fit(model, batches, train, Path(run_dir), progress=False)
        out = {
            "history": result.history,
            "setup_seconds": setup_seconds,
            "world_size": distributed.world_size(),
            "threads": torch.get_num_threads(),
            "steps_per_epoch": args.steps,
            "num_items": model.num_items,
            "peak_rss_mb_rank0": peak_rss_mb(),
            # The distinct ids per batch set the size of the distinct-id step's products.
            "mean_distinct_users": float(np.mean([len(np.unique(u)) for u, _ in seen])),
            "mean_distinct_items": float(np.mean([len(np.unique(i)) for _, i in seen])),
        }
        return out if distributed.is_main() else {}  # rank 0 reports
    finally:
        distributed.teardown(owned)


def job_ml100k_train(args: argparse.Namespace) -> dict[str, Any]:
    """``twotower train configs/ml100k.yaml`` in-process (train_run, as the CLI calls it), so the loss
    can be switched to the general path; DATA_DIR is the ML-100K folder."""
    from twotower.config import load_config
    from twotower.experiment import train_run

    root = Path(__file__).resolve().parents[1]
    overrides = [f"data.path={args.data_dir}", f"train.epochs={args.epochs}"]
    if args.general_loss:
        overrides.append("task.fused_inbatch=false")
    if args.row_by_row:
        overrides.append("task.distinct_inbatch=false")
    config = load_config(root / "configs" / "ml100k.yaml", overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        metrics = train_run(config, run_dir, progress=False)
        history = json.loads((Path(run_dir) / "history.json").read_text())
    return {"history": history, "ndcg@10": metrics["ndcg@10"], "threads": torch.get_num_threads()}


JOBS = {
    "ml100k-train": job_ml100k_train,
    "baseline": job_baseline,
    "generate": job_generate,
    "stream": job_stream,
    "scale-train": job_scale_train,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--steps", type=int, default=200, help="scale-train: steps per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="training jobs: the first one warms up")
    parser.add_argument(
        "--general-loss", action="store_true", help="RetrievalTask's general path, not the fused kernel"
    )
    parser.add_argument(
        "--row-by-row",
        action="store_true",
        help="the fused kernel over every row of the batch, not over its distinct users and items",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = JOBS[args.job](args)
    if args.out is not None and (result or args.job == "baseline"):
        result.setdefault("peak_rss_mb_self", peak_rss_mb())  # a reused generation keeps its own
        args.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
