import math

import pytest
import torch

from twotower.features import FieldInfo
from twotower.frequency import CountFrequency
from twotower.retrieval import ModelConfig, RetrievalTask, TwoTowerModel
from twotower.topk import CSR

Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
C = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
# All pair scores q_i . c_j: [[1, 1], [0, 1]]; at temperature 0.5: [[2, 2], [0, 2]].


def test_plain_in_batch_softmax_by_hand():
    task = RetrievalTask(temperature=0.5)
    loss = task(Q, C, torch.tensor([0, 1]))
    row0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(2)))  # = log 2
    row1 = -math.log(math.exp(2) / (math.exp(0) + math.exp(2)))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_logq_corrected_loss_equals_hand_computed_2x2():
    # Q(item 0) = 3/4, Q(item 1) = 1/4; a batch of B = 2 expects item y 2 Q(y) times, so the corrected
    # logits are [[2 - ln 1.5, 2 - ln .5], [0 - ln 1.5, 2 - ln .5]] (the shared ln 2 leaves the loss as is).
    task = RetrievalTask(temperature=0.5, sampling_probability=CountFrequency(torch.tensor([3.0, 1.0])))
    loss = task(Q, C, torch.tensor([0, 1]))
    # Row 0: positive 1.5945 vs negative 2.6931, a gap of ln 3, so -log(1 / (1 + 3)) = ln 4.
    row0 = math.log(4)
    # Row 1: positive 2.6931 vs negative -0.4055, a gap of 2 + ln 3.
    row1 = math.log(1 + math.exp(-2) / 3)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    logits = task.logits(Q, C, torch.tensor([0, 1]))
    expected = torch.tensor([[2 - math.log(1.5), 2 - math.log(0.5)], [-math.log(1.5), 2 - math.log(0.5)]])
    assert torch.allclose(logits, expected, atol=1e-6)


def test_accidental_hits_are_masked_and_weights_apply():
    ids = torch.tensor([7, 7])  # both rows' positive is item 7: the other column is not a negative
    task = RetrievalTask(temperature=0.5, remove_accidental_hits=True)
    assert task(Q, C, ids).item() == pytest.approx(0.0, abs=1e-6)
    kept = RetrievalTask(temperature=0.5, remove_accidental_hits=False)
    assert kept(Q, C, ids).item() > 0.3
    weighted = RetrievalTask(temperature=0.5)(
        Q, C, torch.tensor([0, 1]), sample_weight=torch.tensor([1.0, 0.0])
    )
    assert weighted.item() == pytest.approx(math.log(2), rel=1e-6)  # only row 0 counts


def test_streaming_estimator_is_updated_only_in_training():
    class Recorder:
        def __init__(self):
            self.calls = 0

        def update(self, ids):
            self.calls += 1

        def log_probability(self, ids):
            return torch.zeros(len(ids))

    rec = Recorder()
    task = RetrievalTask(sampling_probability=rec)
    task(Q, C, torch.tensor([0, 1]))
    task.eval()
    task(Q, C, torch.tensor([0, 1]))
    assert rec.calls == 1
    with pytest.raises(ValueError):
        RetrievalTask(temperature=0)


def _model(similarity="cosine", layers=()):
    users = [FieldInfo("user_id", "categorical", 4, None)]
    items = [FieldInfo("item_id", "categorical", 6, None), FieldInfo("price", "numeric", 0, None)]
    cfg = ModelConfig.model_validate(
        {
            "similarity": similarity,
            "temperature": 0.2,
            "user_tower": {"embedding_dim": 8, "layers": list(layers)},
            "item_tower": {"embedding_dim": 7 if not layers else 8, "layers": list(layers)},
        }
    )
    return TwoTowerModel(
        cfg,
        users,
        items,
        {"user_id": torch.tensor([1, 2, 3, 0])},
        {"item_id": torch.tensor([1, 2, 3, 4, 5, 0]), "price": torch.linspace(-1, 1, 6)},
    )


