"""Tower input layers: sparse-gradient tables compute exactly what dense ones do."""

from __future__ import annotations

import torch

from twotower.features import FieldInfo
from twotower.towers import Tower, TowerConfig

FIELDS = [
    FieldInfo("item_id", "categorical", 500, None),
    FieldInfo("genres", "multi_hot", 20, 4),
    FieldInfo("year", "numeric", 0, None),
]


def _tower(sparse: bool) -> Tower:
    torch.manual_seed(0)
    return Tower(FIELDS, TowerConfig(embedding_dim=8, layers=[16, 8], sparse=sparse))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    genres = torch.randint(0, 20, (64, 4), generator=g)
    genres[:, 2:] = 0  # right padding, and some rows all padding
    genres[:5] = 0
    return {
        "item_id": torch.randint(0, 500, (64,), generator=g),
        "genres": genres,
        "year": torch.randn(64, generator=g),
    }


def test_sparse_tables_give_the_same_outputs_and_gradients():
    dense, sparse = _tower(False), _tower(True)
    batch = _batch()
    out_dense, out_sparse = dense(batch), sparse(batch)
    assert torch.equal(out_dense, out_sparse)
    out_dense.square().sum().backward()
    out_sparse.square().sum().backward()
    for name in ("categorical.item_id.weight", "multi_hot.genres.weight"):
        grad_dense = dict(dense.named_parameters())[name].grad
        grad_sparse = dict(sparse.named_parameters())[name].grad
        assert grad_sparse.is_sparse and not grad_dense.is_sparse
        torch.testing.assert_close(grad_sparse.to_dense(), grad_dense)
    assert sparse.multi_hot["genres"].weight.grad.to_dense()[0].abs().sum() == 0  # padding never learns


def test_sparse_tables_train_with_adagrad_like_dense_ones():
    towers = {s: _tower(s) for s in (False, True)}
    optims = {s: torch.optim.Adagrad(t.parameters(), lr=0.1) for s, t in towers.items()}
    batch = _batch()
    for _ in range(3):
        for s, tower in towers.items():
            optims[s].zero_grad()
            tower(batch).square().sum().backward()
            optims[s].step()
    for (name, a), (_, b) in zip(
        towers[False].named_parameters(), towers[True].named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_bf16_precision_runs_the_mlp_in_bfloat16_and_returns_float32():
    fp32, bf16 = _tower(False), _tower(False)
    bf16.config = bf16.config.model_copy(update={"precision": "bf16"})
    batch = _batch()
    want, got = fp32(batch), bf16(batch)
    assert got.dtype == torch.float32
    assert not torch.equal(got, want)  # the products really ran in bfloat16 ...
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.02)  # ... to bfloat16 accuracy
    got.square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in bf16.mlp.parameters())


def test_multi_hot_mean_ignores_padding_and_an_empty_bag_is_zero():
    bag = _tower(False).multi_hot["genres"]
    rows = bag(torch.tensor([[3, 7, 0, 0], [0, 3, 0, 7], [0, 0, 0, 0]]))
    torch.testing.assert_close(rows[0], (bag.weight[3] + bag.weight[7]) / 2)
    torch.testing.assert_close(rows[1], rows[0])  # where the padding sits does not matter
    assert torch.all(rows[2] == 0)
    torch.testing.assert_close(bag(torch.tensor([[3, 7]])), rows[:1])  # nor how much of it there is


def test_dropout_is_on_in_training_off_in_eval_and_a_batch_of_one_works():
    torch.manual_seed(0)
    tower = Tower(FIELDS, TowerConfig(embedding_dim=8, layers=[16, 8], dropout=0.5))
    batch = _batch()
    tower.eval()
    first = tower(batch)
    torch.testing.assert_close(tower(batch), first)
    one = tower({k: v[:1] for k, v in batch.items()})
    assert one.shape == (1, 8)
    torch.testing.assert_close(one, first[:1])
    tower.train()
    assert not torch.allclose(tower(batch), first)


def test_normalised_output_is_unit_length_and_a_zero_vector_stays_finite():
    torch.manual_seed(0)
    tower = Tower(FIELDS[1:2], TowerConfig(embedding_dim=4, normalize=True))  # genres alone, no MLP
    out = tower({"genres": torch.tensor([[3, 0, 0, 0], [0, 0, 0, 0]])})
    torch.testing.assert_close(out[0].norm(), torch.tensor(1.0))
    assert torch.all(out[1] == 0)  # an empty bag: the zero vector, not NaN
    (out @ out.T).sum().backward()
    assert bool(torch.isfinite(tower.multi_hot["genres"].weight.grad).all())


def test_a_seed_fixes_the_initial_tower():
    a, b = _tower(False), _tower(False)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), name


def test_a_half_precision_tower_takes_float32_numeric_columns():
    # ``tower.to(bfloat16)`` (or ``.half()``) for inference: the float32 numeric column was upcast
    # with ``.float()`` and the MLP refused the mixed input ("mat1 and mat2 must have the same dtype").
    tower, batch = _tower(False).eval(), _batch()
    want = tower(batch)
    got = tower.to(torch.bfloat16)(batch)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
