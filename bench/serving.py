"""Serving: the item index (build time, recall against exact search, latency, throughput).

    python bench/serving.py                  # 100k and 1M items, every backend (about 8 minutes on 2 cores)
    python bench/serving.py --quick          # 20k items (under a minute)
    python bench/serving.py --parts index    # the parts to run; rows of the other parts are kept

Parts: `index` measures twotower.index.ItemIndex for each backend (exact, faiss-flat, faiss-hnsw,
faiss-ivfpq, all with their default IndexConfig) on each catalogue:

- `seconds`: build time (FAISS training + adding; ~0 for exact, which only keeps the vectors);
- `recall@100_vs_exact`: recall@100 against exact search on 1,000 held-out queries;
- `latency_ms` (median) and `p99_ms`: one query per search (batch 1), 1 thread (FAISS and torch),
  over 1,000 searches - 100 for the brute-force backends on catalogues of 500k items or more, where
  one search takes tens of ms (the row's `note` says so);
- `queries_per_s`: one search of a batch of 1,000 queries on all cores.

The synthetic catalogue (seed 0) imitates trained, normalised two-tower embeddings, which are
clustered; isotropic Gaussian vectors have no structure for an ANN index to exploit and are a
pathological worst case. Exactly:

    n_clusters = clip(n_items // 300, 64, 4096)             # 333 for 100k, 3333 for 1M
    centre_c   = normalize(N(0, I_64))                      # one per cluster
    weight_c   ~ LogNormal(0, 1), normalised                # cluster sizes vary ~10x (popular genres)
    spread_c   ~ Uniform(0.4, 0.8)                          # some clusters are tighter than others
    vector     = normalize(centre_c + spread_c * N(0, I_64) / 8)   # c drawn with probability weight_c

Items and queries are separate draws from this same mixture (1,000 queries), so queries are never
items. The noise norm (spread_c) puts a vector at cosine ~0.8-0.9 from its centre and ~0.7 from its
cluster mates, while vectors of different clusters are near-orthogonal. Writes
bench/results/serving.json and .md (serving_quick.* with --quick), see bench-format.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, result, write
from twotower.index import IndexConfig, ItemIndex
from twotower.storage import read_json

NAME = "serving"
BACKENDS = ("exact", "faiss-flat", "faiss-hnsw", "faiss-ivfpq")
DIM, K, N_QUERIES, BATCH = 64, 100, 1000, 1000
SEED = 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synthetic_catalogue(n_items: int, n_queries: int, dim: int = DIM, seed: int = SEED):
    """(items [n_items, dim], queries [n_queries, dim]), float32 unit vectors: see the module docstring."""
    rng = np.random.default_rng(seed)
    n_clusters = int(np.clip(n_items // 300, 64, 4096))
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 1.0, n_clusters)
    weights /= weights.sum()
    spread = rng.uniform(0.4, 0.8, n_clusters).astype(np.float32)

    def draw(n: int) -> np.ndarray:
        c = rng.choice(n_clusters, size=n, p=weights)
        x = centres[c] + rng.standard_normal((n, dim), dtype=np.float32) * (spread[c] / np.sqrt(dim))[:, None]
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw(n_items), draw(n_queries)


def set_threads(n: int) -> None:
    """FAISS (OpenMP) and torch (the exact backend) thread pools."""
    import faiss

    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)


def single_query_ms(index: ItemIndex, queries: np.ndarray, n: int) -> list[float]:
    for q in queries[:5]:  # warm caches and thread pools
        index.search(q[None], K)
    times = []
    for q in queries[:n]:
        start = time.perf_counter()
        index.search(q[None], K)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def run_index_part(args: argparse.Namespace) -> list[dict]:
    """Every backend on every catalogue size: the rows described in the module docstring."""
    sizes = args.sizes or ([20_000] if args.quick else [100_000, 1_000_000])
    cores = os.cpu_count() or 1
    rows: list[dict] = []
    for n in sizes:
        dataset = f"synthetic-{_label(n)}"
        log(f"[{dataset}] generating {n} items x {DIM} and {N_QUERIES} queries")
        items, queries = synthetic_catalogue(n, N_QUERIES)
        for backend in args.backends:
            config = IndexConfig(backend=backend, recall_k=K, recall_queries=N_QUERIES)
            set_threads(cores)
            slow = " (minutes on 2 cores)" if backend == "faiss-hnsw" and n >= 500_000 else ""
            log(f"[{dataset}] {backend}: building{slow}")
            index = ItemIndex.build(items, config, "cosine", queries=queries)
            report = index.build_report
            base = {"dataset": dataset, "protocol": f"k={K}", "method": backend, "part": "index",
                    "params": report["params"], "seeds": [SEED]}  # fmt: skip

            def row(metric: str, value: float, note: str | None = None, base: dict = base) -> dict:
                out = {**base, "metric": metric, "mean": value, "std": 0.0, "values": [value]}
                return {**out, "note": note} if note else out

            what = (
                "nothing to build (keeps the vectors)" if backend == "exact" else "FAISS training and adding"
            )
            rows.append(row("seconds", report["build_seconds"], f"build: {what}"))
            source = f"{report['n_queries']} held-out queries ({report['recall_queries_source']})"
            rows.append(row("recall@100_vs_exact", report["recall_at_k"], source))
            log(f"[{dataset}] {backend}: built in {report['build_seconds']:.1f} s, "
                f"recall@{K} {report['recall_at_k']:.4f}")  # fmt: skip

            brute = backend in ("exact", "faiss-flat") and n >= 500_000
            n_single = 100 if brute else N_QUERIES
            set_threads(1)
            times = single_query_ms(index, queries, n_single)
            note = f"{n_single} single-query searches, 1 thread" + (
                " (fewer: brute force over this catalogue takes tens of ms a query)" if brute else ""
            )
            median, p99 = statistics.median(times), float(np.percentile(times, 99))
            rows += [row("latency_ms", median, "median of " + note), row("p99_ms", p99, note)]

            set_threads(cores)
            index.search(queries[:10], K)
            start = time.perf_counter()
            index.search(queries[:BATCH], K)
            qps = BATCH / (time.perf_counter() - start)
            rows.append(row("queries_per_s", qps, f"one batch of {BATCH} queries, {cores} threads"))
            log(f"[{dataset}] {backend}: median {median:.3f} ms, p99 {p99:.3f} ms, {qps:.0f} queries/s")
            del index
    return rows


def run_http(args: argparse.Namespace) -> list[dict]:
    """The HTTP load test (bench/serving_http.py) in a scratch directory."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serving_http import run_http_part

    with tempfile.TemporaryDirectory(prefix="twotower-serving-") as work:
        return [{**row, "part": "http"} for row in run_http_part(args, Path(work))]


