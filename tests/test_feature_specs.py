"""Tests for `twotower.feature_specs`: defaults, rejection of unknown keys and invalid values, the
``type``-discriminated union, `FieldInfo`, and the quantities a tower derives from a spec."""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd
import pytest
from pydantic import TypeAdapter, ValidationError

import twotower.features as features
from twotower.feature_specs import (
    BucketizedFeature,
    CategoricalFeature,
    FeatureSpec,
    FieldInfo,
    HashedIdFeature,
    IdFeature,
    MultiHotFeature,
    NumericFeature,
)
from twotower.features import FeatureEncoder

SPEC = TypeAdapter(FeatureSpec)
GE = "greater_than_equal"  # pydantic's error type for a value below a ge= bound


def only_error(info: pytest.ExceptionInfo[ValidationError]) -> dict[str, Any]:
    errors = info.value.errors(include_url=False)
    assert len(errors) == 1, errors
    return errors[0]


# --- defaults -------------------------------------------------------------------------------------


def test_id_feature_defaults_and_column_falls_back_to_name() -> None:
    spec = IdFeature(name="user_id")
    assert spec.model_dump() == {
        "name": "user_id",
        "column": "user_id",
        "type": "id",
        "embedding_dim": None,
        "min_count": 1,
    }


def test_hashed_id_feature_requires_num_buckets_and_defaults_the_rest() -> None:
    spec = HashedIdFeature(name="user_id", num_buckets=1000)
    assert spec.model_dump() == {
        "name": "user_id",
        "column": "user_id",
        "type": "hashed_id",
        "num_buckets": 1000,
        "embedding_dim": None,
    }
    with pytest.raises(ValidationError) as info:
        HashedIdFeature(name="user_id")
    err = only_error(info)
    assert (err["type"], err["loc"]) == ("missing", ("num_buckets",))


def test_categorical_feature_defaults() -> None:
    spec = CategoricalFeature(name="gender")
    assert spec.model_dump() == {
        "name": "gender",
        "column": "gender",
        "type": "categorical",
        "embedding_dim": None,
        "min_count": 1,
    }


def test_multi_hot_feature_defaults_to_pipe_separator_and_no_length_limit() -> None:
    spec = MultiHotFeature(name="genres")
    assert spec.model_dump() == {
        "name": "genres",
        "column": "genres",
        "type": "multi_hot",
        "separator": "|",
        "max_len": None,
        "embedding_dim": None,
        "min_count": 1,
    }


def test_numeric_feature_defaults_to_no_fill() -> None:
    spec = NumericFeature(name="age")
    assert spec.model_dump() == {"name": "age", "column": "age", "type": "numeric", "fill": None}
    assert NumericFeature(name="age", fill=-1).fill == -1.0


def test_bucketized_feature_keeps_the_one_option_given_and_coerces_boundaries_to_float() -> None:
    explicit = BucketizedFeature(name="age", boundaries=[18, 30, 65])
    assert explicit.boundaries == [18.0, 30.0, 65.0]
    assert all(type(b) is float for b in explicit.boundaries)
    assert (explicit.num_buckets, explicit.embedding_dim, explicit.column) == (None, None, "age")
    fitted = BucketizedFeature(name="age", num_buckets=4)
    assert (fitted.boundaries, fitted.num_buckets) == (None, 4)
    assert BucketizedFeature(name="age", boundaries=[5]).boundaries == [5.0]  # one cut: two buckets


def test_explicit_column_is_kept_instead_of_the_name() -> None:
    spec = CategoricalFeature(name="genre", column="genre_name", embedding_dim=8, min_count=3)
    assert (spec.name, spec.column, spec.embedding_dim, spec.min_count) == ("genre", "genre_name", 8, 3)
    assert IdFeature(name="user_id", column=None).column == "user_id"


def test_smallest_allowed_values_are_accepted() -> None:
    assert HashedIdFeature(name="h", num_buckets=1, embedding_dim=1).num_buckets == 1
    assert BucketizedFeature(name="b", num_buckets=2).num_buckets == 2
    spec = MultiHotFeature(name="m", separator=",", max_len=1, min_count=1, embedding_dim=1)
    assert (spec.separator, spec.max_len) == (",", 1)


