"""Export: the exported query tower and item embeddings reproduce the trained model's scores exactly."""

import json
import pathlib
import shutil

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


def test_a_runs_stale_export_is_exported_again_with_its_index(runs, tmp_path):
    from twotower.export import stale_export_reason
    from twotower.storage import load_tensors, save_tensors

    run_dir = tmp_path / "run"
    shutil.copytree(runs["plain"], run_dir)
    shutil.rmtree(run_dir / "export", ignore_errors=True)
    export_run(run_dir, index=IndexConfig(backend="faiss-flat"))
    created = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert stale_export_reason(run_dir, run_dir / "export") is None
    assert resolve_export(run_dir) == run_dir / "export"
    assert json.loads((run_dir / "export" / "manifest.json").read_text()) == created  # not rebuilt
    # asking for another index than the one built is a reason to rebuild
    assert "index" in stale_export_reason(run_dir, run_dir / "export", IndexConfig(backend="exact"))
    # a ranker trained (or removed) after the export makes it stale
    (run_dir / "ranker").mkdir()
    assert "ranker was trained" in stale_export_reason(run_dir, run_dir / "export")
    (run_dir / "ranker").rmdir()
    # new retrieval weights: the next resolve exports again, with the export's own index backend
    weights = load_tensors(run_dir / "model.safetensors")
    name = next(k for k in weights if "item" in k and weights[k].is_floating_point())
    weights[name] = weights[name] + 0.5
    save_tensors(run_dir / "model.safetensors", weights)
    assert stale_export_reason(run_dir, run_dir / "export") == "the retrieval weights changed"
    fresh = json.loads((resolve_export(run_dir) / "manifest.json").read_text())
    assert fresh["retrieval_sha256"] != created["retrieval_sha256"]
    assert fresh["index"]["backend"] == "faiss-flat"
    exported = load_export(run_dir / "export")
    assert torch.equal(exported.item_embeddings, Retriever.load(run_dir).model.item_embeddings())
    # a damaged export is exported again too (with the default index, its own being unreadable)
    (run_dir / "export" / "index" / "index.json").write_text("{ not json")
    assert "unreadable" in stale_export_reason(run_dir, run_dir / "export")
    assert load_export(resolve_export(run_dir)).index.config.backend == "exact"


