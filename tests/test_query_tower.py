"""QueryTower: the user side of a trained two-tower on its own.

Pinned: a known user's query embedding is bit-for-bit the trained model's (no history, mean pooling over
the item tower's shared id embedding, an own table with actions, self-attention); the weights and tables
it carries survive a rebuild from its state alone and contain nothing of the item tower; the three ways
in (known users with optional recent events, cold start from encoded features, the flat tensor form)
give hand-computed embeddings on a model with hand-set weights and agree with each other on a trained
one; and the errors for a state that does not fit and for events missing their actions.
"""

import pandas as pd
import pytest
import torch

from twotower.features import FeatureEncoder, FieldInfo
from twotower.history import history_csr, history_positions
from twotower.query_tower import QueryTower
from twotower.retrieval import ModelConfig, TwoTowerModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Five users with every user feature kind: id, categorical, multi-hot and numeric.
USER_FRAME = pd.DataFrame(
    {
        "user_id": ["u0", "u1", "u2", "u3", "u4"],
        "segment": ["a", "b", "a", "b", "a"],
        "tags": ["x|y", "y", "", "x", "z|x"],
        "age": [20.0, 30.0, 40.0, 50.0, 60.0],
    }
)
USER_SPECS = [
    {"type": "id", "name": "user_id"},
    {"type": "categorical", "name": "segment"},
    {"type": "multi_hot", "name": "tags"},
    {"type": "numeric", "name": "age"},
]
ITEM_FIELDS = [FieldInfo("item_id", "categorical", 8, None), FieldInfo("price", "numeric", 0, None)]
ITEM_TABLE = {"item_id": torch.arange(1, 8), "price": torch.linspace(-1, 1, 7)}  # item i has id row i + 1
# The training log, in time order. User 1: items 5, 4, 6, 2 (more than max_len = 3); user 4: none.
LOG_USERS = torch.tensor([1, 0, 1, 1, 2, 3, 3, 0, 2, 1])
LOG_ITEMS = torch.tensor([5, 3, 4, 6, 2, 0, 1, 1, 5, 2])
LOG_ACTIONS = torch.tensor([1, 2, 1, 2, 1, 2, 1, 1, 2, 1])
ALL_USERS = torch.arange(5)

HISTORIES = {
    "plain": None,
    "mean_shared": {"pooling": "mean"},
    "mean_own_table_actions": {"pooling": "mean", "item_feature": None, "embedding_dim": 3},
    "attention_shared": {"pooling": "attention"},
}
WITH_HISTORY = [name for name, history in HISTORIES.items() if history is not None]


def _user_encoder() -> FeatureEncoder:
    return FeatureEncoder(USER_SPECS).fit(USER_FRAME)


def _trained_model(history: dict | None, encoder: FeatureEncoder) -> TwoTowerModel:
    raw = {
        "similarity": "cosine",
        "temperature": 0.1,
        "user_tower": {"embedding_dim": 4, "layers": [8, 6]},
        "item_tower": {"embedding_dim": 4, "layers": [8, 6]},
    }
    if history is not None:
        raw["history"] = {"enabled": True, "max_len": 3, "num_layers": 1, **history}
    actions = LOG_ACTIONS if history is not None and history.get("item_feature", "item_id") is None else None
    torch.manual_seed(0)
    model = TwoTowerModel(
        ModelConfig.model_validate(raw),
        encoder.fields(),
        ITEM_FIELDS,
        encoder.transform(USER_FRAME),
        ITEM_TABLE,
        history=history_csr(LOG_USERS, LOG_ITEMS, 5, actions) if history is not None else None,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    batch = {"user_idx": LOG_USERS, "item_idx": LOG_ITEMS, "history_end": history_positions(LOG_USERS, 5)}
    model.train()  # dropout of the attention layers is active while training
    for _ in range(8):
        optimizer.zero_grad()
        model.compute_loss(batch).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    """``{name: (model, query tower)}``, trained once for the module."""
    encoder = _user_encoder()
    out = {}
    for name, history in HISTORIES.items():
        model = _trained_model(history, encoder)
        out[name] = (model, QueryTower.from_model(model, encoder.fields()))
    return out


def _hand_model() -> TwoTowerModel:
    """Dot similarity, no MLP: the query is [user id vector (1 dim), mean of the history (2 dims)].

    User u (id row u + 1) has id vector [100 (u + 1) + 1]; the OOV row 0 is [1]. Item i (id row i + 1)
    has the item tower's id vector [i + 1, 10 (i + 1)], which the history shares. max_len = 3.
    """
    config = ModelConfig.model_validate(
        {
            "similarity": "dot",
            "user_tower": {"embedding_dim": 1},
            "item_tower": {"embedding_dim": 2},
            "history": {"enabled": True, "max_len": 3},
        }
    )
    model = TwoTowerModel(
        config,
        [FieldInfo("user_id", "categorical", 6, None)],
        ITEM_FIELDS,
        {"user_id": torch.arange(1, 6)},
        ITEM_TABLE,
        history=history_csr(torch.tensor([1, 0, 1, 1]), torch.tensor([5, 3, 4, 6]), 5),  # user 1: 5, 4, 6
    )
    with torch.no_grad():
        model.user_tower.categorical["user_id"].weight.copy_(100 * torch.arange(6.0)[:, None] + 1)
        item_vectors = torch.arange(8.0)[:, None] * torch.tensor([1.0, 10.0])  # row j: [j, 10 j]
        model.item_tower.categorical["item_id"].weight.copy_(item_vectors)
    return model.eval()


@pytest.fixture(scope="module")
def hand():
    model = _hand_model()
    return model, QueryTower.from_model(model, [FieldInfo("user_id", "categorical", 6, None)])


def _close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), rtol=0, atol=1e-5)