# --- unknown keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "typo"),
    [
        (IdFeature, {"name": "u", "embeding_dim": 8}, "embeding_dim"),
        (HashedIdFeature, {"name": "u", "num_buckets": 8, "buckets": 8}, "buckets"),
        (CategoricalFeature, {"name": "g", "mincount": 2}, "mincount"),
        (MultiHotFeature, {"name": "g", "sep": ","}, "sep"),
        (NumericFeature, {"name": "a", "fill_value": 0.0}, "fill_value"),
        (BucketizedFeature, {"name": "a", "num_buckets": 3, "boundary": [1.0]}, "boundary"),
    ],
)
def test_a_misspelt_key_is_rejected_by_name(cls: type, kwargs: dict[str, Any], typo: str) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted") as info:
        cls(**kwargs)
    err = only_error(info)
    assert (err["type"], err["loc"], err["input"]) == ("extra_forbidden", (typo,), kwargs[typo])
    assert typo in str(info.value)


def test_a_key_of_another_kind_is_rejected() -> None:
    # min_count belongs to categorical-like kinds, not to numeric ones.
    with pytest.raises(ValidationError) as info:
        SPEC.validate_python({"type": "numeric", "name": "age", "min_count": 2})
    err = only_error(info)
    assert (err["type"], err["loc"]) == ("extra_forbidden", ("numeric", "min_count"))


def test_misspelt_key_in_a_config_list_is_located_by_index_and_kind() -> None:
    specs = [{"type": "id", "name": "u"}, {"type": "multi_hot", "name": "g", "max_length": 3}]
    with pytest.raises(ValidationError) as info:
        TypeAdapter(list[FeatureSpec]).validate_python(specs)
    err = only_error(info)
    assert (err["type"], err["loc"]) == ("extra_forbidden", (1, "multi_hot", "max_length"))


