"""run_ranker: the served ranker without training: pair features, config rules, the ranker/ files.

A ranker is built with random weights over a fake run directory (model.json and a model.safetensors
whose bytes only need hashing), so saving, loading and their refusals are checked in well under a
second. Training one on a planted impression log is test_reranker.py's job.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from twotower.ranking import RankerConfig
from twotower.run_ranker import (
    RANKER_DIR,
    RankerFormatError,
    RunRanker,
    RunRankerConfig,
    Standardised,
    build_ranker_model,
    pair_features,
    sha256_file,
)
from twotower.storage import read_json, write_json

DIM, ITEMS = 4, 12


def test_pair_features_by_hand():
    user = torch.tensor([[1.0, 2.0]])  # [B=1, d=2]
    items = torch.tensor([[[3.0, 4.0], [5.0, -1.0], [0.0, 0.5]]])  # [1, N=3, 2]
    out = pair_features(user, items)
    assert out.shape == (1, 3, 6)
    expected = [[1, 2, 3, 4, 3, 8], [1, 2, 5, -1, 5, -2], [1, 2, 0, 0.5, 0, 1]]
    assert torch.equal(out[0], torch.tensor(expected, dtype=torch.float32))
    # One candidate list shared by several users broadcasts too.
    assert pair_features(torch.zeros(4, 2), torch.zeros(3, 2)).shape == (4, 3, 6)


def test_config_needs_a_user_column_and_a_servable_ranker():
    with pytest.raises(ValueError, match="columns.user"):
        RunRankerConfig.model_validate({"columns": {"user": None, "context": ["device"]}})
    # a columns section without a user keeps the default user column (it used to lose it)
    assert RunRankerConfig.model_validate({"columns": {"context": ["device"]}}).columns.user == "user_id"
    with pytest.raises(ValueError, match="loss"):
        RunRankerConfig.model_validate({"ranker": {"loss": "ipw"}})
    with pytest.raises(ValueError, match="position"):
        RunRankerConfig.model_validate({"ranker": {"position_feature": True}})
    default = RunRankerConfig()
    assert default.columns.user == "user_id" and default.ranker.combination == "pal"


def test_the_run_ranker_trains_without_bias_dropouts_unless_asked():
    # RankerConfig's own defaults are .1 / .5; a run's ranker turns both off (see RunRankerConfig), and a
    # ranker section given in part keeps that, while a rate that is set is taken.
    assert (RankerConfig().position_dropout, RankerConfig().bias_dropout) == (0.1, 0.5)
    for given in ({}, {"ranker": {"layers": [8]}}):
        ranker = RunRankerConfig.model_validate(given).ranker
        assert (ranker.position_dropout, ranker.bias_dropout) == (0.0, 0.0)
    asked = RunRankerConfig.model_validate({"ranker": {"bias_dropout": 0.5}}).ranker
    assert (asked.position_dropout, asked.bias_dropout, asked.combination) == (0.0, 0.5, "pal")


def _fake_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_json(run_dir / "model.json", {"embedding_dim": DIM, "item_ids": list(range(ITEMS))})
    (run_dir / "model.safetensors").write_bytes(b"retrieval weights stand-in")
    return run_dir


def _ranker(run_dir: Path, seed: int = 0) -> RunRanker:
    torch.manual_seed(seed)
    config = RunRankerConfig.model_validate({"ranker": {"layers": [8], "item_embedding_dim": 3}})
    model = build_ranker_model(DIM, ITEMS, 5, 2, config.ranker)
    model.relevance.mean.normal_()  # non-default statistics: they must travel with the weights
    model.eval()
    curves = {"desktop": [1.0, 0.5], "mobile": [1.0, 0.25]}
    return RunRanker(model, config, DIM, ITEMS, "device", ["desktop", "mobile"], curves,
                     sha256_file(run_dir / "model.safetensors"), {"sessions": 7})  # fmt: skip


def _scores(ranker: RunRanker) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    user, items = torch.randn(2, DIM, generator=gen), torch.tensor([[0, 5, 11], [3, -1, 2]])
    return ranker.score(user, items, torch.randn(2, 3, DIM, generator=gen))


def test_save_and_load_round_trip_and_scores(tmp_path):
    run_dir = _fake_run(tmp_path)
    assert RunRanker.load(run_dir) is None  # a run without a ranker
    ranker = _ranker(run_dir)
    assert isinstance(ranker.relevance, Standardised)
    where = ranker.save(run_dir)
    assert where == run_dir / RANKER_DIR
    loaded = RunRanker.load(run_dir)
    assert loaded is not None and loaded.config == ranker.config and loaded.summary == {"sessions": 7}
    assert loaded.examination_curve == ranker.examination_curve
    assert loaded.context_vocabulary == ["desktop", "mobile"] and loaded.context_column == "device"
    scores = _scores(loaded)
    assert torch.equal(scores, _scores(ranker))
    assert scores[1, 1] == float("-inf") and torch.isfinite(scores[0]).all()  # padding scores -inf
    with pytest.raises(ValueError, match="outside the catalogue"):
        loaded.score(torch.zeros(1, DIM), torch.tensor([[ITEMS]]), torch.zeros(1, 1, DIM))
    # The light stage has its own directory; an unknown stage is refused.
    _ranker(run_dir, seed=2).save(run_dir, "light_ranker")
    light = RunRanker.load(run_dir, "light_ranker")
    assert light is not None and not torch.equal(_scores(light), scores)
    with pytest.raises(ValueError, match="unknown ranker stage"):
        RunRanker.load(run_dir, "heavy_ranker")
    # Saving again replaces the directory whole and leaves no staging directory behind.
    _ranker(run_dir, seed=3).save(run_dir)
    assert sorted(p.name for p in run_dir.iterdir() if "ranker" in p.name) == ["light_ranker", "ranker"]


def test_a_ranker_that_does_not_fit_its_run_is_refused(tmp_path):
    run_dir = _fake_run(tmp_path)
    _ranker(run_dir).save(run_dir)
    meta_path = run_dir / RANKER_DIR / "ranker.json"
    meta = read_json(meta_path)
    where, sha = run_dir / RANKER_DIR, sha256_file(run_dir / "model.safetensors")
    with pytest.raises(RankerFormatError, match="the run has 8 and 12"):
        RunRanker.load_dir(where, 8, ITEMS, sha)
    (run_dir / "model.safetensors").write_bytes(b"retrained towers")
    with pytest.raises(RankerFormatError, match="other retrieval weights"):
        RunRanker.load(run_dir)
    write_json(meta_path, {**meta, "token": "another save"})
    with pytest.raises(RankerFormatError, match="different saves"):
        RunRanker.load_dir(where, DIM, ITEMS, sha)
    write_json(meta_path, {**meta, "format": "twotower.ranker/0"})
    with pytest.raises(RankerFormatError, match="format"):
        RunRanker.load_dir(where, DIM, ITEMS, sha)
    meta_path.write_text("{ not json")
    with pytest.raises(RankerFormatError, match="unreadable"):
        RunRanker.load_dir(where, DIM, ITEMS, sha)


def test_a_failed_replace_puts_the_old_ranker_back_and_a_crash_between_renames_is_named(
    tmp_path, monkeypatch
):
    import os

    run_dir = _fake_run(tmp_path)
    _ranker(run_dir, seed=1).save(run_dir)
    before = _scores(RunRanker.load(run_dir))
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):  # the old ranker moves aside, then the new one cannot move in
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr("twotower.run_ranker.os.replace", second_rename_fails)
    with pytest.raises(OSError, match="disk full"):
        _ranker(run_dir, seed=2).save(run_dir)
    monkeypatch.undo()
    assert torch.equal(_scores(RunRanker.load(run_dir)), before)  # the old ranker serves, nothing left over
    assert sorted(p.name for p in run_dir.iterdir() if "ranker" in p.name) == ["ranker"]
    # A crash between the renames (simulated): load names the ranker set aside instead of saying "none".
    os.replace(run_dir / RANKER_DIR, run_dir / ".ranker-old-abc")
    with pytest.raises(
        RankerFormatError, match=r"interrupted save left the previous one in .*\.ranker-old-abc"
    ):
        RunRanker.load(run_dir)
    # A stray file where the ranker goes is replaced, and nothing is left beside it.
    (run_dir / ".ranker-old-abc").rename(run_dir / "elsewhere")
    (run_dir / RANKER_DIR).write_text("not a ranker")
    _ranker(run_dir, seed=3).save(run_dir)
    assert sorted(p.name for p in run_dir.iterdir() if "ranker" in p.name) == ["ranker"]
