"""Tests for `twotower.data.csv_records`: rows with extra fields, blank lines, undecodable or unparsable
text and repeated header names, directly and through the loaders."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from twotower.data import csv_records
from twotower.data.errors import DataError
from twotower.data.loader import load_interactions, load_table


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_records_skip_blank_and_whitespace_lines_but_not_quoted_blanks(tmp_path: Path) -> None:
    # pandas skips empty lines and lines of spaces/tabs; a quoted '""' or '"  "' is a (blank) data row.
    path = write(tmp_path / "r.csv", 'a,b\n1,10\n   \n""\n \t \n"  "\n\n2,"x\ny"\n3,30\n')
    got = list(csv_records.records(path, ","))
    assert got == [
        (1, 2, ["1", "10"]),
        (2, 4, [""]),
        (3, 6, ["  "]),
        (4, 8, ["2", "x\ny"]),
        (5, 10, ["3", "30"]),
    ]
    assert len(csv_records.read_frame(path, ",", str, False)[0]) == 5  # pandas agrees on the rows
    assert csv_records.lines_of(path, ",", {2, 5}) == {2: 4, 5: 10}


def test_a_row_with_one_field_more_than_the_header_is_reported_not_shifted(tmp_path: Path) -> None:
    # Without index_col=False pandas took the first column as the index and shifted every column.
    path = write(tmp_path / "r.csv", "user_id,item_id\n1,10,x\n2,20,y\n")
    with pytest.raises(DataError) as info:
        load_interactions(path)
    assert (info.value.row, info.value.line) == (1, 2)
    assert info.value.reason == "expected 2 fields, saw 3"


def test_trailing_separators_on_every_row_are_accepted(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user_id,item_id\n1,10,\n2,20,\n")  # Excel-style "1,10,"
    frame = load_interactions(path).frame
    assert frame["user_id"].tolist() == [1, 2] and frame["item_id"].tolist() == [10, 20]


def test_extra_fields_are_reported_wherever_they_are_and_row_numbers_stay_aligned(tmp_path: Path) -> None:
    # Row 1 (blank extra) sets pandas' expected count to 3: row 2 is truncated by pandas (its extra is
    # not blank: reported), row 4 (4 fields) is skipped by pandas, and is reported even though blank.
    path = write(tmp_path / "r.csv", "user_id,item_id\n1,10,\n2,20,y\n3,30\n4,40,,\n5,\n6,60\n")
    loaded = load_interactions(path, on_bad_rows="skip")
    assert loaded.frame["user_id"].tolist() == [1, 3, 6]
    assert [e.split("r.csv, ")[1] for e in loaded.skipped_examples] == [
        "line 3 (row 2): expected 2 fields, saw 3",
        "line 5 (row 4): expected 2 fields, saw 4",
        "line 6 (row 5), column 'item_id': missing item id",
    ]


def test_load_table_reports_rows_with_extra_fields(tmp_path: Path) -> None:
    path = write(tmp_path / "items.csv", "item_id,x\n1,10,a\n2,20,b\n")
    with pytest.raises(DataError) as info:
        load_table(path, "item_id")
    assert (info.value.row, info.value.line, info.value.reason) == (1, 2, "expected 2 fields, saw 3")
    table = load_table(write(tmp_path / "ok.csv", "item_id,x\n1,10,\n2,20,\n"), "item_id")
    assert table.to_dict("list") == {"item_id": [1, 2], "x": [10, 20]}


def test_rows_that_cannot_be_aligned_are_an_error_not_mislabelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "r.csv", "user_id,item_id\n1,10\n2,20,3\n3,30\n")
    real = csv_records.records
    monkeypatch.setattr(csv_records, "records", lambda p, s: list(real(p, s))[:-1])  # one record short
    with pytest.raises(DataError, match="cannot align the 2 rows pandas read with the 1 records found"):
        load_interactions(path)


def test_whitespace_only_lines_do_not_shift_reported_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user_id,item_id\n1,10\n   \n2,\n")
    with pytest.raises(DataError) as info:
        load_interactions(path)
    assert (info.value.reason, info.value.row, info.value.line) == ("missing item id", 2, 4)


def test_whitespace_line_and_a_malformed_row_keep_line_numbers_in_skip_mode(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user_id,item_id\n1,10\n   \n2,20,3\n3,\n")
    loaded = load_interactions(path, on_bad_rows="skip")
    lines = sorted(e.split(", line ")[1].split(" ")[0] for e in loaded.skipped_examples)
    assert lines == ["4", "5"], loaded.skipped_examples


def test_undecodable_bytes_raise_a_dataerror_naming_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_bytes(b"user_id,item_id\n1,1\n\xe9,1\n")  # latin-1 byte in a UTF-8 file
    with pytest.raises(DataError, match="r.csv") as info:
        load_interactions(path)
    assert info.value.line == 3 and "not valid UTF-8 (byte 0xe9)" in info.value.reason


def test_unterminated_quote_raises_a_dataerror_naming_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", 'user_id,item_id\n1,10\n\n2,"20\n3,30\n')
    with pytest.raises(DataError, match="r.csv") as info:
        load_interactions(path)
    assert info.value.line == 4 and "unterminated quoted field" in info.value.reason


def test_a_configured_column_repeated_in_the_header_is_an_error(tmp_path: Path) -> None:
    # pandas renames the 2nd "item_id" to "item_id.1": which one holds the items is ambiguous.
    path = write(tmp_path / "r.csv", "user_id,item_id,item_id\n1,10,20\n")
    with pytest.raises(DataError, match="item_id") as info:
        load_interactions(path)
    assert (info.value.line, info.value.column) == (1, "item_id")
    assert info.value.reason == "appears more than once in the header"
    # A repeated column that is not read is harmless.
    frame = load_interactions(write(tmp_path / "ok.csv", "user_id,item_id,x,x\n1,10,a,b\n")).frame
    assert frame["item_id"].tolist() == [10]


def test_a_table_column_is_typed_as_a_whole_not_chunk_by_chunk(tmp_path: Path) -> None:
    # pandas' low_memory parser infers types per chunk of 2**18 rows: ints in the first chunk, strs in the
    # last (3 and "3" would become two categories of one feature).
    n = 2**18 + 10
    rows = "".join(f"{i},{i % 7}\n" for i in range(n - 1))
    path = write(tmp_path / "items.csv", f"item_id,code\n{rows}{n},x\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = load_table(path, "item_id")
    assert caught == []  # no DtypeWarning ("mixed types") either
    assert {type(v) for v in table["code"]} == {str} and table["code"].iloc[0] == "0"
