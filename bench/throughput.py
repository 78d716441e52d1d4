"""Training throughput: examples/s and peak memory, 1 vs 2 processes on CPU, a FLOP ceiling, and TFRS.

    python bench/throughput.py           # ML-100K (5 epochs) and the 1M-item model (2 x 60 steps of 4096)
    python bench/throughput.py --quick   # a smoke run, under a minute: 1 process, small synthetic model

Two models, each measured in processes of their own (peak RSS: the process tree's resident memory,
sampled every 50 ms, and each worker's own getrusage peak):

- ML-100K: ``configs/ml100k.yaml`` through ``twotower train`` itself, 1 process and ``--nproc 2``
  (the same global batch of 1024, DDP over gloo); examples/s of the training loop per epoch from the
  run's history.json, the first epoch left out as warm-up. TFRS (bench/tfrs_baseline.py, in its own
  virtual environment, ``--tf-python``) trains the same model on the same training rows.
- 1M items: 10M synthetic interactions (``twotower.data.scale``), streamed from Parquet
  (bench/throughput_worker.py has the model). Also: the generator and a model-free pass of the
  streaming reader, for their peak memory.

For each model a FLOP ceiling (bench/flop_ceiling.py): the step's matrix products timed one by one on
this machine; ``ceiling_fraction`` = achieved / ceiling examples/s. Three ways to compute the same
in-batch softmax loss, to show what each buys:

- ``twotower-1proc`` (the default): over the batch's distinct users and items
  (``twotower.unique_softmax``); its ceiling is that of the products it runs (the batch's mean
  distinct counts are in the rows), and ``fraction_of_row_by_row_ceiling`` sets it against the B x B
  step's ceiling;
- ``twotower-row-by-row-1proc``: the fused kernel over all B x B rows and columns
  (``task.distinct_inbatch: false``; ``twotower.inbatch_loss``);
- ``twotower-general-loss-1proc``: ``RetrievalTask``'s general path (``task.fused_inbatch: false``).

Across processes the pool is gathered row by row (``twotower-2proc``).
Writes bench/results/throughput.{json,md} (quick: throughput_quick.*).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common import DEFAULT_ML100K, RESULTS, ROOT, result, write
from flop_ceiling import StepFlops, measure_ceiling, step_gemms
from throughput_worker import scale_model

NAME = "throughput"
CONFIG = "configs/ml100k.yaml"
WORKER = str(ROOT / "bench" / "throughput_worker.py")
DEFAULT_TF_PYTHON = Path("/tmp/tfvenv/bin/python")


# --- measuring a process tree ---------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):  # the task ended meanwhile
                todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):  # exited since it was listed
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1])
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` to completion; its wall time and the peak summed RSS of its process tree."""
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=log)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _rss_mb(_tree(proc.pid)))
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}")
    return {"seconds": seconds, "peak_rss_mb": peak, "output": output}


