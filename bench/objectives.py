"""Every training objective x negative scheme, and the history encoder, on MovieLens 100K.

    python bench/objectives.py                 # msrec + temporal, 3 seeds each (about 40 minutes on 2 cores)
    python bench/objectives.py --quick         # 1 seed, 2 epochs, a few schemes (about a minute)
    python bench/objectives.py --only mixed    # schemes whose name contains "mixed"

Each scheme is `configs/ml100k.yaml` plus the overrides listed in SCHEMES (same towers, optimiser and
epochs), so rows differ only in objective, negatives and history. Hyperparameters were not tuned per
scheme: the temperature of 0.2 was chosen for the first row on a validation split. History rows train
with the leave-one-out view on msrec (a random split) and the strictly-before view on temporal. Writes
bench/results/objectives.json and .md (bench-format.md).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from common import DEFAULT_ML100K, RESULTS, ROOT, measured_rows, result, write
from twotower.config import load_config
from twotower.data.dataset import build_retrieval_data, load_raw
from twotower.experiment import train_run
from twotower.storage import read_json

NAME = "objectives"
CONFIG = "configs/ml100k.yaml"
PROTOCOLS = ("msrec", "temporal")
_UNIFORM = ["task.negatives.sampler=uniform", "task.negatives.in_batch=false", "task.negatives.shared=false"]
_HISTORY = ["model.history.enabled=true", "model.user_tower.layers=[64]"]
_BCE = ["task.objective=pointwise_bce", *_UNIFORM, "task.negatives.num_sampled=3"]
_MSE = ["task.objective=pointwise_mse", *_UNIFORM, "task.negatives.num_sampled=3"]
_HINGE = ["task.objective=hinge", "task.margin=0.2", *_UNIFORM, "task.negatives.num_sampled=4"]
_BPR = ["task.objective=logistic", *_UNIFORM, "task.negatives.num_sampled=1"]
_MIXED = ["task.negatives.sampler=uniform", "task.negatives.num_sampled=1024"]
_HARD = ["task.negatives.hard.num=2", "task.negatives.hard.refresh_every=200"]
_LISTWISE = ["task.negatives.sampler=popularity", "task.negatives.in_batch=false",
             "task.negatives.shared=false", "task.negatives.num_sampled=20"]  # fmt: skip
SCHEMES: dict[str, list[str]] = {
    "softmax, in-batch, logQ counts": [],
    "softmax, in-batch, no logQ": ["task.logq=none"],
    "softmax, in-batch, logQ streaming": ["task.logq=streaming"],
    "softmax, mixed: in-batch + 1024 uniform (Yang)": _MIXED,
    "softmax, in-batch + 2 hard per row": _HARD,
    "listwise, 1 vs 20 popularity^0.75 per row": _LISTWISE,
    "pointwise BCE, 1:3 uniform": _BCE,
    "pointwise cosine MSE, 1:3 uniform": _MSE,
    "triplet hinge m=0.2, 4 uniform": _HINGE,
    "triplet logistic (BPR), 1 uniform": _BPR,
    "softmax in-batch logQ + history mean": [
        *_HISTORY,
        "model.history.pooling=mean",
        "model.history.max_len=50",
    ],
    "softmax in-batch logQ + history mean, event dropout .5": [
        *_HISTORY,
        "model.history.pooling=mean",
        "model.history.max_len=50",
        "model.history.event_dropout=0.5",
    ],
    "softmax in-batch logQ + history self-attention": [
        *_HISTORY,
        "model.history.pooling=attention",
        "model.history.max_len=20",
        "model.history.num_layers=1",
    ],
}
# A random split (msrec) tests on items spread over the user's whole timeline, so training sees every other
# training event (leave-one-out); a temporal split predicts the next event from strictly earlier ones.
HISTORY_VIEW = {"msrec": "all_but_target", "temporal": "before"}
QUICK = (
    "softmax, in-batch, logQ counts",
    "pointwise BCE, 1:3 uniform",
    "softmax in-batch logQ + history mean",
)
METRICS = ("ndcg@10", "recall@10")


def merge(out: Path, name: str, command: str, new_rows: list[dict]) -> dict:
    """Replace the (protocol, method) rows that were just measured in the saved results; keep the rest.

    Every row carries the command that measured it, so a partial run (--only, --protocols, --seeds)
    leaves the others' provenance intact; the header lists each command once (as bench/ultr.py)."""
    path = out / f"{name}.json"
    new_rows = [{**r, "command": command} for r in new_rows]
    done = {(r["protocol"], r["method"]) for r in new_rows}
    old = read_json(path)["rows"] if path.exists() else []
    rows = [r for r in old if (r["protocol"], r["method"]) not in done] + new_rows
    command = " ; ".join(dict.fromkeys(r.get("command", "(command not recorded)") for r in rows))

    def order(r: dict) -> tuple[int, int]:
        method = list(SCHEMES).index(r["method"]) if r["method"] in SCHEMES else len(SCHEMES)
        return PROTOCOLS.index(r["protocol"]), method

    return result(name, command, sorted(rows, key=order))


def run(args: argparse.Namespace) -> None:
    """Run the selected schemes; results are merged into the saved table after every scheme, so an
    interrupted run keeps what it measured and a partial run (--only, --protocols) updates its rows."""
    seeds = [0] if args.quick else list(range(args.seeds))
    data_path = args.data or (str(DEFAULT_ML100K) if DEFAULT_ML100K.exists() else None)
    schemes = {k: v for k, v in SCHEMES.items() if (not args.quick or k in QUICK) and args.only in k}
    name = NAME + ("_quick" if args.quick else "")
    command = shlex.join(["python", "bench/objectives.py", *args.argv])
    text = ""
    for protocol in args.protocols:
        common = [f"data.path={data_path}" if data_path else "data.path=null", f"eval.protocol={protocol}"]
        if args.quick:
            common.append("train.epochs=2")
        raw = load_raw(load_config(ROOT / CONFIG, common).data)
        for scheme, overrides in schemes.items():
            if "model.history.enabled=true" in overrides:
                overrides = [*overrides, f"model.history.training_view={HISTORY_VIEW[protocol]}"]
            config = load_config(ROOT / CONFIG, [*common, *overrides])
            data = build_retrieval_data(config, raw)  # the protocol fixes the split; seeds vary the model
            values: dict[str, list[float]] = {m: [] for m in (*METRICS, "seconds")}
            for seed in seeds:
                seeded = load_config(ROOT / CONFIG, [*common, *overrides, f"train.seed={seed}"])
                with tempfile.TemporaryDirectory() as tmp:
                    metrics = train_run(seeded, tmp, progress=False, data=data)
                for m in METRICS:
                    values[m].append(float(metrics[m]))
                values["seconds"].append(float(metrics["train_seconds"]))
                shown = " ".join(f"{m}={metrics[m]:.4f}" for m in METRICS)
                print(f"{protocol} | {scheme} | seed {seed}: {shown} ({metrics['train_seconds']:.1f} s)",
                      file=sys.stderr, flush=True)  # fmt: skip
            base = {"dataset": "ml-100k", "protocol": protocol, "method": scheme,
                    "config": f"{CONFIG} " + " ".join(f"--set {o}" for o in overrides)}  # fmt: skip
            text = write(
                merge(Path(args.out), name, command, measured_rows(base, values, seeds)), Path(args.out)
            )
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 3 schemes")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", default="", help="run the schemes whose name contains this text")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--data", help="ML-100K folder or zip (default: ../shared/data/ml-100k or download)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    run(args)


if __name__ == "__main__":
    main()