def test_model_scores_cosine_and_recommends_excluding():
    torch.manual_seed(0)
    model = _model()
    assert torch.allclose(model.item_embeddings().norm(dim=1), torch.ones(6), atol=1e-5)
    ids, scores = model.recommend(
        torch.tensor([0, 1]), k=6, exclude=CSR.from_pairs(torch.tensor([0, 0]), torch.tensor([2, 4]), 2)
    )
    assert set(ids[0, :4].tolist()) == {0, 1, 3, 5} and ids[0, 4:].tolist() == [-1, -1]
    full = model.user_embeddings(torch.tensor([1])) @ model.item_embeddings().T / 0.2
    assert torch.allclose(scores[1], full[0].sort(descending=True).values, atol=1e-5)
    loss = model.compute_loss({"user_idx": torch.tensor([0, 1, 2]), "item_idx": torch.tensor([0, 1, 2])})
    loss.backward()
    assert torch.isfinite(loss) and model.user_tower.categorical["user_id"].weight.grad is not None


def test_mismatched_tower_widths_are_explained():
    users = [FieldInfo("user_id", "categorical", 4, None)]
    items = [FieldInfo("item_id", "categorical", 6, None)]
    cfg = ModelConfig.model_validate({"user_tower": {"embedding_dim": 8}, "item_tower": {"embedding_dim": 6}})
    with pytest.raises(ValueError, match="same size"):
        TwoTowerModel(cfg, users, items, {"user_id": torch.tensor([1, 2])}, {"item_id": torch.tensor([1, 2])})


def test_temperature_is_applied_once_in_training_and_in_scoring():
    torch.manual_seed(0)
    model = _model(layers=(8,))  # cosine, temperature 0.2
    users, items = torch.tensor([0, 1, 2]), torch.tensor([0, 3, 5])
    cos = model.user_embeddings(users) @ model.item_embeddings(items).T
    model.eval()
    loss = model.compute_loss({"user_idx": users, "item_idx": items})
    expected = torch.nn.functional.cross_entropy(cos / 0.2, torch.arange(3))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    ids, scores = model.recommend(users, k=6)
    full = model.user_embeddings(users) @ model.item_embeddings().T
    torch.testing.assert_close(scores, full.gather(1, ids) / 0.2)
    assert float(scores.abs().max()) <= 1 / 0.2 + 1e-4  # cosine / T, not / T^2


def test_recommend_runs_in_eval_mode_and_restores_training_mode():
    users = [FieldInfo("user_id", "categorical", 4, None)]
    items = [FieldInfo("item_id", "categorical", 6, None)]
    cfg = ModelConfig.model_validate(
        {
            "user_tower": {"embedding_dim": 8, "layers": [16, 8], "dropout": 0.5},
            "item_tower": {"embedding_dim": 8, "layers": [16, 8], "dropout": 0.5},
        }
    )
    torch.manual_seed(0)
    model = TwoTowerModel(
        cfg, users, items, {"user_id": torch.tensor([1, 2, 3, 0])}, {"item_id": torch.arange(6)}
    )
    model.eval()
    want = model.recommend(torch.arange(4), k=3)
    model.train()
    got = model.recommend(torch.arange(4), k=3)
    assert model.training and model.user_tower.training
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_repeated_ids_in_a_batch_give_the_general_path_loss():
    torch.manual_seed(0)
    model = _model(layers=(8,))
    batch = {"user_idx": torch.tensor([0, 1, 1, 2]), "item_idx": torch.tensor([4, 4, 2, 2])}
    assert model._distinct_ok()
    fast = model.compute_loss(batch)
    general = RetrievalTask(temperature=0.2, fused=False)
    query = model.user_tower(model.user_features(batch["user_idx"]))
    cand = model.item_tower(model.item_features(batch["item_idx"]))
    assert fast.item() == pytest.approx(general(query, cand, batch["item_idx"]).item(), rel=1e-5)


