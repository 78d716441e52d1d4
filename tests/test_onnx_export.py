"""ONNX export of the query tower: onnxruntime reproduces the PyTorch QueryTower within the module's
tolerance (1e-4) at batch sizes 1 and 7 (a dynamic batch axis), without and with history inputs
(actions included); the example inputs are stored users with their real events; an export whose check
fails is refused and leaves no file; a missing onnxruntime is explained.
"""

import sys

import numpy as np
import pytest
import torch

from twotower.features import FieldInfo
from twotower.history import history_csr
from twotower.onnx_export import export_onnx, onnx_inputs
from twotower.query_tower import QueryTower
from twotower.retrieval import ModelConfig, TwoTowerModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOLERANCE = 1e-4  # export_onnx's default
USER_FIELDS = [
    FieldInfo("user_id", "categorical", 6, None),
    FieldInfo("tags", "multi_hot", 5, None),
    FieldInfo("age", "numeric", 0, None),
]
USER_TABLE = {
    "user_id": torch.arange(1, 6),
    "tags": torch.tensor([[2, 3], [3, 0], [0, 0], [2, 0], [4, 2]]),
    "age": torch.tensor([-1.5, -0.5, 0.0, 0.5, 1.5]),
}
ITEM_FIELDS = [FieldInfo("item_id", "categorical", 8, None), FieldInfo("price", "numeric", 0, None)]
ITEM_TABLE = {"item_id": torch.arange(1, 8), "price": torch.linspace(-1, 1, 7)}
# User 1's events 5, 4, 6, 2 (more than max_len = 3) with actions 1, 1, 2, 1; user 4 has none.
LOG_USERS = torch.tensor([1, 0, 1, 1, 2, 3, 3, 0, 2, 1])
LOG_ITEMS = torch.tensor([5, 3, 4, 6, 2, 0, 1, 1, 5, 2])
LOG_ACTIONS = torch.tensor([1, 2, 1, 2, 1, 2, 1, 1, 2, 1])
FEATURE_NAMES = ["feature_user_id", "feature_tags", "feature_age"]
NAMES = {
    "plain": FEATURE_NAMES,
    "history": [*FEATURE_NAMES, "history_ids", "history_valid", "history_recency", "history_actions"],
}


