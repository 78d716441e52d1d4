"""The HTTP part of ``bench/serving.py``: a fixed-rate load test of ``twotower serve`` on 127.0.0.1.

A retrieval run is trained on a synthetic world (``--http-items`` items), exported with the HNSW
index, given a debiased ranker trained on simulated impressions (so each request runs the whole
retrieve -> re-rank path), and served by ``twotower serve`` (``--http-workers`` uvicorn processes,
default 1, one torch thread each). The load generator runs open-loop in its own process: request i
is due at ``t0 + i / rate`` whatever happened to earlier ones, and its latency is measured from that
due time, so a stalled server shows up as latency instead of silently lowering the offered rate (no
coordinated omission). It stops by itself after ``duration`` seconds; every request has a 5 s
timeout and anything but a 200 counts as an error. The mix: 80 % known users, 15 % cold-start users
from features, 5 % with a recent-item history and a genre filter.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from twotower.data.impression_sim import simulate_impressions
from twotower.data.synthetic import SyntheticWorld, WorldConfig
from twotower.demo import demo_config
from twotower.experiment import train_run
from twotower.export import export_run
from twotower.index import IndexConfig
from twotower.recommender import Retriever
from twotower.reranker import RunRankerConfig, train_run_ranker

__all__ = ["build_served_run", "load_test", "run_http_part"]


def build_served_run(work: Path, num_items: int, num_users: int, seed: int = 0) -> Path:
    """Train, attach a ranker (when impressions can be simulated) and export with HNSW."""
    base = demo_config(quick=False)
    world = WorldConfig(num_users=num_users, num_items=num_items, seed=seed)
    data = base.data.model_copy(update={"world": world})
    train = base.train.model_copy(update={"epochs": 3, "batch_size": 2048, "early_stopping": None})
    config = base.model_copy(update={"data": data, "train": train})
    run_dir = work / "run"
    print(f"[http] training a retrieval run on {num_users} users x {num_items} items ...", flush=True)
    train_run(config, run_dir, progress=False)
    print("[http] training the debiased ranker on 20k simulated impressions ...", flush=True)
    world = SyntheticWorld.generate(world)
    log = simulate_impressions(Retriever.load(run_dir), world, 20_000, seed=seed)
    log.drop(columns="true_affinity").to_csv(work / "impressions.csv", index=False)
    ranker = RunRankerConfig.model_validate({"columns": {"user": "user_id", "context": ["device"]}})
    train_run_ranker(run_dir, work / "impressions.csv", ranker)
    print("[http] exporting with faiss-hnsw ...", flush=True)
    export_run(run_dir, index=IndexConfig(backend="faiss-hnsw"))
    return run_dir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _requests(run_dir: Path, n: int, seed: int) -> list[dict]:
    import pandas as pd

    from twotower.storage import read_json

    meta = read_json(run_dir / "model.json")
    users, items = meta["user_ids"], meta["item_ids"]
    genres = sorted(
        {g for cell in pd.read_parquet(run_dir / "items.parquet")["genres"] for g in cell.split("|")}
    )
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        draw = rng.random()
        if draw < 0.80:
            out.append({"user_id": rng.choice(users), "k": 10})
        elif draw < 0.95:
            features = {
                "segment": f"s{rng.randrange(8)}",
                "region": rng.choice(["north", "south", "east", "west"]),
            }
            out.append({"user_id": f"new-{rng.randrange(10**6)}", "features": features, "k": 10})
        else:
            history = [rng.choice(items) for _ in range(5)]
            out.append(
                {
                    "user_id": rng.choice(users),
                    "history": history,
                    "filters": {"genres": [rng.choice(genres)]},
                }
            )
    return out


async def _drive(base: str, bodies: list[dict], rate: float) -> tuple[list[float], int, float]:
    """Send ``bodies`` open-loop at ``rate``/s; (latencies ms of successes, errors, seconds).

    aiohttp, not httpx: the generator shares the machine's two cores with the server, and aiohttp
    spends several times less CPU per request."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    timeout = aiohttp.ClientTimeout(total=5.0)
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(base, timeout=timeout, connector=connector) as session:

        async def one(body: bytes, due: float) -> None:
            nonlocal errors
            try:
                async with session.post("/recommend", data=body, headers=_JSON) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                        return
                latencies.append((time.perf_counter() - due) * 1e3)
            except (aiohttp.ClientError, TimeoutError):
                errors += 1

        payloads = [json.dumps(b).encode() for b in bodies]
        start = time.perf_counter()
        tasks = []
        for i, body in enumerate(payloads):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(body, due)))
        await asyncio.gather(*tasks)
        return latencies, errors, time.perf_counter() - start


_JSON = {"content-type": "application/json"}


def _cpu_times() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs from /proc/stat; (0, 0) where there is none."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