def test_onnx_export_matches_pytorch(runs, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = export_run(runs["mean"], tmp_path / "exp", onnx=True)
    report = json.loads((out / "manifest.json").read_text())["onnx"]
    assert report["max_abs_diff"] <= 1e-4
    assert report["inputs"][-3:] == ["history_ids", "history_valid", "history_recency"]
    assert (out / "query_tower.onnx").stat().st_size > 0


def test_reexport_with_another_backend_leaves_nothing_of_the_old_one(runs, tmp_path):
    out = export_run(runs["plain"], tmp_path / "exp", IndexConfig(backend="faiss-flat", threads=1))
    assert (out / "index" / "index.faiss").exists()
    export_run(runs["plain"], out, IndexConfig(backend="exact"))
    assert not (out / "index" / "index.faiss").exists()  # replaced as a whole, not overwritten file by file
    exported = load_export(out)
    assert exported.manifest["index"]["backend"] == "exact" and exported.index.faiss_index is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_failed_export_keeps_the_previous_one_and_leaves_no_staging(runs, tmp_path):
    out = export_run(runs["plain"], tmp_path / "exp")
    before = (out / "manifest.json").read_bytes()
    # 150 items cannot train 2**8 PQ centroids: the index build fails after most files are staged.
    with pytest.raises(ValueError, match="only 150 items"):
        export_run(runs["plain"], out, IndexConfig(backend="faiss-ivfpq"))
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    load_export(out)  # still whole


def test_export_files_get_plain_umask_modes(runs, tmp_path):
    import os

    out = export_run(runs["plain"], tmp_path / "exp", IndexConfig(backend="faiss-flat", threads=1))
    umask = os.umask(0o022)
    os.umask(umask)
    for path in [out, *out.rglob("*")]:  # not mkdtemp's / mkstemp's owner-only 0700 / 0600
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == want, path


@pytest.mark.parametrize("name", ["index/index.faiss", "index/index.json", "seen.safetensors"])
def test_a_missing_file_is_refused(runs, tmp_path, name):
    out = export_run(runs["plain"], tmp_path / "exp", IndexConfig(backend="faiss-flat", threads=1))
    (out / name).unlink()
    with pytest.raises(ValueError, match=f"{name} is missing"):
        load_export(out)


def test_exported_index_answers_like_the_model_for_cosine(runs, tmp_path):
    out = export_run(runs["plain"], tmp_path / "exp", IndexConfig(backend="faiss-flat", threads=1))
    exported, model = load_export(out), Retriever.load(runs["plain"]).model
    assert exported.similarity == "cosine" and exported.index.normalized
    norms = exported.item_embeddings.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
    queries = model.user_embeddings(torch.arange(30)) / exported.temperature
    want = queries @ model.item_embeddings().T
    ids, scores = exported.index.search(queries, 5)
    np.testing.assert_allclose(scores, torch.gather(want, 1, torch.from_numpy(ids)).numpy(), atol=1e-4)
    np.testing.assert_allclose(scores, want.topk(5, dim=1).values.numpy(), atol=1e-4)


def test_export_refuses_the_run_directory_and_any_folder_holding_it(runs, tmp_path):
    """An export replaces its destination as a whole: `--out RUN` (or RUN's parent) would delete the run."""
    run = tmp_path / "run"
    shutil.copytree(runs["plain"], run)
    for out in (run, tmp_path, run / ".." / "run"):
        with pytest.raises(ValueError, match="run directory"):
            export_run(run, out)
    assert (run / "model.safetensors").exists() and (run / "checkpoints" / "last.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_refuses_to_replace_an_existing_path_that_is_not_an_export(runs, tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "other_model.safetensors").write_bytes(b"precious")
    with pytest.raises(ValueError, match=f"{out}.*not an export"):
        export_run(runs["plain"], out)
    assert (out / "other_model.safetensors").read_bytes() == b"precious"
    (out / "manifest.json").write_text(json.dumps({"format": "someone.else/1"}))
    with pytest.raises(ValueError, match="not an export"):
        export_run(runs["plain"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no staging left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    load_export(export_run(runs["plain"], empty))  # an empty directory holds nothing to lose


def test_a_failed_final_rename_puts_the_previous_export_back(runs, tmp_path, monkeypatch):
    """The old export is moved aside before the new one is renamed into place; if that rename fails
    (ENOSPC, EIO, EXDEV...) the old one must come back, not linger hidden as .exp.old-<ns>."""
    out = export_run(runs["plain"], tmp_path / "exp")
    before = (out / "manifest.json").read_bytes()
    real_rename = pathlib.Path.rename

    def failing_rename(self, target):
        if self.name.startswith(".exp.") and ".old-" not in self.name:  # the staging directory
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", failing_rename)
    with pytest.raises(OSError, match="No space left"):
        export_run(runs["plain"], out)
    monkeypatch.undo()
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    load_export(out)


def test_weights_replaced_while_loading_are_an_error_not_an_export_under_the_new_hash(
    runs, tmp_path, monkeypatch
):
    """The manifest's retrieval_sha256 is what staleness checks compare: filed under the new weights'
    hash, an export of the old ones would never be refreshed."""
    from twotower.export import stale_export_reason
    from twotower.storage import load_tensors, save_tensors

    run_dir = tmp_path / "run"
    shutil.copytree(runs["plain"], run_dir, ignore=shutil.ignore_patterns("export"))
    original = Retriever.load

    def load_then_retrain(where):  # a training finishing into the run just after the load
        loaded = original(where)
        weights = load_tensors(run_dir / "model.safetensors")
        name = next(k for k in weights if "item" in k and weights[k].is_floating_point())
        save_tensors(run_dir / "model.safetensors", {**weights, name: weights[name] + 0.5})
        return loaded

    monkeypatch.setattr(Retriever, "load", load_then_retrain)
    with pytest.raises(RuntimeError, match="model.safetensors changed while it was being loaded"):
        export_run(run_dir)
    monkeypatch.undo()
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith((".export", "export"))) == []
    # had it been written, it would now pass for fresh
    assert stale_export_reason(run_dir, export_run(run_dir)) is None
