"""Known-answer tests for feature specs and `FeatureEncoder`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from twotower.features import (
    BucketizedFeature,
    CategoricalFeature,
    FeatureEncoder,
    FeatureSpec,
    FieldInfo,
    IdFeature,
    MultiHotFeature,
    NumericFeature,
)


@pytest.fixture
def items() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": [10, 20, 30, 40],
            "genre": ["drama", "comedy", "drama", None],
            "tags": ["b|a", "a", "", "c|a|a"],
            "price": [1.0, 2.0, 3.0, None],
        }
    )


def test_id_feature_oov_and_sorted_vocabulary(items: pd.DataFrame) -> None:
    enc = FeatureEncoder([IdFeature(name="item_id")]).fit(items)
    out = enc.transform(pd.DataFrame({"item_id": [40, 10, 99, None]}))["item_id"]
    assert out.dtype == torch.int64
    assert out.tolist() == [4, 1, 0, 0]  # 99 unseen, None missing -> 0
    assert enc.vocabulary("item_id") == [10, 20, 30, 40]


def test_id_values_override_vocabulary(items: pd.DataFrame) -> None:
    # Only 10 and 30 occur in training interactions; 30 only once, so min_count=2 drops it.
    enc = FeatureEncoder([IdFeature(name="item_id", min_count=2)])
    enc.fit(items, id_values=[30, 10, 10])
    assert enc.transform(items)["item_id"].tolist() == [1, 0, 0, 0]
    assert enc.fields() == [FieldInfo("item_id", "categorical", 2, None)]
    with pytest.raises(ValueError, match="no IdFeature"):
        FeatureEncoder([CategoricalFeature(name="genre")]).fit(items, id_values=[1])


def test_categorical_min_count_and_missing(items: pd.DataFrame) -> None:
    enc = FeatureEncoder([CategoricalFeature(name="g", column="genre", min_count=2, embedding_dim=4)])
    enc.fit(items)
    assert enc.vocabulary("g") == ["drama"]  # comedy occurs once
    assert enc.transform(items)["g"].tolist() == [1, 0, 1, 0]
    assert enc.fields() == [FieldInfo("g", "categorical", 2, 4)]


def test_whole_number_floats_match_int_vocabulary() -> None:
    # An int id column with a gap becomes float64 in pandas; 2.0 must still find id 2.
    enc = FeatureEncoder([IdFeature(name="u")]).fit(pd.DataFrame({"u": [1, 2, 3]}))
    assert enc.transform(pd.DataFrame({"u": [2.0, np.nan, 3.0]}))["u"].tolist() == [2, 0, 3]
    assert enc.transform(pd.DataFrame({"u": ["2"]}))["u"].tolist() == [0]  # type-sensitive lookup


def test_an_infinite_category_is_missing_so_the_saved_vocabulary_stays_json(tmp_path) -> None:
    from twotower.storage import read_json, write_json

    enc = FeatureEncoder([CategoricalFeature(name="c")]).fit(pd.DataFrame({"c": [1.5, np.inf, -np.inf, 1.5]}))
    assert enc.vocabulary("c") == [1.5]
    assert enc.transform(pd.DataFrame({"c": [np.inf, 1.5]}))["c"].tolist() == [0, 1]
    write_json(tmp_path / "v.json", enc.vocabulary("c"))
    assert read_json(tmp_path / "v.json") == [1.5]


def test_multi_hot_padding_oov_and_dedup(items: pd.DataFrame) -> None:
    enc = FeatureEncoder([MultiHotFeature(name="tags")]).fit(items)
    assert enc.vocabulary("tags") == ["a", "b", "c"]  # indices 2, 3, 4
    out = enc.transform(pd.DataFrame({"tags": ["c|z", ["a", "b"], None, "a|a"]}))["tags"]
    assert out.dtype == torch.int64
    assert out.tolist() == [[4, 1], [2, 3], [0, 0], [2, 0]]  # z is OOV (1); 0 pads
    assert enc.fields()[0] == FieldInfo("tags", "multi_hot", 5, None)


def test_multi_hot_max_len_truncates_and_pads() -> None:
    df = pd.DataFrame({"t": ["x;y;z", "y"]})
    enc = FeatureEncoder([MultiHotFeature(name="t", separator=";", max_len=2)]).fit(df)
    assert enc.transform(df)["t"].tolist() == [[2, 3], [3, 0]]
    # An all-empty frame still yields width 1 when max_len is not set.
    enc2 = FeatureEncoder([MultiHotFeature(name="t")]).fit(df)
    assert enc2.transform(pd.DataFrame({"t": [None, ""]}))["t"].tolist() == [[0], [0]]


def test_numeric_standardisation_numbers(items: pd.DataFrame) -> None:
    enc = FeatureEncoder([NumericFeature(name="price")]).fit(items)
    # mean 2, population std sqrt(2/3); missing -> mean -> 0
    out = enc.transform(items)["price"]
    assert out.dtype == torch.float32
    s = np.sqrt(2 / 3)
    np.testing.assert_allclose(out.numpy(), [-1 / s, 0.0, 1 / s, 0.0], rtol=1e-6)
    enc_fill = FeatureEncoder([NumericFeature(name="price", fill=5.0)]).fit(items)
    assert enc_fill.transform(items)["price"][3].item() == pytest.approx(3 / s)


def test_numeric_constant_column_and_bad_value() -> None:
    enc = FeatureEncoder([NumericFeature(name="x")]).fit(pd.DataFrame({"x": [7.0, 7.0]}))
    assert enc.transform(pd.DataFrame({"x": [7.0, 8.0]}))["x"].tolist() == [0.0, 1.0]
    bad = pd.DataFrame({"x": ["1", "2", "abc"]}, index=[5, 6, 7])
    with pytest.raises(ValueError, match=r"feature 'x', column 'x', row 3 \(index 7\).*'abc'"):
        enc.transform(bad)


def test_bucket_boundaries_explicit_and_quantile() -> None:
    df = pd.DataFrame({"age": [5.0, 18.0, 30.0, 99.0, None]})
    enc = FeatureEncoder([BucketizedFeature(name="age", boundaries=[18, 30])]).fit(df)
    # <18 -> 1, [18, 30) -> 2, >=30 -> 3, missing -> 0
    assert enc.transform(df)["age"].tolist() == [1, 2, 3, 3, 0]
    assert enc.fields()[0].cardinality == 4

    q = pd.DataFrame({"v": np.arange(1, 101, dtype=float)})
    enc_q = FeatureEncoder([BucketizedFeature(name="v", num_buckets=4)]).fit(q)
    assert enc_q.to_dict()["state"]["v"]["boundaries"] == [25.75, 50.5, 75.25]
    counts = torch.bincount(enc_q.transform(q)["v"]).tolist()
    assert counts == [0, 25, 25, 25, 25]


def test_quantile_ties_collapse() -> None:
    df = pd.DataFrame({"v": [0.0] * 9 + [1.0]})
    enc = FeatureEncoder([BucketizedFeature(name="v", num_buckets=4)]).fit(df)
    assert enc.to_dict()["state"]["v"]["boundaries"] == [0.0]
    assert enc.transform(df)["v"].tolist() == [2] * 10


def test_json_round_trip_keeps_types(items: pd.DataFrame) -> None:
    specs = [
        IdFeature(name="item_id"),
        CategoricalFeature(name="genre"),
        MultiHotFeature(name="tags", max_len=3),
        NumericFeature(name="price"),
        BucketizedFeature(name="price_bucket", column="price", num_buckets=2),
    ]
    enc = FeatureEncoder(specs).fit(items)
    restored = FeatureEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert restored.vocabulary("item_id") == [10, 20, 30, 40]  # ints stay ints
    assert restored.fields() == enc.fields()
    a, b = enc.transform(items), restored.transform(items)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with pytest.raises(ValueError, match="not a feature-encoder state"):
        FeatureEncoder.from_dict({"specs": []})


def test_discriminated_union_validation() -> None:
    adapter = TypeAdapter(FeatureSpec)
    spec = adapter.validate_python({"type": "categorical", "name": "g", "column": "genre"})
    assert isinstance(spec, CategoricalFeature)
    assert adapter.validate_python({"type": "id", "name": "user_id"}).column == "user_id"
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        adapter.validate_python({"type": "embedding", "name": "x"})
    with pytest.raises(ValidationError, match="embeding_dim"):
        adapter.validate_python({"type": "categorical", "name": "g", "embeding_dim": 8})
    with pytest.raises(ValidationError, match="exactly one of 'boundaries' and 'num_buckets'"):
        BucketizedFeature(name="b")
    with pytest.raises(ValidationError, match="strictly increasing"):
        BucketizedFeature(name="b", boundaries=[3.0, 1.0])
    with pytest.raises(ValidationError, match="embeding_dim"):
        FeatureEncoder([{"type": "id", "name": "u", "embeding_dim": 8}])


def test_encoder_config_errors(items: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="duplicate feature names"):
        FeatureEncoder([IdFeature(name="a"), CategoricalFeature(name="a")])
    with pytest.raises(ValueError, match="at most one IdFeature"):
        FeatureEncoder([IdFeature(name="a"), IdFeature(name="b")])
    enc = FeatureEncoder([CategoricalFeature(name="genre_feat", column="genre_name")])
    with pytest.raises(ValueError, match="feature 'genre_feat' reads column 'genre_name'.*not in the frame"):
        enc.fit(items)
    with pytest.raises(RuntimeError, match="before fit"):
        enc.transform(items)


def test_transform_record_equals_transform_of_a_one_row_frame():
    """The serving fast path encodes a row exactly as the frame path does, missing values included."""
    import random

    frame = pd.DataFrame(
        {
            "uid": [1, 2, 3, 4, 5, 6],
            "seg": ["a", "b", "a", None, "c", "b"],
            "tags": ["x|y", "y", "", "z|x|w", None, "x"],
            "age": [20.0, 35.5, None, 41.0, 18.0, 60.0],
            "spend": [1.0, 5.0, 3.0, 2.0, 8.0, None],
        }
    )
    encoder = FeatureEncoder(
        [
            {"type": "id", "name": "uid"},
            {"type": "categorical", "name": "seg"},
            {"type": "multi_hot", "name": "tags", "max_len": 3},
            {"type": "numeric", "name": "age"},
            {"type": "bucketized", "name": "spend", "num_buckets": 3},
        ]
    ).fit(frame)
    rng = random.Random(0)
    pools = {
        "uid": [1, 3, 99, None, "7"],
        "seg": ["a", "c", "zz", None, ""],
        "tags": ["x", "y|q", "w|z|x|y", None, ""],
        "age": [0.0, 33.3, None, 100, "42"],
        "spend": [0.5, 4.0, 100.0, None, 3],
    }
    for _ in range(50):
        record = {col: rng.choice(values) for col, values in pools.items() if rng.random() < 0.9}
        want = encoder.transform(pd.DataFrame({c: [record.get(c)] for c in pools}, dtype=object))
        got = encoder.transform_record(record)
        for name in want:
            assert torch.equal(got[name], want[name].to(got[name].dtype)), (name, record)
    with pytest.raises(ValueError, match="age"):
        encoder.transform_record({"age": "old"})
    with pytest.raises(ValueError, match="seg"):
        encoder.transform_record({"seg": ["a", "b"]})


def test_mixed_type_ids_vocabulary_order_and_json_round_trip_with_oov() -> None:
    # "7", "007" and 7 are three ids; 7.0 and np.int64(7) are the int 7; None and "" are missing.
    column = pd.Series([7, "7", "007", "a", 7.0, np.int64(7), -3, 0.5, None, ""], dtype=object)
    enc = FeatureEncoder([IdFeature(name="u")]).fit(pd.DataFrame({"u": column}))
    assert enc.vocabulary("u") == [-3, 0.5, 7, "007", "7", "a"]  # numbers first, then strings
    probe = pd.Series([*column.tolist(), "b", 8, 7.5, " 7", "a "], dtype=object)
    want = [3, 5, 4, 6, 3, 3, 1, 2, 0, 0, 0, 0, 0, 0, 0]  # unseen values (incl. " 7", "a ") -> OOV 0
    restored = FeatureEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert restored.vocabulary("u") == enc.vocabulary("u")
    for encoder in (enc, restored):
        assert encoder.transform(pd.DataFrame({"u": probe}))["u"].tolist() == want
        assert [int(encoder.transform_record({"u": v})["u"]) for v in probe] == want


def test_multi_hot_dedup_happens_before_max_len_truncation_in_cell_order() -> None:
    enc = FeatureEncoder([MultiHotFeature(name="t", max_len=2)]).fit(pd.DataFrame({"t": ["a|b|c"]}))
    cells = ["c|b|a", "a|a|b", "z|a|b", " b | a ", ["a", "", None, "a"], "|||", np.nan]
    # a=2, b=3, c=4, OOV=1: the FIRST max_len distinct tokens of the cell, in the cell's order.
    want = [[4, 3], [2, 3], [1, 2], [3, 2], [2, 0], [0, 0], [0, 0]]
    assert enc.transform(pd.DataFrame({"t": cells}))["t"].tolist() == want
    assert [enc.transform_record({"t": c})["t"][0].tolist() for c in cells[:-1]] == want[:-1]


def test_numeric_all_missing_column_fits_identity_scaling() -> None:
    enc = FeatureEncoder([NumericFeature(name="x")]).fit(pd.DataFrame({"x": [None, np.nan, " "]}))
    assert enc.to_dict()["state"]["x"] == {"mean": 0.0, "std": 1.0}
    assert enc.transform(pd.DataFrame({"x": [2.5, None]}))["x"].tolist() == [2.5, 0.0]


def test_bucketized_heavy_ties_and_constant_column() -> None:
    df = pd.DataFrame({"v": [1.0] * 50 + [2.0] * 30 + [3.0] * 20})
    enc = FeatureEncoder([BucketizedFeature(name="v", num_buckets=5)]).fit(df)
    # Quantiles 0.2/0.4/0.6/0.8 = 1, 1, 2, 2.2 (interpolated): the repeated cut point 1 is collapsed.
    assert enc.to_dict()["state"]["v"]["boundaries"] == pytest.approx([1.0, 2.0, 2.2])
    assert enc.fields()[0].cardinality == 5
    probe = pd.DataFrame({"v": [0.5, 1.0, 2.0, 2.5, 3.0, None]})
    assert enc.transform(probe)["v"].tolist() == [1, 2, 3, 4, 4, 0]  # boundaries[i-2] <= x < boundaries[i-1]
    const = FeatureEncoder([BucketizedFeature(name="v", num_buckets=4)]).fit(pd.DataFrame({"v": [5.0] * 8}))
    assert const.to_dict()["state"]["v"]["boundaries"] == [5.0]
    assert const.transform(pd.DataFrame({"v": [4.0, 5.0, 6.0]}))["v"].tolist() == [1, 2, 2]


def test_hashed_id_is_stable_through_json_and_matches_transform_record() -> None:
    enc = FeatureEncoder([{"type": "hashed_id", "name": "u", "num_buckets": 7}]).fit(pd.DataFrame({"u": [1]}))
    values = pd.Series([1, 1.0, np.int64(1), "1", "a", 2**70, None, ""], dtype=object)
    restored = FeatureEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    got = enc.transform(pd.DataFrame({"u": values}))["u"].tolist()
    assert got == restored.transform(pd.DataFrame({"u": values}))["u"].tolist()
    assert got == [int(enc.transform_record({"u": v})["u"]) for v in values]
    assert got[0] == got[1] == got[2] and got[6:] == [0, 0] and all(1 <= b <= 7 for b in got[:6])
    assert enc.fields() == [FieldInfo("u", "categorical", 8, None)]


def test_constant_numeric_column_of_large_magnitude_encodes_as_zero() -> None:
    # The float mean of 1000 copies of 123456789.123 is off by ~3e-8, a std far above 0 in absolute
    # terms: constancy is tested exactly, so the constant encodes as 0 and constant + 1 as 1.
    enc = FeatureEncoder([NumericFeature(name="x")]).fit(pd.DataFrame({"x": [123456789.123] * 1000}))
    assert enc.to_dict()["state"]["x"] == {"mean": 123456789.123, "std": 1.0}
    out = enc.transform(pd.DataFrame({"x": [123456789.123, 123456790.123]}))["x"].tolist()
    assert out == [0.0, 1.0]
    spread = FeatureEncoder([NumericFeature(name="x")]).fit(pd.DataFrame({"x": [1e8, 1e8 + 2]}))
    assert spread.to_dict()["state"]["x"] == {"mean": 1e8 + 1, "std": 1.0}  # a real spread is kept


def test_from_dict_copies_the_callers_state() -> None:
    enc = FeatureEncoder([IdFeature(name="u")]).fit(pd.DataFrame({"u": [1, 2]}))
    data = enc.to_dict()
    restored = FeatureEncoder.from_dict(data)
    data["state"]["u"]["vocab"].append(3)  # the caller reuses its dict
    assert restored.vocabulary("u") == [1, 2]
    assert restored.fields()[0].cardinality == 3


def test_transform_of_list_cells_in_a_categorical_raises_the_fit_error() -> None:
    enc = FeatureEncoder([IdFeature(name="u")]).fit(pd.DataFrame({"u": ["a", "b"]}))
    with pytest.raises(ValueError, match="feature 'u' \\(column 'u'\\) holds unhashable values"):
        enc.transform(pd.DataFrame({"u": [["a"], "b"]}))
    with pytest.raises(ValueError, match="holds unhashable values"):
        FeatureEncoder([IdFeature(name="u")]).fit(pd.DataFrame({"u": [["a"], "b"]}))


def test_list_cells_in_a_hashed_id_column_raise_the_same_clear_error() -> None:
    from twotower.features import HashedIdFeature

    enc = FeatureEncoder([HashedIdFeature(name="u", num_buckets=16)]).fit(pd.DataFrame({"u": [1, 2]}))
    with pytest.raises(ValueError, match="feature 'u' \\(column 'u'\\) holds unhashable values"):
        enc.transform(pd.DataFrame({"u": [[1, 2], "a"]}))
    assert enc.transform(pd.DataFrame({"u": ["a", None]}))["u"].tolist()[1] == 0  # still fine otherwise


def test_transform_record_parses_numeric_strings_as_the_frame_does() -> None:
    """float() takes "nan" (read as missing), "1_000" and Arabic-Indic digits; the frame's pd.to_numeric
    refuses all three. A served row was encoded where the same row in a frame is an error."""
    encoder = FeatureEncoder(
        [{"type": "numeric", "name": "x"}, {"type": "bucketized", "name": "y", "boundaries": [5]}]
    )
    encoder.fit(pd.DataFrame({"x": [1.0, 3.0], "y": [1.0, 9.0]}))
    for text in ["nan", "NaN", "1_000", "١٢"]:
        for col in ("x", "y"):
            with pytest.raises(ValueError, match=f"column '{col}'.*not a finite number"):
                encoder.transform(pd.DataFrame({"x": [1.0], "y": [1.0], col: [text]}, dtype=object))
            with pytest.raises(ValueError, match=f"column '{col}'.*not a finite number"):
                encoder.transform_record({col: text})
    got = encoder.transform_record({"x": " 3 ", "y": "1e1"})
    assert got["x"].tolist() == [1.0] and got["y"].tolist() == [2]


def test_multi_hot_set_cells_are_token_sets_not_one_string_token() -> None:
    """A set cell became the single token "{'a', 'b'}" (str of the set); its tokens are sorted, so
    max_len keeps the same ones whatever the process's string hash seed."""
    frame = pd.DataFrame({"g": pd.Series([{"b", "a"}, frozenset({"c"}), ["a", "d"]], dtype=object)})
    encoder = FeatureEncoder([{"type": "multi_hot", "name": "g", "max_len": 2}]).fit(frame)
    assert encoder.vocabulary("g") == ["a", "b", "c", "d"]
    assert encoder.transform(frame)["g"].tolist() == [[2, 3], [4, 0], [2, 5]]
    assert encoder.transform_record({"g": {"d", "c", "a", ""}})["g"].tolist() == [[2, 4]]


