"""`twotower.data.dataset` on a hand-written log: the protocol split comes before any fitting (vocabularies
and numeric statistics from training data only), the catalogue holds every known user and item in
sorted order, and every catalogue entity gets exactly one encoded feature row."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from twotower.config import RunConfig
from twotower.data.dataset import RawData, build_retrieval_data, iterate_batches

# The interaction log, deliberately NOT in time order. Per user, by timestamp:
#   alice: 10@10, 11@20, 12@30, 13@40 -> train 10, 11; valid 12; test 13 (leave-last-out)
#   bob:   10@20, 11@50, 14@90        -> train 10; valid 11; test 14
#   carol: 10@35, 12@45               -> fewer than 3 events: all train
# Item 13 and 14 occur in test rows only. Weight w = ts / 10; stars is the rating.
LOG = """\
user,movie,ts,w,stars
bob,11,50,5.0,3.0
alice,10,10,1.0,4.2
alice,12,30,3.0,1.0
carol,10,35,3.5,3.6
alice,13,40,4.0,2.0
bob,10,20,2.0,0.9
alice,11,20,2.0,5.0
carol,12,45,4.5,2.4
bob,14,90,9.0,4.0
"""
# dave is known only from the user table, item 15 only from the item table (keyed "sku").
USERS = """\
user_id,age
alice,30
bob,20
carol,40
dave,90
"""
ITEMS = """\
sku,price,genre
10,1.0,drama
11,2.0,comedy
12,6.0,drama
13,100.0,horror
14,,comedy
15,50.0,scifi
"""
TRAIN_ROWS = [("alice", 10), ("bob", 10), ("alice", 11), ("carol", 10), ("carol", 12)]  # chronological


def _config(tmp_path: Path, protocol: str = "temporal", tables: bool = True, **extra) -> RunConfig:
    (tmp_path / "log.csv").write_text(LOG)
    data = {
        "source": "files",
        "interactions": str(tmp_path / "log.csv"),
        "columns": {"user": "user", "item": "movie", "timestamp": "ts", "weight": "w", "rating": "stars"},
    }
    features = {"user": [{"type": "id", "name": "user_id"}], "item": [{"type": "id", "name": "item_id"}]}
    if tables:
        (tmp_path / "users.csv").write_text(USERS)
        (tmp_path / "items.csv").write_text(ITEMS)
        data |= {"users": str(tmp_path / "users.csv"), "items": str(tmp_path / "items.csv")}
        data["item_key"] = "sku"
        features["user"].append({"type": "numeric", "name": "age"})
        features["item"] += [{"type": "numeric", "name": "price"}, {"type": "categorical", "name": "genre"}]
    raw = {"data": data, "features": features, "eval": {"protocol": protocol}, **extra}
    return RunConfig.model_validate(raw)


def _pairs(data, part) -> list[tuple[str, int]]:
    users = data.user_ids[part.user_idx.numpy()].tolist()
    items = data.item_ids[part.item_idx.numpy()].tolist()
    return list(zip(users, items, strict=True))


@pytest.fixture
def data(tmp_path):
    return build_retrieval_data(_config(tmp_path))


def test_catalogue_holds_every_logged_or_tabled_entity_sorted(data):
    assert data.user_ids.tolist() == ["alice", "bob", "carol", "dave"]  # dave: user table only
    assert data.item_ids.tolist() == [10, 11, 12, 13, 14, 15]  # 15: item table only; 13, 14: test only
    assert (data.num_users, data.num_items) == (4, 6)


def test_every_catalogue_entity_has_one_encoded_feature_row(data):
    assert {k: len(v) for k, v in data.user_table.items()} == {"user_id": 4, "age": 4}
    assert {k: len(v) for k, v in data.item_table.items()} == {"item_id": 6, "price": 6, "genre": 6}


def test_temporal_split_leaves_each_users_last_event_out(data):
    assert _pairs(data, data.test) == [("alice", 13), ("bob", 14)]  # latest per user, input order
    assert _pairs(data, data.valid) == [("bob", 11), ("alice", 12)]  # second latest, input order
    assert _pairs(data, data.train) == TRAIN_ROWS  # carol (2 events) keeps both in train
    assert (len(data.train), len(data.valid), len(data.test)) == (5, 2, 2)


def test_each_users_test_period_starts_at_their_first_test_event(data):
    # alice's test event is at 40, bob's at 90; carol and dave have none (int64 max).
    never = torch.iinfo(torch.int64).max
    assert data.test_start.tolist() == [40, 90, never, never]


def test_training_rows_are_chronological_with_their_weights_and_history_positions(data):
    # ties (bob 10 and alice 11, both at ts 20) keep log order: bob's row comes first in the file
    assert data.train.weight.tolist() == [1.0, 2.0, 2.0, 3.5, 4.5]
    assert data.train.weight.dtype == torch.float32
    # each row's count of earlier training events of the same user
    assert data.train.history_end.tolist() == [0, 0, 1, 0, 1]
    assert data.valid.weight.tolist() == [5.0, 3.0] and data.test.weight.tolist() == [4.0, 9.0]


def test_events_of_the_same_second_are_not_in_each_others_training_history(tmp_path):
    # erin rates 1 at ts 5, then 3, 2 and 4 within one second (ts 9), then 5, 6 (valid) and 7 (test):
    # the tied events all see only item 1; by log order alone 3 would be in 2's history, 2 in 4's.
    log = "user,movie,ts\nerin,3,9\nerin,1,5\nerin,7,20\nerin,2,9\nerin,5,12\nerin,4,9\nerin,6,15\n"
    (tmp_path / "tied.csv").write_text(log)
    config = RunConfig.model_validate(
        {
            "data": {"source": "files", "interactions": str(tmp_path / "tied.csv"),
                     "columns": {"user": "user", "item": "movie", "timestamp": "ts"}},
            "eval": {"protocol": "temporal"},
        }
    )  # fmt: skip
    data = build_retrieval_data(config)
    rows = _pairs(data, data.train)
    assert rows == [("erin", 1), ("erin", 3), ("erin", 2), ("erin", 4), ("erin", 5)]  # stable by time
    assert data.train.history_end.tolist() == [0, 1, 1, 1, 4]


def test_id_vocabularies_come_from_training_rows_so_test_only_ids_are_oov(data):
    assert data.user_encoder.vocabulary("user_id") == ["alice", "bob", "carol"]
    assert data.item_encoder.vocabulary("item_id") == [10, 11, 12]
    # index = 1 + position in the vocabulary; 13 and 14 (test only) and 15 (table only) -> OOV 0
    assert data.item_table["item_id"].tolist() == [1, 2, 3, 0, 0, 0]
    assert data.item_table["item_id"][data.test.item_idx].tolist() == [0, 0]
    assert data.user_table["user_id"].tolist() == [1, 2, 3, 0]


def test_categorical_vocabulary_comes_from_items_seen_in_training(data):
    # training items 10, 11, 12 have genres drama, comedy, drama -> vocab [comedy, drama] = 1, 2;
    # horror (item 13, test only) and scifi (item 15, table only) are OOV
    assert data.item_encoder.vocabulary("genre") == ["comedy", "drama"]
    assert data.item_table["genre"].tolist() == [2, 1, 2, 0, 1, 0]


def test_numeric_statistics_come_from_training_entities_only(data):
    # One feature row per training item (10, 11, 12), not per interaction and not test/table-only items:
    # prices 1, 2, 6 -> mean 3, population variance (4 + 1 + 9) / 3 = 14/3.
    std = math.sqrt(14 / 3)
    state = data.item_encoder.to_dict()["state"]["price"]
    assert state == pytest.approx({"mean": 3.0, "std": std})
    # item 14 has no price: filled with the mean, so 0
    expected = [(1 - 3) / std, (2 - 3) / std, (6 - 3) / std, (100 - 3) / std, 0.0, (50 - 3) / std]
    assert data.item_table["price"].tolist() == pytest.approx(expected, rel=1e-6)
    # users alice, bob, carol aged 30, 20, 40 (dave's 90 is left out): mean 30, variance 200/3
    age = data.user_encoder.to_dict()["state"]["age"]
    assert age == pytest.approx({"mean": 30.0, "std": math.sqrt(200 / 3)})
    assert data.user_table["age"].dtype == torch.float32


def test_item_table_key_is_renamed_to_item_id(data):
    assert list(data.items.columns) == ["item_id", "price", "genre"]
    assert data.items["item_id"].tolist() == [10, 11, 12, 13, 14, 15]
    assert list(data.raw.interactions.columns) == ["user_id", "item_id", "timestamp", "rating", "weight"]


def test_without_tables_the_catalogue_is_the_logs_ids_sorted(tmp_path):
    data = build_retrieval_data(_config(tmp_path, tables=False))
    assert data.user_ids.tolist() == ["alice", "bob", "carol"]
    assert data.item_ids.tolist() == [10, 11, 12, 13, 14]
    assert data.items is None and data.raw.users is None


def test_random_protocol_holds_out_a_fifth_of_the_rows(tmp_path):
    data = build_retrieval_data(_config(tmp_path, "tfrs"))
    # 9 rows: round(0.2 * 9) = round(1.8) = 2 test rows, 7 train, no validation split
    assert (len(data.train), len(data.test), data.valid) == (7, 2, None)
    log = data.raw.interactions
    every = sorted(_pairs(data, data.train) + _pairs(data, data.test))
    assert every == sorted(zip(log["user_id"], log["item_id"], strict=True))
    train_items = sorted(set(data.item_ids[data.train.item_idx.numpy()].tolist()))
    assert data.item_encoder.vocabulary("item_id") == train_items


def test_stratified_protocol_keeps_three_quarters_of_each_item_rounded(tmp_path):
    data = build_retrieval_data(_config(tmp_path, "msrec"))
    # train rows per item = round(0.75 * count), half to even: item 10: 3 -> round(2.25) = 2,
    # items 11, 12: 2 -> round(1.5) = 2, items 13, 14: 1 -> round(0.75) = 1; so 8 train, 1 test (item 10)
    assert (len(data.train), len(data.test), data.valid) == (8, 1, None)
    assert data.item_ids[data.test.item_idx.numpy()].tolist() == [10]


def test_valid_fraction_splits_training_rows_only_when_the_protocol_has_no_validation(tmp_path):
    temporal = build_retrieval_data(_config(tmp_path, train={"valid_fraction": 0.5}))
    assert _pairs(temporal, temporal.valid) == [("bob", 11), ("alice", 12)]  # the protocol's own
    assert _pairs(temporal, temporal.train) == TRAIN_ROWS

    plain = build_retrieval_data(_config(tmp_path, "tfrs"))
    held = build_retrieval_data(_config(tmp_path, "tfrs", train={"valid_fraction": 0.5, "seed": 1}))
    assert held.valid is not None and len(held.valid) > 0
    assert sorted(_pairs(held, held.train) + _pairs(held, held.valid)) == sorted(_pairs(plain, plain.train))
    assert _pairs(held, held.test) == _pairs(plain, plain.test)
    # the id vocabulary is fitted after the hold-out: training rows only
    train_items = sorted(set(held.item_ids[held.train.item_idx.numpy()].tolist()))
    assert held.item_encoder.vocabulary("item_id") == train_items


def test_history_action_codes_are_the_rounded_ratings_of_training_rows(tmp_path):
    history = {"history": {"enabled": True, "action_column": "rating"}}
    data = build_retrieval_data(_config(tmp_path, tables=False, model=history))
    # chronological training rows' stars 4.2, 0.9, 5.0, 3.6, 2.4 rounded
    assert data.train.action.tolist() == [4, 1, 5, 4, 2]
    missing = {"history": {"enabled": True, "action_column": "clicks"}}
    with pytest.raises(ValueError, match="'clicks' is not a column"):
        build_retrieval_data(_config(tmp_path, tables=False, model=missing))


def test_negative_action_codes_are_rejected(tmp_path):
    config = _config(tmp_path, tables=False, model={"history": {"enabled": True, "action_column": "rating"}})
    log = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [5, 6, 5], "timestamp": [1, 2, 3]})
    log["rating"] = [1.0, -2.0, 3.0]
    with pytest.raises(ValueError, match="non-negative"):
        build_retrieval_data(config, raw=RawData(log, None, None))


IMPRESSIONS_LOG = """\
user_id,item_id,ts,clicked
alice,10,10,1
alice,11,20,1
alice,12,30,1
alice,20,5,0
alice,21,30,0
bob,10,15,1
bob,22,99,0
"""


def _impressions_data(tmp_path, log: str):
    """``log`` (CSV with a clicked column) under the temporal protocol."""
    (tmp_path / "log.csv").write_text(log)
    config = RunConfig.model_validate(
        {
            "data": {
                "source": "files",
                "interactions": str(tmp_path / "log.csv"),
                "columns": {"timestamp": "ts", "clicked": "clicked"},
            },
            "eval": {"protocol": "temporal"},
        }
    )
    return build_retrieval_data(config)


def test_unclicked_rows_are_impressions_kept_before_the_users_first_test_event(tmp_path):
    data = _impressions_data(tmp_path, IMPRESSIONS_LOG)
    assert list(data.raw.interactions.columns) == ["user_id", "item_id", "timestamp"]
    assert len(data.raw.interactions) == 4 and len(data.raw.impressions) == 3
    assert data.item_ids.tolist() == [10, 11, 12, 20, 21, 22]  # shown-only items are in the catalogue
    assert _pairs(data, data.test) == [("alice", 12)]  # alice's first (and only) test event is at ts 30
    # alice 20 @5 < 30 kept, alice 21 @30 not before 30 dropped; bob has no test event: 22 kept
    assert _pairs(data, data.impressions) == [("alice", 20), ("bob", 22)]
    assert data.item_encoder.vocabulary("item_id") == [10]  # alice 10 and bob 10 are the training rows


def test_impressions_stop_before_the_users_validation_event_under_the_temporal_protocol(tmp_path):
    # alice: 10 @10 trains, 11 @20 validates, 12 @30 tests. Her impression at 25 is after the validation
    # event: training on it would see the validation event's future (it was kept: only test cut).
    data = _impressions_data(tmp_path, IMPRESSIONS_LOG.replace("alice,21,30,0", "alice,21,25,0"))
    assert _pairs(data, data.valid) == [("alice", 11)] and _pairs(data, data.test) == [("alice", 12)]
    assert _pairs(data, data.impressions) == [("alice", 20), ("bob", 22)]


def test_batches_skip_a_single_leftover_row_and_drop_last_drops_the_partial_batch(data):
    def sizes(batch_size: int, drop_last: bool) -> list[int]:
        batches = iterate_batches(data.train, batch_size, seed=0, epoch=0, drop_last=drop_last)
        return [len(b["user_idx"]) for b in batches]

    # 5 rows: by 2 -> 2, 2 and a lone row (no in-batch negative: skipped); by 3 -> 3, 2 or, dropping, 3
    assert (sizes(2, False), sizes(2, True), sizes(3, False), sizes(3, True)) == ([2, 2], [2, 2], [3, 2], [3])
    rows = {pair: i for i, pair in enumerate(_pairs(data, data.train))}
    seen = []
    for batch in iterate_batches(data.train, 3, seed=0, epoch=0):
        columns = (batch[k].tolist() for k in ("user_idx", "item_idx", "weight", "history_end"))
        for u, it, w, h in zip(*columns, strict=True):
            i = rows[(data.user_ids[u], data.item_ids[it])]
            assert (w, h) == (data.train.weight[i].item(), data.train.history_end[i].item())
            seen.append(i)
    assert sorted(seen) == [0, 1, 2, 3, 4]  # every training row exactly once per epoch


def test_id_min_count_counts_training_interactions_not_distinct_ids(tmp_path):
    """Training rows: item 10 three times, 11 and 12 once; alice and carol twice, bob once. With
    min_count 2 only those reach the vocabulary; the rest share the OOV row. (Every id used to count
    once, so any min_count >= 2 sent every id to OOV.)"""
    raw = _config(tmp_path, tables=False).model_dump()
    for side in ("user", "item"):
        raw["features"][side][0]["min_count"] = 2
    data = build_retrieval_data(RunConfig.model_validate(raw))
    assert data.item_encoder.vocabulary("item_id") == [10]
    assert data.user_encoder.vocabulary("user_id") == ["alice", "carol"]
    assert data.item_table["item_id"].tolist() == [1, 0, 0, 0, 0]  # items 10..14
    assert data.user_table["user_id"].tolist() == [1, 0, 2]  # alice, bob, carol


def test_a_bad_feature_value_names_the_table_file_and_the_entity_id(tmp_path):
    config = _config(tmp_path)
    (tmp_path / "items.csv").write_text(ITEMS.replace("12,6.0,drama", "12,six,drama"))
    with pytest.raises(ValueError, match=r"items\.csv: feature 'price', column 'price', item_id 12: .*'six'"):
        build_retrieval_data(config)


def test_a_feature_named_after_the_files_id_column_says_ids_are_renamed(tmp_path):
    config = _config(tmp_path, tables=False)
    from twotower.features import IdFeature

    config.features.user = [IdFeature(name="user")]  # the file's column; the log's ids are renamed user_id
    with pytest.raises(
        ValueError, match=r"log\.csv: features 'user' \(column 'user'\).*always called user_id and item_id"
    ):
        build_retrieval_data(config)


def test_text_table_keys_and_numeric_log_ids_are_compared_as_text(tmp_path):
    # The item table's key "007" makes its ids text while the log's 10, 11 are numbers: they used to
    # fail to sort together (TypeError); now both are text, "10" is 10 and "007" stays its own item.
    (tmp_path / "log.csv").write_text("user,movie\na,10\na,11\nb,10\nb,11\nc,10\nc,11\n")
    (tmp_path / "items.csv").write_text("sku,genre\n007,x\n10,drama\n11,comedy\n")
    config = RunConfig.model_validate({
        "data": {"source": "files", "interactions": str(tmp_path / "log.csv"),
                 "items": str(tmp_path / "items.csv"), "item_key": "sku",
                 "columns": {"user": "user", "item": "movie"}},
        "features": {"item": [{"type": "id", "name": "item_id"}, {"type": "categorical", "name": "genre"}]},
        "eval": {"protocol": "tfrs"},
    })  # fmt: skip
    data = build_retrieval_data(config)
    assert data.item_ids.tolist() == ["007", "10", "11"]
    codes = data.item_table["genre"].tolist()
    assert codes[1] != codes[2] and 0 not in codes[1:]  # 10 and 11 got their own genres, not "missing"


@pytest.mark.parametrize("table_format", ["csv", "parquet"])
@pytest.mark.parametrize("log_format", ["csv", "parquet"])
def test_spaced_log_ids_join_the_item_table_in_csv_and_parquet_alike(tmp_path, log_format, table_format):
    # A log whose item ids carry spaces (" 7 ") joins a table keyed "7": the CSV reader always stripped
    # them, a Parquet string column used to keep them, so " 7 " and "7" became two items and the logged
    # ones lost their features.
    log = pd.DataFrame({"user": list("aabbcc"), "movie": [" 7 ", " 8 "] * 3})
    items = pd.DataFrame({"sku": ["7", "8"], "genre": ["drama", "comedy"]})
    for frame, name, fmt in ((log, "log", log_format), (items, "items", table_format)):
        path = tmp_path / f"{name}.{fmt}"
        frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path, index=False)
    config = RunConfig.model_validate({
        "data": {"source": "files", "interactions": str(tmp_path / f"log.{log_format}"),
                 "items": str(tmp_path / f"items.{table_format}"), "item_key": "sku",
                 "columns": {"user": "user", "item": "movie"}},
        "features": {"item": [{"type": "id", "name": "item_id"}, {"type": "categorical", "name": "genre"}]},
        "eval": {"protocol": "tfrs"},
    })  # fmt: skip
    data = build_retrieval_data(config)
    assert [str(i) for i in data.item_ids] == ["7", "8"]
    codes = data.item_table["genre"].tolist()
    assert 0 not in codes and codes[0] != codes[1]  # each logged item got its own genre, not "missing"


def test_a_side_without_an_id_feature_builds(tmp_path):
    # A user tower of features only (no id feature) used to fail: "id_values was given but no
    # IdFeature is declared".
    config = _config(tmp_path).model_copy(deep=True)
    config.features.user = [s for s in config.features.user if s.type != "id"]
    data = build_retrieval_data(config)
    assert list(data.user_table) == ["age"] and len(data.user_table["age"]) == data.num_users


@pytest.mark.parametrize(
    ("rows", "batch_size", "drop_last", "expected"),
    [(10, 4, False, 3), (9, 4, False, 2), (9, 4, True, 2), (8, 4, False, 2), (1, 4, False, 0)],
)
def test_batch_count_is_the_number_of_batches_iterate_batches_yields(rows, batch_size, drop_last, expected):
    from twotower.data.dataset import Interactions, batch_count

    data = Interactions(torch.arange(rows), torch.arange(rows))
    assert batch_count(rows, batch_size, drop_last) == expected  # 9 rows in 4s: the 1-row tail is skipped
    assert len(list(iterate_batches(data, batch_size, seed=0, epoch=1, drop_last=drop_last))) == expected
