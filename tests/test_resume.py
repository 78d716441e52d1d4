"""--resume: refused on another config or on data edited in place, allowed on the same."""

import json

import numpy as np
import pytest

from conftest import tiny_config
from twotower.experiment import train_run


@pytest.mark.usefixtures("one_torch_thread")
def test_resuming_with_another_model_is_a_config_error_that_keeps_the_runs_config(tmp_path):
    from twotower.config import ConfigError

    run_dir = tmp_path / "run"
    train_run(tiny_config(epochs=1), run_dir, progress=False)
    saved = (run_dir / "config.yaml").read_text()
    other = tiny_config(epochs=2)
    other.model.user_tower.embedding_dim = 8
    with pytest.raises(ConfigError, match="cannot resume .*model differs"):
        train_run(other, run_dir, resume=True, progress=False)
    assert (run_dir / "config.yaml").read_text() == saved  # was overwritten before torch's size error
    more = train_run(tiny_config(epochs=2, lr=0.005), run_dir, resume=True, progress=False)  # train.*: fine
    assert more["epochs_run"] == 2


@pytest.mark.usefixtures("one_torch_thread")
def test_resuming_on_another_training_split_is_a_config_error_that_keeps_the_runs_config(tmp_path):
    from twotower.config import ConfigError, RunConfig

    def split(protocol, **train):  # ids seen 20 times: the vocabularies depend on the training rows
        raw = tiny_config(**train).model_dump(mode="json")
        raw["eval"]["protocol"] = protocol
        for side in ("user", "item"):
            raw["features"][side][0]["min_count"] = 20
        return RunConfig.model_validate(raw)

    run_dir = tmp_path / "run"
    train_run(split("msrec", epochs=1, valid_fraction=0.2), run_dir, progress=False)
    saved = (run_dir / "config.yaml").read_text()
    for other, name in (
        (split("temporal", epochs=2, valid_fraction=0.2), "eval.protocol"),
        (split("msrec", epochs=2, valid_fraction=0.5), "train.valid_fraction"),
        (split("msrec", epochs=2, valid_fraction=0.2, seed=4), "train.seed"),
    ):  # each was torch's size-mismatch traceback, after config.yaml had been replaced
        with pytest.raises(ConfigError, match=f"cannot resume .*{name} differs"):
            train_run(other, run_dir, resume=True, progress=False)
        assert (run_dir / "config.yaml").read_text() == saved
    more = train_run(split("msrec", epochs=2, valid_fraction=0.2), run_dir, resume=True, progress=False)
    assert more["epochs_run"] == 2


def _logged_config(tmp_path, **train):
    """A run on files - a log and an item table - as `twotower train` reads them: (config, log, items)."""
    from twotower.config import RunConfig

    rng = np.random.default_rng(0)
    log = tmp_path / "log.csv"
    rows = [f"u{u},i{rng.integers(20)},{t}" for u in range(30) for t in range(8)]
    log.write_text("user_id,item_id,ts\n" + "\n".join(rows) + "\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,genre\n" + "".join(f"i{i},g{i % 3}\n" for i in range(20)))
    config = RunConfig.model_validate(
        {
            "data": {
                "source": "files",
                "interactions": str(log),
                "items": str(items),
                "columns": {"timestamp": "ts"},
            },
            "train": {"batch_size": 64, **train},
            "eval": {"protocol": "temporal"},
        }
    )
    return config, log, items


@pytest.mark.usefixtures("one_torch_thread")
def test_resuming_on_data_files_edited_in_place_is_a_config_error_that_names_the_file(tmp_path):
    # The config still names the same files, so the config check passed: training went on, on other
    # rows (a log) or features (a table) than the checkpoint's vocabularies and split were made from.
    import re

    from twotower.config import ConfigError

    config, log, items = _logged_config(tmp_path, epochs=1)
    run_dir = tmp_path / "run"
    train_run(config, run_dir, progress=False)
    files = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    resumed, _, _ = _logged_config(tmp_path, epochs=2)
    for path, edited in (
        (log, log.read_bytes().replace(b"\nu3,", b"\nu4,", 1)),  # same size: content, not size or mtime
        (items, items.read_bytes() + b"i20,g0\n"),
    ):
        original = path.read_bytes()
        path.write_bytes(edited)
        message = f"cannot resume .*: data file {re.escape(str(path))} changed since the run started"
        with pytest.raises(ConfigError, match=message):
            train_run(resumed, run_dir, resume=True, progress=False)
        # Refused before anything in the run directory was touched: config, fingerprint, checkpoints.
        assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == files
        path.write_bytes(original)
    assert train_run(resumed, run_dir, resume=True, progress=False)["epochs_run"] == 2