class _StealSampler:
    """The hypervisor's steal time (CPU time this VM was ready to run but not given a core), sampled
    every second during a load test: on a shared VM it, not the server, sets much of the tail."""

    def __init__(self) -> None:
        import threading

        self.shares: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = _cpu_times()
        while not self._stop.wait(1.0):
            now = _cpu_times()
            total = now[1] - last[1]
            if total > 0:
                self.shares.append((now[0] - last[0]) / total)
            last = now

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        if not self.shares:
            return {}
        return {
            "steal_pct_mean": 100 * float(np.mean(self.shares)),
            "steal_pct_max_1s": 100 * max(self.shares),
        }


def load_test(run_dir: Path, rate: float, duration: float, seed: int = 0, workers: int = 1) -> dict:
    """Serve ``run_dir`` in a subprocess and offer ``rate`` requests/s for ``duration`` seconds."""
    port = _free_port()
    cmd = [sys.executable, "-m", "twotower.cli", "serve", str(run_dir), "--port", str(port),
           "--workers", str(workers)]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not come up")
            time.sleep(0.2)
        bodies = _requests(run_dir, int(rate * duration), seed)
        warmup = bodies[: max(50, int(rate))]  # 1 s, not measured
        # The generator runs in a fresh interpreter: this process holds training leftovers whose
        # garbage-collector pauses would be charged to the server.
        with tempfile.TemporaryDirectory() as tmp:
            requests_file = Path(tmp) / "requests.json"
            requests_file.write_text(json.dumps({"warmup": warmup, "bodies": bodies}))
            driver = [sys.executable, __file__, "--drive", base, str(requests_file), str(rate)]
            steal = _StealSampler()
            out = json.loads(subprocess.run(driver, check=True, capture_output=True, text=True).stdout)
            steal_stats = steal.stop()
        latencies, errors, seconds = out["latencies"], out["errors"], out["seconds"]
        health = httpx.get(f"{base}/healthz").json()
    finally:
        server.terminate()
        server.wait(timeout=20)
    lat = np.asarray(latencies)
    return {
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": float(errors),
        "requests": float(len(bodies)),
        "requests_per_s": len(bodies) / seconds,
        "ranker": health["ranker"],
        "index": health["index"],
        **steal_stats,
    }


def run_http_part(args, work: Path) -> list[dict]:
    """``args.http_repeats`` load tests of one served run (each against a freshly started server, with
    its own request sample): every metric's row lists each run, so a tail that moves between runs
    on a shared machine shows up as its spread instead of as one lucky or unlucky number."""
    run_dir = Path(args.http_run) / "run" if args.http_run else work / "run"
    if (run_dir / "export" / "manifest.json").exists():
        print(f"[http] reusing the served run in {run_dir}", flush=True)
    else:
        run_dir = build_served_run(run_dir.parent, args.http_items, args.http_users)
    runs = []
    for repeat in range(args.http_repeats):
        print(f"[http] load test {repeat + 1}/{args.http_repeats}: {args.rate} requests/s for "
              f"{args.duration} s ...", flush=True)  # fmt: skip
        runs.append(load_test(run_dir, args.rate, args.duration, seed=repeat, workers=args.http_workers))
        print(f"[http] {runs[-1]}", flush=True)
    dataset = f"synthetic-{args.http_items // 1000}k"
    note = (
        f"{args.rate} req/s offered for {args.duration} s per run, open loop; index {runs[0]['index']}, "
        f"re-rank with the relevance tower: {runs[0]['ranker']}; {args.http_workers} uvicorn workers, "
        "1 torch thread each; one value per run (a fresh server each)"
    )
    rows = []
    for metric in ("p50_ms", "p95_ms", "p99_ms", "errors", "requests_per_s", "steal_pct_mean",
                   "steal_pct_max_1s"):  # fmt: skip
        if any(metric not in r for r in runs):  # steal: only where /proc/stat has it
            continue
        values = [r[metric] for r in runs]
        rows.append({"dataset": dataset, "protocol": f"{args.rate:g}rps-{args.duration:g}s", "method": "http",
                     "metric": metric, "mean": float(np.mean(values)),
                     "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                     "values": values, "seeds": list(range(len(runs))), "workers": args.http_workers,
                     "note": note})  # fmt: skip
    return rows


if __name__ == "__main__" and sys.argv[1:2] == ["--drive"]:
    _, _, url, file, offered = sys.argv
    spec = json.loads(Path(file).read_text())
    try:  # uvloop (uvicorn[standard] brings it): less of the shared CPU spent by the generator
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    run(_drive(url, spec["warmup"], float(offered)))
    lat, errs, secs = run(_drive(url, spec["bodies"], float(offered)))
    print(json.dumps({"latencies": lat, "errors": errs, "seconds": secs}))
