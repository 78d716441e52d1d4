"""Bad-input and known-answer tests for `twotower.data.loader` (CSV, TSV, TXT and Parquet)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twotower.data.errors import DataError
from twotower.data.loader import InteractionColumns, load_interactions, load_table

ALL = InteractionColumns(timestamp="ts", rating="rating", weight="w")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def raises_at(path: Path, columns: InteractionColumns, *, row: int, line: int | None, column: str | None):
    with pytest.raises(DataError) as info:
        load_interactions(path, columns)
    err = info.value
    assert (err.row, err.line, err.column, err.path) == (row, line, column, str(path)), str(err)
    return err


def test_error_message_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rows = "".join(f"{u},{u * 10},4\n" for u in range(1, 6))
    write(tmp_path / "ratings.csv", f"user_id,item_id,rating\n{rows}6,60,abc\n")
    with pytest.raises(DataError) as info:
        load_interactions("ratings.csv", InteractionColumns(rating="rating"))
    assert str(info.value) == "ratings.csv, line 7 (row 6), column 'rating': not a number: 'abc'"
    assert info.value.reason == "not a number: 'abc'"
    clone = pickle.loads(pickle.dumps(info.value))
    assert str(clone) == str(info.value) and clone.row == 6


def test_clean_csv_known_values(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.csv",
        "user_id,item_id,rating,ts,w,extra\n"
        "1,10,4.5,86400,1,x\n"
        "2,20,3,1970-01-02T00:00:00Z,0.5,y\n"
        "3,30,1,2020-01-01T02:00:00+02:00,2,z\n"
        "\n"  # a blank line is not a data row
        "1,30,5,2020-01-01,1,w\n",
    )
    loaded = load_interactions(path, ALL)
    f = loaded.frame
    assert list(f.columns) == ["user_id", "item_id", "timestamp", "rating", "weight"]
    assert f.dtypes.astype(str).tolist() == ["int64", "int64", "int64", "float64", "float64"]
    assert f["user_id"].tolist() == [1, 2, 3, 1]  # file order
    assert f["timestamp"].tolist() == [86400, 86400, 1577836800, 1577836800]
    assert f["rating"].tolist() == [4.5, 3.0, 1.0, 5.0]
    assert (loaded.skipped, loaded.skipped_examples) == (0, [])


def test_id_normalisation(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user_id,item_id\n 1 ,007\n2,a\n-3,12\n")
    f = load_interactions(path).frame
    assert f["user_id"].dtype == np.int64 and f["user_id"].tolist() == [1, 2, -3]
    # "007" is not a canonical integer, so the column stays text and "007" keeps its identity.
    assert f["item_id"].tolist() == ["007", "a", "12"]
    assert pd.api.types.is_string_dtype(f["item_id"])


def test_missing_ids_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user_id,item_id\n1,10\n2,20\n,30\n")
    err = raises_at(path, InteractionColumns(), row=3, line=4, column="user_id")
    assert err.reason == "missing user id"
    path = write(tmp_path / "r2.csv", "u,i\n1,10\n2,NaN\n")
    raises_at(path, InteractionColumns(user="u", item="i"), row=2, line=3, column="i")


def test_quoted_newline_shifts_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", 'user_id,item_id,note\n1,10,"two\nlines"\n\n2,20,ok\n3,,ok\n')
    raises_at(path, InteractionColumns(), row=3, line=6, column="item_id")


def test_bad_numbers_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user_id,item_id,rating,ts,w\n1,10,4,5,1\n2,20,4,5,heavy\n")
    err = raises_at(path, ALL, row=2, line=3, column="w")
    assert err.reason == "not a number: 'heavy'"
    path = write(tmp_path / "r2.csv", "user_id,item_id,rating,ts,w\n1,10,4,5,-1\n")
    assert raises_at(path, ALL, row=1, line=2, column="w").reason == "negative weight: '-1'"
    path = write(tmp_path / "r3.csv", "user_id,item_id,rating,ts,w\n1,10,,5,1\n")
    assert raises_at(path, ALL, row=1, line=2, column="rating").reason == "missing rating"


def test_first_bad_row_wins_across_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user_id,item_id,rating,ts,w\n1,10,4,5,1\n2,20,4,soon,1\n3,,x,5,1\n")
    err = raises_at(path, ALL, row=2, line=3, column="ts")
    assert err.reason == "unparsable timestamp: 'soon' (expected integer Unix seconds or ISO-8601)"


def test_timestamp_format(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user_id,item_id,when\n1,10,02/01/1970\n2,20,1970-01-02\n")
    cols = InteractionColumns(timestamp="when", timestamp_format="%d/%m/%Y")
    err = raises_at(path, cols, row=2, line=3, column="when")
    assert "expected format '%d/%m/%Y'" in err.reason
    path = write(tmp_path / "ok.csv", "user_id,item_id,when\n1,10,02/01/1970\n")
    assert load_interactions(path, cols).frame["timestamp"].tolist() == [86400]


def test_too_many_fields(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user_id,item_id\n1,10\n2,20,99\n3,30\n")
    err = raises_at(path, InteractionColumns(), row=2, line=3, column=None)
    assert err.reason == "expected 2 fields, saw 3"


def test_absent_column_lists_available(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user,item_id\n1,10\n")
    with pytest.raises(DataError, match=r"column 'user_id': column not found; available columns: \['user'"):
        load_interactions(path)


def test_skip_mode_counts_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(
        tmp_path / "r.csv",
        "user_id,item_id,rating,ts,w\n1,10,4,5,1\n,20,4,5,1\n3,30,x,5,1\n4,40,4,5,1,9\n5,50,2,never,1\n6,60,1,7,1\n",
    )
    with caplog.at_level(logging.WARNING, logger="twotower.data"):
        loaded = load_interactions(path, ALL, on_bad_rows="skip")
    assert loaded.frame["user_id"].tolist() == [1, 6]
    assert loaded.skipped == 4
    assert [e.split(":")[0] for e in loaded.skipped_examples] == [
        f"{path}, line {n} (row {n - 1}), column '{c}'" if c else f"{path}, line {n} (row {n - 1})"
        for n, c in [(3, "user_id"), (4, "rating"), (5, None), (6, "ts")]
    ]
    assert any("skipped 4 bad rows of 6" in r.getMessage() for r in caplog.records)


def test_tsv_txt_and_explicit_sep(tmp_path: Path) -> None:
    write(tmp_path / "r.tsv", "user_id\titem_id\n1\t10\n")
    write(tmp_path / "r.txt", "user_id|item_id\n1|10\n")
    write(tmp_path / "semi.csv", "user_id;item_id\n1;10\n")
    for name, sep in [("r.tsv", None), ("r.txt", None), ("semi.csv", ";")]:
        assert load_interactions(tmp_path / name, sep=sep).frame["item_id"].tolist() == [10]
    with pytest.raises(DataError, match="unsupported file type '.json'"):
        load_interactions(write(tmp_path / "r.json", "{}"))
    with pytest.raises(DataError, match="empty file"):
        load_interactions(write(tmp_path / "e.csv", ""))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_interactions(tmp_path / "nope.csv")


def test_parquet_errors_and_types(tmp_path: Path) -> None:
    path = tmp_path / "r.parquet"
    pd.DataFrame(
        {"user_id": ["a", "b", None], "item_id": [1, 2, 3], "rating": ["4", "five", "3"]}
    ).to_parquet(path)
    err = raises_at(path, InteractionColumns(rating="rating"), row=2, line=None, column="rating")
    assert str(err) == f"{path}, row 2, column 'rating': not a number: 'five'"
    raises_at(path, InteractionColumns(), row=3, line=None, column="user_id")
    loaded = load_interactions(path, InteractionColumns(rating="rating"), on_bad_rows="skip")
    assert loaded.skipped == 2 and loaded.frame["user_id"].tolist() == ["a"]
    with pytest.raises(DataError, match=r"column 'ts': column not found; available columns: \['user_id'"):
        load_interactions(path, InteractionColumns(timestamp="ts"))


def test_parquet_timestamps_and_nullable_ids(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pd.DataFrame(
        {
            "user_id": [1.0, np.nan, 3.0],  # an int column with a gap, as pandas writes it
            "item_id": ["10", "20", "30"],  # typed as text in the file: stays str
            "when": pd.to_datetime(["1970-01-02 00:00:00", "2020-01-01 00:00:00", "2020-01-01 00:00:01"]),
            "unix": [86400, 1, 2],
        }
    ).to_parquet(path)
    raises_at(path, InteractionColumns(timestamp="when"), row=2, line=None, column="user_id")
    f = load_interactions(path, InteractionColumns(timestamp="when"), on_bad_rows="skip").frame
    assert f["user_id"].dtype == np.int64 and f["user_id"].tolist() == [1, 3]
    assert f["item_id"].tolist() == ["10", "30"]
    assert f["timestamp"].tolist() == [86400, 1577836801]
    g = load_interactions(path, InteractionColumns(timestamp="unix"), on_bad_rows="skip").frame
    assert g["timestamp"].tolist() == [86400, 2]
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_interactions(write(tmp_path / "bad.parquet", "not parquet"))


def test_load_table_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "items.csv", "item_id,genres,price\n1,A|B,1.5\n2,B,2\n")
    table = load_table(path, "item_id")
    assert table["item_id"].tolist() == [1, 2] and table["item_id"].dtype == np.int64
    assert table["price"].tolist() == [1.5, 2.0] and table["genres"].tolist() == ["A|B", "B"]
    dup = write(tmp_path / "dup.csv", "item_id,x\n1,a\n2,b\n\n1,c\n")
    with pytest.raises(DataError) as info:
        load_table(dup, "item_id")
    assert (info.value.row, info.value.line, info.value.column) == (3, 5, "item_id")
    assert info.value.reason == "duplicate key 1 (first seen in row 1)"
    gap = write(tmp_path / "gap.csv", "item_id,x\n1,a\n,b\n")
    with pytest.raises(DataError, match=r"line 3 \(row 2\), column 'item_id': missing key"):
        load_table(gap, "item_id")
    with pytest.raises(DataError, match="column 'movie_id': column not found"):
        load_table(path, "movie_id")


def test_load_table_parquet(tmp_path: Path) -> None:
    path = tmp_path / "users.parquet"
    pd.DataFrame({"user_id": ["u1", "u2", "u1"], "age": [20, 30, 40]}).to_parquet(path)
    with pytest.raises(DataError) as info:
        load_table(path, "user_id")
    assert str(info.value) == f"{path}, row 3, column 'user_id': duplicate key 'u1' (first seen in row 1)"
    pd.DataFrame({"user_id": [5, 6], "age": [20, 30]}).to_parquet(path)
    table = load_table(path, "user_id")
    assert table["user_id"].tolist() == [5, 6] and table["age"].tolist() == [20, 30]


def test_click_flags_parse_and_a_bad_flag_names_row_and_column(tmp_path: Path) -> None:
    cols = InteractionColumns(clicked="clk")
    good = write(tmp_path / "good.csv", "user_id,item_id,clk\n1,10,1\n1,11,no\n2,10,True\n2,12,0\n")
    frame = load_interactions(good, cols).frame
    assert frame["clicked"].tolist() == [True, False, True, False]
    bad = write(tmp_path / "bad.csv", "user_id,item_id,clk\n1,10,1\n1,11,maybe\n")
    err = raises_at(bad, cols, row=2, line=3, column="clk")
    assert "click flag" in str(err)


def test_bom_crlf_quoted_separators_and_trailing_blank_lines(tmp_path: Path) -> None:
    body = 'user_id,item_id,note\r\n"1","a,b","x, y"\r\n2,"c""d",z\r\n\r\n3,10,w\r\n\r\n\r\n'
    path = tmp_path / "r.csv"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    f = load_interactions(path).frame
    assert f["user_id"].tolist() == [1, 2, 3] and f["user_id"].dtype == np.int64
    assert f["item_id"].tolist() == ["a,b", 'c"d', "10"]  # one text id makes the column text
    # The same layout with a bad cell: the BOM does not hide the header, CRLF and blank lines are counted.
    path.write_bytes(b"\xef\xbb\xbf" + body.replace("3,10,w", "3,,w").encode())
    raises_at(path, InteractionColumns(), row=3, line=5, column="item_id")


def test_header_only_and_blank_only_files(tmp_path: Path) -> None:
    for text in ("user_id,item_id,ts,rating,w\n", "user_id,item_id,ts,rating,w"):
        loaded = load_interactions(write(tmp_path / "h.csv", text), ALL)
        assert len(loaded.frame) == 0 and loaded.skipped == 0
        assert loaded.frame.dtypes.astype(str).tolist() == ["int64", "int64", "int64", "float64", "float64"]
    with pytest.raises(DataError, match="empty file"):
        load_interactions(write(tmp_path / "b.csv", "\n\n"))
    with pytest.raises(DataError, match="column 'w': column not found"):
        load_interactions(write(tmp_path / "h2.csv", "user_id,item_id,ts,rating\n"), ALL)


def test_mixed_and_very_large_ids_keep_their_identity(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.csv",
        "user_id,item_id\n7,999999999999999999\n007,-999999999999999999\na,0\n",
    )
    f = load_interactions(path).frame
    assert f["user_id"].tolist() == ["7", "007", "a"]  # "7" and "007" stay two users
    assert f["item_id"].dtype == np.int64 and f["item_id"].tolist() == [10**18 - 1, -(10**18 - 1), 0]
    # 19 digits may not fit int64; "-0" and "+5" are not canonical: all stay text, never merged.
    path = write(tmp_path / "r2.csv", "user_id,item_id\n9223372036854775807,-0\n1,0\n2,+5\n")
    f = load_interactions(path).frame
    assert f["user_id"].tolist() == ["9223372036854775807", "1", "2"]
    assert f["item_id"].tolist() == ["-0", "0", "+5"]


def test_nan_and_infinite_ratings_are_bad_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user_id,item_id,r\n1,1,NaN\n2,2,-inf\n3,3, 4 \n4,4,NAN\n")
    cols = InteractionColumns(rating="r")
    assert raises_at(path, cols, row=1, line=2, column="r").reason == "missing rating"
    loaded = load_interactions(path, cols, on_bad_rows="skip")
    assert loaded.frame["rating"].tolist() == [4.0] and loaded.skipped == 3
    reasons = [e.split(": ", 1)[1] for e in loaded.skipped_examples]
    assert reasons == ["missing rating", "not a finite number: '-inf'", "not a number: 'NAN'"]


def test_timestamps_epoch_numbers_and_iso_strings_in_one_column(tmp_path: Path) -> None:
    cells = ["86400", "1970-01-02T00:00:00", "86400.9", "1970-01-02 00:00:00+01:00", "-1.5", " 5 ",
             "1969-12-31T23:59:59.5Z", "1e9"]  # fmt: skip
    path = write(tmp_path / "r.csv", "user_id,item_id,ts\n" + "".join(f"1,1,{c}\n" for c in cells))
    f = load_interactions(path, InteractionColumns(timestamp="ts")).frame
    # zone-less = UTC, +01:00 is an hour earlier, fractions are floored (also below zero).
    assert f["timestamp"].tolist() == [86400, 86400, 86400, 82800, -2, 5, -1, 10**9]
    path = write(tmp_path / "m.csv", "user_id,item_id,ts\n1,1,5\n2,2,NULL\n")
    err = raises_at(path, InteractionColumns(timestamp="ts"), row=2, line=3, column="ts")
    assert err.reason == "missing timestamp"


def test_parquet_nullable_and_dictionary_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "n.parquet"
    pd.DataFrame(
        {
            "user_id": pd.array([1, None, 3], dtype="Int64"),
            "item_id": pd.Categorical(["x", "y", "x"]),
            "r": pd.array([4.5, 3.0, None], dtype="Float64"),
            "t": pd.array([86400, 1, 2], dtype="Int64"),
        }
    ).to_parquet(path)
    cols = InteractionColumns(rating="r", timestamp="t")
    raises_at(path, cols, row=2, line=None, column="user_id")
    loaded = load_interactions(path, cols, on_bad_rows="skip")
    assert loaded.skipped == 2 and loaded.frame["user_id"].tolist() == [1]
    assert loaded.frame.dtypes.astype(str).tolist() == ["int64", "str", "int64", "float64"]
    assert (loaded.frame["item_id"].tolist(), loaded.frame["timestamp"].tolist()) == (["x"], [86400])
    # Arrow dictionary-encoded columns and a millisecond timestamp before the epoch (floored).
    table = pa.table(
        {
            "user_id": pa.array([5, 6]).dictionary_encode(),
            "item_id": pa.array(["a", "b"]).dictionary_encode(),
            "t": pa.array([86_400_500, -500], pa.timestamp("ms")),
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    f = load_interactions(tmp_path / "d.parquet", InteractionColumns(timestamp="t")).frame
    assert f["user_id"].tolist() == [5, 6] and f["user_id"].dtype == np.int64
    assert f["item_id"].tolist() == ["a", "b"] and f["timestamp"].tolist() == [86400, -1]


def test_load_table_key_normalisation_edge_cases(tmp_path: Path) -> None:
    table = load_table(write(tmp_path / "a.csv", "item_id,x\n7,1\n007,2\n"), "item_id")
    assert table["item_id"].tolist() == ["7", "007"]  # distinct keys, as in the interactions
    with pytest.raises(DataError, match=r"line 3 \(row 2\), column 'item_id': duplicate key 7"):
        load_table(write(tmp_path / "b.csv", "item_id,x\n7,1\n 7 ,2\n"), "item_id")  # spaces stripped
    with pytest.raises(DataError, match=r"line 2 \(row 1\), column 'item_id': missing key"):
        load_table(write(tmp_path / "c.csv", "item_id,x\nNA,1\n"), "item_id")
    empty = load_table(write(tmp_path / "d.csv", "item_id,x\n"), "item_id")
    assert len(empty) == 0 and list(empty.columns) == ["item_id", "x"]


def test_parquet_text_ids_are_stripped_as_in_text_files(tmp_path: Path) -> None:
    # The CSV reader's rule (see the key edge cases above), for string and dictionary columns alike.
    path = tmp_path / "r.parquet"
    pd.DataFrame({"user_id": [" u1 ", "u2\t"], "item_id": pd.Categorical([" 7 ", "x "])}).to_parquet(path)
    f = load_interactions(path).frame
    assert f["user_id"].tolist() == ["u1", "u2"] and f["item_id"].tolist() == ["7", "x"]
    pd.DataFrame({"item_id": ["7", " 7 "], "x": [1, 2]}).to_parquet(path)
    with pytest.raises(
        DataError, match=r"row 2, column 'item_id': duplicate key '7' \(first seen in row 1\)"
    ):
        load_table(path, "item_id")


def test_parquet_categorical_id_column_with_one_distinct_value(tmp_path: Path) -> None:
    # `.map` keeps a one-category categorical categorical; the loader judges it by its values.
    path = tmp_path / "r.parquet"
    pd.DataFrame({"user_id": pd.Categorical(["a", "a"]), "item_id": [1, 2]}).to_parquet(path)
    assert load_interactions(path).frame["user_id"].tolist() == ["a", "a"]
    pd.DataFrame({"user_id": pd.Categorical(["a", None, "a"]), "item_id": [1, 2, 3]}).to_parquet(path)
    assert load_interactions(path, on_bad_rows="skip").frame["user_id"].tolist() == ["a", "a"]
    pd.DataFrame({"item_id": pd.Categorical(["x"]), "v": [1]}).to_parquet(path)
    assert load_table(path, "item_id")["item_id"].tolist() == ["x"]
    pd.DataFrame({"item_id": pd.Categorical([7, 7]), "v": [1, 2]}).to_parquet(path)
    assert load_interactions(path, InteractionColumns(user="v")).frame["item_id"].tolist() == [7, 7]


def test_parquet_numeric_timestamps_are_parsed_with_timestamp_format(tmp_path: Path) -> None:
    # The same yyyymmdd data in a CSV and in Parquet (int and whole float) gives the same seconds.
    cols = InteractionColumns(timestamp="t", timestamp_format="%Y%m%d")
    csv_path = write(tmp_path / "r.csv", "user_id,item_id,t\n1,1,20200101\n")
    assert load_interactions(csv_path, cols).frame["timestamp"].tolist() == [1577836800]
    pq_path = tmp_path / "r.parquet"
    pd.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "t": [20200101, 19700102]}).to_parquet(pq_path)
    assert load_interactions(pq_path, cols).frame["timestamp"].tolist() == [1577836800, 86400]
    pd.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "t": [20200101.0, 20200101.5]}).to_parquet(pq_path)
    err = raises_at(pq_path, cols, row=2, line=None, column="t")
    assert err.reason == "unparsable timestamp: 20200101.5 (expected format '%Y%m%d')"
    assert load_interactions(pq_path, cols, on_bad_rows="skip").frame["timestamp"].tolist() == [1577836800]


def test_parquet_uint64_ids_beyond_int64_keep_their_identity(tmp_path: Path) -> None:
    path = tmp_path / "r.parquet"
    pd.DataFrame({"user_id": np.array([2**64 - 1, 1], dtype=np.uint64), "item_id": [1, 2]}).to_parquet(path)
    assert load_interactions(path).frame["user_id"].tolist() == ["18446744073709551615", "1"]
    pd.DataFrame({"user_id": np.array([2**63 - 1, 1], dtype=np.uint64), "item_id": [1, 2]}).to_parquet(path)
    f = load_interactions(path).frame
    assert f["user_id"].dtype == np.int64 and f["user_id"].tolist() == [2**63 - 1, 1]


def test_parquet_integer_ids_with_nulls_beyond_2_53_keep_their_identity(tmp_path: Path) -> None:
    # A non-pandas writer (Spark, polars, pyarrow) stores a nullable int64 column without pandas metadata;
    # pandas would read it as float64, rounding 2**62 + 1 and 2**62 + 3 to the same float: one user.
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "r.parquet"
    big = [2**62 + 1, None, 2**62 + 3]
    pq.write_table(
        pa.table({"user_id": pa.array(big), "item_id": [1, 2, 3], "t": pa.array([5, None, 7])}), path
    )
    cols = InteractionColumns(timestamp="t")
    raises_at(path, cols, row=2, line=None, column="user_id")
    f = load_interactions(path, cols, on_bad_rows="skip").frame
    assert f["user_id"].dtype == np.int64 and f["user_id"].tolist() == [2**62 + 1, 2**62 + 3]
    assert f["timestamp"].tolist() == [5, 7]
    pq.write_table(
        pa.table({"user_id": pa.array([2**64 - 1, None, 1], pa.uint64()), "item_id": [1, 2, 3]}), path
    )
    assert load_interactions(path, on_bad_rows="skip").frame["user_id"].tolist() == [
        "18446744073709551615",
        "1",
    ]
    pq.write_table(pa.table({"item_id": pa.array([2**62 + 1, None]), "v": [1, 2]}), path)
    with pytest.raises(DataError, match=r"row 2, column 'item_id': missing key"):
        load_table(path, "item_id")


def test_a_folder_of_part_files_is_named_as_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "log.parquet"  # what Spark or Dask write: a folder of part files
    folder.mkdir()
    pd.DataFrame({"user_id": [1], "item_id": [2]}).to_parquet(folder / "part-0.parquet")
    with pytest.raises(IsADirectoryError, match=r"log.parquet: is a folder; pass one \.csv"):
        load_interactions(folder)


def test_parquet_ids_saved_as_the_frame_index_are_found(tmp_path: Path) -> None:
    # df.set_index("item_id").to_parquet(): ids 1, 2 are kept only as a range in the pandas metadata,
    # other ids as a column that pandas turns back into the index. Both used to be "not found" / KeyError.
    path = tmp_path / "items.parquet"
    for ids in ([1, 2], [5, 9]):
        pd.DataFrame({"item_id": ids, "genre": ["a", "b"]}).set_index("item_id").to_parquet(path)
        table = load_table(path, "item_id")
        assert table.to_dict("list") == {"item_id": ids, "genre": ["a", "b"]}
    log = tmp_path / "log.parquet"
    pd.DataFrame({"user_id": [1, 2], "item_id": [3, 4], "r": [5.0, 4.0]}).set_index(
        ["user_id", "item_id"]
    ).to_parquet(log)
    f = load_interactions(log, InteractionColumns(rating="r")).frame
    assert f.to_dict("list") == {"user_id": [1, 2], "item_id": [3, 4], "rating": [5.0, 4.0]}
    with pytest.raises(DataError, match=r"column 'x': column not found; available columns: \['r', 'user_id'"):
        load_interactions(log, InteractionColumns(item="x"))