# --- invalid values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "loc", "error_type"),
    [
        (IdFeature, {"name": ""}, ("name",), "string_too_short"),
        (IdFeature, {"name": 12}, ("name",), "string_type"),
        (IdFeature, {"name": "u", "embedding_dim": 0}, ("embedding_dim",), GE),
        (IdFeature, {"name": "u", "embedding_dim": 2.5}, ("embedding_dim",), "int_from_float"),
        (IdFeature, {"name": "u", "min_count": 0}, ("min_count",), GE),
        (IdFeature, {"name": "u", "type": "categorical"}, ("type",), "literal_error"),
        (HashedIdFeature, {"name": "u", "num_buckets": 0}, ("num_buckets",), GE),
        (HashedIdFeature, {"name": "u", "num_buckets": -5}, ("num_buckets",), GE),
        (HashedIdFeature, {"name": "u", "num_buckets": "many"}, ("num_buckets",), "int_parsing"),
        (HashedIdFeature, {"name": "u", "num_buckets": 8, "embedding_dim": -1}, ("embedding_dim",), GE),
        (CategoricalFeature, {"name": "g", "min_count": -1}, ("min_count",), GE),
        (CategoricalFeature, {"name": "g", "embedding_dim": 0}, ("embedding_dim",), GE),
        (MultiHotFeature, {"name": "g", "separator": ""}, ("separator",), "string_too_short"),
        (MultiHotFeature, {"name": "g", "max_len": 0}, ("max_len",), GE),
        (MultiHotFeature, {"name": "g", "min_count": 0}, ("min_count",), GE),
        (NumericFeature, {"name": "a", "fill": "x"}, ("fill",), "float_parsing"),
        # a NaN or infinite fill would encode every missing cell as NaN / inf
        (NumericFeature, {"name": "a", "fill": float("nan")}, ("fill",), "finite_number"),
        (NumericFeature, {"name": "a", "fill": float("inf")}, ("fill",), "finite_number"),
        (BucketizedFeature, {"name": "a", "num_buckets": 1}, ("num_buckets",), GE),
        (BucketizedFeature, {"name": "a", "num_buckets": 0}, ("num_buckets",), GE),
        (BucketizedFeature, {"name": "a", "boundaries": "abc"}, ("boundaries",), "list_type"),
        (BucketizedFeature, {"name": "a", "boundaries": [1, "x"]}, ("boundaries", 1), "float_parsing"),
        (BucketizedFeature, {"name": "a", "num_buckets": 3, "embedding_dim": 0}, ("embedding_dim",), GE),
    ],
)
def test_an_invalid_value_is_rejected_at_its_field(
    cls: type, kwargs: dict[str, Any], loc: tuple, error_type: str
) -> None:
    with pytest.raises(ValidationError) as info:
        cls(**kwargs)
    err = only_error(info)
    assert err["loc"] == loc
    assert err["type"] == error_type


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"boundaries": [1.0], "num_buckets": 3}],
    ids=["neither", "both"],
)
def test_bucketized_needs_exactly_one_of_boundaries_and_num_buckets(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        BucketizedFeature(name="age", **kwargs)
    err = only_error(info)
    assert err["type"] == "value_error"
    assert err["msg"] == "Value error, feature 'age': give exactly one of 'boundaries' and 'num_buckets'"


@pytest.mark.parametrize(
    "boundaries",
    [
        [],
        [3.0, 1.0],
        [1.0, 1.0],
        [0.0, 2.0, 2.0, 3.0],
        [1.0, float("inf")],
        [float("-inf"), 0.0],
        [float("nan")],
    ],
    ids=["empty", "decreasing", "equal", "repeat-inside", "inf", "minus-inf", "nan"],
)
def test_bucketized_boundaries_must_be_finite_and_strictly_increasing(boundaries: list[float]) -> None:
    with pytest.raises(ValidationError) as info:
        BucketizedFeature(name="age", boundaries=boundaries)
    err = only_error(info)
    assert err["msg"] == "Value error, feature 'age': boundaries must be finite and strictly increasing"


# --- the discriminated union ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "cls"),
    [
        ({"type": "id", "name": "user_id"}, IdFeature),
        ({"type": "hashed_id", "name": "user_id", "num_buckets": 64}, HashedIdFeature),
        ({"type": "categorical", "name": "gender"}, CategoricalFeature),
        ({"type": "multi_hot", "name": "genres"}, MultiHotFeature),
        ({"type": "numeric", "name": "age"}, NumericFeature),
        ({"type": "bucketized", "name": "age", "num_buckets": 5}, BucketizedFeature),
    ],
)
def test_union_picks_the_kind_named_by_type(data: dict[str, Any], cls: type) -> None:
    spec = SPEC.validate_python(data)
    assert type(spec) is cls
    assert spec.type == data["type"] and spec.column == data["name"]


def test_union_only_tries_the_kind_named_by_type() -> None:
    # A hashed_id spec without num_buckets is one error of that kind, not six (one per kind).
    with pytest.raises(ValidationError) as info:
        SPEC.validate_python({"type": "hashed_id", "name": "user_id"})
    err = only_error(info)
    assert (err["type"], err["loc"]) == ("missing", ("hashed_id", "num_buckets"))


def test_union_rejects_an_unknown_type_and_lists_the_known_ones() -> None:
    with pytest.raises(ValidationError) as info:
        SPEC.validate_python({"type": "embedding", "name": "x"})
    err = only_error(info)
    assert err["type"] == "union_tag_invalid"
    assert err["ctx"]["tag"] == "embedding"
    expected = "'id', 'hashed_id', 'categorical', 'multi_hot', 'numeric', 'bucketized'"
    assert err["ctx"]["expected_tags"] == expected


def test_union_rejects_a_spec_without_type() -> None:
    with pytest.raises(ValidationError) as info:
        SPEC.validate_python({"name": "user_id"})
    err = only_error(info)
    assert err["type"] == "union_tag_not_found"
    assert err["msg"] == "Unable to extract tag using discriminator 'type'"


