"""`twotower demo`: the whole retrieval loop on a synthetic world whose answer is known.

No download and no data of the user's own: a `SyntheticWorld` plants user segments that prefer some
genres, plus a popularity law that is independent of taste. The demo trains a two-tower retriever
on user and item side features (ids, segment, region, age; genres, price, year), evaluates it with
the leave-last-out protocol over the full catalogue, and sets it beside two references computed on
the same split: most-popular (what a model without personalisation gets) and the world's true
affinities (the best any model could do with this much noise). It ends with one user's
recommendations next to the genres that user's segment is known to like.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twotower.config import RunConfig, save_config
from twotower.data.dataset import RetrievalData, build_retrieval_data
from twotower.data.synthetic import WorldConfig
from twotower.evaluate import PROTOCOLS, evaluate_embeddings
from twotower.experiment import train_run
from twotower.recommender import Retriever
from twotower.storage import write_json

__all__ = ["demo_config", "popularity_metrics", "oracle_metrics", "run_demo"]


def demo_config(quick: bool = False) -> RunConfig:
    """The demo's run config: a feature-rich two-tower on the synthetic world, temporal protocol."""
    world = WorldConfig(num_users=600, num_items=300, seed=0) if quick else WorldConfig(seed=0)
    return RunConfig.model_validate(
        {
            "data": {"source": "synthetic", "world": world.model_dump()},
            "features": {
                "user": [
                    {"type": "id", "name": "user_id"},
                    {"type": "categorical", "name": "segment"},
                    {"type": "categorical", "name": "region"},
                    {"type": "bucketized", "name": "age", "num_buckets": 6},
                ],
                "item": [
                    {"type": "id", "name": "item_id"},
                    {"type": "multi_hot", "name": "genres"},
                    {"type": "numeric", "name": "price"},
                    {"type": "numeric", "name": "year"},
                ],
            },
            "model": {
                "similarity": "cosine",
                "temperature": 0.1,
                "user_tower": {"embedding_dim": 32, "layers": [64, 32]},
                "item_tower": {"embedding_dim": 32, "layers": [64, 32]},
            },
            "task": {"logq": "counts"},
            "train": {
                "epochs": 8 if quick else 15,
                "batch_size": 512,
                "lr": 0.005,
                "seed": 0,
                "early_stopping": {"metric": "recall@10", "patience": 3},
            },
            "eval": {"protocol": "temporal", "ks": [10]},
        }
    )


def _exclude(data: RetrievalData) -> tuple[torch.Tensor, torch.Tensor]:
    return data.train.user_idx, data.train.item_idx


def popularity_metrics(data: RetrievalData, protocol: str) -> dict[str, Any]:
    """Most-popular baseline on the same split: every user gets the training counts as scores."""
    counts = torch.bincount(data.train.item_idx, minlength=data.num_items).double()
    # Ties between equally popular items break towards the lower index (deterministic).
    users = torch.ones(data.num_users, 1, dtype=torch.float64)
    return evaluate_embeddings(
        PROTOCOLS[protocol], users, counts[:, None], data.test.user_idx, data.test.item_idx, *_exclude(data)
    )


def oracle_metrics(data: RetrievalData, protocol: str) -> dict[str, Any]:
    """The world's true logits as scores: an upper reference no trained model should pass by much."""
    world = data.raw.world
    if world is None:
        raise ValueError("oracle metrics need a synthetic world")
    cfg = world.config
    # True logit = a * <u, i> + p * pop_i, written as one inner product of augmented vectors; the
    # catalogue is sorted by id and synthetic ids equal row numbers, so index i is world row ids[i].
    u = world.user_latent[data.user_ids.astype(np.int64)] * cfg.affinity_strength
    i = world.item_latent[data.item_ids.astype(np.int64)]
    pop = world.item_popularity_logit[data.item_ids.astype(np.int64)] * cfg.popularity_strength
    users = torch.as_tensor(np.hstack([u, np.ones((len(u), 1))]))
    items = torch.as_tensor(np.hstack([i, pop[:, None]]))
    return evaluate_embeddings(
        PROTOCOLS[protocol], users, items, data.test.user_idx, data.test.item_idx, *_exclude(data)
    )


def run_demo(
    out_dir: str | Path = "runs/demo",
    quick: bool = False,
    echo: Callable[[str], Any] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, evaluate and compare; writes the run into ``out_dir`` and returns a summary."""
    out_dir = Path(out_dir)
    config = demo_config(quick)
    data = build_retrieval_data(config)
    world = data.raw.world
    assert world is not None
    echo(world.describe())
    echo(f"Training a two-tower retriever ({len(data.train):,} training interactions) -> {out_dir}")
    metrics = train_run(config, out_dir, progress=progress, data=data)
    protocol = config.eval.protocol
    rows = {
        "two-tower": metrics,
        "most popular": popularity_metrics(data, protocol),
        "true affinities (oracle)": oracle_metrics(data, protocol),
    }
    names = [key for key in metrics if "@" in key]
    echo(f"\nFull-corpus evaluation, protocol '{protocol}' ({metrics['n_queries']} users):")
    echo(f"  {'method':<26}" + "".join(f"{n:>14}" for n in names))
    for method, values in rows.items():
        echo(f"  {method:<26}" + "".join(f"{values[n]:>14.4f}" for n in names))

    retriever = Retriever.load(out_dir)
    user = int(data.user_ids[0])
    ids, scores = retriever.recommend([user], k=10)
    segment = int(world.user_segment[user])
    liked = [f"g{g}" for g in np.flatnonzero(world.segment_genres[segment])]
    echo(f"\nUser {user} belongs to segment s{segment}, which likes genres {', '.join(liked)}. Top 10:")
    for rank, (item, score, title) in enumerate(
        zip(ids[0], scores[0], retriever.titles(ids[0]), strict=True), 1
    ):
        echo(f"  {rank:>2}. {title or item}  score {score:.3f}")
    summary = {
        "run_dir": str(out_dir),
        "protocol": protocol,
        "metrics": {method: {n: values[n] for n in names} for method, values in rows.items()},
        "beats_popularity": metrics["recall@10"] > rows["most popular"]["recall@10"],
    }
    write_json(out_dir / "demo_summary.json", summary)
    save_config(config, out_dir / "config.yaml")
    echo(f"\nEverything is in {out_dir}: try `twotower recommend {out_dir} --user {user}`.")
    return summary
