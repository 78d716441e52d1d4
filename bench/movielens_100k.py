"""MovieLens 100K retrieval benchmark: `msrec` and `tfrs` protocols, 3 seeds, anchors beside our numbers.

    python bench/movielens_100k.py            # full: both protocols x 3 seeds (a few minutes on 2 cores)
    python bench/movielens_100k.py --quick    # smoke run: 1 seed, 2 epochs (under a minute)

Reads ML-100K from ../shared/data/ml-100k when present (or --data), otherwise downloads it from GroupLens
(checksum verified). Writes bench/results/movielens_100k.json and .md in the format of bench-format.md
(--quick: movielens_100k_quick.*).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import DEFAULT_ML100K, RESULTS, ROOT, measured_rows, result, write
from twotower.config import load_config
from twotower.data.dataset import build_retrieval_data, load_raw
from twotower.demo import popularity_metrics
from twotower.experiment import train_run

DEFAULT_DATA = DEFAULT_ML100K
NAME = "movielens_100k"

RUNS = {  # protocol -> (config, method name, metrics reported)
    "msrec": (
        "configs/ml100k.yaml",
        "twotower-inbatch-logq",
        ["ndcg@10", "recall@10", "precision@10", "map@10", "mrr@10", "hit@10"],
    ),
    "tfrs": (
        "configs/ml100k_tfrs.yaml",
        "twotower-inbatch-logq",
        ["top1_accuracy", "top5_accuracy", "top10_accuracy", "top50_accuracy", "top100_accuracy"],
    ),
}
_MS = "recommenders-team/recommenders examples/06_benchmarks/movielens.ipynb"
_RERUN = "anchors.md: re-run on a 2-core machine with the msrec protocol"
_TFRS = "tensorflow/recommenders docs/examples (anchors.md)"
ANCHORS = [
    (
        "msrec",
        "BiVAE (Microsoft Recommenders)",
        {"map@10": 0.1436, "ndcg@10": 0.4687, "precision@10": 0.4082, "recall@10": 0.2209},
        _MS,
    ),
    (
        "msrec",
        "BPR (Cornac, Microsoft Recommenders)",
        {"map@10": 0.1340, "ndcg@10": 0.4450, "precision@10": 0.3887, "recall@10": 0.2166},
        _MS,
    ),
    (
        "msrec",
        "LightGCN (Microsoft Recommenders)",
        {"map@10": 0.1209, "ndcg@10": 0.4164, "precision@10": 0.3592, "recall@10": 0.1960},
        _MS,
    ),
    (
        "msrec",
        "EASE (lambda 500)",
        {"map@10": 0.1491, "ndcg@10": 0.4829, "precision@10": 0.4198, "recall@10": 0.2277},
        _RERUN,
    ),
    (
        "msrec",
        "most popular",
        {"map@10": 0.0560, "ndcg@10": 0.2524, "precision@10": 0.2287, "recall@10": 0.1132},
        _RERUN,
    ),
    ("tfrs", "TFRS basic_retrieval (dim 32, 3 epochs)", {"top100_accuracy": 0.239}, _TFRS),
    ("tfrs", "TFRS deep_recommenders [64, 32]", {"top100_accuracy": 0.29}, _TFRS),
]


def run(args: argparse.Namespace) -> dict:
    seeds = [0] if args.quick else list(range(args.seeds))
    data_path = args.data or (str(DEFAULT_DATA) if DEFAULT_DATA.exists() else None)
    rows: list[dict] = []
    for protocol, (config_path, method, names) in RUNS.items():
        overrides = [f"data.path={data_path}" if data_path else "data.path=null"]
        if args.quick:
            overrides.append("train.epochs=2")
        base = load_config(ROOT / config_path, overrides)
        raw = load_raw(base.data)
        data = build_retrieval_data(base, raw)  # the split is fixed by the protocol, not the seed
        values: dict[str, list[float]] = {n: [] for n in [*names, "seconds", "examples_per_s"]}
        for seed in seeds:
            config = load_config(ROOT / config_path, [*overrides, f"train.seed={seed}"])
            with tempfile.TemporaryDirectory() as tmp:
                metrics = train_run(config, tmp, progress=False, data=data)
            print(
                f"{protocol} seed {seed}: "
                + " ".join(f"{n}={metrics[n]:.4f}" for n in names)
                + f" ({metrics['total_seconds']:.1f} s)",
                file=sys.stderr,
            )
            for n in names:
                values[n].append(float(metrics[n]))
            values["seconds"].append(float(metrics["total_seconds"]))
            values["examples_per_s"].append(float(metrics["train_examples_per_s"]))
        base = {"dataset": "ml-100k", "protocol": protocol, "method": method, "config": config_path}
        rows.extend(measured_rows(base, values, seeds))
        popular = popularity_metrics(data, protocol)
        rows.extend(
            {
                "dataset": "ml-100k",
                "protocol": protocol,
                "method": "most popular (ours)",
                "metric": n,
                "mean": float(popular[n]),
                "std": 0.0,
                "values": [float(popular[n])],
                "seeds": [],
                "config": "training counts",
            }
            for n in names
        )
    for protocol, method, metrics, source in ANCHORS:
        rows.extend(
            {
                "dataset": "ml-100k",
                "protocol": protocol,
                "method": method,
                "metric": m,
                "mean": v,
                "anchor": True,
                "source": source,
            }
            for m, v in metrics.items()
        )
    # A smoke run writes movielens_100k_quick.*, never over the default run's results.
    name = NAME + ("_quick" if args.quick else "")
    return result(name, "python bench/movielens_100k.py" + (" --quick" if args.quick else ""), rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data", help="ML-100K folder or zip (default: ../shared/data/ml-100k or download)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    print(write(run(args), args.out))


if __name__ == "__main__":
    main()
