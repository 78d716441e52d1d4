import pandas as pd
import pytest
import torch

from conftest import tiny_config
from twotower.config import parse_config
from twotower.data.dataset import build_retrieval_data, iterate_batches
from twotower.experiment import build_model, train_run
from twotower.history import HistoryConfig, HistoryEncoder, history_csr, history_positions
from twotower.recommender import Retriever

USERS = torch.tensor([1, 0, 1, 1, 2])
ITEMS = torch.tensor([5, 3, 4, 6, 2])  # user 1's events in time order: 5, 4, 6


def test_csr_and_positions_by_hand():
    indptr, items, actions = history_csr(USERS, ITEMS, num_users=4, actions=torch.tensor([1, 2, 3, 4, 5]))
    assert indptr.tolist() == [0, 1, 4, 5, 5] and items.tolist() == [3, 5, 4, 6, 2]
    assert actions.tolist() == [2, 1, 3, 4, 5]
    assert history_positions(USERS, 4).tolist() == [0, 0, 1, 2, 0]  # events before each row


def _encoder(pooling="mean", max_len=2, actions=None):
    cfg = HistoryConfig(enabled=True, pooling=pooling, max_len=max_len, item_feature=None, dropout=0.0)
    indptr, items, acts = history_csr(USERS, ITEMS, 4, actions)
    torch.manual_seed(0)
    enc = HistoryEncoder(cfg, indptr, items, acts, num_items=7, dim=2, own_table=True)
    with torch.no_grad():
        enc.item_embedding.weight.copy_(torch.arange(14.0).view(7, 2))  # e_i = [2i, 2i + 1]
    return enc.eval()


def test_mean_pooling_by_hand_with_end_exclude_and_max_len():
    enc = _encoder(max_len=2)
    out = enc(torch.tensor([1, 1, 1, 3, 0, 1]), end=torch.tensor([3, 1, 0, 0, 1, 2]))
    expected = torch.tensor(
        [
            [(8 + 12) / 2, (9 + 13) / 2],  # user 1, all 3 events, last 2 kept: mean(e4, e6)
            [10.0, 11.0],  # only the first event (5) precedes
            [0.0, 0.0],  # nothing before the first event
            [0.0, 0.0],  # user 3 has no history
            [6.0, 7.0],  # user 0: {3}
            [(10 + 8) / 2, (11 + 9) / 2],  # events 5 and 4
        ]
    )
    assert torch.allclose(out, expected)
    left_out = enc(torch.tensor([1]), exclude=torch.tensor([6]))
    # 6 excluded, then the last two of what is left (5, 4), as a served history without 6 would be
    assert torch.allclose(left_out, torch.tensor([[9.0, 10.0]]))
    assert torch.allclose(enc(torch.tensor([1]), exclude=torch.tensor([5])), torch.tensor([[8.0, 9.0]]) + 2)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_padding_does_not_change_the_output(pooling):
    short, long = _encoder(pooling, max_len=3), _encoder(pooling, max_len=40)
    if pooling == "attention":  # same weights; the long encoder's extra recency rows are padding-only
        state = short.state_dict()
        state["recency.weight"] = torch.cat([state["recency.weight"], long.recency.weight[3:].detach()])
        long.load_state_dict(state)
    users = torch.tensor([1, 0, 2, 3])
    assert torch.allclose(short(users), long(users), atol=1e-6)
    assert torch.all(short(torch.tensor([3])) == 0)  # an empty history is the zero vector, not NaN


def test_action_embeddings_are_added_per_event():
    enc = _encoder(
        max_len=5, actions=torch.tensor([1, 1, 2, 1, 1])
    )  # user 1's events 5, 4, 6: actions 1, 2, 1
    with torch.no_grad():
        enc.action_embedding.weight.copy_(torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]]))
    out = enc(torch.tensor([1]))
    expected = (
        torch.tensor([10.0, 11.0])
        + torch.tensor([8.0, 9.0])
        + torch.tensor([12.0, 13.0])
        + torch.tensor([200.0, 100.0])
    ) / 3
    assert torch.allclose(out, expected[None])


