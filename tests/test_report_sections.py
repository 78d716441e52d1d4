"""report_sections: each section of the report from a hand-made ``run`` dict, no trained run needed.

The whole page from a real run (files read, sections assembled, stale charts removed) is tested in
test_report.py; here the formatting rules, the comparison of methods, the missing-data lines and the
charts are checked one section at a time.
"""

import pytest

from twotower.report_sections import (
    Charts,
    examination_section,
    fmt_value,
    funnel_section,
    is_number,
    metric_comparison,
    notes_section,
    recall_section,
    summary_section,
    training_section,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(**files) -> dict:
    """A run as report.py reads it: every file None unless given, no problems unless given."""
    keys = ("config", "metrics", "history", "model", "demo", "ranker", "stored")
    return {"problems": files.pop("problems", {}), **dict.fromkeys(keys), **files}


def test_values_format_as_table_cells():
    assert fmt_value(0.123456) == "0.1235" and fmt_value(12345.678) == "12,345.7"
    assert fmt_value(None) == "" and fmt_value(3) == "3" and fmt_value("x") == "x"
    assert is_number(1) and is_number(0.5) and not is_number(True) and not is_number("1")


def test_comparison_shows_the_run_once_beside_the_demo_baselines():
    own = {"recall@10": 0.4, "ndcg@10": 0.2}
    metrics = {**own, "top5_accuracy": 0.3, "n_queries": 100, "protocol": "temporal", "flag": True}
    demo = {"metrics": {"two-tower": dict(own), "popular": {"recall@10": 0.1, "note": "n/a"}}}
    methods = metric_comparison(_run(metrics=metrics, demo=demo))
    assert methods == {"this run": {**own, "top5_accuracy": 0.3}, "popular": {"recall@10": 0.1}}
    assert metric_comparison(_run()) == {}


def test_summary_lists_config_highlights_and_escapes_them():
    config = {"data": {"source": "synthetic"}, "model": {"similarity": "cosine", "temperature": 0.05},
              "features": {"user": [{"name": "<seg>", "type": "categorical"}]}}  # fmt: skip
    metrics = {"recall@10": 0.25, "protocol": "msrec", "n_queries": 42, "epochs_run": 3}
    html = summary_section(_run(config=config, metrics=metrics))
    assert "<dt>data</dt><dd>source synthetic</dd>" in html
    assert "similarity cosine, temperature 0.05" in html and "&lt;seg&gt; (categorical)" in html
    assert "protocol <b>msrec</b> (42 queries" in html
    assert '<td>recall@10</td><td class="n">0.2500</td>' in html and "<td>epochs_run</td>" in html
    missing = summary_section(_run(problems={"metrics": "metrics.json is <unreadable>"}))
    assert "No config.yaml" in missing and "metrics.json is &lt;unreadable&gt;" in missing


def test_funnel_and_notes_tables():
    funnel = {"retrieval": {"recall@100": 0.81234, "users": 300}, "main ranker": {"ndcg@10": 0.5}}
    table = funnel_section(funnel)
    assert "<th>stage</th><th>recall@100</th><th>users</th><th>ndcg@10</th>" in table
    assert '<td>retrieval</td><td class="n">0.8123</td><td class="n">300</td><td></td>' in table
    assert "No funnel metrics" in funnel_section(None) and "No notes" in notes_section([])
    assert notes_section(["a < b"]) == "<ul><li>a &lt; b</li></ul>"


def test_charts_are_written_as_pngs_and_named_in_img_tags(tmp_path):
    charts = Charts(tmp_path / "my report")
    history = [{"epoch": e, "loss": 1.0 / e, "valid_recall@5": 0.1 * e, "valid_recall@10": 0.2 * e}
               for e in (1, 2, 3)]  # fmt: skip
    html = training_section(_run(history=history, metrics={"best_epoch": 2}), charts)
    assert html.startswith('<img src="my%20report/training.png"') and "best epoch (2)" in html
    metrics = {"recall@1": 0.1, "recall@10": 0.3}
    html = recall_section(_run(metrics=metrics), {"popular": {1: 0.01, 10: 0.05}}, charts)
    assert "recall.png" in html and '<td>popular</td><td class="n">0.0100</td>' in html
    assert charts.written == {"training.png", "recall.png"}
    for name in charts.written:
        assert (charts.folder / name).read_bytes()[:8] == PNG_SIGNATURE
    assert "Recall at fewer than two cut-offs" in recall_section(_run(metrics={"recall@10": 0.3}), {}, charts)
    assert "No history.json" in training_section(_run(), charts)


def test_training_columns_follow_the_cut_off_as_a_number(tmp_path):
    # history.json is written with sorted keys: as text, valid_recall@10 comes before valid_recall@5
    # (and the chart's legend would read @1, @10, @20, @5).
    history = [{"epoch": 1, "loss": 1.0, "valid_recall@10": 0.2, "valid_ndcg@5": 0.1, "valid_recall@5": 0.1}]
    html = training_section(_run(history=history), Charts(tmp_path / "report"))
    header = html[html.index("<table>") :]
    assert header.index("valid_ndcg@5") < header.index("valid_recall@5") < header.index("valid_recall@10")


def test_an_undefined_value_is_not_shown_as_raw_nan():
    assert fmt_value(float("nan")) == "n/a"
    table = funnel_section({"served": {"ndcg@10": float("nan")}})
    assert "nan" not in table and '<td class="n">n/a</td>' in table


def test_examination_compares_learned_and_true_curves_relative_to_position_one(tmp_path):
    ranker = {"examination_curve": {"mobile": [1.0, 0.7, 0.5]}, "context": {"column": "device"},
              "summary": {"sessions": 10}}  # fmt: skip
    charts = Charts(tmp_path / "report")
    html = examination_section(_run(ranker=ranker), {"mobile": [0.9, 0.6, 0.45]}, charts)
    # true / true[0] = [1, .667, .5]: the largest gap to the learned curve is .0333.
    assert '<td>mobile</td><td class="n">0.0333</td>' in html and "Context column device" in html
    assert charts.written == {"examination.png"}
    assert "No ranker/" in examination_section(_run(), {}, charts)
    no_bias = examination_section(_run(ranker={"examination_curve": None}), {}, charts)
    assert "no bias tower" in no_bias


@pytest.mark.parametrize("key", ["config", "history"])
def test_a_file_problem_replaces_the_how_to(key, tmp_path):
    run = _run(problems={key: f"{key} is broken"})
    html = summary_section(run) if key == "config" else training_section(run, Charts(tmp_path))
    assert f"{key} is broken" in html
