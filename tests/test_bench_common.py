"""bench/common.py: the results JSON other tools read, and its markdown table rebuilt from it."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from twotower.storage import read_json

_SPEC = importlib.util.spec_from_file_location(
    "bench_common", Path(__file__).resolve().parents[1] / "bench" / "common.py"
)
common = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(common)


def _refuse(token: str):
    raise ValueError(f"not JSON: {token}")


def test_a_nan_result_is_standard_json_and_the_saved_rows_make_the_same_table(tmp_path):
    # A partial bench run merges the rows saved earlier and rebuilds the table from them. A NaN seed
    # value used to fail measured_rows (statistics.stdev), the file to hold the token NaN (no JSON), and
    # the mean saved as null to fail the table.
    base = {"dataset": "toy", "protocol": "loo", "method": "m"}
    rows = common.measured_rows(base, {"ndcg@10": [math.nan, 0.5], "recall@10": [0.25, 0.25]}, [0, 1])
    rows.append({**base, "method": "paper", "metric": "ndcg@10", "mean": 0.4, "anchor": True})
    text = common.write(common.result("toy", "python bench/toy.py", rows), tmp_path)
    saved = tmp_path / "toy.json"
    json.loads(saved.read_text(), parse_constant=_refuse)
    assert common.markdown(read_json(saved)) == text
    assert "| m | nan | 0.25 |" in text and "| paper (published) | 0.4 |  |" in text


@pytest.mark.parametrize("std", [None, math.nan, 0.0])
def test_a_cell_without_a_finite_std_shows_the_mean_alone(std):
    assert common._cell({"mean": 0.123456, "std": std}) == "0.1235"
    assert common._cell({"mean": 0.5, "std": 0.01}) == "0.5 ± 0.01"
