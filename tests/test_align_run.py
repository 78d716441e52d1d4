"""`twotower align`: a run's retrieval aligned to its own ranker, written as a new run."""

from __future__ import annotations

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
