import pytest
import torch

from conftest import tiny_config
from twotower.data.dataset import build_retrieval_data
from twotower.experiment import build_model, train_run
from twotower.history import MeanHistoryEncoder, history_csr
from twotower.recommender import Retriever


def test_history_csr_keeps_log_order_and_the_most_recent():
    users = torch.tensor([1, 0, 1, 1, 2])
    items = torch.tensor([5, 3, 4, 6, 2])
    indptr, hist = history_csr(users, items, num_users=4)
    assert indptr.tolist() == [0, 1, 4, 5, 5] and hist.tolist() == [3, 5, 4, 6, 2]
    indptr, hist = history_csr(users, items, num_users=4, max_len=2)
    assert indptr.tolist() == [0, 1, 3, 4, 4] and hist.tolist() == [3, 4, 6, 2]


def test_mean_pooling_leaves_the_target_out_by_hand():
    indptr, hist = history_csr(torch.tensor([1, 0, 1, 1]), torch.tensor([5, 3, 4, 6]), num_users=4)
    enc = MeanHistoryEncoder(indptr, hist, num_items=7, dim=2)
    with torch.no_grad():
        enc.embedding.weight.copy_(torch.arange(14.0).view(7, 2))  # e_i = [2i, 2i + 1]
    out = enc(torch.tensor([1, 1, 3, 0]), torch.tensor([4, 9, 0, 3]))
    expected = torch.tensor(
        [
            [(10 + 12) / 2, (11 + 13) / 2],  # user 1 = {5, 4, 6} without 4: mean(e5, e6)
            [(10 + 8 + 12) / 3, (11 + 9 + 13) / 3],  # 9 is not in the history: nothing left out
            [0.0, 0.0],  # empty history
            [0.0, 0.0],  # its only item left out
        ]
    )
    assert torch.allclose(out, expected)
    full = enc(torch.tensor([1]))
    assert torch.allclose(full, torch.tensor([[10.0, 11.0]]))
    out.sum().backward()
    # Item 4 gets 1/3 from row 1 only: row 0 left it out, so it contributes no gradient there.
    assert torch.allclose(enc.embedding.weight.grad[4], torch.full((2,), 1 / 3))


def test_history_model_trains_saves_and_serves(tmp_path):
    cfg = tiny_config(epochs=3)
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(
                update={"history": cfg.model.history.model_copy(update={"enabled": True})}
            )
        }
    )
    data = build_retrieval_data(cfg)
    model = build_model(cfg, data)
    assert model.history is not None and model.user_tower.input_dim == 16 + 16 + 16
    metrics = train_run(cfg, tmp_path, progress=False, data=data)
    retriever = Retriever.load(tmp_path)
    assert torch.equal(retriever.model.history.items, model.history.items)
    again = retriever.model.user_embeddings()
    assert again.shape == (data.num_users, 16)
    assert metrics["recall@10"] > 0


def test_enabled_history_without_data_is_an_error():
    from twotower.features import FieldInfo
    from twotower.retrieval import ModelConfig, TwoTowerModel

    cfg = ModelConfig.model_validate({"history": {"enabled": True}})
    with pytest.raises(ValueError, match="histories"):
        TwoTowerModel(
            cfg,
            [FieldInfo("u", "categorical", 3, None)],
            [FieldInfo("i", "categorical", 3, None)],
            {"u": torch.tensor([1, 2])},
            {"i": torch.tensor([1, 2])},
        )