def test_an_array_in_a_categorical_record_is_refused_as_in_a_frame() -> None:
    """transform_record refused lists but took a numpy array as the string "['a' 'b']" (OOV, silently)."""
    encoder = FeatureEncoder([{"type": "categorical", "name": "c"}]).fit(pd.DataFrame({"c": ["a", "b"]}))
    with pytest.raises(ValueError, match="takes one value"):
        encoder.transform_record({"c": np.array(["a", "b"])})
    hashed = FeatureEncoder([{"type": "hashed_id", "name": "u", "num_buckets": 8}]).fit(
        pd.DataFrame({"u": [1]})
    )
    with pytest.raises(ValueError, match="takes one value"):
        hashed.transform_record({"u": np.array([1, 2])})


def test_numeric_statistics_of_huge_values_do_not_overflow() -> None:
    """The squares of values beyond 1e154 overflow: the std was inf and every value encoded as 0."""
    frame = pd.DataFrame({"x": [1e200, 2e200, 3e200]})
    encoder = FeatureEncoder([{"type": "numeric", "name": "x"}]).fit(frame)
    np.testing.assert_allclose(encoder.transform(frame)["x"].numpy(), [-1.2247449, 0.0, 1.2247449], rtol=1e-6)
    normal = pd.DataFrame({"x": [0.1, 2.5, -7.0, 1e6]})  # ordinary columns: bit-identical statistics
    state = FeatureEncoder([{"type": "numeric", "name": "x"}]).fit(normal).to_dict()["state"]["x"]
    assert state == {"mean": float(normal["x"].to_numpy().mean()), "std": float(normal["x"].to_numpy().std())}