def test_training_history_never_holds_the_target_or_later_events():
    cfg = _history_config("mean")
    data = build_retrieval_data(cfg)
    model = build_model(cfg, data)
    stamps = data.raw.interactions.set_index(["user_id", "item_id"])["timestamp"]
    pairs = pd.MultiIndex.from_arrays(
        [data.user_ids[data.train.user_idx.numpy()], data.item_ids[data.train.item_idx.numpy()]]
    )
    times = torch.tensor(stamps.reindex(pairs).to_numpy())  # each training row's timestamp
    event_time = torch.empty_like(times)
    order = torch.sort(data.train.user_idx, stable=True).indices
    event_time[:] = times[order]  # the CSR's events in the same order as model.history.items
    for batch in iterate_batches(data.train, 256, seed=0, epoch=1):
        positions, valid, _ = model.history.padded(batch["user_idx"], batch["history_end"])
        row_time = times[_row_index(data, batch)]
        seen_items = model.history.items[positions]
        assert not bool((seen_items == batch["item_idx"][:, None])[valid].any())
        assert bool((event_time[positions][valid] <= row_time[:, None].expand_as(positions)[valid]).all())
        break


def _row_index(data, batch):
    key = data.train.user_idx * len(data.item_ids) + data.train.item_idx
    wanted = batch["user_idx"] * len(data.item_ids) + batch["item_idx"]
    sorter = torch.argsort(key)
    return sorter[torch.searchsorted(key[sorter], wanted)]


def _history_config(pooling, view="before"):
    raw = tiny_config(epochs=2).model_dump()
    raw["model"]["history"] = {
        "enabled": True,
        "pooling": pooling,
        "max_len": 20,
        "training_view": view,
        "action_column": "rating",
        "num_layers": 1,
    }
    return parse_config(raw)


@pytest.mark.parametrize(
    ("pooling", "view"), [("mean", "before"), ("attention", "before"), ("mean", "all_but_target")]
)
def test_history_models_train_save_and_serve(pooling, view, tmp_path):
    cfg = _history_config(pooling, view)
    data = build_retrieval_data(cfg)
    metrics = train_run(cfg, tmp_path, progress=False, data=data)
    assert metrics["recall@10"] > 0
    retriever = Retriever.load(tmp_path)
    # The history shares the item tower's id table: no second copy is saved.
    assert not any(k.startswith("history.item_embedding") for k in retriever.model.state_dict())
    assert retriever.model.user_embeddings().shape == (data.num_users, 16)


def test_history_errors_are_explained():
    raw = tiny_config().model_dump()
    raw["model"]["history"] = {"enabled": True, "item_feature": "genres"}
    with pytest.raises(ValueError, match="item_feature"):
        build_model(parse_config(raw), build_retrieval_data(parse_config(raw)))
    raw["model"]["history"] = {"enabled": True, "action_column": "stars"}
    with pytest.raises(ValueError, match="stars"):
        build_retrieval_data(parse_config(raw))


