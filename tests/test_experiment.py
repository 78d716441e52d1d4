"""End to end on data with a known answer: the planted structure must be recovered."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_config
from twotower.data.dataset import build_retrieval_data, iterate_batches
from twotower.demo import demo_config, oracle_metrics, popularity_metrics
from twotower.experiment import train_run
from twotower.recommender import Retriever, UnknownUserError, evaluate_run


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo")
    config = demo_config(quick=True)
    data = build_retrieval_data(config)
    metrics = train_run(config, run_dir, progress=False, data=data)
    return run_dir, data, metrics


def test_planted_structure_is_recovered_far_above_popularity(demo_run):
    _, data, metrics = demo_run
    popular = popularity_metrics(data, "temporal")
    oracle = oracle_metrics(data, "temporal")
    assert metrics["recall@10"] > 2 * popular["recall@10"], (metrics, popular)
    # Close to what the true affinities themselves achieve on this sample.
    assert metrics["recall@10"] > 0.75 * oracle["recall@10"], (metrics, oracle)


def test_learned_item_embeddings_group_items_by_genre(demo_run):
    run_dir, data, _ = demo_run
    world = data.raw.world
    emb = Retriever.load(run_dir).model.item_embeddings().numpy()
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    genres = world.item_genres[data.item_ids.astype(int)].astype(float)
    share = genres @ genres.T > 0  # the pair has a genre in common
    np.fill_diagonal(share, False)
    neighbours = np.argsort(-sim, axis=1)[:, :5]
    neighbour_rate = np.take_along_axis(share, neighbours, axis=1).mean()
    base_rate = share.sum() / (share.size - len(share))
    assert neighbour_rate > 2 * base_rate, (neighbour_rate, base_rate)


def test_vocabularies_come_from_training_data_only():
    data = build_retrieval_data(tiny_config())
    train_users = set(data.user_ids[data.train.user_idx.numpy()].tolist())
    vocab = set(data.user_encoder.vocabulary("user_id"))
    assert vocab == train_users
    # Every test row maps to a catalogue index; ids unseen in training take the OOV row (0).
    ids = data.user_table["user_id"][data.test.user_idx]
    unseen = ~np.isin(data.user_ids[data.test.user_idx.numpy()], list(train_users))
    assert torch.all(ids[torch.as_tensor(unseen)] == 0)
    assert len(data.train) + len(data.valid) + len(data.test) == len(data.raw.interactions)


def test_batches_depend_only_on_seed_and_epoch():
    data = build_retrieval_data(tiny_config())
    first = [b["item_idx"] for b in iterate_batches(data.train, 64, seed=1, epoch=2)]
    again = [b["item_idx"] for b in iterate_batches(data.train, 64, seed=1, epoch=2)]
    other = [b["item_idx"] for b in iterate_batches(data.train, 64, seed=1, epoch=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(torch.cat(first), torch.cat(other))
    assert sorted(torch.cat(first).tolist()) == sorted(data.train.item_idx.tolist())


def test_retriever_recommends_raw_ids_excluding_seen_and_re_evaluates(demo_run):
    run_dir, data, metrics = demo_run
    retriever = Retriever.load(run_dir)
    ids, scores = retriever.recommend([0, 5], k=10)
    assert ids.shape == (2, 10) and np.all(np.diff(scores, axis=1) <= 1e-6)
    seen = set(data.raw.interactions.query("user_id == 0")["item_id"])
    train_seen = set(data.item_ids[data.train.item_idx[data.train.user_idx == 0].numpy()].tolist())
    assert not set(ids[0].tolist()) & train_seen and train_seen <= seen
    with_seen, _ = retriever.recommend(["0"], k=len(data.item_ids), exclude_seen=False)  # string ids work
    assert set(with_seen[0].tolist()) == set(data.item_ids.tolist())
    assert retriever.titles(ids[0])[0].startswith(f"Item {ids[0][0]} (")
    with pytest.raises(UnknownUserError, match="99999"):
        retriever.recommend([99999])
    again = evaluate_run(run_dir)
    assert again["recall@10"] == pytest.approx(metrics["recall@10"])


def test_prefetching_batches_on_a_thread_trains_the_same_model(tmp_path):
    from twotower.storage import load_tensors

    runs = {}
    for depth in (0, 2):
        runs[depth] = train_run(tiny_config(prefetch=depth), tmp_path / str(depth), progress=False)
    assert runs[0]["ndcg@10"] == runs[2]["ndcg@10"]
    a, b = (load_tensors(tmp_path / str(d) / "model.safetensors") for d in (0, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")  # fmt: skip
def test_compiled_towers_give_the_same_loss_and_gradients_and_runs_load_alike(tmp_path):
    import copy

    from twotower.experiment import build_model
    from twotower.storage import load_tensors

    config = tiny_config(epochs=2)
    for tower in (config.model.user_tower, config.model.item_tower):
        tower.dropout = 0.0  # compiled dropout draws other random numbers: compare without it
    data = build_retrieval_data(config)
    torch.manual_seed(0)
    eager = build_model(config, data)
    compiled = copy.deepcopy(eager)
    compiled.user_tower.compile(dynamic=True)
    compiled.item_tower.compile(dynamic=True)
    batch = next(iter(iterate_batches(data.train, 256, 0, 1)))
    losses, grads = [], []
    for model in (eager, compiled):
        loss = model.compute_loss(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)

    # End to end: train.compile runs, and its run directory holds the towers' usual weight names.
    # (Whole runs are compared by their metrics: Adam turns rounding-level gradient differences
    # on near-zero gradients into lr-sized steps, so weights after training differ by more.)
    runs = {}
    for flag in (False, True):
        run_config = config.model_copy(deep=True)
        run_config.train.compile = flag
        runs[flag] = train_run(run_config, tmp_path / str(flag), progress=False, data=data)
    assert runs[True]["ndcg@10"] == pytest.approx(runs[False]["ndcg@10"], abs=0.03)
    a, b = (load_tensors(tmp_path / str(flag) / "model.safetensors") for flag in (False, True))
    assert sorted(a) == sorted(b)


@pytest.mark.usefixtures("one_torch_thread")
def test_resuming_replaces_the_export_of_the_previous_weights(tmp_path):
    # recommend/serve use RUN_DIR/export when it exists: after --resume it used to serve the old model.
    from twotower.export import export_run, resolve_export
    from twotower.reranker import sha256_file

    run_dir = tmp_path / "run"
    train_run(tiny_config(epochs=1), run_dir, progress=False)
    old = export_run(run_dir)
    train_run(tiny_config(epochs=2), run_dir, resume=True, progress=False)
    assert not old.exists()
    manifest = json.loads((resolve_export(run_dir) / "manifest.json").read_text())
    assert manifest["retrieval_sha256"] == sha256_file(run_dir / "model.safetensors")


def test_training_again_into_a_run_removes_what_described_the_old_weights(tmp_path):
    """A report or another protocol's metrics left from the previous weights would pass for the new ones'."""
    from twotower.recommender import evaluate_run
    from twotower.report import build_report

    run_dir = tmp_path / "run"
    train_run(tiny_config(epochs=1), run_dir, progress=False)
    evaluate_run(run_dir, "tfrs")
    build_report(run_dir)
    (run_dir / "funnel.json").write_text("{}")
    assert (run_dir / "metrics-tfrs.json").exists() and (run_dir / "report").is_dir()
    train_run(tiny_config(epochs=1), run_dir, progress=False)
    left = {p.name for p in run_dir.iterdir()}
    assert not left & {"metrics-tfrs.json", "report.html", "report", "funnel.json"}
    assert {"metrics.json", "history.json", "model.safetensors", "config.yaml"} <= left


def test_an_evaluation_that_fails_after_training_keeps_the_trained_model(tmp_path, monkeypatch):
    import twotower.experiment as experiment
    from twotower.recommender import Retriever

    fit, evaluate, trained = experiment.fit, experiment.evaluate_model, []

    def fit_then_mark(*args, **kwargs):
        result = fit(*args, **kwargs)
        trained.append(True)
        return result

    def out_of_memory_after_training(*args, **kwargs):  # validation during training still runs
        if trained:
            raise MemoryError("evaluation over a large catalogue")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(experiment, "fit", fit_then_mark)
    monkeypatch.setattr(experiment, "evaluate_model", out_of_memory_after_training)
    run_dir = tmp_path / "run"
    with pytest.raises(MemoryError):
        train_run(tiny_config(epochs=1), run_dir, progress=False)
    assert not (run_dir / "metrics.json").exists()
    assert (run_dir / "history.json").exists()
    retriever = Retriever.load(run_dir)  # the trained weights are there, and serve
    assert retriever.recommend(retriever.user_ids[:1], k=3)[0].shape == (1, 3)


def test_an_evaluation_that_fails_when_training_again_leaves_no_metrics_of_the_old_weights(
    tmp_path, monkeypatch
):
    import twotower.experiment as experiment

    run_dir = tmp_path / "run"
    train_run(tiny_config(epochs=1), run_dir, progress=False)
    assert (run_dir / "metrics.json").exists()
    fit, evaluate, trained = experiment.fit, experiment.evaluate_model, []

    def fit_then_mark(*args, **kwargs):
        result = fit(*args, **kwargs)
        trained.append(True)
        return result

    def out_of_memory_after_training(*args, **kwargs):
        if trained:
            raise MemoryError("evaluation over a large catalogue")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(experiment, "fit", fit_then_mark)
    monkeypatch.setattr(experiment, "evaluate_model", out_of_memory_after_training)
    with pytest.raises(MemoryError):
        train_run(tiny_config(epochs=2), run_dir, progress=False)
    # metrics.json described the epoch-1 weights; model.safetensors now holds epoch 2's
    assert not (run_dir / "metrics.json").exists()
    assert [h["epoch"] for h in json.loads((run_dir / "history.json").read_text())] == [1, 2]


def test_a_crash_while_saving_the_model_leaves_no_model_json_beside_other_weights(tmp_path, monkeypatch):
    import twotower.experiment as experiment

    run_dir = tmp_path / "run"
    train_run(tiny_config(epochs=1), run_dir, progress=False)
    save_tensors = experiment.save_tensors

    def crash_after_the_weights(path, tensors):
        save_tensors(path, tensors)
        if path.name == "model.safetensors":
            raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "save_tensors", crash_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        train_run(tiny_config(epochs=1, seed=5), run_dir, progress=False)
    # The old model.json (the seed-0 run's config, vocabularies) would have passed for the new weights.
    assert (run_dir / "model.safetensors").exists() and not (run_dir / "model.json").exists()


def test_a_data_error_leaves_no_run_directory(tmp_path):
    from twotower.config import RunConfig

    config = RunConfig.model_validate({"data": {"source": "files", "interactions": str(tmp_path / "no.csv")}})
    with pytest.raises(FileNotFoundError, match="no.csv"):
        train_run(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # used to hold a lone config.yaml


def test_unusable_early_stopping_is_an_error_before_training(tmp_path):
    from twotower.config import ConfigError

    config = tiny_config(early_stopping={"metric": "ndcg@11"})
    with pytest.raises(ConfigError, match="'ndcg@11' is not one of .*'ndcg@10'"):
        train_run(config, tmp_path / "a", progress=False)  # was a KeyError after the first epoch
    config = tiny_config(early_stopping={"metric": "ndcg@10"})
    config.eval.protocol = "msrec"  # no validation split of its own and valid_fraction 0: was ignored
    with pytest.raises(ConfigError, match="needs a validation split"):
        train_run(config, tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.usefixtures("one_torch_thread")
def test_relative_data_paths_are_saved_absolute_so_the_run_works_from_anywhere(tmp_path, monkeypatch):
    import numpy as np
    import yaml

    from twotower.config import RunConfig
    from twotower.recommender import evaluate_run

    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    rows = [f"u{u},i{rng.integers(20)},{t}" for u in range(30) for t in range(8)]
    (tmp_path / "data" / "log.csv").write_text("user_id,item_id,ts\n" + "\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    config = RunConfig.model_validate(
        {
            "data": {"source": "files", "interactions": "data/log.csv", "columns": {"timestamp": "ts"}},
            "train": {"epochs": 1, "batch_size": 64},
            "eval": {"protocol": "temporal"},
        }
    )
    metrics = train_run(config, "run", progress=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["interactions"] == str(tmp_path / "data" / "log.csv")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # `twotower evaluate ../run` from another directory
    assert evaluate_run(tmp_path / "run")["ndcg@10"] == pytest.approx(metrics["ndcg@10"])


@pytest.mark.usefixtures("one_torch_thread")
def test_a_model_that_cannot_be_built_leaves_the_runs_config_alone(tmp_path):
    run_dir = tmp_path / "run"
    train_run(tiny_config(epochs=1), run_dir, progress=False)
    saved = (run_dir / "config.yaml").read_text()
    mismatched = tiny_config(epochs=1)
    mismatched.model.user_tower.layers = [8]  # 8 dims against the item tower's 16
    with pytest.raises(ValueError, match="user tower outputs 8 dims"):
        train_run(mismatched, run_dir, progress=False)
    assert (run_dir / "config.yaml").read_text() == saved  # the weights still have their config
    with pytest.raises(ValueError, match="user tower outputs 8 dims"):
        train_run(mismatched, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()