def _stored(query: QueryTower, users: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    events = [query.stored_events(u) for u in users.tolist()]
    actions = [a for _, a in events] if query.history.action_embedding is not None else None
    return [e for e, _ in events], actions


# --- the trained model's embeddings, bit for bit ------------------------------------------------------


@pytest.mark.parametrize("name", list(HISTORIES))
def test_known_users_get_the_trained_models_embeddings_bit_for_bit(trained, name):
    model, query = trained[name]
    assert torch.equal(query.known(ALL_USERS), model.user_embeddings(ALL_USERS))
    some = torch.tensor([4, 1, 1, 0])  # any order, repeats, a user without history
    assert torch.equal(query.known(some), model.user_embeddings(some))
    assert not query.training and query.output_dim == 6 and query.num_users == 5


@pytest.mark.parametrize("name", list(HISTORIES))
def test_a_query_tower_rebuilt_from_its_state_alone_is_identical(trained, name):
    """The export path: empty modules of the right shapes, then the saved tables and weights."""
    model, query = trained[name]
    history = query.history
    rebuilt = QueryTower(
        model.config,
        _user_encoder().fields(),
        num_users=5,
        num_items=7,
        history_dim=history.dim if history is not None else None,
        history_actions=history.action_embedding.num_embeddings
        if history is not None and history.action_embedding is not None
        else None,
    )
    rebuilt.load_state({k: v.clone() for k, v in query.state_dict().items()})
    assert torch.equal(rebuilt.known(ALL_USERS), model.user_embeddings(ALL_USERS))
    assert rebuilt.user__tags.shape == (5, 2)  # the (num_users, 1) placeholder took the saved width


@pytest.mark.parametrize("name", list(HISTORIES))
def test_the_query_tower_carries_nothing_of_the_item_tower(trained, name):
    model, query = trained[name]
    keys = set(query.state_dict())
    assert not any(k.startswith(("item_tower.", "item__", "task.")) for k in keys)
    expected_users = {"user__user_id", "user__segment", "user__tags", "user__age"}
    assert {k for k in keys if k.startswith("user__")} == expected_users
    assert all(k.startswith(("user_tower.", "history.", "user__")) for k in keys)
    assert (query.history is None) == (name == "plain")


@pytest.mark.parametrize("name", ["mean_shared", "attention_shared"])
def test_a_shared_history_table_is_the_item_towers_id_vectors_precomputed(trained, name):
    model, query = trained[name]
    assert model.history.item_embedding is None  # training looks events up through the item tower
    # Row i is the item tower's vector of catalogue item i, i.e. of id row i + 1.
    expected = model.item_tower.categorical["item_id"].weight[torch.arange(1, 8)]
    assert torch.equal(query.history.item_embedding.weight, expected)
    # A copy, not a view: the item tower may change (or not ship) without changing the query tower.
    before = query.known(ALL_USERS)
    saved = model.item_tower.categorical["item_id"].weight.detach().clone()
    with torch.no_grad():
        model.item_tower.categorical["item_id"].weight.zero_()
    try:
        assert torch.equal(query.known(ALL_USERS), before)
    finally:
        with torch.no_grad():
            model.item_tower.categorical["item_id"].weight.copy_(saved)


def test_an_own_history_table_and_the_action_table_are_the_models(trained):
    model, query = trained["mean_own_table_actions"]
    assert torch.equal(query.history.item_embedding.weight, model.history.item_embedding.weight)
    assert torch.equal(query.history.action_embedding.weight, model.history.action_embedding.weight)
    assert query.history.action_embedding.num_embeddings == 3  # actions 0, 1, 2
    items, actions = query.stored_events(1)
    assert items.tolist() == [5, 4, 6, 2] and actions.tolist() == [1, 1, 2, 1]  # chronological


# --- the ways in, by hand -----------------------------------------------------------------------------


def test_known_users_by_hand_id_vector_then_mean_of_their_events(hand):
    model, query = hand
    # User 1 (id row 2): events 5, 4, 6 -> [6, 60], [5, 50], [7, 70]; user 0: event 3 -> [4, 40];
    # user 3 has no history: the zero vector.
    expected = [[201.0, 6.0, 60.0], [101.0, 4.0, 40.0], [401.0, 0.0, 0.0]]
    _close(query.known(torch.tensor([1, 0, 3])), expected)
    assert torch.equal(query.known(torch.tensor([1, 0, 3])), model.user_embeddings(torch.tensor([1, 0, 3])))


def test_recent_events_are_appended_and_only_the_last_max_len_count(hand):
    _, query = hand
    # User 1's 5, 4, 6 then 0 -> the last three 4, 6, 0: [5, 50], [7, 70], [1, 10]; user 0 gets nothing new.
    out = query.known(torch.tensor([1, 0]), [torch.tensor([0]), torch.tensor([], dtype=torch.long)])
    _close(out, [[201.0, 13 / 3, 130 / 3], [101.0, 4.0, 40.0]])
    # Only empty extras: the training-time path, unchanged.
    nothing = [torch.tensor([], dtype=torch.long)] * 2
    assert torch.equal(query.known(torch.tensor([1, 0]), nothing), query.known(torch.tensor([1, 0])))


def test_cold_start_uses_the_oov_row_and_only_the_given_events(hand):
    _, query = hand
    unknown = {"user_id": torch.tensor([0, 0])}  # an id the encoder does not know maps to row 0: [1]
    _close(query.from_features(unknown), [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # Events 2, 2 -> [3, 30]; no stored history is mixed in.
    events = [torch.tensor([2, 2]), torch.tensor([], dtype=torch.long)]
    _close(query.from_features(unknown, events), [[1.0, 3.0, 30.0], [1.0, 0.0, 0.0]])
    # A catalogue user's features with events of our choosing ignore that user's stored history.
    _close(query.from_features({"user_id": torch.tensor([2])}, [torch.tensor([0])]), [[201.0, 1.0, 10.0]])


def test_the_flat_tensor_form_takes_fields_then_event_rows_by_hand(hand):
    _, query = hand
    ids = torch.tensor([[4, 6, 0], [2, 0, 0]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    recency = torch.tensor([[2, 1, 0], [0, 0, 0]])
    out = query(torch.tensor([2, 0]), ids, valid, recency)
    _close(out, [[201.0, 13 / 3, 130 / 3], [1.0, 3.0, 30.0]])


# --- the ways in agree on trained models --------------------------------------------------------------


@pytest.mark.parametrize("name", WITH_HISTORY)
def test_explicit_stored_events_reproduce_the_known_embedding(trained, name):
    _, query = trained[name]
    events, actions = _stored(query, ALL_USERS)
    explicit = query.from_features(query.stored_features(ALL_USERS), events, actions)
    torch.testing.assert_close(explicit, query.known(ALL_USERS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", WITH_HISTORY)
def test_known_with_recent_events_is_the_explicit_form_of_history_plus_events(trained, name):
    _, query = trained[name]
    users = torch.tensor([1, 4, 2])
    extra = [torch.tensor([3]), torch.tensor([0, 6]), torch.tensor([], dtype=torch.long)]
    extra_actions = [torch.tensor([2]), torch.tensor([1, 1]), torch.tensor([], dtype=torch.long)]
    has_actions = query.history.action_embedding is not None
    out = query.known(users, extra, extra_actions if has_actions else None)
    events, actions = _stored(query, users)
    sequences = [torch.cat([e, x]) for e, x in zip(events, extra, strict=True)]
    acts = [torch.cat([a, x]) for a, x in zip(actions, extra_actions, strict=True)] if has_actions else None
    assert torch.equal(out, query.from_features(query.stored_features(users), sequences, acts))
    plain = query.known(users)
    assert not torch.allclose(out[:2], plain[:2])  # the recent events are really used
    torch.testing.assert_close(out[2], plain[2], rtol=0, atol=1e-6)  # no recent events: as stored


def test_recent_actions_change_the_embedding_of_an_action_model(trained):
    _, query = trained["mean_own_table_actions"]
    users, extra = torch.tensor([0]), [torch.tensor([6])]
    one = query.known(users, extra, [torch.tensor([1])])
    two = query.known(users, extra, [torch.tensor([2])])
    assert not torch.allclose(one, two)


def test_recent_events_without_actions_take_action_zero_on_an_action_model(trained):
    """A request may send recent items without their actions: they count as action 0, as in
    from_features. (This crashed, or silently shifted the stored actions, before the fix.)"""
    _, query = trained["mean_own_table_actions"]
    users = torch.tensor([1, 0, 4])  # 4 stored events (more than max_len), 2, and none
    extra = [torch.tensor([2]), torch.tensor([3]), torch.tensor([5, 6])]
    out = query.known(users, extra)
    events, actions = _stored(query, users)
    sequences = [torch.cat([e, x]) for e, x in zip(events, extra, strict=True)]
    zeros = [torch.zeros(len(x), dtype=torch.long) for x in extra]
    acts = [torch.cat([a, z]) for a, z in zip(actions, zeros, strict=True)]
    assert torch.equal(out, query.from_features(query.stored_features(users), sequences, acts))


@pytest.mark.parametrize("name", list(HISTORIES))
def test_cold_start_from_raw_values_is_the_user_tower_on_oov_features_and_no_history(trained, name):
    model, query = trained[name]
    encoder = _user_encoder()
    features = encoder.transform_record({"user_id": "new-user", "segment": "b", "tags": "y|w", "age": 35.0})
    assert features["user_id"].tolist() == [0]  # an unknown id is out-of-vocabulary
    history = None if model.history is None else torch.zeros(1, model.history.dim)
    assert torch.equal(query.from_features(features), model.user_tower(features, history))


@pytest.mark.parametrize("name", list(HISTORIES))
def test_raw_values_of_a_catalogue_user_with_its_history_give_its_known_embedding(trained, name):
    _, query = trained[name]
    encoder = _user_encoder()
    features = encoder.transform_record(USER_FRAME.iloc[1].to_dict())
    events, actions = _stored(query, torch.tensor([1])) if query.history is not None else (None, None)
    out = query.from_features(features, events, actions)
    torch.testing.assert_close(out, query.known(torch.tensor([1])), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(HISTORIES))
def test_the_flat_tensor_form_equals_the_dict_form(trained, name):
    _, query = trained[name]
    users = torch.tensor([1, 4, 0])
    features = query.stored_features(users)
    inputs = [features[f.name] for f in query.user_fields]
    if query.history is None:
        assert torch.equal(query(*inputs), query.known(users))
        return
    events, actions = _stored(query, users)
    ids, valid, recency, acts = query.history.event_rows(events, actions)
    flat = query(*inputs, ids, valid, recency, *([acts] if acts is not None else []))
    # Not bit-equal: the flat form runs with autograd on, so torch may take the transformer's slow path
    # where from_features (no_grad) takes the fused one; the two differ in the last float32 bits.
    torch.testing.assert_close(flat, query.from_features(features, events, actions), rtol=0, atol=1e-6)


# --- errors -------------------------------------------------------------------------------------------


def test_event_rows_without_actions_are_refused_by_an_action_model(trained):
    _, query = trained["mean_own_table_actions"]
    features = query.stored_features(torch.tensor([1]))
    ids, valid, recency, _ = query.history.event_rows([torch.tensor([5, 4])])
    with pytest.raises(ValueError, match="embeds actions"):
        query(*[features[f.name] for f in query.user_fields], ids, valid, recency)


def test_a_state_missing_a_weight_is_refused(trained):
    model, query = trained["plain"]
    state = {k: v for k, v in query.state_dict().items() if k != "user_tower.mlp.0.weight"}
    fresh = QueryTower(model.config, _user_encoder().fields(), 5, 7, None)
    with pytest.raises(RuntimeError, match="user_tower.mlp.0.weight"):
        fresh.load_state(state)
