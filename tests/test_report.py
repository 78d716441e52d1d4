"""The HTML run report: every section present, images real PNGs, missing data explained, strings escaped."""

import json
import re
import shutil

import matplotlib.image
import pytest

from conftest import tiny_config
from twotower.experiment import train_run
from twotower.report import build_report, summary_table
from twotower.reranker import FORMAT
from twotower.storage import write_json

HEADINGS = ["Summary", "Training curves", "Recall@K", "Examination curves", "Funnel", "Notes"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run with validation metrics in its history and recall at three cut-offs."""
    run_dir = tmp_path_factory.mktemp("run")
    config = tiny_config(epochs=2, valid_fraction=0.1)
    config.eval.ks = [5, 10, 20]
    metrics = train_run(config, run_dir, progress=False)
    return run_dir, metrics


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run, free to be edited by one test."""
    return shutil.copytree(trained[0], tmp_path / "run")


def section(page: str, key: str) -> str:
    start = page.index(f'<h2 id="{key}">')
    end = page.find("<h2", start + 1)
    return page[start : end if end >= 0 else len(page)]


def images(page: str, report_path) -> list:
    return [report_path.parent / src for src in re.findall(r'<img src="([^"]+)"', page)]


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, pixels.shape


def test_report_has_every_section_and_its_charts(run, trained):
    metrics = trained[1]
    path = build_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    for heading in HEADINGS:
        assert f">{heading}</h2>" in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(srcs) == ["report/recall.png", "report/training.png"]  # no ranker, no extra curves
    for image in images(page, path):
        assert_png(image)
    summary = section(page, "summary")
    assert "temporal" in summary and "cosine" in summary
    assert f"{metrics['recall@10']:.4f}" in summary and f"{metrics['ndcg@20']:.4f}" in summary
    training = section(page, "training")
    assert "No validation metrics" not in training
    assert "valid_recall@10" in training and training.count("<tr>") == 3  # header + 2 epochs
    assert "@5" in section(page, "recall") and "@20" in section(page, "recall")
    assert "No ranker/" in section(page, "examination")
    assert "No funnel metrics" in section(page, "funnel") and "No notes" in section(page, "notes")
    assert "<script" not in page and "http" not in page  # self-contained: no JavaScript, nothing fetched


def test_examination_curves_with_ranker_json_and_true_curves(run, tmp_path):
    (run / "ranker").mkdir()
    ranker = {
        "format": FORMAT,
        "context": {"column": "device", "vocabulary": ["desktop", "mobile"]},
        "examination_curve": {"desktop": [1.0, 0.8, 0.6], "mobile": [1.0, 0.7, 0.5]},
        "summary": {"sessions": 1234, "final_loss": 0.25},
    }
    (run / "ranker" / "ranker.json").write_text(json.dumps(ranker))
    out = tmp_path / "elsewhere" / "exam.html"
    out.parent.mkdir()
    extra = {
        "true_examination": {"mobile": [0.9, 0.6, 0.45], "tablet": [0.5, 0.25]},
        "recall_curves": {"popularity": {5: 0.05, 10: 0.1, 20: 0.2}, "oracle": {"10": 0.6}},
    }
    path = build_report(run, out=out, extra=extra)
    assert path == out
    page = path.read_text()
    exam = section(page, "examination")
    assert '<img src="exam/examination.png"' in exam
    assert_png(out.parent / "exam" / "examination.png")
    assert "device" in exam and "1234" in exam and "0.2500" in exam
    # mobile: learned [1, .7, .5] vs true / true[0] = [1, .667, .5]: max gap .0333; tablet: nothing learned.
    assert '<td>mobile</td><td class="n">0.0333</td>' in exam and "<td>tablet</td>" not in exam
    recall = section(page, "recall")
    assert "popularity" in recall and "oracle" in recall and "0.6000" in recall
    for image in images(page, path):
        assert_png(image)


def test_examination_caption_names_no_true_curve_when_there_is_none(run):
    # A ranker trained on a real log has no true curve: the caption said "dashed: true" anyway.
    (run / "ranker").mkdir()
    ranker = {
        "format": FORMAT,
        "context": {"column": "device", "vocabulary": ["desktop"]},
        "examination_curve": {"desktop": [1.0, 0.8, 0.6]},
    }
    (run / "ranker" / "ranker.json").write_text(json.dumps(ranker))
    exam = section(build_report(run).read_text(), "examination")
    assert "learned by the ranker" in exam and "dashed" not in exam
    page = build_report(run, extra={"true_examination": {"desktop": [0.9, 0.6]}}).read_text()
    assert "dashed: true" in section(page, "examination")


def test_missing_history_is_said_and_its_stale_chart_removed(run):
    history = json.loads((run / "history.json").read_text())
    (run / "history.json").write_text(json.dumps([{"epoch": r["epoch"], "loss": r["loss"]} for r in history]))
    (run / "ranker").mkdir()
    (run / "ranker" / "ranker.json").write_text(json.dumps({"format": "someone-else/9"}))
    page = build_report(run).read_text()
    assert "No validation metrics" in section(page, "training")
    assert "ranker/ranker.json does not have the layout" in section(page, "examination")
    assert (run / "report" / "training.png").exists()
    (run / "history.json").unlink()
    (run / "metrics.json").write_text("{not json")
    page = build_report(run).read_text()
    assert "No history.json" in section(page, "training")
    assert "training.png" not in page and not (run / "report" / "training.png").exists()
    assert "metrics.json is unreadable" in section(page, "summary")
    assert "Recall at fewer than two cut-offs" in section(page, "recall")
    for heading in HEADINGS:
        assert f">{heading}</h2>" in page
    assert "no test metrics" in summary_table(run)


def test_strings_from_files_and_extra_are_escaped(run):
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["<script>alert('metric')</script>"] = 1
    (run / "metrics.json").write_text(json.dumps(metrics))
    extra = {
        "notes": ["<script>alert('note')</script> & more"],
        "funnel": {"<script>stage</script>": {"recall@100": 0.5}},
        "recall_curves": {"<b>bold</b> $x$": {1: 0.1, 10: 0.3}},
    }
    page = build_report(run, extra=extra).read_text()
    assert "<script" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&#x27;note&#x27;)&lt;/script&gt; &amp; more" in section(page, "notes")
    assert "&lt;script&gt;stage&lt;/script&gt;" in section(page, "funnel")
    assert "&lt;script&gt;alert(&#x27;metric&#x27;)" in section(page, "summary")


def test_funnel_table_renders_its_values(run):
    funnel = {"retrieval": {"recall@100": 0.81234, "users": 300}, "main ranker": {"ndcg@10": 0.5}}
    page = build_report(run, extra={"funnel": funnel}).read_text()
    table = section(page, "funnel")
    assert "<th>stage</th><th>recall@100</th><th>users</th><th>ndcg@10</th>" in table
    assert '<td>retrieval</td><td class="n">0.8123</td><td class="n">300</td><td></td>' in table
    assert '<td>main ranker</td><td></td><td></td><td class="n">0.5000</td>' in table


def test_bad_extra_and_bad_run_dir_are_errors(run, tmp_path):
    with pytest.raises(ValueError, match="unknown extra keys"):
        build_report(run, extra={"note": ["typo"]})
    with pytest.raises(ValueError, match="recall_curves"):
        build_report(run, extra={"recall_curves": {"pop": {"ten": 0.1}}})
    with pytest.raises(ValueError, match="recall_curves"):
        build_report(run, extra={"true_examination": {"mobile": []}})
    with pytest.raises(TypeError, match="notes"):
        build_report(run, extra={"notes": "one string"})
    with pytest.raises(TypeError, match="expected a number"):
        build_report(run, extra={"funnel": {"retrieval": {"recall": "high"}}})
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        build_report(tmp_path / "nowhere")
    assert not (run / "report.html").exists()  # a refused extra writes nothing


def test_summary_table_lists_the_headline_metrics(run, trained):
    metrics = trained[1]
    text = summary_table(run)
    assert text.splitlines()[0].startswith("protocol temporal")
    assert "this run" in text and "2 epochs," in text and "best None" not in text  # no early stopping
    names = [line.split()[0] for line in text.splitlines()[2:] if "@" in line.split()[0]]
    # by cut-off as a number, not as text (@10, @20, @5)
    assert [n for n in names if n.startswith("recall")] == ["recall@5", "recall@10", "recall@20"]
    line = next(line for line in text.splitlines() if line.startswith("recall@10 "))
    assert line.split()[-1] == f"{metrics['recall@10']:.4f}"
    # A demo's summary adds its baselines; its copy of this run's own numbers is not repeated.
    own = {k: v for k, v in metrics.items() if "@" in k}
    demo = {"metrics": {"two-tower": own, "most popular": {k: 0.01 for k in own}}}
    (run / "demo_summary.json").write_text(json.dumps(demo))
    lines = summary_table(run).splitlines()
    header, line = lines[1], next(line for line in lines if line.startswith("recall@10 "))
    assert header.split() == ["metric", "this", "run", "most", "popular"]
    assert line.split()[1:] == [f"{metrics['recall@10']:.4f}", "0.0100"]


def test_a_damaged_funnel_file_is_named_in_the_funnel_section(run):
    damaged = {"funnel": {"retrieval": {"recall": "high"}}, "notes": ["kept?"]}
    (run / "funnel.json").write_text(json.dumps(damaged))
    try:
        funnel = section(build_report(run).read_text(), "funnel")  # the rest is still built
    finally:
        (run / "funnel.json").unlink()
    assert "funnel.json was not used" in funnel and "expected a number" in funnel


def test_a_funnel_file_with_nan_values_saved_as_null_is_still_used(run):
    # The demo's funnel.json goes through write_json, which writes an undefined (NaN) metric as null:
    # the report used to drop the whole file over it ("expected a number, got None").
    stored = {"funnel": {"served": {"ndcg@10": float("nan"), "users": 3}},
              "recall_curves": {"popular": {5: 0.1, 10: float("nan"), 20: 0.3}},
              "true_examination": {"desktop": [1.0, float("nan"), 0.5]}, "notes": ["kept"]}  # fmt: skip
    write_json(run / "funnel.json", stored)
    page = build_report(run).read_text()
    assert "was not used" not in page and "kept" in section(page, "notes")
    assert "<td>served</td>" in section(page, "funnel")
    assert "report/examination.png" in page and "popular" in section(page, "recall")