def hardware() -> dict[str, Any]:
    """What the numbers depend on: CPU model, cores, memory, torch threads, and how busy the box was."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))  # fmt: skip
    return {"cpu_model": cpu, "memory_gb": round(mem / 2**20, 1), "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg()}  # fmt: skip


def row(dataset: str, method: str, metric: str, values: list[float], **extra: Any) -> dict[str, Any]:
    # The 1-minute load average when the row was taken: the machine may be shared, and other load
    # slows every number here (but the ceiling, which keeps the fastest of its measurements).
    return {"dataset": dataset, "protocol": "train-step", "method": method, "metric": metric,
            "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values, "seeds": [0], "load_1min": round(os.getloadavg()[0], 2), **extra}  # fmt: skip


# --- ML-100K ----------------------------------------------------------------------------------------


def ml100k_cli(data: Path, epochs: int, nproc: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "twotower.cli", "train", CONFIG, f"--set=data.path={data}",
               f"--set=train.epochs={epochs}", f"--run-dir={run_dir}", "--quiet"]  # fmt: skip
        if nproc > 1:
            cmd.append(f"--nproc={nproc}")
        measured = run_measured(cmd)
        history = json.loads((Path(run_dir) / "history.json").read_text())
    rates = [h["examples_per_s"] for h in history]
    return {"examples_per_s": rates[1:] or rates, "peak_rss_mb": measured["peak_rss_mb"],
            "seconds": measured["seconds"], "final_loss": history[-1]["loss"]}  # fmt: skip


def ml100k_tfrs(data: Path, epochs: int, tf_python: Path, jit: bool) -> dict[str, Any]:
    """TFRS on the training rows twotower trains on (same split, same logQ), in its own venv."""
    from twotower.config import load_config
    from twotower.data.dataset import build_retrieval_data

    config = load_config(ROOT / CONFIG, [f"data.path={data}"])
    prepared = build_retrieval_data(config)
    train = prepared.train
    counts = torch.bincount(train.item_idx, minlength=prepared.num_items).double()
    log_q = torch.log(counts[train.item_idx].clamp_min(1.0) / counts.sum())  # as CountFrequency
    meta = {"num_users": prepared.num_users, "num_items": prepared.num_items,
            "dim": config.model.user_tower.embedding_dim, "temperature": config.model.temperature,
            "lr": config.train.lr, "batch_size": config.train.batch_size}  # fmt: skip
    table = pa.table({"user_idx": train.user_idx.numpy(), "item_idx": train.item_idx.numpy(),
                      "log_q": log_q.numpy()})  # fmt: skip
    table = table.replace_schema_metadata({k: json.dumps(v) for k, v in meta.items()})
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(table, Path(tmp) / "train.parquet")
        cmd = [str(tf_python), str(ROOT / "bench" / "tfrs_baseline.py"), "--data", f"{tmp}/train.parquet",
               "--out", f"{tmp}/tfrs.json", "--epochs", str(epochs)] + (["--jit"] if jit else [])  # fmt: skip
        measured = run_measured(cmd)
        out = json.loads((Path(tmp) / "tfrs.json").read_text())
    rates = out["examples_per_s"]
    peak = max(measured["peak_rss_mb"], out["peak_rss_mb"])
    return {"examples_per_s": rates[1:] or rates, "peak_rss_mb": peak, "versions": out["versions"],
            "loss": out["loss"]}  # fmt: skip


def ceiling(batch: int, dim: int, user: list[int], item: list[int], quick: bool,
            distinct: tuple[int, int] | None = None) -> StepFlops:  # fmt: skip
    """The step's products timed; with ``distinct`` (users, items per batch) those of the distinct-id
    step, each tower over its distinct ids and the logits distinct users x items."""
    users, items = distinct or (None, None)
    gemms = step_gemms(batch, dim, user, item, users=users, items=items)
    return measure_ceiling(gemms, min_seconds=0.06 if quick else 0.5)


def ceiling_rows(dataset: str, before: StepFlops, after: StepFlops, batch: int,
                 rates: dict[str, float], **extra: Any) -> list[dict[str, Any]]:  # fmt: skip
    """The step's products, timed before and after the training runs (the faster of the two per
    product: the conservative ceiling); each measured method's rate set against it."""
    best = before.best(after)
    gemms = [f"{g.what}: [{g.m}, {g.k}] x [{g.k}, {g.n}]" for g in best.gemms]
    return [row(dataset, method, metric, [value], batch=batch, gemms=gemms, **extra)
            for method, achieved in rates.items()
            for metric, value in best.report(batch, achieved).items()]  # fmt: skip