@pytest.mark.parametrize(
    "spec",
    [
        IdFeature(name="u", embedding_dim=16, min_count=2),
        HashedIdFeature(name="u", column="user", num_buckets=97),
        CategoricalFeature(name="g", min_count=5),
        MultiHotFeature(name="genres", separator=";", max_len=4),
        NumericFeature(name="age", fill=30.5),
        BucketizedFeature(name="age", boundaries=[18.0, 65.0], embedding_dim=4),
        BucketizedFeature(name="price", num_buckets=10),
    ],
    ids=lambda s: s.type,
)
def test_a_dumped_spec_validates_back_to_an_equal_spec(spec: Any) -> None:
    # This is how FeatureEncoder takes spec objects and how its state survives a JSON round trip.
    assert SPEC.validate_python(spec.model_dump()) == spec
    assert SPEC.validate_json(SPEC.dump_json(spec)) == spec


def test_features_module_re_exports_the_same_spec_classes() -> None:
    exported = [
        (features.IdFeature, IdFeature),
        (features.HashedIdFeature, HashedIdFeature),
        (features.CategoricalFeature, CategoricalFeature),
        (features.MultiHotFeature, MultiHotFeature),
        (features.NumericFeature, NumericFeature),
        (features.BucketizedFeature, BucketizedFeature),
        (features.FieldInfo, FieldInfo),
    ]
    assert all(a is b for a, b in exported)


def test_encoder_validates_plain_dicts_through_the_union() -> None:
    encoder = FeatureEncoder(
        [{"type": "hashed_id", "name": "user_id", "num_buckets": 8}, NumericFeature(name="age", fill=0.0)]
    )
    assert [type(s) for s in encoder.specs] == [HashedIdFeature, NumericFeature]
    with pytest.raises(ValidationError, match="embeding_dim"):
        FeatureEncoder([{"type": "id", "name": "u", "embeding_dim": 8}])


# --- FieldInfo and derived quantities -------------------------------------------------------------


def test_field_info_is_a_frozen_value() -> None:
    info = FieldInfo("genres", "multi_hot", 7, 16)
    assert (info.name, info.kind, info.cardinality, info.embedding_dim) == ("genres", "multi_hot", 7, 16)
    assert info == FieldInfo(name="genres", kind="multi_hot", cardinality=7, embedding_dim=16)
    assert info != FieldInfo("genres", "multi_hot", 8, 16)
    assert len({info, FieldInfo("genres", "multi_hot", 7, 16)}) == 1  # hashable, equal by value
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.cardinality = 8  # type: ignore[misc]


def test_field_cardinalities_follow_from_the_specs() -> None:
    frame = pd.DataFrame(
        {
            "user_id": ["a", "b", "c", "a"],
            "age": [1.0, 2.0, 3.0, 4.0],
            "price": [1.0, 2.0, 3.0, 4.0],
            "genres": ["x|y", "y", "z", "x"],
        }
    )
    encoder = FeatureEncoder(
        [
            HashedIdFeature(name="user_id", num_buckets=8, embedding_dim=4),
            BucketizedFeature(name="age_b", column="age", boundaries=[0.0, 2.5, 10.0]),
            BucketizedFeature(name="price", num_buckets=4, embedding_dim=3),
            MultiHotFeature(name="genres"),
            NumericFeature(name="age"),
        ]
    ).fit(frame)
    assert encoder.fields() == [
        FieldInfo("user_id", "categorical", 9, 4),  # num_buckets + 1 (0 = missing) = 8 + 1
        FieldInfo("age_b", "categorical", 5, None),  # len(boundaries) + 2 = 3 + 2
        # quantiles of [1, 2, 3, 4] at 1/4, 2/4, 3/4 (linear): 1.75, 2.5, 3.25 -> 3 cuts + 2 = 5
        FieldInfo("price", "categorical", 5, 3),
        FieldInfo("genres", "multi_hot", 5, None),  # vocab {x, y, z} + padding + OOV = 3 + 2
        FieldInfo("age", "numeric", 0, None),
    ]
    assert encoder.to_dict()["state"]["price"] == {"boundaries": [1.75, 2.5, 3.25]}
