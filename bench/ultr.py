"""Unbiased learning to rank: every method x click model, the confounding sweep, the recovered curves.

    python bench/ultr.py                       # all parts, 3 seeds (about 55 minutes on 2 cores)
    python bench/ultr.py --quick               # 1 seed, 1 epoch, small world, a few methods (under a minute)
    python bench/ultr.py --parts sweep         # one part: main | sweep | rates
    python bench/ultr.py --letor PATH          # also a LETOR file (e.g. MSLR-WEB10K Fold1/train.txt)
    python bench/ultr.py --parts sweep --top-n 40   # all 40 candidates shown (rows tagged /shown-40):
                                               # the sweep without the documents the top 10 never show
    python bench/ultr.py --epochs 32 --valid-share 0.1   # each method's training length chosen on 10 % of
                                               # the training queries (rows tagged /valid-0.1-max32ep)
    python bench/ultr.py --epochs 32 --valid-share 0.1 --bias-refit-epochs 16   # then the bias tower
                                               # alone, relevance frozen (rows tagged /bias-refit-16ep)

Parts (bench-format.md rows; `protocol` = click model / logging policy):

a. main: every method in twotower.ultr.METHODS x {position-based (pbm), cascade} on the synthetic world
   (2000 users x 40 candidates each, two devices) and on MovieLens 100K (users as queries, rated movies
   as documents, rating - 1 as the label), logged by a linear production ranker fitted on 1 % of the
   training queries' true labels (the ULTRA protocol), top 10 shown, 10 sessions per query, 5 % RandTop-N
   sessions, clicks redrawn every epoch. Metrics against the TRUE labels of held-out queries (20 %):
   nDCG@1/3/5/10 and MRR@3/5/10 (rows measured before MRR@3/5 were added have mrr@10 only);
   click log-likelihood and AUC on a held-out click log of those queries, logged by the same ranker.
   (Rows without a `held_out_log` field are older: their held-out clicks were logged by a ranker fitted
   on 1 % of the held-out queries' own labels; only their click_loglik / click_auc depend on it.)
b. sweep: synthetic world, pbm, logging score w * y + (1 - w) * U(0, 4) for w in {0, .25, .5, .75, 1};
   the oracle as the reference. Rows `pbm/mixture-w0-to-w1`: each method's nDCG@10 drop from w = 0 to
   w = 1 (per seed), and that drop beyond the oracle's (the top-10 logs' own loss of information).
c. curves: the examination curve learned by each two-tower method under pbm (synthetic world, mean over
   seeds) against the simulator's, per device, relative to rank 1 (from part a's runs).
d. rates: PAL and additive with bias-logit dropout at the rates in RATES, part a's protocol with pbm
   clicks (methods METHOD+bias-dropout@RATE), plotted against the rate with the plain (0) and default (.5)
   rows of part a.

Writes bench/results/ultr.json, ultr.md, ultr_sweep.png, ultr_curves.png and ultr_rates.png
(ultr_valid_*.png with --valid-share, ultr_valid_refit_*.png with --bias-refit-epochs too; --quick:
ultr_quick*).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common import DEFAULT_ML100K, RESULTS, measured_rows, result, write  # noqa: E402
from twotower.data.click_log import logging_scores, simulate_click_log  # noqa: E402
from twotower.data.click_models import ClickModel  # noqa: E402
from twotower.data.letor import read_letor  # noqa: E402
from twotower.data.ltr import RankingData, from_letor, from_movielens, from_synthetic_world  # noqa: E402
from twotower.data.movielens import load_movielens  # noqa: E402
from twotower.data.synthetic import SyntheticWorld, WorldConfig  # noqa: E402
from twotower.storage import read_json  # noqa: E402
from twotower.ultr import METHODS, UltrConfig, evaluate_ranker, train_ranker  # noqa: E402

NAME = "ultr"
METRICS = ("ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "mrr@3", "mrr@5", "mrr@10", "curve_max_abs_error",
           "click_loglik", "click_auc", "seconds")  # fmt: skip
SWEEP_W = (0.0, 0.25, 0.5, 0.75, 1.0)
SWEEP_METHODS = (
    "two-tower-additive",
    "two-tower-additive+position-dropout",
    "two-tower-additive+bias-dropout",
    "ipw-true",
    "naive",
    # not one of the five: the same shown documents with their true labels, so its drop from
    # w = 0 to w = 1 is what the logs lose by showing only the top 10 (no click model can recover it)
    "oracle",
)
QUICK_METHODS = ("naive", "two-tower-pal", "two-tower-additive+bias-dropout", "oracle")
# Part "rates": bias-logit dropout rates between none (the plain rows) and the default .5 (the
# +bias-dropout rows), for PAL and additive, under the main protocol with pbm clicks.
RATES = (0.05, 0.1, 0.2, 0.3)
RATE_METHODS = ("two-tower-pal", "two-tower-additive")
# Which policy logged the held-out clicks (click_loglik, click_auc): rows without this field are older,
# their held-out log's production ranker was fitted on 1 % of the held-out queries' own labels.
HELD_OUT = {"held_out_log": "logged by the training queries' production ranker"}
TOP_N = 10  # documents shown per session, as in ULTRA


def datasets(args: argparse.Namespace, only: list[str] | None = None) -> dict[str, RankingData]:
    names = only or args.datasets
    out: dict[str, RankingData] = {}
    if "synthetic" in names:
        world = SyntheticWorld.generate(
            WorldConfig(num_users=300 if args.quick else 2000, num_items=1000, seed=0)
        )
        out["synthetic"] = from_synthetic_world(world, candidates=40)
    if "ml-100k" in names and not args.quick:
        path = args.ml100k or (DEFAULT_ML100K if DEFAULT_ML100K.exists() else None)
        out["ml-100k"] = from_movielens(load_movielens("ml-100k", path=path))
    if args.letor and only is None:
        out[Path(args.letor).name] = from_letor(read_letor(args.letor))
    return out


def run_cell(data: RankingData, config: UltrConfig, methods, seeds, label: str) -> tuple[dict, dict]:
    """Every method on one (data, simulation) cell: per-method metric lists and learned curves."""
    values = {m: {k: [] for k in METRICS} for m in methods}
    curves: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        train, test = data.split(0.2, seed)
        mean, std = train.feature_stats()
        train, test = train.standardized(mean, std), test.standardized(mean, std)
        sim = config.simulation
        log = simulate_click_log(train, logging_scores(train, sim.logging, seed), sim, seed)
        # The held-out clicks are logged by the same production ranker (fitted on 1 % of the training
        # queries' labels, as in ULTRA); only their sessions and clicks are new draws.
        test_scores = logging_scores(test, sim.logging, seed, fitted_on=train)
        test_log = simulate_click_log(test, test_scores, sim, seed + 100,
                                      sessions_per_query=config.test_sessions_per_query)  # fmt: skip
        truth = ClickModel(sim.click_model, data.max_label, sim.top_n).curves
        truth = truth if sim.click_model.model == "pbm" else None
        for method in methods:
            start = time.perf_counter()
            model = train_ranker(method, train, log, config, seed)
            metrics, learned = evaluate_ranker(model, test, test_log, truth)
            metrics["seconds"] = time.perf_counter() - start
            for k in METRICS:
                if k in metrics:
                    values[method][k].append(float(metrics[k]))
            curves[method].append(learned)
            err = metrics.get("curve_max_abs_error", float("nan"))
            print(f"{label} | {method} | seed {seed}: ndcg@10={metrics['ndcg@10']:.4f} curve_err={err:.3f} "
                  f"({metrics['seconds']:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip
    return {m: {k: v for k, v in vals.items() if v} for m, vals in values.items()}, curves


def length_tag(args: argparse.Namespace) -> str:
    """Protocol suffix: how many documents a session shows (when not ULTRA's 10), and how the training
    length is chosen (on held-out queries; else 8 fixed epochs)."""
    tag = f"/shown-{args.top_n}" if args.top_n != TOP_N else ""
    tag += f"/valid-{args.valid_share:g}-max{args.epochs}ep" if args.valid_share else ""
    if args.valid_share and args.patience != 3:  # 3: the rows measured before patience was a flag
        tag += f"-patience{args.patience}"
    return tag + (f"/bias-refit-{args.bias_refit_epochs}ep" if args.bias_refit_epochs else "")


def plot_tag(args: argparse.Namespace) -> str:
    """Plot file suffix, so a run with another training protocol does not overwrite the default's plots."""
    shown = f"_shown{args.top_n}" if args.top_n != TOP_N else ""
    return shown + ("_valid" if args.valid_share else "") + ("_refit" if args.bias_refit_epochs else "")


def config_for(args: argparse.Namespace, click: str, logging: dict, ranker: dict | None = None) -> UltrConfig:
    train = {"epochs": 1 if args.quick else args.epochs, "batch_size": 256, "lr": 3e-3}
    return UltrConfig.model_validate(
        {
            "simulation": {"click_model": {"model": click}, "logging": logging, "top_n": args.top_n},
            "ranker": ranker or {},
            "train": train,
            "valid_share": args.valid_share,
            "patience": args.patience,
            "bias_refit_epochs": args.bias_refit_epochs,
        }  # fmt: skip
    )


def merge(out: Path, name: str, command: str, new_rows: list[dict]) -> dict:
    """The saved rows with ``new_rows`` added or replacing their (dataset, protocol, method) cells.

    Every row carries the command that measured it, so a partial run (--parts, --clicks, --methods)
    leaves the others' provenance intact; the header lists each command once."""
    path = out / f"{name}.json"
    new_rows = [{**r, "command": command} for r in new_rows]
    done = {(r["dataset"], r["protocol"], r["method"]) for r in new_rows}
    saved = read_json(path) if path.exists() else {"rows": []}
    kept = [r for r in saved["rows"] if (r["dataset"], r["protocol"], r["method"]) not in done]
    rows = kept + new_rows
    commands = list(dict.fromkeys(r.get("command", "(command not recorded)") for r in rows))
    return result(name, " ; ".join(commands), rows)


def save(args, command: str, rows: list[dict]) -> tuple[str, dict]:
    res = merge(Path(args.out), NAME + ("_quick" if args.quick else ""), command, rows)
    return write(res, Path(args.out)), res


def sweep_from_rows(rows: list[dict], tag: str) -> dict[str, dict[float, list[float]]]:
    """nDCG@10 per seed, by method and w, of the sweep rows measured under the protocol ``tag``."""
    return {m: {w: values for w, (values, _) in by_w.items()} for m, by_w in _sweep_cells(rows, tag).items()}


def _sweep_cells(rows: list[dict], tag: str) -> dict[str, dict[float, tuple[list[float], list[int]]]]:
    cells: dict[str, dict[float, tuple[list[float], list[int]]]] = {}
    for w in SWEEP_W:
        for r in rows:
            if r["protocol"] == f"pbm/mixture-w{w:g}{tag}" and r["metric"] == "ndcg@10":
                cells.setdefault(r["method"], {})[w] = (r["values"], r["seeds"])
    return cells


def sweep_drop_rows(rows: list[dict], tag: str) -> list[dict]:
    """The issue's sweep target as rows (protocol ``pbm/mixture-w0-to-w1``), per seed and then mean ± std:

    * ``ndcg@10_drop``: nDCG@10 at w = 0 minus at w = 1, the loss the target compares between methods;
    * ``ndcg@10_drop_beyond_oracle``: that drop minus the oracle's on the same seed. The oracle learns
      the true labels of the same shown documents, so its drop is the information the top-10 logs lose
      at w = 1 (documents never shown); what is left is what clicks and the method add to it.

    Seeds pair the two cells (same world split, same seed), so only seeds measured at both w count."""
    cells = _sweep_cells(rows, tag)
    drops: dict[str, dict[int, float]] = {}
    for method, by_w in cells.items():
        if 0.0 in by_w and 1.0 in by_w:
            at_1 = dict(zip(by_w[1.0][1], by_w[1.0][0], strict=True))
            drops[method] = {s: v - at_1[s] for v, s in zip(*by_w[0.0], strict=True) if s in at_1}
    out: list[dict] = []
    base = {"dataset": "synthetic", "protocol": f"pbm/mixture-w0-to-w1{tag}", **HELD_OUT}
    for method, by_seed in drops.items():
        values = {"ndcg@10_drop": by_seed}
        if method != "oracle" and "oracle" in drops:
            oracle = drops["oracle"]
            beyond = {s: d - oracle[s] for s, d in by_seed.items() if s in oracle}
            values["ndcg@10_drop_beyond_oracle"] = beyond
        for metric, per_seed in values.items():
            if per_seed:
                seeds = sorted(per_seed)
                row_values = {metric: [per_seed[s] for s in seeds]}
                out += measured_rows({**base, "method": method}, row_values, seeds)
    return out


def _mean_std_line(ax, by_x: dict[float, list[float]], label: str) -> None:
    """One line of per-x means over seeds, with their std as error bars."""
    xs = sorted(by_x)
    means = [statistics.fmean(by_x[x]) for x in xs]
    stds = [statistics.stdev(by_x[x]) if len(by_x[x]) > 1 else 0.0 for x in xs]
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)


