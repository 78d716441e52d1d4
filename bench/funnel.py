"""The aligned funnel: every alignment piece on and off, against the main ranker and the world's truth.

    python bench/funnel.py            # the demo's world (2000 users x 1000 items), seeds 0 1 2
    python bench/funnel.py --quick    # the small world, one seed (under a minute or two)

Each seed runs twotower.funnel_experiment end to end: a synthetic world (its seed too), a retrieval
two-tower, 8000 simulated position-biased requests (clicks follow taste, the interaction log also
popularity), a PAL main ranker and a light ranker, then six copies of the retrieval fine-tuned for the
same number of steps: control (own loss only), + raw clicks, + debiased (IPW) clicks, + distillation
(KL), + reward (REINFORCE on the ranker's logits), + all; and the light ranker distilled from the main
one. Funnel 1000 items -> 50 retrieved -> 20 kept by the light ranker -> 10 served.

Metrics (protocol funnel-full-catalogue, every user, nothing excluded): ranker_top10_recall@N - share of
the main ranker's own top 10 over the catalogue inside retrieval's top N; light_ranker_top10_recall@20 -
the same after the light ranker; spearman_retrieval_ranker on retrieval's 50; retrieval_ndcg@10 and
served_ndcg@10 against the true p(click | seen); oracle funnels with stages replaced by the truth.

Writes bench/results/funnel.json, funnel.md and funnel.png (recall of the ranker's top 10 vs N);
--quick writes funnel_quick.*.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import RESULTS, measured_rows, result, write  # noqa: E402
from twotower.funnel_experiment import FunnelExperimentConfig, run_funnel_experiment  # noqa: E402


def plot(per_seed: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = per_seed[0]["funnel"]
    for method in rows:
        points = sorted(
            (int(m.split("@")[1]), m) for m in rows[method] if m.startswith("ranker_top10_recall@")
        )
        if not points:
            continue
        ns = [n for n, _ in points]
        means = [statistics.fmean(run["funnel"][method][m] for run in per_seed) for _, m in points]
        ax.plot(ns, means, marker="o", label=method)
    ax.set(
        xlabel="retrieval list size N", ylabel="share of the main ranker's top 10 retrieved", ylim=(0, 1.02)
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small world, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    per_seed = []
    for seed in seeds:
        config = FunnelExperimentConfig(quick=args.quick, seed=seed, requests=3000 if args.quick else 8000)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="twotower-funnel-") as tmp:
            per_seed.append(
                run_funnel_experiment(config, Path(tmp) / "run", echo=lambda s: print(s, flush=True))
            )
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)

    dataset = "synthetic-small" if args.quick else "synthetic"
    rows = []
    for method in per_seed[0]["funnel"]:
        metrics = per_seed[0]["funnel"][method]
        values = {m: [run["funnel"][method][m] for run in per_seed] for m in metrics}
        base = {"dataset": dataset, "protocol": per_seed[0]["protocol"], "method": method}
        rows += measured_rows(base, values, seeds)
    seconds = [run["seconds"]["total"] for run in per_seed]
    rows += measured_rows(
        {"dataset": dataset, "protocol": per_seed[0]["protocol"], "method": "whole experiment"},
        {"seconds": seconds}, seeds,
    )  # fmt: skip
    command = "python bench/funnel.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    # A smoke run must not overwrite the default run's results (funnel_quick.*, as the other benchmarks).
    name = "funnel" + ("_quick" if args.quick else "")
    print(write(result(name, command, rows)))
    plot(per_seed, RESULTS / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
