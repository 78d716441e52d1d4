"""Known-answer, round-trip and bad-input tests for `twotower.data.letor` (LETOR/svmlight files)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest

from twotower.data import letor
from twotower.data.errors import DataError
from twotower.data.letor import LetorData, read_letor, write_letor

KNOWN = (
    "# MQ2007-style file: a comment line, a blank line and a whitespace-only line are skipped\n"
    "2 qid:10 1:0.5 3:1.25 # docid = A \n"
    "\n"
    "0 qid:10 3:2 1:1e-3\n"  # indices out of order are fine
    "   \n"
    "1.0 qid:10\t2:-4 #third\n"  # '1.0' is the whole number 1; a tab separates like a space
    "3 qid:7 1:1 2:2 3:3 4:4\n"  # a dense line
    "0 qid:7 #\n"  # no features at all: a row of zeros
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_known_file_exact_arrays(tmp_path: Path) -> None:
    data = read_letor(write(tmp_path / "known.txt", KNOWN))
    expected = np.array(
        [[0.5, 0, 1.25, 0], [0.001, 0, 2, 0], [0, -4, 0, 0], [1, 2, 3, 4], [0, 0, 0, 0]], dtype=np.float32
    )
    assert data.features.dtype == np.float32 and np.array_equal(data.features, expected)
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [2, 0, 1, 3, 0]
    assert data.query_offsets.dtype == np.int64 and data.query_offsets.tolist() == [0, 3, 5]
    assert data.query_ids.dtype == np.int64 and data.query_ids.tolist() == [10, 7]
    assert data.comments == ["docid = A", "", "third", "", ""]
    assert (data.num_queries, data.num_features) == (2, 4)
    assert data.query_slice(1) == slice(3, 5) and data.query_slice(-2) == slice(0, 3)
    with pytest.raises(IndexError):
        data.query_slice(2)
    wide = read_letor(tmp_path / "known.txt", num_features=6, keep_comments=False)
    assert wide.features.shape == (5, 6) and np.array_equal(wide.features[:, :4], expected)
    assert not wide.features[:, 4:].any() and wide.comments is None


def test_string_qids_keep_their_identity(tmp_path: Path) -> None:
    # '007' is not a canonical integer, so every qid stays text and '007' is not merged with '7'.
    path = write(tmp_path / "s.txt", "1 qid:007 1:1\n0 qid:7 1:2\n2 qid:abc 2:1\n")
    data = read_letor(path)
    assert data.query_ids.dtype == object and data.query_ids.tolist() == ["007", "7", "abc"]
    assert data.query_offsets.tolist() == [0, 1, 2, 3]


def test_empty_file_has_no_documents(tmp_path: Path) -> None:
    data = read_letor(write(tmp_path / "e.txt", "# only a comment\n\n"), num_features=3)
    assert data.features.shape == (0, 3) and data.query_offsets.tolist() == [0]
    assert data.num_queries == 0 and data.query_ids.dtype == np.int64


def test_writer_text_is_exact(tmp_path: Path) -> None:
    data = LetorData(
        features=np.array([[0.5, 0, 1.25, 0], [0.1, 0, 0, 0]], dtype=np.float32),
        labels=np.array([2, 0]),
        query_offsets=np.array([0, 1, 2]),
        query_ids=np.array(["q1", "q2"], dtype=object),
        comments=["doc A", ""],
        path=Path("mem"),
    )
    sparse, dense = tmp_path / "sparse.txt", tmp_path / "dense.txt"
    write_letor(sparse, data)
    write_letor(dense, data, sparse=False)
    # Column 4 is zero everywhere, so the first sparse line lists it to keep the width in the file.
    assert sparse.read_text() == "2 qid:q1 1:0.5 3:1.25 4:0.0 # doc A\n0 qid:q2 1:0.1\n"
    assert (
        dense.read_text() == "2 qid:q1 1:0.5 2:0.0 3:1.25 4:0.0 # doc A\n0 qid:q2 1:0.1 2:0.0 3:0.0 4:0.0\n"
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temp files left


def random_data(rng: np.random.Generator, n_queries: int, width: int) -> LetorData:
    sizes = rng.integers(1, 12, n_queries)
    n = int(sizes.sum())
    values = rng.standard_normal((n, width)).astype(np.float32)
    scale = np.float32(10.0) ** rng.integers(-40, 38, (n, width)).astype(np.float32)
    features = (values * scale).astype(np.float32)  # subnormals up to ~1e38: every float32 regime
    features[~np.isfinite(features)] = 1
    features[rng.random((n, width)) < 0.6] = 0  # mostly sparse
    features[features == 0] = 0  # no -0.0: a sparse file cannot keep its sign
    comments = [f"doc {i} = x#{i}" if i % 3 else "" for i in range(n)]
    return LetorData(
        features=features,
        labels=rng.integers(0, 5, n),
        query_offsets=np.concatenate([[0], np.cumsum(sizes)]),
        query_ids=np.arange(n_queries) * 3 + 100,
        comments=comments,
        path=Path("mem"),
    )


@pytest.mark.parametrize("name,sparse", [("r.txt", True), ("r.txt", False), ("r.txt.gz", True)])
def test_round_trip_is_bit_exact(tmp_path: Path, name: str, sparse: bool) -> None:
    original = random_data(np.random.default_rng(7), n_queries=40, width=9)
    write_letor(tmp_path / name, original, sparse=sparse)
    back = read_letor(tmp_path / name)
    assert back.features.shape == original.features.shape
    assert np.array_equal(back.features.view(np.uint32), original.features.view(np.uint32))
    assert np.array_equal(back.labels, original.labels)
    assert np.array_equal(back.query_offsets, original.query_offsets)
    assert np.array_equal(back.query_ids, original.query_ids)
    assert back.comments == original.comments


def test_hand_written_gzip(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "known.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write(KNOWN)
    plain = read_letor(write(tmp_path / "known.txt", KNOWN))
    zipped = read_letor(tmp_path / "known.txt.gz")
    assert np.array_equal(zipped.features, plain.features) and zipped.comments == plain.comments
    write(tmp_path / "fake.gz", "2 qid:1 1:1\n")
    with pytest.raises(DataError, match="fake.gz: cannot read the file"):
        read_letor(tmp_path / "fake.gz")


def test_many_blocks_match_and_keep_line_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = random_data(np.random.default_rng(3), n_queries=200, width=20)
    path = tmp_path / "big.txt"
    write_letor(path, original)
    one_block = read_letor(path)
    monkeypatch.setattr(letor, "_BLOCK_CHARS", 500)  # dozens of blocks
    many = read_letor(path)
    assert np.array_equal(many.features, one_block.features)
    assert np.array_equal(many.features, original.features)
    # A bad value deep in the file is found by the fast path and located by the slow one.
    lines = path.read_text().splitlines(keepends=True)
    lines[700] = lines[700].split(" #")[0].rstrip() + " 5:oops\n"
    write(path, "".join(lines))
    with pytest.raises(DataError) as info:
        read_letor(path)
    assert (info.value.line, info.value.row, info.value.column) == (701, 701, "feature 5")


PREFIX = "# header\n1 qid:1 1:1 2:2\n\n"  # the bad line below is physical line 4, document 2


@pytest.mark.parametrize(
    "bad,column,reason",
    [
        ("2 1:0.5", "qid", "expected 'qid:<id>' after the label, got '1:0.5'"),
        ("2", "qid", "expected 'qid:<id>' after the label, got end of line"),
        ("2 qid: 1:0.5", "qid", "empty qid"),
        ("2 qid:1 0.5", "features", "expected index:value, got '0.5' (token 1 after the qid)"),
        ("2 qid:1 1:1 7:abc", "feature 7", "not a number: 'abc'"),
        ("2 qid:1 7:1:1", "feature 7", "not a number: '1:1'"),
        ("2 qid:1 7:nan", "feature 7", "not a finite number: 'nan'"),
        ("2 qid:1 7:-inf", "feature 7", "not a finite number: '-inf'"),
        ("2 qid:1 7:1e999", "feature 7", "not a finite number: '1e999'"),
        # finite as float64 but inf as the stored float32 (write_letor refuses inf: no round trip)
        ("2 qid:1 7:1e39", "feature 7", "out of float32 range: '1e39'"),
        ("2 qid:1 7:-3.5e38", "feature 7", "out of float32 range: '-3.5e38'"),
        ("2 qid:1 0:1", "feature index", "feature index must be a whole number >= 1, got '0'"),
        ("2 qid:1 -3:1", "feature index", "feature index must be a whole number >= 1, got '-3'"),
        ("2 qid:1 1.5:1", "feature index", "feature index must be a whole number >= 1, got '1.5'"),
        ("2 qid:1 :1", "feature index", "feature index must be a whole number >= 1, got ''"),
        ("2 qid:1 3:1 1:1 3:2", "feature 3", "duplicate feature index 3 (also token 1 of this line)"),
        ("2.5 qid:1 1:1", "label", "label must be a whole number >= 0, got '2.5'"),
        ("-1 qid:1 1:1", "label", "label must be a whole number >= 0, got '-1'"),
        ("abc qid:1 1:1", "label", "label must be a whole number >= 0, got 'abc'"),
        ("nan qid:1 1:1", "label", "label must be a whole number >= 0, got 'nan'"),
    ],
)
def test_malformed_line_names_file_line_and_field(tmp_path: Path, bad: str, column: str, reason: str) -> None:
    path = write(tmp_path / "bad.txt", PREFIX + bad + "\n1 qid:1 1:1\n")
    with pytest.raises(DataError) as info:
        read_letor(path)
    err = info.value
    assert (err.path, err.line, err.row, err.column, err.reason) == (str(path), 4, 2, column, reason)
    assert str(err) == f"{path}, line 4 (row 2), column {column!r}: {reason}"


def test_limits_from_arguments(tmp_path: Path) -> None:
    path = write(tmp_path / "lim.txt", PREFIX + "5 qid:1 4:1\n")
    with pytest.raises(DataError) as info:
        read_letor(path, max_label=4)
    assert (info.value.line, info.value.column, info.value.reason) == (4, "label", "label 5 > max_label=4")
    with pytest.raises(DataError) as info:
        read_letor(path, num_features=3)
    assert (info.value.line, info.value.column) == (4, "feature 4")
    assert info.value.reason == "feature index 4 > num_features=3"
    assert read_letor(path, max_label=5, num_features=4).labels.tolist() == [1, 5]


def test_earliest_error_wins_across_fields(tmp_path: Path) -> None:
    # Features are checked a block at a time, after the labels: the feature error on line 2 must
    # still be reported before the label error on line 3.
    path = write(tmp_path / "order.txt", "1 qid:1 1:1\n1 qid:1 2:x\nbad qid:1 1:1\n")
    with pytest.raises(DataError) as info:
        read_letor(path)
    assert (info.value.line, info.value.column) == (2, "feature 2")


def test_non_contiguous_query_names_both_places(tmp_path: Path) -> None:
    path = write(tmp_path / "q.txt", "1 qid:1 1:1\n0 qid:1 1:2\n\n2 qid:2 1:3\n0 qid:1 1:4\n")
    with pytest.raises(DataError) as info:
        read_letor(path)
    err = info.value
    assert (err.line, err.row, err.column) == (5, 4, "qid")
    assert err.reason == (
        "qid '1' reappears after other queries (its documents were on lines 1-2); "
        "a query's documents must be contiguous"
    )
    assert pickle.loads(pickle.dumps(err)).line == 5


def test_writer_rejects_data_it_could_not_read_back(tmp_path: Path) -> None:
    good = random_data(np.random.default_rng(1), n_queries=2, width=3)
    bad_value = LetorData(**{**good.__dict__, "features": np.full_like(good.features, np.nan)})
    with pytest.raises(ValueError, match="finite"):
        write_letor(tmp_path / "x.txt", bad_value)
    bad_qid = LetorData(**{**good.__dict__, "query_ids": np.array(["a b", "c"], dtype=object)})
    with pytest.raises(ValueError, match="whitespace"):
        write_letor(tmp_path / "x.txt", bad_qid)
    padded = LetorData(**{**good.__dict__, "comments": [" x", *good.comments[1:]]})
    with pytest.raises(ValueError, match="start/end with spaces"):
        write_letor(tmp_path / "x.txt", padded)
    assert not (tmp_path / "x.txt").exists()


def test_clean_files_take_the_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_slow_path(*_args: object) -> None:
        raise AssertionError("the per-token parser ran on a clean file")

    expected = read_letor(write(tmp_path / "known.txt", KNOWN))
    monkeypatch.setattr(letor._Reader, "_slow", no_slow_path)
    assert np.array_equal(read_letor(tmp_path / "known.txt").features, expected.features)  # unsorted
    original = random_data(np.random.default_rng(5), n_queries=30, width=6)
    for sparse in (True, False):  # the scatter and the reshape branches
        write_letor(tmp_path / "r.txt", original, sparse=sparse)
        assert np.array_equal(read_letor(tmp_path / "r.txt").features, original.features)


def test_float32_range_boundary(tmp_path: Path) -> None:
    # FLT_MAX itself (and anything that rounds down to it) is a finite float32 and is kept exactly.
    path = write(tmp_path / "max.txt", "1 qid:1 1:3.4028235e38 2:-3.4028235e38 3:1e-50\n")
    data = read_letor(path)
    assert data.features.tolist() == [[np.finfo(np.float32).max, -np.finfo(np.float32).max, 0.0]]


@pytest.mark.parametrize("name", ["crlf.txt", "crlf.txt.gz"])
def test_crlf_trailing_spaces_and_hashes_in_comments(tmp_path: Path, name: str) -> None:
    text = "# head\r\n2 qid:b 1:1 2:2   \r\n\r\n0 qid:b 2:3 # id = x#1 \r\n1.0 qid:a\t1:-1\r\n"
    raw = text.encode()
    (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    data = read_letor(tmp_path / name)
    assert data.features.tolist() == [[1, 2], [0, 3], [-1, 0]] and data.labels.tolist() == [2, 0, 1]
    assert data.query_ids.tolist() == ["b", "a"] and data.query_offsets.tolist() == [0, 2, 3]  # file order
    assert data.comments == ["", "id = x#1", ""]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"1 qid:1 1:1\r\n1 qid:1 2:x\r\n")  # lines still counted right
    with pytest.raises(DataError) as info:
        read_letor(bad)
    assert (info.value.line, info.value.column) == (2, "feature 2")
