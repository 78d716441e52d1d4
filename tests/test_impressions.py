"""Known-answer and bad-input tests for `twotower.data.impressions` (ranked impression logs)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pydantic
import pytest

from twotower.data.errors import DataError
from twotower.data.impressions import ImpressionColumns, read_impressions

TWO_DEVICES = (
    "request_id,item_id,position,click,device,label\n"
    "q1,10,2,0,mobile,0\n"
    "q1,11,1,1,mobile,2\n"  # rows of a request need not be in position order
    "q2,10,1,no,desktop,1\n"
    "q1,12,4,yes,mobile,3\n"  # position 3 of q1 was not logged: a masked slot
    "q2,13,2.0,0,desktop,0\n"  # '2.0' is the whole number 2
    "q3, 11 ,3,1,desktop,1\n"  # only position 3 of q3
)
CTX = ImpressionColumns(context=["device"], label="label")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_two_devices_exact_frame_and_lists(tmp_path: Path) -> None:
    log = read_impressions(write(tmp_path / "imp.csv", TWO_DEVICES), CTX)
    f = log.frame
    assert list(f.columns) == ["request_id", "item_id", "position", "click", "label", "device"]
    assert f.dtypes.astype(str).tolist() == ["str", "int64", "int64", "int8", "int64", "str"]
    # Requests in order of first appearance (q1, q2, q3), each sorted by position.
    assert f["request_id"].tolist() == ["q1", "q1", "q1", "q2", "q2", "q3"]
    assert f["position"].tolist() == [1, 2, 4, 1, 2, 3]
    assert f["item_id"].tolist() == [11, 10, 12, 10, 13, 11]
    assert f["click"].tolist() == [1, 0, 1, 0, 0, 1]
    assert f["label"].tolist() == [2, 0, 3, 1, 0, 1]
    assert (log.skipped, log.context) == (0, ["device"])

    lists = log.to_lists()
    assert lists.request_ids.tolist() == ["q1", "q2", "q3"]
    # Column j holds position j + 1; -1 marks an unused slot of an int item column.
    assert lists.items.dtype == np.int64
    assert lists.items.tolist() == [[11, 10, -1, 12], [10, 13, -1, -1], [-1, -1, 11, -1]]
    assert lists.mask.tolist() == [[1, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0]]
    assert lists.clicks.dtype == np.float32
    assert lists.clicks.tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]]
    assert lists.labels is not None
    assert lists.labels.tolist() == [[2, 0, -1, 3], [1, 0, -1, -1], [-1, -1, 1, -1]]
    assert list(lists.context) == ["device"]
    assert lists.context["device"].tolist() == ["mobile", "desktop", "desktop"]
    assert lists.user_ids is None

    top2 = log.to_lists(max_position=2)  # q3 has nothing in the top 2 and drops out
    assert top2.request_ids.tolist() == ["q1", "q2"]
    assert top2.items.tolist() == [[11, 10], [10, 13]] and top2.mask.all()
    assert top2.clicks.tolist() == [[1, 0], [0, 0]]
    assert top2.context["device"].tolist() == ["mobile", "desktop"]
    assert log.to_lists(max_position=6).items.shape == (3, 6)
    with pytest.raises(ValueError, match="max_position"):
        log.to_lists(max_position=0)


def test_text_item_ids_and_users(tmp_path: Path) -> None:
    text = "req\tdoc\tpos\tclk\tuid\n7\ta\t1\ttrue\t5\n7\t007\t2\tfalse\t5\n8\ta\t1\t1\t6\n"
    cols = ImpressionColumns(request="req", item="doc", position="pos", click="clk", user="uid")
    lists = read_impressions(write(tmp_path / "imp.tsv", text), cols).to_lists()
    assert lists.request_ids.dtype == np.int64 and lists.request_ids.tolist() == [7, 8]
    assert lists.items.dtype == object and lists.items.tolist() == [["a", "007"], ["a", None]]
    assert lists.user_ids is not None and lists.user_ids.tolist() == [5, 6]
    assert lists.labels is None


HEADER = "request_id,item_id,position,click,device,label\n"
GOOD = "r1,1,1,1,mobile,0\nr1,2,2,0,mobile,1\n\n"  # rows 1-2; the blank line makes row 3 line 5


@pytest.mark.parametrize(
    "bad,column,reason",
    [
        (",3,3,0,mobile,0", "request_id", "missing request id"),
        ("r1,NA,3,0,mobile,0", "item_id", "missing item id"),
        ("r1,3,0,0,mobile,0", "position", "position must be a whole number >= 1: '0'"),
        ("r1,3,2.5,0,mobile,0", "position", "position must be a whole number >= 1: '2.5'"),
        ("r1,3,third,0,mobile,0", "position", "not a number: 'third'"),
        ("r1,3,,0,mobile,0", "position", "missing position"),
        ("r1,3,3,maybe,mobile,0", "click", "not a click flag: 'maybe' (expected 1/0, true/false or yes/no)"),
        ("r1,3,3,0,mobile,-1", "label", "label must be a whole number >= 0: '-1'"),
        ("r1,3,3,0,mobile,1.5", "label", "label must be a whole number >= 0: '1.5'"),
        ("r1,3,3,0,,0", "device", "missing context value"),
        ("r1,3,2,0,mobile,0", "position", "duplicate position 2 in request 'r1' (first in row 2)"),
        ("r1,1,3,0,mobile,0", "item_id", "duplicate item 1 in request 'r1' (first in row 1)"),
        (
            "r1,3,3,0,tablet,0",
            "device",
            "context 'device' changes within request 'r1': 'tablet' here, 'mobile' in row 1",
        ),
    ],
)
def test_bad_row_names_file_row_line_and_column(tmp_path: Path, bad: str, column: str, reason: str) -> None:
    path = write(tmp_path / "imp.csv", HEADER + GOOD + bad + "\nr2,1,1,0,desktop,0\n")
    with pytest.raises(DataError) as info:
        read_impressions(path, CTX)
    err = info.value
    assert (err.path, err.row, err.line, err.column, err.reason) == (str(path), 3, 5, column, reason)
    assert str(err) == f"{path}, line 5 (row 3), column {column!r}: {reason}"


def test_missing_configured_column(tmp_path: Path) -> None:
    path = write(tmp_path / "imp.csv", "request_id,item_id,pos,click\nr1,1,1,1\n")
    with pytest.raises(DataError) as info:
        read_impressions(path)
    assert info.value.column == "position" and info.value.row is None
    assert "column not found; available columns: ['request_id', 'item_id', 'pos', 'click']" in str(info.value)
    with pytest.raises(DataError, match="column 'device': column not found"):
        read_impressions(path, ImpressionColumns(position="pos", context=["device"]))


def test_user_must_be_constant_within_a_request(tmp_path: Path) -> None:
    path = write(tmp_path / "imp.csv", "request_id,item_id,position,click,uid\nr1,1,1,1,u1\nr1,2,2,0,u2\n")
    with pytest.raises(DataError) as info:
        read_impressions(path, ImpressionColumns(user="uid"))
    assert (info.value.row, info.value.column) == (2, "uid")
    assert info.value.reason == "user changes within request 'r1': 'u2' here, 'u1' in row 1"


def test_earliest_bad_row_wins_across_rules(tmp_path: Path) -> None:
    # Row 3 repeats a position, row 4 has a bad click: the cross-row rule is reported first.
    text = HEADER + "r1,1,1,1,m,0\nr1,2,2,0,m,0\nr1,3,2,0,m,0\nr1,4,4,x,m,0\n"
    with pytest.raises(DataError) as info:
        read_impressions(write(tmp_path / "imp.csv", text), CTX)
    assert (info.value.row, info.value.column) == (3, "position")


def test_skip_mode_drops_only_the_offending_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = HEADER + (
        "r1,1,1,1,m,0\n"  # row 1 ok
        "r1,2,1,0,m,0\n"  # row 2 repeats position 1
        "r1,3,2,0,d,0\n"  # row 3 changes the device
        "r1,4,2,x,m,0\n"  # row 4 bad click
        "r1,5,2,0,m,0\n"  # row 5 ok: position 2 is free again once rows 2-4 are dropped
        "r2,1,1,0,d,0,9\n"  # row 6 has too many fields
    )
    with caplog.at_level(logging.WARNING, logger="twotower.data"):
        log = read_impressions(write(tmp_path / "imp.csv", text), CTX, on_bad_rows="skip")
    assert log.frame["item_id"].tolist() == [1, 5] and log.frame["position"].tolist() == [1, 2]
    assert log.skipped == 4
    assert [e.split(":")[0] for e in log.skipped_examples] == [
        f"{tmp_path / 'imp.csv'}, line {r + 1} (row {r}), column '{c}'"
        if c
        else f"{tmp_path / 'imp.csv'}, line 7 (row 6)"
        for r, c in [(2, "position"), (3, "device"), (4, "click"), (6, None)]
    ]
    assert any("skipped 4 bad rows of 6" in r.getMessage() for r in caplog.records)


def test_parquet_round_trip(tmp_path: Path) -> None:
    log = read_impressions(write(tmp_path / "imp.csv", TWO_DEVICES), CTX)
    log.frame.to_parquet(tmp_path / "imp.parquet")
    back = read_impressions(tmp_path / "imp.parquet", CTX)
    pd.testing.assert_frame_equal(back.frame, log.frame)
    # Nullable ints arrive as floats: whole positions are fine, a gap is a missing position.
    pd.DataFrame(
        {
            "request_id": [1, 1, 2],
            "item_id": ["a", "b", "c"],
            "position": [1.0, np.nan, 1.0],
            "click": [1, 0, 0],
        }
        | {"device": [3, 3, 4], "label": [0, 1, 2]}
    ).to_parquet(tmp_path / "gap.parquet")
    with pytest.raises(DataError) as info:
        read_impressions(tmp_path / "gap.parquet", CTX)
    assert (info.value.row, info.value.line, info.value.column) == (2, None, "position")
    kept = read_impressions(tmp_path / "gap.parquet", CTX, on_bad_rows="skip")
    assert kept.frame["request_id"].tolist() == [1, 2] and kept.frame["position"].tolist() == [1, 1]
    assert kept.to_lists().context["device"].tolist() == ["3", "4"]  # categorical text, not 3.0


def test_columns_schema_is_strict() -> None:
    with pytest.raises(pydantic.ValidationError, match="requets"):
        ImpressionColumns.model_validate({"requets": "query_id"})
    with pytest.raises(pydantic.ValidationError, match="clash"):
        ImpressionColumns(context=["position"])
    with pytest.raises(pydantic.ValidationError, match="repeat"):
        ImpressionColumns(context=["device", "device"])
    with pytest.raises(ValueError, match="on_bad_rows"):
        read_impressions("x.csv", on_bad_rows="ignore")  # type: ignore[arg-type]


def test_a_typo_position_is_a_clear_error_not_a_huge_allocation(tmp_path: Path) -> None:
    text = "request_id,item_id,position,click\nq1,10,1,1\nq1,11,2,0\nq2,12,1000000000,0\n"
    log = read_impressions(write(tmp_path / "imp.csv", text))
    with pytest.raises(ValueError, match=r"position 1000000000 \(request 'q2', item 12\)"):
        log.to_lists()  # used to ask numpy for 2 x 10^9 slots (MemoryError)
    assert log.to_lists(max_position=2).mask.tolist() == [[True, True]]  # q2 has no slot left: dropped
