"""Export: the exported query tower and item embeddings reproduce the trained model's scores exactly."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from twotower.experiment import train_run
from twotower.export import export_run, load_export, resolve_export
from twotower.index import IndexConfig
from twotower.recommender import Retriever


def _history_config(pooling: str, actions: bool = False):
    cfg = tiny_config(epochs=1)
    history = {"enabled": True, "pooling": pooling, "max_len": 8, "num_layers": 1}
    if actions:
        history["action_column"] = "rating"
    return cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"history": cfg.model.history.model_validate(history)})}
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, cfg in {
        "plain": tiny_config(epochs=1),
        "mean": _history_config("mean"),
        "attention": _history_config("attention"),
    }.items():
        run_dir = tmp_path_factory.mktemp(name)
        train_run(cfg, run_dir, progress=False)
        out[name] = run_dir
    return out


@pytest.mark.parametrize("name", ["plain", "mean", "attention"])
def test_export_reproduces_trained_scores_exactly(runs, name):
    run_dir = runs[name]
    retriever = Retriever.load(run_dir)
    exported = load_export(export_run(run_dir))
    model = retriever.model
    users = torch.arange(model.num_users)
    assert torch.equal(exported.query.known(users), model.user_embeddings(users))
    assert torch.equal(exported.item_embeddings, model.item_embeddings())
    want_ids, want_scores = retriever.recommend(retriever.user_ids[:50], k=20)
    seen = [exported.seen.row(u).numpy() for u in range(50)]
    # the same operations in the same order as training: queries / temperature, then inner products
    queries = (exported.query.known(users[:50]) / exported.temperature).numpy()
    ids, scores = exported.index.search(queries, 20, exclude=seen)
    np.testing.assert_array_equal(exported.item_ids[ids], want_ids)
    np.testing.assert_array_equal(scores, want_scores)


def test_history_events_path_equals_stored_path(runs):
    """Encoding a stored history through the explicit-events path gives the same embedding."""
    exported = load_export(resolve_export(runs["attention"]))
    query = exported.query
    users = torch.arange(20)
    stored = query.known(users)
    sequences = [query.stored_events(u)[0] for u in users.tolist()]
    explicit = query.from_features(query.stored_features(users), sequences)
    torch.testing.assert_close(explicit, stored, rtol=0, atol=1e-6)
    # an extra recent item changes the query (the history is really used)
    moved = query.known(users[:1], [torch.tensor([3])])
    assert not torch.allclose(moved, stored[:1])


def test_manifest_and_integrity(runs, tmp_path):
    out = export_run(runs["plain"], tmp_path / "exp", IndexConfig(backend="faiss-flat"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "twotower.export/1"
    assert manifest["similarity"] == "cosine" and manifest["embedding_dim"] == 16
    assert manifest["index"]["backend"] == "faiss-flat"
    assert manifest["index"]["report"]["recall_at_k"] == pytest.approx(1.0)
    assert {"query_tower.safetensors", "items.safetensors", "catalogue.json"} <= set(manifest["files"])
    assert "torch" in manifest["versions"] and manifest["ranker"] is False
    # a re-export replaces the directory as a whole; no staging directories are left behind
    export_run(runs["plain"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    # a corrupted file is refused
    with (out / "items.safetensors").open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="items.safetensors"):
        load_export(out)


def test_metric_mismatch_refused(runs, tmp_path):
    out = export_run(runs["plain"], tmp_path / "exp")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["similarity"] = "dot"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="cosine|dot"):
        load_export(out)


def test_resolve_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.json"):
        resolve_export(tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_export(tmp_path)


def test_onnx_export_matches_pytorch(runs, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = export_run(runs["mean"], tmp_path / "exp", onnx=True)
    report = json.loads((out / "manifest.json").read_text())["onnx"]
    assert report["max_abs_diff"] <= 1e-4
    assert report["inputs"][-3:] == ["history_ids", "history_valid", "history_recency"]
    assert (out / "query_tower.onnx").stat().st_size > 0