def _finish(ax, xlabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("nDCG@10 vs true labels (held-out queries)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_sweep(sweep: dict[str, dict[float, list[float]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, by_w in sweep.items():
        if method == "oracle":  # the reference, drawn apart from the methods
            xs = sorted(by_w)
            ax.plot(xs, [statistics.fmean(by_w[x]) for x in xs], "k--", alpha=0.6,
                    label="oracle (true labels of the shown documents)")  # fmt: skip
            continue
        _mean_std_line(ax, by_w, method)
    _finish(ax, "logging policy strength w  (score = w·y + (1−w)·U(0, 4))",
            "Confounding sweep: synthetic world, position-based clicks")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rates_from_rows(rows: list[dict], protocol: str) -> dict[str, dict[str, dict[float, list[float]]]]:
    """nDCG@10 per seed by dataset, method and bias-dropout rate under ``protocol``: the part's
    ``METHOD+bias-dropout@RATE`` rows, the plain METHOD (rate 0), METHOD+bias-dropout (its default
    rate), and naive and oracle (as rate 0, drawn as lines)."""
    out: dict[str, dict[str, dict[float, list[float]]]] = {}
    for r in rows:
        if r["protocol"] != protocol or r["metric"] != "ndcg@10":
            continue
        method, dropped, suffix = r["method"].partition("+bias-dropout")
        if r["method"] in ("naive", "oracle") or (method in RATE_METHODS and not dropped):
            rate = 0.0
        elif method in RATE_METHODS and suffix == "":
            rate = METHODS[r["method"]]["bias_dropout"]
        elif method in RATE_METHODS and suffix.startswith("@"):
            rate = float(suffix[1:])
        else:
            continue
        out.setdefault(r["dataset"], {}).setdefault(method, {})[rate] = r["values"]
    return out


def plot_rates(data: dict[str, dict[str, dict[float, list[float]]]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(data), figsize=(5.5 * len(data), 4.2), squeeze=False)
    for ax, (dataset, by_method) in zip(axes[0], data.items(), strict=True):
        for method, by_rate in by_method.items():
            if method in ("naive", "oracle"):
                colour = "grey" if method == "naive" else "k"
                ax.axhline(statistics.fmean(by_rate[0.0]), ls="--", color=colour, alpha=0.7, label=method)
                continue
            _mean_std_line(ax, by_rate, method)
        _finish(ax, "bias-logit dropout rate", f"{dataset}: production-1% logging, position-based clicks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: dict[str, list[dict]], truth: np.ndarray, devices: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(devices), figsize=(5.5 * len(devices), 4.2), squeeze=False)
    ranks = np.arange(1, truth.shape[1] + 1)
    for d, (ax, device) in enumerate(zip(axes[0], devices, strict=True)):
        ax.plot(ranks, truth[d] / truth[d, 0], "k-", lw=3, alpha=0.35, label="simulator (truth)")
        for method, runs in curves.items():
            learned = np.mean([run[device] for run in runs if run], axis=0)
            ax.plot(ranks, learned, marker=".", label=method)
        ax.set_title(f"examination relative to rank 1: {device}")
        ax.set_xlabel("rank")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("P(examined | rank) / P(examined | rank 1)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8, help="with --valid-share: at most this many")
    parser.add_argument(
        "--valid-share", type=float, default=0.0,
        help="hold out this share of the training queries to choose each method's training length",
    )  # fmt: skip
    parser.add_argument("--patience", type=int, default=3, help="with --valid-share")
    parser.add_argument(
        "--sweep-w", type=float, nargs="+", default=list(SWEEP_W), choices=SWEEP_W,
        help="the sweep's policy strengths to measure (default: all; the others' saved rows are kept)",
    )  # fmt: skip
    parser.add_argument(
        "--top-n", type=int, default=TOP_N,
        help="documents shown per session (the synthetic world has 40 per query: 40 shows them all)",
    )  # fmt: skip
    parser.add_argument(
        "--bias-refit-epochs", type=int, default=0,
        help="then fit the bias tower alone this many epochs, relevance frozen (UltrConfig)",
    )  # fmt: skip
    parts = ["main", "sweep", "rates"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "ml-100k"])
    parser.add_argument(
        "--clicks", nargs="+", default=["pbm", "cascade"], choices=["pbm", "cascade", "trust"]
    )
    parser.add_argument("--methods", nargs="+", default=None, help="default: all (a few with --quick)")
    parser.add_argument(
        "--ml100k", help="ML-100K folder or zip (default: ../shared/data/ml-100k or download)"
    )
    parser.add_argument("--letor", help="a LETOR/svmlight file to add as a data set")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    seeds = [0] if args.quick else list(range(args.seeds))
    methods = args.methods or (QUICK_METHODS if args.quick else tuple(METHODS))
    command = "python bench/ultr.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    out = Path(args.out)
    stem = NAME + ("_quick" if args.quick else "")
    text = ""
    if "main" in args.parts:
        for name, data in datasets(args).items():
            for click in args.clicks:
                config = config_for(args, click, {"kind": "production", "label_share": 0.01})
                values, curves = run_cell(data, config, methods, seeds, f"{name} {click}")
                rows = []
                for method, vals in values.items():
                    base = {"dataset": name, "protocol": f"{click}/production-1%{length_tag(args)}",
                            "method": method, **HELD_OUT}  # fmt: skip
                    rows += measured_rows(base, vals, seeds)
                text, _ = save(args, command, rows)
                two_tower = {m: c for m, c in curves.items() if m.startswith("two-tower")}
                # The curves are not saved in the rows: a run of some of the two-tower methods would
                # redraw the plot with those alone, so it is left as it is (except --quick's own plot).
                complete = args.quick or set(two_tower) == {m for m in METHODS if m.startswith("two-tower")}
                if two_tower and not complete:
                    print("curves plot not redrawn: it needs every two-tower method", file=sys.stderr)
                if name == "synthetic" and click == "pbm" and two_tower and complete:
                    sim = config.simulation
                    truth = ClickModel(sim.click_model, data.max_label, sim.top_n)
                    path = out / f"{stem}{plot_tag(args)}_curves.png"
                    plot_curves(two_tower, truth.curves, truth.device_names, path)
    if "sweep" in args.parts:
        data = datasets(args, only=["synthetic"])["synthetic"]
        # --methods picks any methods (the PAL variants too); by default the five
        sweep_methods = list(args.methods) if args.methods else list(SWEEP_METHODS)
        rows = []
        for w in args.sweep_w:
            config = config_for(args, "pbm", {"kind": "mixture", "w": w})
            values, _ = run_cell(data, config, sweep_methods, seeds, f"sweep w={w}")
            for method, vals in values.items():
                base = {"dataset": "synthetic", "protocol": f"pbm/mixture-w{w:g}{length_tag(args)}",
                        "method": method, **HELD_OUT}  # fmt: skip
                rows += measured_rows(base, vals, seeds)
            text, saved = save(args, command, rows)
        # from the saved rows, so a run with a few methods redraws the plot with the others kept
        text, saved = save(args, command, sweep_drop_rows(saved["rows"], length_tag(args)))
        sweep = sweep_from_rows(saved["rows"], length_tag(args))
        plot_sweep(sweep, out / f"{stem}{plot_tag(args)}_sweep.png")
    if "rates" in args.parts:
        rate_methods = [m for m in RATE_METHODS if not args.methods or m in args.methods]
        protocol = f"pbm/production-1%{length_tag(args)}"
        for name, data in datasets(args).items():
            rows = []
            for rate in RATES:
                config = config_for(args, "pbm", {"kind": "production", "label_share": 0.01},
                                    {"bias_dropout": rate})  # fmt: skip
                values, _ = run_cell(data, config, rate_methods, seeds, f"{name} bias-dropout {rate:g}")
                for method, vals in values.items():
                    base = {
                        "dataset": name,
                        "protocol": protocol,
                        "method": f"{method}+bias-dropout@{rate:g}",
                        **HELD_OUT,
                    }
                    rows += measured_rows(base, vals, seeds)
                text, saved = save(args, command, rows)
            plot_rates(rates_from_rows(saved["rows"], protocol), out / f"{stem}{plot_tag(args)}_rates.png")
    print(text)


if __name__ == "__main__":
    main()