def distinct_per_batch(data: Path, batch: int, epochs: int) -> tuple[float, float]:
    """Mean distinct users and items in the ML-100K training batches of the measured epochs."""
    from twotower.config import load_config
    from twotower.data.dataset import build_retrieval_data, iterate_batches

    config = load_config(ROOT / CONFIG, [f"data.path={data}"])
    train = build_retrieval_data(config).train
    users, items = [], []
    for epoch in range(2, epochs + 1):
        for b in iterate_batches(train, batch, config.train.seed, epoch):
            users.append(len(torch.unique(b["user_idx"])))
            items.append(len(torch.unique(b["item_idx"])))
    return statistics.fmean(users), statistics.fmean(items)


# Row-by-row methods run the B x B products; the default runs the distinct-id ones.
ROW_BY_ROW = ("twotower-row-by-row-1proc", "twotower-general-loss-1proc")


def bench_ml100k(args: argparse.Namespace, data: Path) -> list[dict[str, Any]]:
    epochs = 2 if args.quick else 5
    rows: list[dict[str, Any]] = []
    users, items = distinct_per_batch(data, 1024, epochs)
    distinct = (round(users), round(items))
    before = ceiling(1024, 64, [], [], args.quick)
    before_distinct = ceiling(1024, 64, [], [], args.quick, distinct)
    rates: dict[str, float] = {}

    def add(method: str, rates_: list[float], rss: float, **extra: Any) -> None:
        print(f"ml-100k {method}: {rates_}", file=sys.stderr, flush=True)
        rows.extend([row("ml-100k", method, "examples_per_s", rates_, epochs_measured=f"2-{epochs}", **extra),
                     row("ml-100k", method, "peak_rss_mb", [rss])])  # fmt: skip
        rates[method] = statistics.fmean(rates_)

    # twotower and TFRS alternate, round after round: on a shared machine whose speed drifts over
    # minutes, each round's ratio compares runs taken side by side (the speedups are per round).
    tf_python = Path(args.tf_python)
    with_tfrs = not args.quick and tf_python.exists()
    if not with_tfrs:
        print(f"TFRS skipped ({'--quick' if args.quick else f'no {tf_python}'})", file=sys.stderr)
    rounds = 1 if args.quick else args.rounds
    epochs_of: dict[str, list[float]] = {}
    round_means: dict[str, list[float]] = {}
    extra_of: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        got = ml100k_cli(data, epochs, 1)
        info = {"config": CONFIG, "processes": 1, "final_epoch_loss": got["final_loss"]}
        measured = {"twotower-1proc": (got["examples_per_s"], got["peak_rss_mb"], info)}
        for jit in (False, True) if with_tfrs else ():
            tf = ml100k_tfrs(data, epochs, tf_python, jit)
            info = {"versions": tf["versions"], "final_epoch_loss": tf["loss"][-1]}
            measured["tfrs-xla-1proc" if jit else "tfrs-1proc"] = (
                tf["examples_per_s"],
                tf["peak_rss_mb"],
                info,
            )
        for method, (rates_, rss, extra) in measured.items():
            epochs_of.setdefault(method, []).extend(rates_)
            round_means.setdefault(method, []).append(statistics.fmean(rates_))
            extra_of[method] = {
                **extra,
                "peak_rss_mb": max(rss, extra_of.get(method, {}).get("peak_rss_mb", 0)),
            }
    for method, values in epochs_of.items():
        extra = dict(extra_of[method])
        add(method, values, extra.pop("peak_rss_mb"), rounds=rounds, round_means=round_means[method], **extra)
    if not args.quick:
        got = ml100k_cli(data, epochs, 2)
        add("twotower-2proc", got["examples_per_s"], got["peak_rss_mb"], config=CONFIG, processes=2,
            final_epoch_loss=got["final_loss"])  # fmt: skip
    for method, flag in zip(ROW_BY_ROW, ("--row-by-row", "--general-loss"), strict=True):
        got = worker("ml100k-train", data, "full", "--epochs", str(epochs), flag)
        history = got["history"]
        add(method, [h["examples_per_s"] for h in history][1:], got["peak_rss_mb_tree"], config=CONFIG,
            processes=1, final_epoch_loss=history[-1]["loss"])  # fmt: skip
    after = ceiling(1024, 64, [], [], args.quick)
    rows.extend(ceiling_rows("ml-100k", before, after, 1024, {m: rates[m] for m in ROW_BY_ROW}))
    # The default step's own products, and how it compares with the B x B step's ceiling.
    after_distinct = ceiling(1024, 64, [], [], args.quick, distinct)
    rows.extend(ceiling_rows("ml-100k", before_distinct, after_distinct, 1024,
                             {"twotower-1proc": rates["twotower-1proc"]}, mean_distinct_users=users,
                             mean_distinct_items=items))  # fmt: skip
    b_by_b = before.best(after).report(1024, rates["twotower-1proc"])["ceiling_fraction"]
    rows.append(row("ml-100k", "twotower-1proc", "fraction_of_row_by_row_ceiling", [b_by_b]))
    if not with_tfrs:
        return rows
    for baseline, metric in (("tfrs-1proc", "speedup_vs_tfrs"), ("tfrs-xla-1proc", "speedup_vs_tfrs_xla")):
        per_round = [a / b for a, b in zip(round_means["twotower-1proc"], round_means[baseline], strict=True)]
        rows.append(row("ml-100k", "twotower-1proc", metric, per_round, note="one ratio per round"))
        for method in ROW_BY_ROW:  # measured once, against the mean of the TFRS rounds
            rows.append(row("ml-100k", method, metric, [rates[method] / rates[baseline]]))
    return rows