def test_a_bool_id_in_a_record_is_no_user_although_true_equals_1() -> None:
    """The service sends a user id its catalogue lacks to transform_record; twotower.ids refuses True as
    user 1, but the encoder keyed it as 1 and served user 1's embedding (or bucket)."""
    frame = pd.DataFrame({"uid": [0, 1, 2], "flag": [True, False, True]})
    encoder = FeatureEncoder([{"type": "id", "name": "uid"}, {"type": "categorical", "name": "flag"}]).fit(
        frame
    )
    got = encoder.transform_record({"uid": True, "flag": True})
    assert got["uid"].tolist() == [0] and got["flag"].tolist() == [2]  # a bool category still is one
    assert encoder.transform_record({"uid": np.bool_(False)})["uid"].tolist() == [0]
    hashed = FeatureEncoder([{"type": "hashed_id", "name": "uid", "num_buckets": 1 << 20}]).fit(frame)
    assert hashed.transform_record({"uid": True})["uid"].tolist() == [0]


def test_a_value_whose_standardised_form_overflows_float32_is_refused() -> None:
    # Fitted on 1, 2, 3 (mean 2, std .8165): 1e308 is a finite float64 whose standardised value is
    # about 1.2e308, infinite in float32 - it used to reach the tower and make its output NaN.
    enc = FeatureEncoder([NumericFeature(name="x")]).fit(pd.DataFrame({"x": [1.0, 2.0, 3.0]}))
    with pytest.raises(ValueError, match=r"feature 'x', column 'x': 1e\+308 is out of range"):
        enc.transform_record({"x": 1e308})
    with pytest.raises(ValueError, match=r"row 2 \(index 1\): 1e\+308 is out of range"):
        enc.transform(pd.DataFrame({"x": [1.0, 1e308]}))
    std = (2 / 3) ** 0.5
    assert enc.transform_record({"x": 1e30})["x"].item() == pytest.approx((1e30 - 2) / std, rel=1e-6)
