"""Tests for `twotower.data.errors`: the `DataError` message format for every combination of
line/row/column, its attributes, pickling and exception hierarchy, `ChecksumError`, and the exact
locations reported by real loaders on small malformed files."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest

from twotower.data.errors import ChecksumError, DataError
from twotower.data.impressions import read_impressions
from twotower.data.loader import InteractionColumns, load_interactions, load_table

# --- message format -------------------------------------------------------------------------------


def test_message_names_file_line_row_and_column_as_documented() -> None:
    err = DataError("ratings.csv", "not a number: 'abc'", row=6, line=7, column="rating")
    assert str(err) == "ratings.csv, line 7 (row 6), column 'rating': not a number: 'abc'"


@pytest.mark.parametrize(
    ("row", "line", "column", "expected"),
    [
        (6, 7, None, "r.csv, line 7 (row 6): bad"),
        (None, 1, None, "r.csv, line 1: bad"),  # tied to a line but not to a data row (the header)
        (None, 1, "ts", "r.csv, line 1, column 'ts': bad"),
        (3, None, "rating", "r.csv, row 3, column 'rating': bad"),  # Parquet: no lines
        (3, None, None, "r.csv, row 3: bad"),
        (None, None, "user_id", "r.csv, column 'user_id': bad"),  # a missing column
        (None, None, None, "r.csv: bad"),  # an unreadable file
    ],
)
def test_message_leaves_out_the_parts_that_are_none(
    row: int | None, line: int | None, column: str | None, expected: str
) -> None:
    assert str(DataError("r.csv", "bad", row=row, line=line, column=column)) == expected


def test_column_is_quoted_with_repr() -> None:
    err = DataError("r.csv", "bad", column="it's")
    assert str(err) == 'r.csv, column "it\'s": bad'


def test_path_object_is_stored_and_shown_as_str(tmp_path: Path) -> None:
    path = tmp_path / "items.parquet"
    err = DataError(path, "missing key", row=2, column="item_id")
    assert err.path == str(path) and isinstance(err.path, str)
    assert str(err) == f"{path}, row 2, column 'item_id': missing key"


def test_attributes_keep_the_raw_parts() -> None:
    err = DataError("ratings.csv", "not a number: 'abc'", row=6, line=7, column="rating")
    assert (err.path, err.reason, err.row, err.line, err.column) == (
        "ratings.csv",
        "not a number: 'abc'",
        6,
        7,
        "rating",
    )
    assert err.args == ("ratings.csv, line 7 (row 6), column 'rating': not a number: 'abc'",)
    bare = DataError("ratings.csv", "empty file")
    assert (bare.row, bare.line, bare.column) == (None, None, None)


def test_location_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        DataError("r.csv", "bad", 6)  # type: ignore[misc]


# --- exception behaviour --------------------------------------------------------------------------


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)
    with pytest.raises(ValueError, match=r"^r\.csv, row 1: bad$"):
        raise DataError("r.csv", "bad", row=1)


@pytest.mark.parametrize(
    "kwargs",
    [{"row": 6, "line": 7, "column": "rating"}, {"row": 3}, {"line": 1}, {}],
    ids=["all", "row-only", "line-only", "none"],
)
def test_pickle_and_copy_keep_type_attributes_and_message(kwargs: dict) -> None:
    err = DataError("ratings.csv", "not a number: 'abc'", **kwargs)
    for clone in (pickle.loads(pickle.dumps(err)), copy.copy(err), copy.deepcopy(err)):
        assert type(clone) is DataError
        assert (clone.path, clone.reason, clone.row, clone.line, clone.column) == (
            err.path,
            err.reason,
            err.row,
            err.line,
            err.column,
        )
        assert str(clone) == str(err) and clone.args == err.args


def test_checksum_error_message_attributes_and_pickle() -> None:
    err = ChecksumError("https://example.org/ml-100k.zip", "sha256", "ab12", "cd34")
    assert str(err) == (
        "checksum mismatch for https://example.org/ml-100k.zip: expected sha256 ab12, got cd34; "
        "the download was deleted - retry, or check the URL and the expected digest"
    )
    assert (err.url, err.algorithm, err.expected, err.actual) == (
        "https://example.org/ml-100k.zip",
        "sha256",
        "ab12",
        "cd34",
    )
    assert isinstance(err, ValueError) and not isinstance(err, DataError)
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is ChecksumError and str(clone) == str(err)
    assert (clone.url, clone.algorithm, clone.expected, clone.actual) == (err.url, "sha256", "ab12", "cd34")


# --- end to end through the loaders ---------------------------------------------------------------


def test_loader_counts_quoted_newlines_and_blank_lines_in_the_line_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # line 1 header; row 1 spans lines 2-3 (quoted newline); line 4 blank (not a row); row 2 on line 5.
    Path("ratings.csv").write_text('user_id,item_id,rating,note\n1,10,4,"a\nb"\n\n2,20,oops,x\n')
    with pytest.raises(DataError) as info:
        load_interactions("ratings.csv", InteractionColumns(rating="rating"))
    assert str(info.value) == "ratings.csv, line 5 (row 2), column 'rating': not a number: 'oops'"
    assert (info.value.row, info.value.line, info.value.column) == (2, 5, "rating")


def test_loader_reports_a_row_with_too_many_fields_without_a_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("items.csv").write_text("item_id,x\n1,a\n2,b,c\n")
    with pytest.raises(DataError) as info:
        load_table("items.csv", "item_id")
    assert str(info.value) == "items.csv, line 3 (row 2): expected 2 fields, saw 3"


def test_loader_reports_an_unsniffable_header_by_line_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("log.txt").write_text("useritem\n1\n")
    with pytest.raises(DataError) as info:
        load_interactions("log.txt")
    assert str(info.value) == "log.txt, line 1: cannot infer the separator from the header; pass sep="
    assert (info.value.row, info.value.line, info.value.column) == (None, 1, None)


def test_impression_reader_names_the_row_that_repeats_a_position(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("imp.csv").write_text("request_id,item_id,position,click\nq1,10,1,1\nq1,11,2,0\nq1,12,2,0\n")
    with pytest.raises(DataError) as info:
        read_impressions("imp.csv")
    assert str(info.value) == (
        "imp.csv, line 4 (row 3), column 'position': duplicate position 2 in request 'q1' (first in row 2)"
    )
