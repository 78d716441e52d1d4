"""The run's debiased re-ranker on an impression log with a planted answer.

A small retrieval run is trained once. Simulated requests show 10 of a user's top-30 retrieved items,
ordered by a logging policy that prefers some items for reasons unrelated to the user (a fixed random
boost per item), on desktop or mobile. Clicks follow a position-based model: p(click) =
(1 / position)^eta(device) * sigmoid(true affinity - offset), eta = 1 on desktop and 2 on mobile.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from twotower.data.synthetic import SyntheticWorld
from twotower.demo import demo_config
from twotower.experiment import train_run
from twotower.export import export_run, load_export, resolve_export, stale_export_reason
from twotower.recommender import Retriever
from twotower.reranker import (
    RankerFormatError,
    RunRanker,
    RunRankerConfig,
    fit_run_ranker,
    pair_features,
    train_run_ranker,
    training_dir,
)
from twotower.storage import read_json, write_json

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ETA = {"desktop": 1.0, "mobile": 2.0}
SHOWN, OFFSET = 10, 4.0  # OFFSET ~ the mean true logit of a top-30 item: clicks are not saturated


def _config(combination: str = "pal", **train) -> RunRankerConfig:
    return RunRankerConfig.model_validate(
        {
            "columns": {"user": "user_id", "context": ["device"]},
            "ranker": {"combination": combination, "layers": [64, 32], "dropout": 0.0},
            # A few thousand requests, far fewer than a real log: more and larger steps than the defaults.
            "train": {"epochs": 6, "batch_size": 128, "lr": 0.02, **train},
        }
    )


@dataclass
class Planted:
    run_dir: Path
    retriever: Retriever
    world: SyntheticWorld
    user_emb: torch.Tensor
    item_emb: torch.Tensor
    top30: np.ndarray
    boost: np.ndarray

    def simulate(self, n: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        users = rng.integers(0, len(self.user_emb), n)
        shown = np.stack([rng.choice(self.top30[u], SHOWN, replace=False) for u in users])
        key = self.boost[shown] + 0.5 * rng.normal(size=shown.shape)  # the logger's taste, not the user's
        shown = np.take_along_axis(shown, np.argsort(-key, axis=1), axis=1)
        device = rng.choice(list(ETA), n)
        exam = (1.0 / np.arange(1, SHOWN + 1))[None, :] ** np.array([ETA[d] for d in device])[:, None]
        # Synthetic ids equal world rows.
        truth = self.world.affinity(
            self.retriever.user_ids[users][:, None].astype(int), self.retriever.item_ids[shown].astype(int)
        )
        clicks = rng.random(shown.shape) < exam / (1.0 + np.exp(-(truth - OFFSET)))
        return {"users": users, "shown": shown, "device": device, "clicks": clicks, "truth": truth}

    def write_csv(self, path: Path, sim: dict[str, np.ndarray]) -> Path:
        n = len(sim["users"])
        pd.DataFrame(
            {
                "request_id": np.repeat(np.arange(n), SHOWN),
                "item_id": self.retriever.item_ids[sim["shown"]].ravel(),
                "position": np.tile(np.arange(1, SHOWN + 1), n),
                "click": sim["clicks"].ravel().astype(int),
                "user_id": np.repeat(self.retriever.user_ids[sim["users"]], SHOWN),
                "device": np.repeat(sim["device"], SHOWN),
            }
        ).to_csv(path, index=False)
        return path

    def score(self, ranker: RunRanker, sim: dict[str, np.ndarray]) -> torch.Tensor:
        items = torch.from_numpy(sim["shown"])
        return ranker.score(self.user_emb[torch.from_numpy(sim["users"])], items, self.item_emb[items])


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Planted:
    run_dir = tmp_path_factory.mktemp("rerank-run")
    config = demo_config(quick=True)
    config = config.model_copy(
        update={"train": config.train.model_copy(update={"epochs": 1, "early_stopping": None})}
    )
    train_run(config, run_dir, progress=False)
    retriever = Retriever.load(run_dir)
    user_emb, item_emb = retriever.model.user_embeddings(), retriever.model.item_embeddings()
    top30 = torch.topk(user_emb @ item_emb.T, 30, dim=1).indices.numpy()
    boost = np.random.default_rng(99).normal(size=len(item_emb))
    world = SyntheticWorld.generate(config.data.world)
    return Planted(run_dir, retriever, world, user_emb, item_emb, top30, boost)


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory):
    """PAL and the naive model (no bias tower) on the same 3000 logged requests; PAL is saved."""
    path = planted.write_csv(tmp_path_factory.mktemp("log") / "impressions.csv", planted.simulate(3000, 1))
    pal, summary = fit_run_ranker(planted.run_dir, path, _config("pal"))
    pal.save(planted.run_dir)
    naive, _ = fit_run_ranker(planted.run_dir, path, _config("none"))
    return pal, naive, summary


def _spearman(scores: np.ndarray, truth: np.ndarray) -> float:
    """Mean per-request Spearman correlation of the scores with the truth."""
    a, b = (x.argsort(1).argsort(1).astype(float) for x in (scores, truth))
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return float(np.mean((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))))


def test_learned_examination_curve_is_the_planted_one(trained):
    pal, _, summary = trained
    assert summary["sessions"] == 3000 and summary["dropped_unknown_user"] == 0
    assert set(pal.examination_curve) == set(ETA) and pal.context_column == "device"
    for device, eta in ETA.items():
        learned = np.array(pal.examination_curve[device])
        planted = (1.0 / np.arange(1, SHOWN + 1)) ** eta
        assert learned[0] == pytest.approx(1.0)
        # Over six seeds of the simulation, the logger and the training: 0.035-0.071 with the exact
        # bias refit (the default), 0.028-0.082 without it.
        assert np.abs(learned - planted).max() <= 0.1, (device, learned.round(3))


def test_bias_refit_moves_only_the_bias_tower(planted, tmp_path):
    """Refitting the bias tower after training changes the examination curve, never the served scores,
    and reports the held-out click likelihood after it."""
    path = planted.write_csv(tmp_path / "impressions.csv", planted.simulate(800, 5))
    train = {"epochs": 2, "valid_fraction": 0.2}
    plain, plain_summary = fit_run_ranker(
        planted.run_dir, path, _config("pal", **train).model_copy(update={"bias_refit": False})
    )
    refit, summary = fit_run_ranker(planted.run_dir, path, _config("pal", **train))
    sim = planted.simulate(50, 6)
    assert torch.equal(planted.score(refit, sim), planted.score(plain, sim))
    assert refit.examination_curve != plain.examination_curve
    assert "valid_click_loglik_after_bias_refit" not in plain_summary
    assert summary["valid_click_loglik"] == plain_summary["valid_click_loglik"]
    assert np.isfinite(summary["valid_click_loglik_after_bias_refit"])


def test_relevance_tower_ranks_held_out_items_better_than_naive(planted, trained):
    pal, naive, _ = trained
    held_out = planted.simulate(1000, 2)  # new requests, never logged
    debiased = _spearman(planted.score(pal, held_out).numpy(), held_out["truth"])
    plain = _spearman(planted.score(naive, held_out).numpy(), held_out["truth"])
    # The naive model takes the logger's item boost for relevance. Here 0.66 against 0.24; over six
    # seeds 0.65-0.77 against 0.24-0.39, a margin of 0.33-0.47.
    assert debiased > 0.5 and debiased > plain + 0.2, (debiased, plain)


def test_saved_ranker_scores_exactly_like_the_trained_one(planted, trained):
    pal, _, _ = trained
    loaded = RunRanker.load(planted.run_dir)
    assert loaded is not None and loaded.config == pal.config
    assert loaded.examination_curve == pal.examination_curve
    sim = planted.simulate(50, 3)
    assert torch.equal(planted.score(loaded, sim), planted.score(pal, sim))
    meta = read_json(planted.run_dir / "ranker" / "ranker.json")
    assert meta["format"] == "twotower.ranker/1" and meta["num_features"] == 3 * planted.user_emb.shape[1]
    assert meta["context"] == {"column": "device", "vocabulary": ["desktop", "mobile"]}
    resolved = yaml.safe_load((planted.run_dir / "ranker" / "config.yaml").read_text())
    assert RunRankerConfig.model_validate(resolved) == pal.config
    # Padding (a negative index) scores -inf; the relevance module is what score runs.
    items = torch.tensor([[0, -1]])
    scores = loaded.score(planted.user_emb[:1], items, planted.item_emb[items.clamp(min=0)])
    assert scores[0, 1] == float("-inf")
    # (same [1, 2] batch on both sides: a product over another shape may round differently)
    feats = pair_features(planted.user_emb[:1], planted.item_emb[items.clamp(min=0)])
    with torch.no_grad():
        assert torch.equal(loaded.relevance(feats, items.clamp(min=0))[0, 0], scores[0, 0])


def _hand_made(path: Path, rows: list[tuple]) -> Path:
    pd.DataFrame(rows, columns=["request_id", "user_id", "item_id", "position", "click", "device"]).to_csv(
        path, index=False
    )
    return path


def test_train_run_ranker_counts_dropped_ids_saves_and_replaces(planted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(planted.run_dir, run_dir, ignore=shutil.ignore_patterns("checkpoints", "ranker"))
    assert RunRanker.load(run_dir) is None  # a run without a ranker
    export_run(run_dir)  # served before the ranker existed
    path = _hand_made(
        tmp_path / "log.csv",
        [
            ("a", 0, 1, 1, 1, "desktop"), ("a", 0, 2, 2, 0, "desktop"), ("a", 0, 999, 3, 0, "desktop"),
            ("b", 99999, 1, 1, 1, "mobile"), ("b", 99999, 2, 2, 0, "mobile"),  # unknown user
            ("c", 1, 998, 1, 1, "mobile"), ("c", 1, 997, 2, 0, "mobile"),  # no known item left
            ("d", 2, 3, 1, 0, "tablet"), ("d", 2, 4, 12, 1, "tablet"),  # position 12 > max_position
        ],
    )  # fmt: skip
    summary = train_run_ranker(run_dir, path, _config(epochs=1))
    expected = {
        "requests": 4,
        "dropped_unknown_user": 1,
        "masked_unknown_item": 3,
        "dropped_no_known_item": 1,
    }
    assert {k: summary[k] for k in expected} == expected and summary["sessions"] == 2
    first = RunRanker.load(run_dir)
    assert first is not None and first.context_vocabulary == ["desktop", "tablet"]
    assert first.summary["masked_unknown_item"] == 3
    # The export from before the ranker is stale: serving exports the run again, ranker included.
    assert "ranker was trained" in stale_export_reason(run_dir, run_dir / "export")
    assert load_export(resolve_export(run_dir)).ranker is not None
    # Training again replaces the ranker whole and leaves no staging directory behind.
    train_run_ranker(run_dir, path, _config(epochs=1, seed=1))
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith((".ranker", "ranker"))) == ["ranker"]
    assert stale_export_reason(run_dir, run_dir / "export") == "the run's ranker changed"
    again = RunRanker.load(run_dir)
    assert not torch.equal(
        again.model.relevance.tower.mlp[0].weight, first.model.relevance.tower.mlp[0].weight
    )

    # Broken or stale rankers are errors, not silently wrong scores.
    meta_path = run_dir / "ranker" / "ranker.json"
    meta = read_json(meta_path)
    write_json(meta_path, {**meta, "token": "another save"})
    with pytest.raises(RankerFormatError, match="different saves"):
        RunRanker.load(run_dir)
    write_json(meta_path, {**meta, "retrieval_sha256": "0" * 64})
    with pytest.raises(RankerFormatError, match="other retrieval weights"):
        RunRanker.load(run_dir)
    write_json(meta_path, {**meta, "format": "twotower.ranker/0"})
    with pytest.raises(RankerFormatError, match="format"):
        RunRanker.load(run_dir)
    meta_path.write_text("{ not json")
    with pytest.raises(RankerFormatError, match="unreadable"):
        RunRanker.load(run_dir)


def test_a_log_with_no_known_item_is_an_error_naming_the_file(planted, tmp_path):
    path = _hand_made(
        tmp_path / "foreign.csv", [("a", 0, 5000, 1, 1, "desktop"), ("b", 1, 5001, 1, 0, "mobile")]
    )
    with pytest.raises(ValueError, match="foreign.csv"):
        fit_run_ranker(planted.run_dir, path, _config())


def test_weights_replaced_while_loading_are_an_error_not_a_ranker_under_the_wrong_hash(
    planted, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    shutil.copytree(planted.run_dir, run_dir, ignore=shutil.ignore_patterns("export", "ranker*"))
    path = planted.write_csv(tmp_path / "log.csv", planted.simulate(50, 3))
    original = Retriever.load

    def load_then_retrain(where):  # a training finishing into the run just after the load
        loaded = original(where)
        with open(Path(where) / "model.safetensors", "ab") as handle:
            handle.write(b"new weights")
        return loaded

    monkeypatch.setattr(Retriever, "load", load_then_retrain)
    with pytest.raises(RuntimeError, match="model.safetensors changed while it was being loaded"):
        fit_run_ranker(run_dir, path, _config())


def test_a_log_without_any_click_is_an_error_not_a_meaningless_ranker(planted, tmp_path):
    path = _hand_made(
        tmp_path / "unclicked.csv", [("a", 0, 1, 1, 0, "desktop"), ("a", 0, 2, 2, 0, "desktop")]
    )
    with pytest.raises(ValueError, match="unclicked.csv: no click on a known item"):
        fit_run_ranker(planted.run_dir, path, _config())


def test_a_log_whose_clicks_all_fall_in_the_validation_split_is_an_error(planted, tmp_path):
    """One clicked request of two, half held out: on the seeds that hold it out, training would see no
    click at all (the dead ranker the no-click check refuses), so it is refused the same way."""
    path = _hand_made(tmp_path / "one-click.csv", [("a", 0, 1, 1, 1, "desktop"), ("b", 1, 2, 1, 0, "mobile")])
    refused = 0
    for seed in range(6):
        try:
            fit_run_ranker(planted.run_dir, path, _config(epochs=1, valid_fraction=0.5, seed=seed))
        except ValueError as exc:
            assert "one-click.csv: no click on a known item" in str(exc) and "validation" in str(exc)
            refused += 1
    assert 0 < refused < 6


def test_early_stopping_summary_describes_the_restored_weights(planted, tmp_path, monkeypatch):
    """With early stopping the ranker holds the best epoch's weights: the summary's held-out metrics are
    that epoch's, not the last one's."""
    import twotower.reranker as reranker

    real_fit = reranker.fit
    results = []

    def fit(model, batches, config, run_dir, validate=None, **kwargs):
        calls = iter(range(100))

        def worse_after_the_first_epoch():  # epoch 1 is the best; epochs 2 and 3 are worse
            return {k: v - next(calls) for k, v in validate().items()}

        results.append(real_fit(model, batches, config, run_dir, worse_after_the_first_epoch, **kwargs))
        return results[-1]

    monkeypatch.setattr(reranker, "fit", fit)
    path = planted.write_csv(tmp_path / "impressions.csv", planted.simulate(300, 7))
    stopping = {"metric": "click_loglik", "patience": 2}
    config = _config(epochs=3, valid_fraction=0.3, early_stopping=stopping)
    _, summary = fit_run_ranker(planted.run_dir, path, config.model_copy(update={"bias_refit": False}))
    (result,) = results
    assert result.best_epoch == 1 and result.epochs_run == 3
    assert summary["valid_click_loglik"] == result.best_metric and summary["best_epoch"] == 1


def test_a_log_shown_only_below_max_position_says_so(planted, tmp_path):
    """Every row deeper than max_position: the error names the cause, not the ids (which are fine)."""
    path = _hand_made(tmp_path / "deep.csv", [("a", 0, 1, 11, 1, "desktop"), ("a", 0, 2, 12, 0, "desktop")])
    with pytest.raises(ValueError, match=r"deep.csv: .*no row at a position <= max_position \(10\)"):
        fit_run_ranker(planted.run_dir, path, _config())


def test_an_interrupted_ranker_training_resumes_where_it_stopped(planted, tmp_path):
    path = planted.write_csv(tmp_path / "log.csv", planted.simulate(300, 5))
    sim = planted.simulate(50, 6)
    straight, _ = fit_run_ranker(planted.run_dir, path, _config(epochs=2))
    ckpt = tmp_path / "ckpt"
    fit_run_ranker(planted.run_dir, path, _config(epochs=1), checkpoints=ckpt)  # "interrupted" after 1
    resumed, summary = fit_run_ranker(planted.run_dir, path, _config(epochs=2), checkpoints=ckpt, resume=True)
    assert summary["epochs"] == 2
    torch.testing.assert_close(planted.score(resumed, sim), planted.score(straight, sim))
    # Checkpoints of another log or config are not resumed: refused, saying what differs, and kept.
    other = planted.write_csv(tmp_path / "other.csv", planted.simulate(300, 7))
    kept = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(ValueError, match=r"differing: the impression log .*; train without --resume"):
        fit_run_ranker(planted.run_dir, other, _config(epochs=1), checkpoints=ckpt, resume=True)
    with pytest.raises(ValueError, match=r"differing: config ranker\.combination, train\.batch_size;"):
        fit_run_ranker(planted.run_dir, path, _config("additive", epochs=3, batch_size=32), checkpoints=ckpt,
                       resume=True)  # fmt: skip
    assert sorted(p.name for p in ckpt.iterdir()) == kept
    (ckpt / "fingerprint.json").write_text("{not json")
    with pytest.raises(ValueError, match="fingerprint.json is unreadable"):
        fit_run_ranker(planted.run_dir, path, _config(epochs=2), checkpoints=ckpt, resume=True)
    # Without --resume the same folder is replaced and training starts over.
    _, fresh = fit_run_ranker(planted.run_dir, other, _config(epochs=1), checkpoints=ckpt)
    assert fresh["epochs"] == 1
    # train_run_ranker keeps its checkpoints beside the ranker until the ranker is saved.
    run = tmp_path / "run"
    shutil.copytree(planted.run_dir, run)
    train_run_ranker(run, path, _config(epochs=1), resume=True)
    assert (run / "ranker").is_dir() and not training_dir(run).exists()


def test_a_context_value_only_validation_requests_have_is_left_out_of_validation(planted, tmp_path, caplog):
    sim = planted.simulate(300, 8)
    # The requests the split (seed 0, 10 %: 30 of 300) holds out; one of them alone is on a "tv".
    held = np.random.default_rng([0, 41]).permutation(300)[:30]
    sim["device"] = sim["device"].astype(object)
    sim["device"][held[0]] = "tv"
    path = planted.write_csv(tmp_path / "log.csv", sim)
    with caplog.at_level("WARNING", logger="twotower"):
        ranker, summary = fit_run_ranker(planted.run_dir, path, _config(epochs=1, seed=0, valid_fraction=0.1))
    # "tv" was never trained: it is not in the bias tower's vocabulary, and its request is not validated.
    assert ranker.context_vocabulary == ["desktop", "mobile"] and set(ranker.examination_curve) == set(ETA)
    assert summary["valid_sessions"] == 29 and "1 validation requests have a device value" in caplog.text


def test_positions_the_log_never_shows_get_no_curve_of_untrained_embeddings(planted, tmp_path):
    """A log that shows 6 items per request under max_position 10: positions 7-10 were never trained
    on, so the ranker is built for positions 1-6 (later positions take the last one's value, as
    everywhere positions past the table do) instead of reporting curve values of random embeddings."""
    path = planted.write_csv(tmp_path / "log.csv", planted.simulate(400, 9))
    frame = pd.read_csv(path)
    frame[frame["position"] <= 6].to_csv(path, index=False)
    ranker, _ = fit_run_ranker(planted.run_dir, path, _config(epochs=1))
    assert ranker.model.num_positions == 6
    assert {len(curve) for curve in ranker.examination_curve.values()} == {6}