def test_positions_with_timestamps_count_only_strictly_earlier_events():
    # User 1's events at times 10, 20, 20, 30: the two events of second 20 are not before each other.
    users, times = torch.tensor([1, 0, 1, 1, 2, 1]), torch.tensor([10, 5, 20, 20, 7, 30])
    assert history_positions(users, 4).tolist() == [0, 0, 1, 2, 0, 3]  # log order alone
    assert history_positions(users, 4, times).tolist() == [0, 0, 1, 1, 0, 3]
    with pytest.raises(ValueError, match="timestamps"):
        history_positions(users, 4, times[:3])


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_an_event_at_or_after_the_end_never_changes_the_row(pooling):
    enc = _encoder(pooling, max_len=5)
    users, end = torch.tensor([1, 1, 1]), torch.tensor([0, 1, 2])  # user 1's events: 5, 4, 6
    before = enc(users, end=end)
    enc.items[enc.indptr[1] + 2] = 0  # rewrite the last event: no row sees it
    torch.testing.assert_close(enc(users, end=end), before)
    enc.items[enc.indptr[1] + 1] = 0  # rewrite the second: only the row with end 2 sees it
    after = enc(users, end=end)
    torch.testing.assert_close(after[:2], before[:2])
    assert not torch.allclose(after[2], before[2])


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_left_right_and_no_padding_give_one_result(pooling):
    enc = _encoder(pooling, max_len=6)
    seq = torch.tensor([5, 4, 6])
    ids, valid, recency, _ = enc.event_rows([seq])  # right padding, the stored layout
    left = (
        torch.tensor([[0, 0, 0, 5, 4, 6]]),
        torch.tensor([[False, False, False, True, True, True]]),
        torch.tensor([[0, 0, 0, 2, 1, 0]]),
    )
    unpadded = (seq[None], torch.ones(1, 3, dtype=torch.bool), torch.tensor([[2, 1, 0]]))
    with torch.no_grad():
        want = enc.encode(*unpadded)
        torch.testing.assert_close(enc.encode(ids, valid, recency), want)
        torch.testing.assert_close(enc.encode(*left), want)
        torch.testing.assert_close(enc(torch.tensor([1])), want)  # the stored history, same events


def test_a_history_longer_than_max_len_keeps_the_most_recent_events():
    enc = _encoder("attention", max_len=2)
    positions, valid, recency = enc.padded(torch.tensor([1]))  # user 1: 5, 4, 6
    assert enc.items[positions].tolist() == [[4, 6]] and recency.tolist() == [[1, 0]] and bool(valid.all())
    ids, _, rec, _ = enc.event_rows([torch.tensor([5, 4, 6])])
    assert ids.tolist() == [[4, 6]] and rec.tolist() == [[1, 0]]


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_empty_and_fully_excluded_histories_are_zero_with_finite_gradients(pooling):
    enc = _encoder(pooling, max_len=3).train()
    # user 3 has no events, user 0's only event (3) is excluded, user 1 keeps events: one batch.
    out = enc(torch.tensor([3, 0, 1]), exclude=torch.tensor([-1, 3, -1]))
    assert torch.all(out[:2] == 0) and bool(out[2].abs().sum() > 0)
    out.square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), name


def test_attention_dropout_is_off_in_eval_and_on_in_training():
    cfg = HistoryConfig(enabled=True, pooling="attention", max_len=3, item_feature=None, dropout=0.5)
    indptr, items, _ = history_csr(USERS, ITEMS, 4)
    torch.manual_seed(0)
    enc = HistoryEncoder(cfg, indptr, items, None, num_items=7, dim=4, own_table=True)
    users = torch.tensor([0, 1, 2])
    enc.eval()
    with_grad = enc(users)
    with torch.no_grad():  # the inference fast path computes the same thing
        torch.testing.assert_close(enc(users), with_grad)
        torch.testing.assert_close(enc(users), with_grad)
    enc.train()
    torch.manual_seed(1)
    assert not torch.allclose(enc(users), with_grad)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_a_model_off_the_cpu_takes_cpu_indices_and_builds_event_rows_on_its_device(pooling):
    # The "meta" device stands in for a GPU: indices from a CPU loader (or torch.arange) used to meet
    # the model's buffers in one elementwise op and crash, and event rows were built on the CPU.
    enc = _encoder(pooling, max_len=3).to("meta")
    out = enc(torch.tensor([1, 0, 3]), end=torch.tensor([2, 1, 0]), exclude=torch.tensor([5, 3, 0]))
    assert out.device.type == "meta" and out.shape == (3, 2)
    ids, valid, recency, acts = enc.event_rows([torch.tensor([5, 4]), torch.tensor([], dtype=torch.long)])
    assert {t.device.type for t in (ids, valid, recency)} == {"meta"} and acts is None
    assert enc.encode(ids, valid, recency).device.type == "meta"


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_a_left_out_target_gives_the_history_a_served_request_would_see(pooling):
    # User 1's events 5, 4, 6 with max_len 2: leaving out 4 must look exactly like serving the user
    # with history [5, 6] (window after the exclusion, recency 1, 0 with no gap).
    enc = _encoder(pooling, max_len=2)
    ids, valid, recency, _ = enc.event_rows([torch.tensor([5, 6])])
    served = enc.encode(ids, valid, recency)
    assert torch.allclose(enc(torch.tensor([1]), exclude=torch.tensor([4])), served, atol=1e-6)
    positions, valid, recency, ids = enc._without(torch.tensor([1, 1, 0]), None, torch.tensor([6, -1, 3]))
    assert ids[valid].tolist() == [5, 4, 4, 6] and recency.tolist() == [[1, 0], [1, 0], [0, 0]]
    assert valid.tolist() == [[True, True], [True, True], [False, False]]


