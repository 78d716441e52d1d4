"""bench/ultr.py's wiring: which ranker config each part trains (no training here)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from twotower.ultr import method_config

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_ultr():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling `common`
    try:
        spec = importlib.util.spec_from_file_location("bench_ultr", BENCH / "ultr.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_the_rates_part_trains_each_method_at_each_rate(bench_ultr, monkeypatch, tmp_path):
    # The rates part passes the rate in the shared ranker section: it must reach the plain PAL and
    # additive methods (it once did not: their own settings overrode it, every row was rate 0).
    trained = []

    def run_cell(data, config, methods, seeds, label):
        trained.extend((m, method_config(m, config.ranker).bias_dropout) for m in methods)
        return {m: {"ndcg@10": [0.5]} for m in methods}, {m: [] for m in methods}

    monkeypatch.setattr(bench_ultr, "run_cell", run_cell)
    monkeypatch.setattr(bench_ultr, "datasets", lambda args, only=None: {"synthetic": None})
    monkeypatch.setattr(bench_ultr, "plot_rates", lambda data, path: None)
    bench_ultr.main(["--parts", "rates", "--datasets", "synthetic", "--seeds", "1", "--out", str(tmp_path)])
    assert trained == [(m, rate) for rate in bench_ultr.RATES for m in bench_ultr.RATE_METHODS]
    assert all(rate > 0 for _, rate in trained)


def test_a_run_of_some_two_tower_methods_leaves_the_curves_plot_alone(bench_ultr, monkeypatch, tmp_path):
    plotted = []

    def run_cell(data, config, methods, seeds, label):
        return {m: {"ndcg@10": [0.5]} for m in methods}, {m: [] for m in methods}

    monkeypatch.setattr(bench_ultr, "run_cell", run_cell)
    monkeypatch.setattr(bench_ultr, "datasets", lambda args, only=None: {"synthetic": _Data()})
    monkeypatch.setattr(
        bench_ultr, "plot_curves", lambda curves, truth, devices, path: plotted.append(set(curves))
    )
    argv = ["--parts", "main", "--clicks", "pbm", "--seeds", "1", "--out", str(tmp_path)]
    bench_ultr.main([*argv, "--methods", "two-tower-pal", "naive"])
    assert plotted == []  # the plot would have shown PAL alone
    every = [m for m in bench_ultr.METHODS if m.startswith("two-tower")]
    bench_ultr.main([*argv, "--methods", *every])
    assert plotted == [set(every)]


class _Data:
    max_label = 4
