import json

import pytest
import torch

from conftest import tiny_config
from twotower.data.dataset import build_retrieval_data
from twotower.experiment import train_run
from twotower.storage import load_tensors


@pytest.fixture(scope="module")
def data():
    return build_retrieval_data(tiny_config())


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, data):
    full = train_run(tiny_config(epochs=4), tmp_path / "full", progress=False, data=data)
    # Interrupted after epoch 2 (a run configured for 2 epochs), then resumed to 4.
    train_run(tiny_config(epochs=2), tmp_path / "cut", progress=False, data=data)
    resumed = train_run(tiny_config(epochs=4), tmp_path / "cut", resume=True, progress=False, data=data)
    a = load_tensors(tmp_path / "full" / "model.safetensors")
    b = load_tensors(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # dropout, the streaming estimator and AdamW state all continue exactly
        assert torch.equal(a[key], b[key]), key
    assert resumed["recall@10"] == full["recall@10"] and resumed["ndcg@10"] == full["ndcg@10"]
    history = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_run_directory_holds_config_checkpoints_and_metrics(tmp_path, data):
    train_run(tiny_config(epochs=2), tmp_path, progress=False, data=data)
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.yaml",
        "checkpoints",
        "metrics.json",
        "model.safetensors",
        "model.json",
        "history.json",
    } <= names
    ckpt = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert ckpt == {"last.json", "last-epoch0002.safetensors"}  # older epochs are replaced
    assert not any(n.endswith(".tmp") for n in names | ckpt)
    assert not any(p.suffix in (".pt", ".pkl", ".pth") for p in tmp_path.rglob("*"))


def test_early_stopping_restores_the_best_epoch(tmp_path, data):
    cfg = tiny_config(epochs=30, lr=0.05, early_stopping={"metric": "recall@10", "patience": 2})
    metrics = train_run(cfg, tmp_path, progress=False, data=data)
    history = json.loads((tmp_path / "history.json").read_text())
    best = max(history, key=lambda h: h["valid_recall@10"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["epochs_run"] < 30  # it stopped
    assert metrics["epochs_run"] - metrics["best_epoch"] == 2


def test_diverging_loss_is_reported(tmp_path, data):
    from twotower.experiment import build_model
    from twotower.train import fit

    cfg = tiny_config()
    model = build_model(cfg, data)

    def batches(epoch):
        yield {
            "user_idx": torch.tensor([0, 1]),
            "item_idx": torch.tensor([0, 1]),
            "weight": torch.tensor([float("nan"), 1.0]),
        }

    with pytest.raises(FloatingPointError, match="epoch 1"):
        fit(model, batches, cfg.train, tmp_path, progress=False)