# --- the 1M-item model --------------------------------------------------------------------------------


def worker(job: str, data_dir: Path, size: str, *extra: str, nproc: int = 1) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        base = [WORKER, job, str(data_dir), "--size", size, "--out", str(out), *extra]
        if nproc == 1:
            measured = run_measured([sys.executable, *base])
        else:
            launch = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={nproc}",
            ]
            threads = str(max(1, (os.cpu_count() or 1) // nproc))
            measured = run_measured([*launch, *base], env={"OMP_NUM_THREADS": threads})
        report = json.loads(out.read_text())
    return {**report, "peak_rss_mb_tree": measured["peak_rss_mb"], "wall_seconds": measured["seconds"]}


def bench_scale(args: argparse.Namespace) -> list[dict[str, Any]]:
    size = "quick" if args.quick else "full"
    dataset = f"synthetic-{'50k' if args.quick else '1m'}-items"
    data_dir = Path(args.data_dir) / size
    spec = scale_model(size)
    rows: list[dict[str, Any]] = []
    base = worker("baseline", data_dir, size)
    rows.append(
        row(dataset, "imports only (RSS floor of every job)", "peak_rss_mb", [base["peak_rss_mb_self"]])
    )
    gen = worker("generate", data_dir, size)
    # Reused files report the measurement taken when they were generated (its time is in "generated").
    when = {"generated": gen["created"], "bytes_on_disk": gen["bytes_on_disk"]}
    rows += [row(dataset, "scale generator", "seconds", [gen["seconds"]], **when),
             row(dataset, "scale generator", "peak_rss_mb", [gen["peak_rss_mb_self"]], **when)]  # fmt: skip
    read = worker("stream", data_dir, size)
    reader = "streaming reader + prefetch (no model)"
    rows += [row(dataset, reader, "examples_per_s", [read["examples_per_s"]], rows=read["rows"],
                 peak_buffered_rows=read["peak_buffered_rows"]),
             row(dataset, reader, "peak_rss_mb", [read["peak_rss_mb_self"]])]  # fmt: skip
    user = [64, *spec["model"]["user_tower"]["layers"]]  # hashed id -> MLP
    item = [64 + 16 + 16, *spec["model"]["item_tower"]["layers"]]  # id, category, tags -> MLP
    batch = spec["train"]["batch_size"]
    before = ceiling(batch, 64, user, item, args.quick)
    steps = ["--steps", str(6 if args.quick else args.steps), "--epochs", "2"]
    runs = {
        "twotower-1proc": ([], 1),
        ROW_BY_ROW[0]: (["--row-by-row"], 1),
        ROW_BY_ROW[1]: (["--general-loss"], 1),
    }
    if not args.quick:
        runs["twotower-2proc"] = ([], 2)
    rates, distinct = {}, (0.0, 0.0)
    for method, (flags, nproc) in runs.items():
        got = worker("scale-train", data_dir, size, *steps, *flags, nproc=nproc)
        measured = [h["examples_per_s"] for h in got["history"]][1:]
        print(f"{dataset} {method}: {measured}", file=sys.stderr, flush=True)
        rows += [row(dataset, method, "examples_per_s", measured, processes=nproc, config=spec,
                     threads_per_process=got["threads"], steps_measured=int(steps[1])),
                 row(dataset, method, "peak_rss_mb", [got["peak_rss_mb_tree"]], processes=nproc)]  # fmt: skip
        rates[method] = statistics.fmean(measured)
        if method == "twotower-1proc":
            distinct = (got["mean_distinct_users"], got["mean_distinct_items"])
    after = ceiling(batch, 64, user, item, args.quick)
    rows += ceiling_rows(dataset, before, after, batch, {m: rates[m] for m in ROW_BY_ROW})
    sizes = (round(distinct[0]), round(distinct[1]))
    # Its own products, timed twice back to back (the sizes are known only once it has run).
    first, second = (ceiling(batch, 64, user, item, args.quick, sizes) for _ in range(2))
    rows += ceiling_rows(dataset, first, second, batch, {"twotower-1proc": rates["twotower-1proc"]},
                         mean_distinct_users=distinct[0], mean_distinct_items=distinct[1])  # fmt: skip
    b_by_b = before.best(after).report(batch, rates["twotower-1proc"])["ceiling_fraction"]
    rows.append(row(dataset, "twotower-1proc", "fraction_of_row_by_row_ceiling", [b_by_b]))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", help="ML-100K folder (default: ../shared/data/ml-100k)")
    parser.add_argument("--data-dir", default="/tmp/twotower-bench-scale", help="synthetic data cache")
    parser.add_argument("--steps", type=int, default=60, help="1M-item model: measured steps")
    parser.add_argument(
        "--rounds", type=int, default=3, help="ML-100K: rounds of twotower-1proc, TFRS and TFRS+XLA in turn"
    )
    parser.add_argument("--tf-python", default=str(DEFAULT_TF_PYTHON), help="python of a venv with TFRS")
    parser.add_argument(
        "--only", choices=["ml100k", "scale"], help="one model; the other's saved rows are kept"
    )
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    start = hardware()
    rows: list[dict[str, Any]] = []
    data = Path(args.data) if args.data else DEFAULT_ML100K
    if args.only in (None, "ml100k"):
        if (data / "u.data").exists():
            rows += bench_ml100k(args, data)
        else:
            print(f"ML-100K rows skipped: no {data / 'u.data'} (pass --data)", file=sys.stderr)
    if args.only in (None, "scale"):
        rows += bench_scale(args)
    command = "python bench/throughput.py" + (" --quick" if args.quick else "")
    name = NAME + ("_quick" if args.quick else "")
    saved = Path(args.out) / f"{name}.json"
    if args.only and saved.exists():  # a partial run replaces its model's rows and keeps the rest
        measured = {r["dataset"] for r in rows}
        rows = [r for r in json.loads(saved.read_text())["rows"] if r["dataset"] not in measured] + rows
        rows.sort(key=lambda r: r["dataset"] != "ml-100k")  # stable: ML-100K first, as in a full run
        command += f" (rows of the other model from an earlier run; this one: --only {args.only})"
    res = result(name, command, rows)
    res["machine"].update(start, load_average_end=os.getloadavg())
    print(write(res, Path(args.out)))


if __name__ == "__main__":
    main()
