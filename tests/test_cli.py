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
    assert "None" not in result.output  # no early stopping: no best_epoch line, not "best_epoch None"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 1
    result = runner.invoke(app, ["recommend", str(run_dir), "--user", "3", "-k", "5"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip().startswith(("1.", "5."))]
    assert len(lines) == 2 and "Item" in lines[0]  # rank, id, score and title
    result = runner.invoke(app, ["recommend", str(run_dir), "--user", "3", "--history", "no-such-item"])
    assert result.exit_code == 0 and "not in the catalogue, ignored: ['no-such-item']" in result.output
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
    assert "faiss-hnsw: recall@37 vs exact" in result.output  # 150 items: measured at 150 // 4
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


def _clean_failure(result, *needles):
    """Exit code 2, a one-line `error:` naming what was wrong, and no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def test_bad_input_fails_with_a_message_not_a_traceback(tmp_path):
    # Each of these used to end in a Python traceback (exit code 1).
    config = _write_config(tmp_path)
    run = ["--run-dir", str(tmp_path / "r"), "--quiet"]
    result = runner.invoke(app, ["train", str(config), *run, "--set", "model.user_tower.layers=[64,"])
    _clean_failure(result, "model.user_tower.layers=[64,", "not valid YAML")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"train:\n  seed: \xff\n")
    _clean_failure(runner.invoke(app, ["train", str(binary), *run]), "binary.yaml", "cannot read")
    listy = tmp_path / "list.yaml"
    listy.write_text("[]\n")  # was taken for "all defaults" and trained
    _clean_failure(runner.invoke(app, ["train", str(listy), *run]), "list.yaml", "mapping")
    assert not (tmp_path / "r").exists()
    result = runner.invoke(app, ["train", str(config), "--run-dir", str(config), "--quiet"])  # a file
    _clean_failure(result, "tiny.yaml")
    result = runner.invoke(app, ["train-ranker", str(tmp_path), str(config), "--config", str(tmp_path)])
    _clean_failure(result, "cannot read the config")
    result = runner.invoke(app, ["export", str(tmp_path), "--index-option", "nprobe=[1"])
    _clean_failure(result, "nprobe=[1", "not valid YAML")


def test_early_stopping_metric_set_into_a_resolved_config_is_checked_before_training(tmp_path):
    # The resolved config.yaml writes `early_stopping: null`; --set into it used to say "not a section",
    # and an unknown metric failed with a KeyError traceback after an epoch of training.
    config = _write_config(tmp_path)
    result = runner.invoke(
        app,
        ["train", str(config), "--run-dir", str(tmp_path / "r"), "--quiet",
         "--set", "train.early_stopping.metric=ndcg@11"],
    )  # fmt: skip
    _clean_failure(result, "train.early_stopping.metric 'ndcg@11'")
    assert not (tmp_path / "r").exists()


def test_paths_with_spaces_and_relative_paths_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "my runs"
    folder.mkdir()
    _write_config(folder)
    result = runner.invoke(
        app,
        ["train", "my runs/tiny.yaml", "--run-dir", "my runs/run one", "--quiet", "--set", "train.epochs=1"],
    )
    assert result.exit_code == 0, result.output
    assert "run directory: my runs/run one" in result.output
    saved = yaml.safe_load((folder / "run one" / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1


def test_output_paths_that_cannot_be_written_fail_with_a_message(tmp_path):
    # --out under a regular file: report and export ended in a NotADirectoryError / FileExistsError
    # traceback, and so did `demo --out FILE`.
    config = _write_config(tmp_path)
    run_dir = tmp_path / "run"
    assert runner.invoke(app, ["train", str(config), "--run-dir", str(run_dir), "--quiet"]).exit_code == 0
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    result = runner.invoke(app, ["report", str(run_dir), "--out", str(blocker / "r.html")])
    _clean_failure(result, "a_file")
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(blocker / "export")])
    _clean_failure(result, "a_file")
    _clean_failure(runner.invoke(app, ["demo", "--quick", "--out", str(blocker)]), "a_file")
    assert blocker.read_text() == "not a folder\n"


def test_evaluate_unknown_protocol_and_bad_index_are_plain_messages(tmp_path):
    config = _write_config(tmp_path)
    run_dir = tmp_path / "run"
    assert runner.invoke(app, ["train", str(config), "--run-dir", str(run_dir), "--quiet"]).exit_code == 0
    result = runner.invoke(app, ["evaluate", str(run_dir), "--protocol", "bogus"])
    _clean_failure(result, "error: unknown protocol 'bogus'")  # was `error: "unknown protocol ..."`
    result = runner.invoke(app, ["export", str(run_dir), "--index", "hnsw"])
    _clean_failure(result, "--index", "backend")
    assert "errors.pydantic.dev" not in result.output and "validation error for" not in result.output


def test_serve_refuses_a_port_that_does_not_exist(tmp_path):
    # --port 99999 was accepted: the server announced http://127.0.0.1:99999 and listened on 34463
    # (the port taken modulo 65536), so nothing answered where it said.
    for port, bound in (("99999", "65535"), ("0", "1")):
        result = runner.invoke(app, ["serve", str(tmp_path), "--port", port])
        assert result.exit_code == 2 and "serving" not in result.output, result.output
        assert "--port" in result.output and bound in result.output


def test_recommend_runs_on_a_base_install_without_the_serve_extra(tmp_path):
    # The demo (a base install: no FastAPI, no uvicorn) suggests `twotower recommend`; it used to import
    # twotower.serve and fail with ModuleNotFoundError: fastapi.
    import subprocess
    import sys

    from twotower.experiment import train_run

    run_dir = tmp_path / "run"
    train_run(tiny_config(epochs=1), run_dir, progress=False)
    script = (
        "import sys\n"
        "sys.modules['fastapi'] = sys.modules['uvicorn'] = None  # as if not installed\n"
        "from typer.testing import CliRunner\n"
        "from twotower.cli import app\n"
        f"result = CliRunner().invoke(app, ['recommend', {str(run_dir)!r}, '--user', '3', '-k', '2'])\n"
        "print(result.output)\n"
        "sys.exit(result.exit_code or (1 if result.exception else 0))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2." in done.stdout
