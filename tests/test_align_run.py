"""`twotower align`: a run's retrieval aligned to its own ranker, written as a new run."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import train_small_run
from twotower.align import Teacher
from twotower.align_run import AlignRunConfig, align_run
from twotower.cli import app
from twotower.config import load_config
from twotower.data.impression_sim import simulate_impressions
from twotower.data.synthetic import SyntheticWorld
from twotower.funnel_metrics import ranker_topk_recall
from twotower.recommender import Retriever
from twotower.reranker import RunRanker, RunRankerConfig, train_run_ranker
from twotower.storage import read_json

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("align_run")
    out = root / "run"
    train_small_run(out, world_seed=2)
    world = SyntheticWorld.generate(load_config(out / "config.yaml").data.world)
    log = simulate_impressions(
        Retriever.load(out), world, 1500, seed=0, candidates=40, relevance="taste", offset=1.0
    )
    log.drop(columns="true_affinity").to_csv(root / "log.csv", index=False)
    ranker = RunRankerConfig.model_validate(
        {"columns": {"user": "user_id", "context": ["device"]}, "train": {"epochs": 3, "batch_size": 128}}
    )
    train_run_ranker(out, root / "log.csv", ranker)
    return out, root / "log.csv"


def _agreement(run_dir, ranker: RunRanker, teacher_emb) -> float:
    model = Retriever.load(run_dir).model.eval()
    teacher = Teacher(ranker, *teacher_emb)
    users = torch.arange(model.num_users)
    return ranker_topk_recall(model.recommend(users, k=20)[0].numpy(), teacher.top(users, 10).numpy())


def test_aligned_run_retrieves_more_of_the_rankers_favourites(run, tmp_path) -> None:
    source, log = run
    old = Retriever.load(source).model.eval()
    emb = (old.user_embeddings(), old.item_embeddings())
    ranker = RunRanker.load(source)
    config = AlignRunConfig.model_validate(
        {"align": {"epochs": 4, "candidates": 30, "random": 30, "users_per_step": 16}}
    )
    summary = align_run(source, tmp_path / "aligned", config, impressions=log)
    aligned = tmp_path / "aligned"
    assert summary["click_positives"] > 0 and len(summary["history"]) == 4
    assert not (aligned / "ranker").exists() and not (aligned / "metrics.json").exists()
    assert read_json(aligned / "align.json")["teacher_ranker_retrieval_sha256"] == ranker.retrieval_sha256
    assert _agreement(aligned, ranker, emb) > _agreement(source, ranker, emb) + 0.1
    # The source run is untouched and a second alignment into the same place is refused.
    assert (source / "ranker" / "ranker.json").exists()
    with pytest.raises(FileExistsError):
        align_run(source, aligned, config)


def test_align_command(run, tmp_path) -> None:
    source, _ = run
    args = ["align", str(source), "--out", str(tmp_path / "a"), "--quiet", "--set", "align.epochs=1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "aligned run" in result.output and "train-ranker" in result.output
    assert Retriever.load(tmp_path / "a").recommend([1], k=3)[0].shape == (1, 3)
    bad = runner.invoke(app, ["align", str(source), "--out", str(tmp_path / "b"), "--set", "align.epoch=1"])
    assert bad.exit_code != 0 and "epoch" in bad.output
    no_ranker = runner.invoke(app, ["align", str(tmp_path / "a"), "--out", str(tmp_path / "c")])
    assert no_ranker.exit_code != 0 and "train-ranker" in no_ranker.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_history_run_aligns(tmp_path) -> None:
    # A history model (training_view "before" by default) needs each positive's history_end: align
    # used to hand it bare (user, item) pairs and crashed with a KeyError from compute_loss.
    from twotower.config import RunConfig
    from twotower.experiment import train_run

    source = tmp_path / "run"
    train_run(RunConfig.model_validate({
        "data": {"source": "synthetic", "world": {"num_users": 150, "num_items": 90, "seed": 1}},
        "model": {"temperature": 0.1, "user_tower": {"layers": [16]}, "item_tower": {"layers": [16]},
                  "history": {"enabled": True}},
        "train": {"epochs": 1, "batch_size": 128, "lr": 0.01, "seed": 0},
        "eval": {"protocol": "temporal", "ks": [10]},
    }), source, progress=False)  # fmt: skip
    # The run keeps each pair's history_end (events of the same second are not in each other's history).
    from twotower.storage import load_tensors

    pairs = load_tensors(source / "train_pairs.safetensors")
    assert pairs["history_end"].shape == pairs["user_idx"].shape and int(pairs["history_end"].max()) > 0
    world = SyntheticWorld.generate(load_config(source / "config.yaml").data.world)
    log = simulate_impressions(Retriever.load(source), world, 300, seed=0, candidates=30, offset=1.0)
    log.drop(columns="true_affinity").to_csv(tmp_path / "log.csv", index=False)
    ranker = RunRankerConfig.model_validate({"columns": {"user": "user_id"}, "train": {"epochs": 1}})
    train_run_ranker(source, tmp_path / "log.csv", ranker)
    config = AlignRunConfig.model_validate({"align": {"epochs": 1, "candidates": 10, "random": 5}})
    summary = align_run(source, tmp_path / "aligned", config, impressions=tmp_path / "log.csv")
    assert summary["click_positives"] > 0 and "retrieval" in summary["history"][0]


def test_clicks_are_read_with_the_rankers_bad_row_policy(tmp_path) -> None:
    # A ranker trained with on_bad_rows="skip" on a log with a bad row: align read the same log with
    # the default "raise" and refused it.
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from twotower.align_run import _log_clicks
    from twotower.data.impressions import ImpressionColumns

    frame = pd.DataFrame({"request_id": [0, 0, 1], "item_id": [1, 2, 1], "position": [1, 2, 0],
                          "click": [1, 0, 1], "user_id": [0, 0, 1]})  # fmt: skip
    frame.to_csv(tmp_path / "log.csv", index=False)  # the last row's position 0 is invalid
    config = SimpleNamespace(columns=ImpressionColumns(user="user_id"), on_bad_rows="skip")
    ranker = SimpleNamespace(config=config)
    retriever = SimpleNamespace(user_ids=np.array([0, 1]), item_ids=np.array([1, 2]))
    run_config = AlignRunConfig.model_validate({"debias": {"method": "none"}})
    clicks = _log_clicks(tmp_path / "log.csv", run_config, ranker, retriever)  # type: ignore[arg-type]
    assert clicks.user_idx.tolist() == [0] and clicks.item_idx.tolist() == [0]


def test_logged_clicks_in_the_users_test_period_are_dropped(caplog) -> None:
    # u0's test period starts at 100, u1 has no test event (int64 max), u2 is not in the run.
    from twotower.align_run import _before_test

    labels = pd.DataFrame({
        "user_id": ["u0", "u0", "u1", "u2"], "item_id": [1, 2, 1, 1],
        "clicked": [True, True, True, True], "timestamp": [99, 100, 10**12, 5],
    })  # fmt: skip
    start = torch.tensor([100, torch.iinfo(torch.int64).max])
    kept = _before_test(labels, start, np.array(["u0", "u1"]))
    assert kept["timestamp"].tolist() == [99, 10**12, 5]  # u0's click at 100 is in its test period
    assert _before_test(labels, None, np.array(["u0", "u1"])) is labels  # a run without times
    with caplog.at_level(logging.WARNING, logger="twotower"):
        assert len(_before_test(labels.drop(columns="timestamp"), start, np.array(["u0", "u1"]))) == 4
    assert "cannot be kept out of the test period" in caplog.text