@pytest.mark.usefixtures("one_torch_thread")
def test_resuming_on_unchanged_data_files_continues_and_a_run_without_a_fingerprint_warns(tmp_path, caplog):
    import logging

    from twotower.reranker import sha256_file

    config, log, items = _logged_config(tmp_path, epochs=1)
    run_dir = tmp_path / "run"
    train_run(config, run_dir, progress=False)
    mark = run_dir / "data_fingerprint.json"
    recorded = json.loads(mark.read_text())
    assert recorded == {"sha256": {str(log): sha256_file(log), str(items): sha256_file(items)}}
    log.write_bytes(log.read_bytes())  # rewritten as it was: a new mtime, the same data
    with caplog.at_level(logging.INFO, logger="twotower"):
        assert (
            train_run(_logged_config(tmp_path, epochs=2)[0], run_dir, resume=True, progress=False)[
                "epochs_run"
            ]
            == 2
        )
    assert "resumed from" in caplog.text and "fingerprint" not in caplog.text
    assert json.loads(mark.read_text()) == recorded  # still the data the run started on

    mark.unlink()  # a run trained before fingerprints: resumable, with a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="twotower"):
        more = train_run(_logged_config(tmp_path, epochs=3)[0], run_dir, resume=True, progress=False)
    assert more["epochs_run"] == 3
    assert "records no fingerprint of its data" in caplog.text
    assert not mark.exists()  # today's data is not recorded as the data the run started on


def test_the_data_fingerprint_covers_a_local_movielens_copy_but_not_the_verified_download(tmp_path):
    from twotower.config import RunConfig, with_absolute_paths
    from twotower.data.movielens import local_files
    from twotower.resume import _data_files

    folder = tmp_path / "ml-1m"
    folder.mkdir()
    for name in ("ratings.dat", "movies.dat", "users.dat", "README"):
        (folder / name).write_text("x")

    def files(**source):
        return _data_files(
            with_absolute_paths(RunConfig.model_validate({"data": {"source": "movielens", **source}}))
        )

    assert files(name="ml-1m", path=str(tmp_path)) == local_files("ml-1m", tmp_path)
    assert sorted(p.name for p in local_files("ml-1m", tmp_path)) == [
        "movies.dat",
        "ratings.dat",
        "users.dat",
    ]
    assert files(name="ml-1m", path=str(tmp_path / "ml-1m.zip")) == [tmp_path / "ml-1m.zip"]
    assert files(name="ml-1m", cache_dir=str(tmp_path)) == []  # stored only once its MD5 matched


def test_resume_without_a_checkpoint_says_it_starts_from_scratch(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="twotower"):
        train_run(tiny_config(epochs=1), tmp_path / "run", resume=True, progress=False)
    assert "no checkpoint to resume from" in caplog.text


@pytest.mark.usefixtures("one_torch_thread")
def test_resuming_a_checkpoint_without_its_config_is_refused_and_keeps_the_checkpoint(tmp_path):
    # It used to log "no checkpoint to resume from; training starts from scratch" and then load the
    # checkpoint unchecked: here a state-dict traceback, after config.yaml had been written anew.
    from twotower.config import ConfigError, RunConfig

    run_dir = tmp_path / "run"
    train_run(tiny_config(epochs=1), run_dir, progress=False)
    (run_dir / "config.yaml").unlink()
    checkpoint = (run_dir / "checkpoints" / "last.json").read_text()
    raw = tiny_config(epochs=2).model_dump(mode="json")
    raw["model"]["user_tower"]["layers"] = raw["model"]["item_tower"]["layers"] = [8]
    other = RunConfig.model_validate(raw)
    with pytest.raises(ConfigError, match="cannot resume .*checkpoint but no config.yaml"):
        train_run(other, run_dir, resume=True, progress=False)
    assert not (run_dir / "config.yaml").exists()
    assert (run_dir / "checkpoints" / "last.json").read_text() == checkpoint
