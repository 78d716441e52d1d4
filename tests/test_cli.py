import json

import yaml
from typer.testing import CliRunner

from conftest import tiny_config
from twotower.cli import app
from twotower.config import config_to_dict

runner = CliRunner()


def _write_config(tmp_path, **changes):
    raw = config_to_dict(tiny_config(epochs=2))
    raw.update(changes)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_recommend_evaluate(tmp_path):
    config = _write_config(tmp_path)
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app, ["train", str(config), "--run-dir", str(run_dir), "--quiet", "--set", "train.epochs=1"]
    )
    assert result.exit_code == 0, result.output
    assert "recall@10" in result.output
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 1
    result = runner.invoke(app, ["recommend", str(run_dir), "--user", "3", "-k", "5"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip().startswith(("1.", "5."))]
    assert len(lines) == 2 and "Item" in lines[0]  # rank, id, score and title
    result = runner.invoke(app, ["evaluate", str(run_dir)])
    assert result.exit_code == 0 and "ndcg@10" in result.output
    result = runner.invoke(
        app,
        ["train", str(config), "--run-dir", str(run_dir), "--quiet", "--resume", "--set", "train.epochs=2"],
    )
    assert result.exit_code == 0, result.output


def test_misspelt_key_and_unknown_user_fail_clearly(tmp_path):
    config = _write_config(tmp_path)
    result = runner.invoke(
        app, ["train", str(config), "--set", "train.epoks=3", "--run-dir", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "train.epoks" in result.output and "tiny.yaml" in result.output
    assert not (tmp_path / "r").exists()  # nothing half-written
    runner.invoke(app, ["train", str(config), "--run-dir", str(tmp_path / "ok"), "--quiet"])
    # an unknown user is served from features (cold start), as the HTTP service does
    result = runner.invoke(
        app, ["recommend", str(tmp_path / "ok"), "--user", "nobody", "--feature", "segment=s1"]
    )
    assert result.exit_code == 0 and "nobody (cold start)" in result.output
    result = runner.invoke(app, ["recommend", str(tmp_path / "ok"), "--user", "1", "--feature", "segmnt=s1"])
    assert result.exit_code == 2 and "segmnt" in result.output
    result = runner.invoke(app, ["recommend", str(tmp_path), "--user", "1"])
    assert result.exit_code == 2 and "model.json" in result.output


def test_export_command_builds_the_named_index(tmp_path):
    config = _write_config(tmp_path)
    run_dir = tmp_path / "run"
    assert runner.invoke(app, ["train", str(config), "--run-dir", str(run_dir), "--quiet"]).exit_code == 0
    result = runner.invoke(
        app, ["export", str(run_dir), "--index", "faiss-hnsw", "--index-option", "ef_search=64"]
    )
    assert result.exit_code == 0, result.output
    assert "faiss-hnsw: recall@100 vs exact" in result.output
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["index"]["report"]["params"]["ef_search"] == 64
    bad = runner.invoke(app, ["export", str(run_dir), "--index-option", "ef_serch=64"])
    assert bad.exit_code == 2 and "ef_serch" in bad.output
    result = runner.invoke(app, ["recommend", str(run_dir / "export"), "--user", "3", "--json", "-k", "3"])
    assert result.exit_code == 0 and len(json.loads(result.output)["items"]) == 3


def test_report_command(tmp_path):
    config = _write_config(tmp_path)
    run_dir = tmp_path / "run"
    assert runner.invoke(app, ["train", str(config), "--run-dir", str(run_dir), "--quiet"]).exit_code == 0
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report.html").exists() and "report.html" in result.output
    bad = runner.invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2
