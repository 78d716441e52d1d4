"""`twotower.recommender`: a saved run loaded as a `Retriever` answers in raw ids exactly what a brute-force
top-k over the loaded model's own embeddings gives (training items excluded), and `evaluate_run`
re-evaluates the saved model on the re-created split."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import train_small_run
from twotower.data.dataset import build_retrieval_data
from twotower.recommender import Retriever, UnknownUserError, evaluate_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_torch_thread):
    return train_small_run(tmp_path_factory.mktemp("recommender") / "run", world_seed=5)


@pytest.fixture(scope="module")
def retriever(run_dir):
    return Retriever.load(run_dir)


@pytest.fixture(scope="module")
def data(retriever):
    """The run's data re-built from its config: the training items of each user, independently of the
    pairs the run saved."""
    return build_retrieval_data(retriever.config)


def _items_by_user(data, part) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    users = data.user_ids[part.user_idx.numpy()].tolist()
    for user, item in zip(users, data.item_ids[part.item_idx.numpy()].tolist(), strict=True):
        out.setdefault(user, set()).add(item)
    return out


def _brute_force(retriever, users, k, seen=None):
    """Score every item as <user, item> / temperature, drop seen items, order by (score desc, index asc),
    keep k and map indices to raw ids; rows with fewer than k candidates are padded by (None, -inf)."""
    model = retriever.model
    pos = torch.as_tensor([retriever.user_ids.tolist().index(u) for u in users])
    with torch.no_grad():
        queries = model.user_embeddings(pos) / retriever.config.model.temperature
        scores = (queries @ model.item_embeddings().T).numpy()
    all_ids, all_scores = [], []
    for row, user in zip(scores, users, strict=True):
        excluded = seen.get(user, set()) if seen is not None else set()
        keep = [i for i in range(len(row)) if retriever.item_ids[i] not in excluded]
        order = sorted(keep, key=lambda i: (-row[i], i))[:k]
        pad = min(k, len(row)) - len(order)
        all_ids.append([retriever.item_ids[i].item() for i in order] + [None] * pad)
        all_scores.append([row[i] for i in order] + [-np.inf] * pad)
    return all_ids, np.asarray(all_scores, dtype=np.float32)


def test_catalogue_matches_the_runs_data(retriever, data):
    assert retriever.user_ids.tolist() == data.user_ids.tolist()
    assert retriever.item_ids.tolist() == data.item_ids.tolist()
    # the synthetic world's raw ids are 0..n-1, so in this run an id equals its catalogue index
    assert retriever.user_ids.tolist() == list(range(150))
    assert retriever.item_ids.tolist() == list(range(90))


def test_ids_are_translated_through_the_catalogue_both_ways(retriever):
    # the same model under other raw ids: user index u is called 1000 + 10 u, item index i "sku-<89 - i>"
    item_ids = np.array([f"sku-{89 - i:02d}" for i in range(90)])
    renamed = dataclasses.replace(retriever, user_ids=1000 + 10 * np.arange(150), item_ids=item_ids)
    ids, scores = renamed.recommend([1420, 1000], k=5)
    base_ids, base_scores = retriever.recommend([42, 0], k=5)
    assert ids.tolist() == [[f"sku-{89 - i:02d}" for i in row] for row in base_ids.tolist()]
    assert np.array_equal(scores, base_scores)
    with pytest.raises(UnknownUserError, match="42"):
        renamed.recommend([42])


def test_recommendations_are_the_brute_force_top_k_of_unseen_items(retriever, data):
    users = retriever.user_ids.tolist()
    train = _items_by_user(data, data.train)
    ids, scores = retriever.recommend(users, k=10)
    expected_ids, expected_scores = _brute_force(retriever, users, 10, seen=train)
    assert ids.tolist() == expected_ids
    torch.testing.assert_close(torch.from_numpy(scores), torch.from_numpy(expected_scores))
    assert np.all(np.diff(scores, axis=1) <= 0)
    for user, row in zip(users, ids.tolist(), strict=True):
        assert not set(row) & train[user]
    # only TRAINING items are excluded: held-out test items do come back (this run's recall@10 ~ .6)
    test = _items_by_user(data, data.test)
    assert sum(bool(set(row) & test.get(u, set())) for u, row in zip(users, ids.tolist(), strict=True)) > 10


def test_without_exclusion_training_items_are_ranked_too(retriever, data):
    users = [0, 7, 42, 149]
    ids, scores = retriever.recommend(users, k=10, exclude_seen=False)
    expected_ids, expected_scores = _brute_force(retriever, users, 10)
    assert ids.tolist() == expected_ids
    torch.testing.assert_close(torch.from_numpy(scores), torch.from_numpy(expected_scores))
    train = _items_by_user(data, data.train)
    assert any(set(row) & train[u] for u, row in zip(users, ids.tolist(), strict=True))


def test_k_beyond_the_catalogue_returns_every_item_and_pads_the_excluded_ones(retriever, data):
    users = [3, 77]
    every, _ = retriever.recommend(users, k=1000, exclude_seen=False)
    assert every.shape == (2, 90)
    assert all(sorted(row) == retriever.item_ids.tolist() for row in every.tolist())

    ids, scores = retriever.recommend(users, k=1000)
    train = _items_by_user(data, data.train)
    assert ids.shape == scores.shape == (2, 90)
    for user, row, score in zip(users, ids.tolist(), scores, strict=True):
        n_free = 90 - len(train[user])
        assert set(row[:n_free]) == set(retriever.item_ids.tolist()) - train[user]
        assert row[n_free:] == [None] * len(train[user]) and np.all(np.isneginf(score[n_free:]))
        assert np.all(np.isfinite(score[:n_free]))
    expected_ids, expected_scores = _brute_force(retriever, users, 1000, seen=train)
    assert ids.tolist() == expected_ids
    torch.testing.assert_close(torch.from_numpy(scores), torch.from_numpy(expected_scores))


def test_outputs_are_raw_id_and_float32_score_arrays_of_users_by_k(retriever):
    ids, scores = retriever.recommend([5, 6, 7], k=4)
    assert ids.shape == scores.shape == (3, 4)
    assert scores.dtype == np.float32
    assert ids.dtype == object  # raw ids of any type, None for an empty slot
    assert all(type(i) is int and i in set(retriever.item_ids.tolist()) for i in ids.ravel())


def test_rows_follow_the_requested_users_in_order_and_string_ids_are_cast(retriever):
    ids, scores = retriever.recommend([0, 42], k=5)
    back_ids, back_scores = retriever.recommend(np.array([42, 0]), k=5)
    assert back_ids.tolist() == ids[::-1].tolist() and np.array_equal(back_scores, scores[::-1])
    typed_ids, typed_scores = retriever.recommend(["0", "42"], k=5)  # as typed on a command line
    assert typed_ids.tolist() == ids.tolist() and np.array_equal(typed_scores, scores)
    assert retriever.user_index(["42", "0"]).tolist() == [42, 0]
    assert retriever.user_index([149]).dtype == torch.long


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_no_users_give_empty_arrays_of_zero_rows(retriever, exclude_seen):
    ids, scores = retriever.recommend([], k=4, exclude_seen=exclude_seen)
    assert ids.shape == scores.shape == (0, 4) and ids.dtype == object and scores.dtype == np.float32
    ids, scores = retriever.recommend(np.array([], dtype=np.int64), k=1000, exclude_seen=exclude_seen)
    assert ids.shape == scores.shape == (0, 90)


def test_unknown_users_raise_an_error_naming_only_them(retriever):
    with pytest.raises(UnknownUserError) as info:
        retriever.recommend([0, 99999, 5], k=3)
    assert info.value.args[0] == "unknown user id(s): 99999"
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownUserError) as info:
        retriever.recommend(["12", "-1"], k=3)  # "12" is cast to the known user 12
    assert info.value.args[0] == "unknown user id(s): -1"
    with pytest.raises(UnknownUserError, match="nobody"):
        retriever.recommend(["nobody"], k=3)
    # each id is matched on its own: a known "12" beside an unconvertible one is not reported
    with pytest.raises(UnknownUserError) as info:
        retriever.recommend(["nobody", "12", "-1"], k=3)
    assert info.value.args[0] == "unknown user id(s): nobody, -1"
    # nothing looser than int <-> str: no rounding, no bool as int, no zero-padded twin
    for near_miss in (3.5, True, "007"):
        with pytest.raises(UnknownUserError):
            retriever.recommend([near_miss], k=3)
    assert retriever.user_index([3.0, "7", np.int64(5)]).tolist() == [3, 7, 5]


def test_a_single_id_instead_of_a_list_of_ids_is_refused_not_split_into_characters(retriever):
    # "42" used to be read as the users "4" and "2" (two rows of someone else's recommendations).
    for single in ("42", b"42", 42, np.int64(42), np.array(42), np.array([[4, 2]])):
        with pytest.raises(TypeError, match=r"1-D sequence of user ids.*pass \[user_id\]"):
            retriever.recommend(single, k=3)
    ids, _ = retriever.recommend(["42"], k=3)
    assert ids.shape == (1, 3) and ids.tolist() == retriever.recommend([42], k=3)[0].tolist()
    assert retriever.user_index(u for u in (4, 2)).tolist() == [4, 2]  # any iterable of ids


def test_loading_twice_gives_identical_recommendations(run_dir, retriever):
    users = retriever.user_ids.tolist()
    first_ids, first_scores = Retriever.load(run_dir).recommend(users, k=10)
    second_ids, second_scores = Retriever.load(run_dir).recommend(users, k=10)
    assert first_ids.tolist() == second_ids.tolist()
    assert np.array_equal(first_scores, second_scores)


def test_loading_a_directory_without_a_model_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.json missing"):
        Retriever.load(tmp_path)


def test_titles_follow_raw_ids_and_unknown_ids_have_none(retriever, data):
    title = data.items.set_index("item_id")["title"]
    ids = [int(retriever.item_ids[5]), int(retriever.item_ids[0]), 123456]
    assert retriever.titles(np.array(ids)) == [title[ids[0]], title[ids[1]], None]
    assert title[ids[1]].startswith(f"Item {ids[1]} (")


def test_evaluate_run_reproduces_the_saved_metrics_and_writes_them(run_dir, caplog):
    saved = json.loads((run_dir / "metrics.json").read_text())
    with caplog.at_level("WARNING", logger="twotower.recommender"):
        again = evaluate_run(run_dir)
    assert not caplog.records  # the run's own split: nothing to warn about
    assert again["protocol"] == "temporal" and again["n_queries"] == saved["n_queries"] == 150
    for key in ("ndcg@10", "recall@10", "precision@10", "map@10", "mrr@10", "hit@10"):
        assert again[key] == pytest.approx(saved[key], abs=1e-9), key
    assert json.loads((run_dir / "metrics-temporal.json").read_text()) == pytest.approx(again)
    with caplog.at_level("WARNING", logger="twotower.recommender"):
        other = evaluate_run(run_dir, protocol="tfrs")
    assert other["protocol"] == "tfrs" and (run_dir / "metrics-tfrs.json").exists()
    # The tfrs test split is drawn afresh from every interaction, most of which the model trained on:
    # those numbers were printed as if held out.
    assert "trained on the temporal split" in caplog.text and "optimistic" in caplog.text


def test_evaluate_run_refuses_data_that_no_longer_matches_the_catalogue(run_dir, tmp_path):
    copy = shutil.copytree(run_dir, tmp_path / "run")
    meta = json.loads((copy / "model.json").read_text())
    meta["config"]["data"]["world"]["num_items"] = 80  # the data now has 80 items, the model 90
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no longer matches"):
        evaluate_run(copy)


def test_evaluate_run_refuses_data_whose_users_no_longer_match(run_dir, tmp_path):
    # Same 90 items, but a 140-user world: its user indices would be scored with the saved model's
    # embeddings of other users (it used to print metrics for them).
    copy = shutil.copytree(run_dir, tmp_path / "run")
    meta = json.loads((copy / "model.json").read_text())
    meta["config"]["data"]["world"]["num_users"] = 140
    (copy / "model.json").write_text(json.dumps(meta))
    (copy / "metrics-temporal.json").unlink(missing_ok=True)  # from an earlier evaluate_run
    with pytest.raises(ValueError, match="no longer matches.*user ids differ"):
        evaluate_run(copy)
    assert not (copy / "metrics-temporal.json").exists()