def _query(with_history: bool) -> QueryTower:
    raw = {
        "temperature": 0.1,
        "user_tower": {"embedding_dim": 4, "layers": [8, 6]},
        "item_tower": {"embedding_dim": 4, "layers": [8, 6]},
    }
    history = None
    if with_history:  # mean pooling over an own table, with per-event actions
        raw["history"] = {"enabled": True, "max_len": 3, "item_feature": None, "embedding_dim": 3}
        history = history_csr(LOG_USERS, LOG_ITEMS, 5, LOG_ACTIONS)
    torch.manual_seed(0)
    model = TwoTowerModel(
        ModelConfig.model_validate(raw), USER_FIELDS, ITEM_FIELDS, USER_TABLE, ITEM_TABLE, history=history
    )
    return QueryTower.from_model(model.eval(), USER_FIELDS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{name: (query tower, path, report)}``: each model exported once for the module."""
    out = {}
    for name in NAMES:
        query = _query(name == "history")
        path = tmp_path_factory.mktemp(name) / "query_tower.onnx"
        out[name] = (query, path, export_onnx(query, path))
    return out


def _run(path, names, inputs) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["query_embedding"], {n: t.numpy() for n, t in zip(names, inputs, strict=True)})[0]


@pytest.mark.parametrize("name", list(NAMES))
def test_the_report_names_the_inputs_in_field_order_and_a_diff_within_tolerance(exported, name):
    _, path, report = exported[name]
    assert report["inputs"] == NAMES[name]
    assert 0 <= report["max_abs_diff"] <= TOLERANCE
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert report["opset"] == model.opset_import[0].version
    assert [i.name for i in model.graph.input] == NAMES[name]
    assert [o.name for o in model.graph.output] == ["query_embedding"]


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("name", list(NAMES))
def test_onnxruntime_matches_the_pytorch_query_tower_at_any_batch_size(exported, name, batch):
    query, path, report = exported[name]
    names, inputs = onnx_inputs(query, batch=batch, seed=11)
    got = _run(path, report["inputs"], inputs)
    with torch.no_grad():
        want = query(*inputs).numpy()
    assert got.shape == want.shape == (batch, 6)
    assert float(np.abs(got - want).max()) <= TOLERANCE
    assert names == report["inputs"]


@pytest.mark.parametrize("name", list(NAMES))
def test_every_input_has_a_symbolic_batch_axis(exported, name):
    _, path, _ = exported[name]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert all(isinstance(shape[0], str) for shape in shapes.values())
    assert shapes["feature_user_id"][1:] == [] and isinstance(shapes["feature_tags"][1], str)
    if name == "history":
        assert all(shapes[n][1:] == [3] for n in NAMES["history"][3:])  # max_len event slots


@pytest.mark.parametrize("width", [1, 3, 5])
@pytest.mark.parametrize("name", list(NAMES))
def test_multi_hot_rows_of_any_width_match_pytorch(exported, name, width):
    """The encoder makes a multi-hot row as wide as its tokens (no max_len): a cold-start user with
    more tags than any stored one (the stored table is 2 wide) must be answered as PyTorch answers."""
    query, path, report = exported[name]
    inputs = list(onnx_inputs(query, batch=3, seed=5)[1])
    inputs[1] = torch.tensor([[2, 3, 4, 1, 2], [3, 0, 0, 0, 0], [0, 0, 0, 0, 0]])[:, :width]
    with torch.no_grad():
        want = query(*inputs).numpy()
    assert float(np.abs(_run(path, report["inputs"], inputs) - want).max()) <= TOLERANCE


def test_a_one_token_wide_multi_hot_table_still_exports_a_dynamic_token_axis(tmp_path):
    query = _query(with_history=False)
    query.user__tags = query.user__tags[:, :1].clone()
    report = export_onnx(query, tmp_path / "q.onnx")
    inputs = list(onnx_inputs(query, batch=2, seed=0)[1])
    inputs[1] = torch.tensor([[2, 3, 4], [1, 0, 0]])
    with torch.no_grad():
        want = query(*inputs).numpy()
    assert float(np.abs(_run(tmp_path / "q.onnx", report["inputs"], inputs) - want).max()) <= TOLERANCE


def test_example_inputs_are_stored_users_with_their_real_events(exported):
    query, _, _ = exported["history"]
    names, inputs = onnx_inputs(query, batch=16, seed=3)
    assert names == NAMES["history"]
    user_id, tags, age, ids, valid, recency, actions = inputs
    assert valid.dtype == torch.bool and ids.dtype == recency.dtype == actions.dtype == torch.long
    # user_id row u + 1 is user u; its events are the last max_len of its stored history, oldest first.
    for row, user in enumerate((user_id - 1).tolist()):
        assert torch.equal(tags[row], query.user__tags[user]) and age[row] == query.user__age[user]
        items, acts = query.stored_events(user)
        n = min(len(items), 3)
        assert valid[row].tolist() == [True] * n + [False] * (3 - n)
        assert ids[row, :n].tolist() == items[-3:].tolist()
        assert actions[row, :n].tolist() == acts[-3:].tolist()
        assert recency[row, :n].tolist() == list(range(n - 1, -1, -1))
    torch.testing.assert_close(query(*inputs), query.known(user_id - 1), rtol=0, atol=1e-6)
    again = onnx_inputs(query, batch=16, seed=3)[1]
    assert all(torch.equal(a, b) for a, b in zip(inputs, again, strict=True))  # the seed fixes the batch


class _Shifted(ort.InferenceSession):
    """An onnxruntime session whose outputs are moved by ``shift``: a graph that disagrees with PyTorch."""

    shift = 0.0

    def run(self, *args, **kwargs):
        return [out + np.float32(self.shift) for out in super().run(*args, **kwargs)]


@pytest.mark.parametrize("shift", [1e-3, float("nan")])
def test_an_export_that_disagrees_with_pytorch_is_refused_and_leaves_no_file(tmp_path, monkeypatch, shift):
    monkeypatch.setattr(_Shifted, "shift", shift)
    monkeypatch.setattr(ort, "InferenceSession", _Shifted)
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export_onnx(_query(with_history=False), tmp_path / "query_tower.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_bf16_query_tower_is_refused_with_the_setting_named(tmp_path):
    query = _query(with_history=False)
    query.user_tower.config = query.user_tower.config.model_copy(update={"precision": "bf16"})
    with pytest.raises(ValueError, match="user_tower.precision 'bf16'"):
        export_onnx(query, tmp_path / "query_tower.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_onnxruntime_is_explained_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install twotower\[onnx\]"):
        export_onnx(_query(with_history=False), tmp_path / "query_tower.onnx")
    assert list(tmp_path.iterdir()) == []