# One function per part, each returning bench rows (with "part" set).
PARTS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {"index": run_index_part, "http": run_http}


def merge(out: Path, name: str, command: str, parts: list[str], new_rows: list[dict]) -> dict:
    """The saved rows of the parts not run this time, then the new rows. Every row carries the command
    that measured it and the header lists each command once, so a partial run (--parts) does not
    relabel the rows it kept."""
    path = out / f"{name}.json"
    old = read_json(path)["rows"] if path.exists() else []
    rows = [r for r in old if r.get("part") not in parts] + [{**r, "command": command} for r in new_rows]
    commands = " ; ".join(dict.fromkeys(r.get("command", "(command not recorded)") for r in rows))
    return result(name, commands, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a 20k-item catalogue only")
    parser.add_argument("--parts", nargs="+", choices=["index", "http"], default=["index", "http"])
    parser.add_argument("--rate", type=float, default=200.0, help="http: requests per second offered")
    parser.add_argument("--duration", type=float, default=60.0, help="http: seconds of load")
    parser.add_argument("--http-items", type=int, default=100_000, help="http: catalogue of the served run")
    parser.add_argument("--http-users", type=int, default=5_000, help="http: users of the served run")
    parser.add_argument(
        "--http-workers",
        type=int,
        default=1,
        help="http: server processes (1: at 200 req/s one worker is ~40 %% busy, and a second one on 2 "
        "cores only competes with the load generator)",
    )
    parser.add_argument("--http-repeats", type=int, default=3, help="http: load tests of the served run")
    parser.add_argument(
        "--http-run", type=Path, help="http: a folder to keep the served run in and reuse (default: scratch)"
    )
    parser.add_argument("--sizes", nargs="+", type=int, help="catalogue sizes (default 100000 1000000)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:  # a small served run and a short load
        args.http_items, args.http_users, args.duration = 5_000, 1_000, 10.0
    missing = [part for part in args.parts if part not in PARTS]
    if missing:
        parser.error(f"part(s) {missing} not implemented yet")
    rows = [row for part in args.parts for row in PARTS[part](args)]
    name = NAME + ("_quick" if args.quick else "")
    command = (
        "python bench/serving.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    print(write(merge(args.out, name, command, args.parts, rows), args.out))


if __name__ == "__main__":
    main()