def test_event_dropout_hides_events_in_training_only():
    cfg = HistoryConfig(enabled=True, max_len=3, item_feature=None, dropout=0.0, event_dropout=0.5)
    indptr, items, _ = history_csr(USERS, ITEMS, 4)
    enc = HistoryEncoder(cfg, indptr, items, None, num_items=7, dim=2, own_table=True)
    with torch.no_grad():
        enc.item_embedding.weight.copy_(torch.arange(14.0).view(7, 2))  # e_i = [2i, 2i + 1]
    users = torch.ones(2000, dtype=torch.long)  # user 1: events 5, 4, 6, mean [10, 11]
    enc.eval()
    assert torch.allclose(enc(users), torch.tensor([[10.0, 11.0]]).expand(2000, -1))
    enc.train()
    torch.manual_seed(0)
    out = enc(users)
    # Each of the 3 events is kept with probability 1/2: the 8 subsets are about equally frequent, and
    # the empty one gives the zero vector (1/8 of the rows).
    empty = (out == 0).all(1).float().mean().item()
    assert empty == pytest.approx(1 / 8, abs=0.03)
    only_4 = torch.isclose(out, torch.tensor([8.0, 9.0])).all(1).float().mean().item()
    assert only_4 == pytest.approx(1 / 8, abs=0.03)  # the subset {4}: e_4 = [8, 9] (no other subset's mean)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_a_target_repeated_in_the_history_is_left_out_and_older_events_fill_the_window(pooling):
    # User 0's events 1, 5, 2, 5 (item 5 twice), max_len 2: leaving out 5 keeps 1 and 2, as a served
    # history [1, 2] would be. The window read one slot past max_len held 5, 2, 5: only 2 was kept.
    cfg = HistoryConfig(enabled=True, pooling=pooling, max_len=2, item_feature=None, dropout=0.0)
    indptr, items, _ = history_csr(torch.tensor([0, 0, 0, 0, 1]), torch.tensor([1, 5, 2, 5, 3]), 2)
    torch.manual_seed(0)
    enc = HistoryEncoder(cfg, indptr, items, None, num_items=7, dim=2, own_table=True).eval()
    with torch.no_grad():
        enc.item_embedding.weight.copy_(torch.arange(14.0).view(7, 2))  # e_i = [2i, 2i + 1]
    positions, valid, recency, ids = enc._without(torch.tensor([0, 1]), None, torch.tensor([5, 5]))
    assert ids[valid].tolist() == [1, 2, 3] and recency.tolist() == [[1, 0], [0, 0]]
    assert valid.tolist() == [[True, True], [True, False]]
    out = enc(torch.tensor([0]), exclude=torch.tensor([5]))
    served = enc.encode(*enc.event_rows([torch.tensor([1, 2])])[:3])
    assert torch.allclose(out, served, atol=1e-6)
    if pooling == "mean":
        assert torch.allclose(out, torch.tensor([[(2 + 4) / 2, (3 + 5) / 2]]))  # mean(e1, e2)