def test_training_rows_see_only_the_history_before_them():
    from twotower.history import history_csr, history_positions

    users = [FieldInfo("user_id", "categorical", 3, None)]
    items = [FieldInfo("item_id", "categorical", 6, None)]
    cfg = ModelConfig.model_validate(
        {
            "user_tower": {"embedding_dim": 4, "layers": [8]},
            "item_tower": {"embedding_dim": 8, "layers": [8]},
            "history": {"enabled": True, "max_len": 4},
        }
    )
    log_users, log_items = torch.tensor([0, 1, 0, 0, 1]), torch.tensor([1, 2, 3, 4, 5])
    torch.manual_seed(0)
    model = TwoTowerModel(
        cfg,
        users,
        items,
        {"user_id": torch.tensor([1, 2, 0])},
        {"item_id": torch.arange(6)},
        history=history_csr(log_users, log_items, 3),
    )
    batch = {"user_idx": log_users, "item_idx": log_items, "history_end": history_positions(log_users, 3)}
    with pytest.raises(KeyError, match="history_end"):
        model.compute_loss({"user_idx": log_users, "item_idx": log_items})
    loss = model.compute_loss(batch)
    served = model.user_embeddings(torch.tensor([0]))
    # The user's last event (item 4) is nobody's history in training: changing it changes no query ...
    model.history.items[2] = 0
    assert model.compute_loss(batch).item() == pytest.approx(loss.item(), rel=1e-6)
    # ... but scoring uses the whole history.
    assert not torch.allclose(model.user_embeddings(torch.tensor([0])), served)


def _history_model(pooling="mean"):
    from twotower.history import history_csr

    cfg = ModelConfig.model_validate(
        {
            "user_tower": {"embedding_dim": 4, "layers": [8]},
            "item_tower": {"embedding_dim": 8, "layers": [8]},
            "history": {"enabled": True, "max_len": 2, "pooling": pooling, "dropout": 0.0},
        }
    )
    torch.manual_seed(0)
    return TwoTowerModel(
        cfg,
        [FieldInfo("user_id", "categorical", 4, None)],
        [FieldInfo("item_id", "categorical", 7, None)],
        {"user_id": torch.tensor([1, 2, 3, 0])},
        {"item_id": torch.arange(1, 7)},
        history=history_csr(torch.tensor([0, 1, 0, 0, 1, 2]), torch.tensor([1, 2, 3, 4, 5, 0]), 4),
    ).eval()


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_an_empty_request_gets_empty_answers_with_a_shared_history(pooling):
    # The shared item embedding was reshaped with view(B, L, -1): ambiguous for B = 0, so a request
    # for no users crashed instead of answering with no rows.
    model, none = _history_model(pooling), torch.tensor([], dtype=torch.long)
    assert model.user_embeddings(none).shape == (0, 8)
    ids, scores = model.recommend(none, k=3)
    assert ids.shape == (0, 3) and scores.shape == (0, 3)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_a_model_off_the_cpu_embeds_every_user_from_cpu_indices(pooling):
    # "meta" stands in for a GPU: user_embeddings() (e.g. a hard-negative refresh during GPU training)
    # builds torch.arange on the CPU, which crashed inside the history encoder.
    model = _history_model(pooling).to("meta")
    assert model.user_embeddings().device.type == "meta"
    end, exclude = torch.tensor([1, 0]), torch.tensor([1, 2])
    assert model.encode_users(torch.tensor([0, 1]), end, exclude).shape == (2, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_model_scores_as_on_the_cpu_from_cpu_indices():
    from twotower.query_tower import QueryTower

    model = _history_model("attention")
    users = [FieldInfo("user_id", "categorical", 4, None)]
    want = model.recommend(torch.arange(4), k=3)
    query = QueryTower.from_model(model, users)
    recent = [torch.tensor([3]), torch.tensor([], dtype=torch.long), torch.tensor([4, 5]), torch.tensor([0])]
    want_query = query.known(torch.arange(4), recent)
    got = model.cuda().recommend(torch.arange(4), k=3)
    torch.testing.assert_close(got[1].cpu(), want[1])
    assert torch.equal(got[0].cpu(), want[0])
    torch.testing.assert_close(query.cuda().known(torch.arange(4), recent).cpu(), want_query)
