"""MovieLens loader tests: the real ml-100k from /work/shared (when present), and synthetic archives.

The synthetic archives below are a few rows of made-up data in the MovieLens layouts; no MovieLens
file is ever copied into the repository (the license forbids redistribution).
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twotower.data import movielens
from twotower.data.errors import ChecksumError, DataError
from twotower.data.movielens import load_movielens
from twotower.data.movielens_files import MovieLensFiles

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

needs_shared = pytest.mark.skipif(
    not (SHARED / "ml-100k" / "u.data").is_file() or not (SHARED / "ml-100k.zip").is_file(),
    reason=f"real MovieLens 100K not available at {SHARED} (shared data folder absent)",
)


def make_zip(path: Path, members: dict[str, str | bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content.encode("utf-8") if isinstance(content, str) else content)
    return path


def fake_100k(u_data: str = "3\t10\t4\t900\n1\t11\t5\t800\n2\t10\t1\t700\n") -> dict[str, str | bytes]:
    flags = ["0"] * 19
    comedy = list(flags)
    comedy[5] = "1"
    comedy[7] = "1"
    genre = "".join(f"{g}|{i}\n" for i, g in enumerate(movielens.ML100K_GENRES)) + "\n"
    return {
        "ml-100k/u.data": u_data,
        "ml-100k/u.item": (
            "10|Fake Film (2001)|01-Jan-2001||http://x|" + "|".join(comedy) + "\n"
            "11|Caf\xe9 Story (1990)||||" + "|".join(flags) + "\n"
        ).encode("latin-1"),
        "ml-100k/u.user": "1|17|F|writer|01234\n2|18|M|other|T8H1N\n3|60|M|none|99999\n",
        "ml-100k/u.genre": genre,
    }


# --- a) the real data set ---------------------------------------------------------------------------


@needs_shared
def test_real_ml100k_folder_and_zip_agree() -> None:
    folder = load_movielens("ml-100k", path=SHARED / "ml-100k")
    archive = load_movielens("ml-100k", path=SHARED / "ml-100k.zip")
    for data in (folder, archive):
        assert len(data.interactions) == 100_000
        assert data.users is not None and len(data.users) == 943
        assert len(data.items) == 1682
        assert data.interactions.dtypes.astype(str).tolist() == ["int64", "int64", "float64", "int64"]
    counts = folder.interactions["rating"].value_counts().sort_index()
    assert counts.tolist() == [6110, 11370, 27145, 34174, 21201]
    pd.testing.assert_frame_equal(folder.interactions, archive.interactions)
    pd.testing.assert_frame_equal(folder.users, archive.users)
    pd.testing.assert_frame_equal(folder.items, archive.items)
    # File order is kept: the first line of u.data is "196 242 3 881250949".
    assert folder.interactions.iloc[0].tolist() == [196, 242, 3.0, 881250949]
    toy = folder.items.iloc[0]
    assert (toy["title"], toy["genres"], toy["year"]) == (
        "Toy Story (1995)",
        "Animation|Children's|Comedy",
        1995,
    )
    assert folder.users.iloc[0].tolist() == [1, 24, "18-24", "M", "technician", "857"]
    assert folder.items["year"].isna().sum() == 1  # item 267 has no release date


# --- b) download, verify, cache -----------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[dict]:
    state: dict = {"body": b"", "requests": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            state["requests"] += 1
            state["path"] = self.path
            self.send_response(200)
            self.send_header("Content-Length", str(len(state["body"])))
            self.end_headers()
            self.wfile.write(state["body"])

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/datasets"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_verifies_and_caches(tmp_path: Path, server: dict) -> None:
    body = make_zip(tmp_path / "src.zip", fake_100k()).read_bytes()
    server["body"] = body
    cache = tmp_path / "cache"
    kwargs = dict(cache_dir=cache, base_url=server["url"], expected_md5=hashlib.md5(body).hexdigest())
    data = load_movielens("ml-100k", **kwargs)
    assert server["requests"] == 1 and server["path"] == "/datasets/ml-100k.zip"
    assert sorted(p.name for p in cache.iterdir()) == ["ml-100k.zip"]
    assert data.interactions["user_id"].tolist() == [3, 1, 2]
    again = load_movielens("ml-100k", **kwargs)
    assert server["requests"] == 1  # served from the cache
    pd.testing.assert_frame_equal(data.items, again.items)
    sha = hashlib.sha256(body).hexdigest()
    load_movielens("ml-100k", cache_dir=tmp_path / "c2", base_url=server["url"], expected_sha256=sha)
    assert server["requests"] == 2


def test_checksum_mismatch_leaves_nothing(tmp_path: Path, server: dict) -> None:
    good = make_zip(tmp_path / "src.zip", fake_100k()).read_bytes()
    server["body"] = good[:-10] + b"corruption"
    cache = tmp_path / "cache"
    expected = hashlib.md5(good).hexdigest()
    with pytest.raises(ChecksumError) as info:
        load_movielens("ml-100k", cache_dir=cache, base_url=server["url"] + "/", expected_md5=expected)
    message = str(info.value)
    assert f"{server['url']}/ml-100k.zip" in message and expected in message
    assert hashlib.md5(server["body"]).hexdigest() in message
    assert list(cache.iterdir()) == []


def test_download_needs_a_digest_and_permission(
    tmp_path: Path, server: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(movielens.CHECKSUMS, "ml-1m", {"md5": None, "sha256": None})
    with pytest.raises(ValueError, match=r"no published checksum is known for http://.*/ml-1m.zip"):
        load_movielens("ml-1m", cache_dir=tmp_path, base_url=server["url"])
    with pytest.raises(FileNotFoundError, match="download=False"):
        load_movielens("ml-100k", cache_dir=tmp_path, download=False)
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "env"))
    assert movielens.default_cache_dir() == tmp_path / "env"
    assert server["requests"] == 0
    assert all(len(v["md5"]) == 32 for k, v in movielens.CHECKSUMS.items() if k != "ml-1m")


# --- c) layouts and parsing ---------------------------------------------------------------------------


def test_ml100k_layout(tmp_path: Path) -> None:
    data = load_movielens("ml-100k", path=make_zip(tmp_path / "ml-100k.zip", fake_100k()))
    assert data.items["genres"].tolist() == ["Comedy|Documentary", ""]
    assert data.items["title"].tolist() == ["Fake Film (2001)", "Café Story (1990)"]
    np.testing.assert_array_equal(data.items["year"], [2001.0, np.nan])  # year from the release date
    assert data.users["age_bucket"].tolist() == ["Under 18", "18-24", "56+"]
    assert data.users["zip_prefix"].tolist() == ["012", "T8H", "999"]


def test_ml100k_bad_cell_is_located(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "ml-100k.zip", fake_100k("1\t10\t4\t900\n2\t11\tfive\t800\n"))
    with pytest.raises(DataError) as info:
        load_movielens("ml-100k", path=path)
    assert str(info.value) == f"{path}:ml-100k/u.data, line 2 (row 2), column 'rating': not a number: 'five'"


def test_ml1m_layout(tmp_path: Path) -> None:
    path = make_zip(
        tmp_path / "ml-1m.zip",
        {
            "ml-1m/ratings.dat": "2::20::5::978300760\n1::10::3::978302109\n",
            "ml-1m/users.dat": "1::F::1::10::48067\n2::M::56::16::70072-1234\n",
            "ml-1m/movies.dat": "10::Am\xe9lie: A Story (2001)::Comedy|Romance\n20::No Year::Drama\n".encode(
                "latin-1"
            ),
        },
    )
    data = load_movielens("ml-1m", path=path)
    assert data.interactions.to_numpy().tolist() == [[2, 20, 5, 978300760], [1, 10, 3, 978302109]]
    assert data.users.to_dict("list") == {
        "user_id": [1, 2],
        "age": [1, 56],
        "age_bucket": ["Under 18", "56+"],
        "gender": ["F", "M"],
        "occupation": ["K-12 student", "self-employed"],
        "zip_prefix": ["480", "700"],
    }
    assert data.items["title"].tolist() == ["Amélie: A Story (2001)", "No Year"]
    np.testing.assert_array_equal(data.items["year"], [2001.0, np.nan])
    bad = make_zip(
        tmp_path / "bad.zip",
        {"ratings.dat": "1::10::3::5\n", "movies.dat": "10::X::Drama\n", "users.dat": "1::F::7::0::1\n"},
    )
    with pytest.raises(
        DataError, match=r"bad.zip:users.dat, line 1 \(row 1\), column 'age': unknown age code 7"
    ):
        load_movielens("ml-1m", path=bad)


def test_ml20m_layout_and_folder(tmp_path: Path) -> None:
    files = {
        "ratings.csv": "userId,movieId,rating,timestamp\n5,30,3.5,1112486027\n1,10,4.0,1112484676\n",
        "movies.csv": (
            'movieId,title,genres\n10,"Good, Bad (1966)",Western\n30,Serial (1994-1998),(no genres listed)\n'
        ),
    }
    data = load_movielens(
        "ml-20m", path=make_zip(tmp_path / "ml-20m.zip", {f"ml-20m/{k}": v for k, v in files.items()})
    )
    assert data.users is None
    assert data.interactions["rating"].tolist() == [3.5, 4.0]
    assert data.items["title"].tolist() == ["Good, Bad (1966)", "Serial (1994-1998)"]
    assert data.items["genres"].tolist() == ["Western", ""]
    assert data.items["year"].tolist() == [1966.0, 1994.0]
    folder = tmp_path / "ml-25m"  # a plain folder works too, with or without the release sub-folder
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    for where in (folder, tmp_path):
        pd.testing.assert_frame_equal(load_movielens("ml-25m", path=where).interactions, data.interactions)
    with pytest.raises(FileNotFoundError, match="has no 'ratings.csv'"):
        load_movielens("ml-20m", path=make_zip(tmp_path / "empty.zip", {"README": "x"}))


def test_bad_cells_after_blank_lines_name_the_physical_line_and_nothing_wraps(tmp_path: Path) -> None:
    # pandas skips the blank (and spaces-only) lines, so row 2 is on line 4; a bad cell must name line 4.
    path = make_zip(tmp_path / "ml-100k.zip", fake_100k("1\t10\t4\t900\n\n   \n2\t11\tfive\t800\n"))
    with pytest.raises(DataError) as info:
        load_movielens("ml-100k", path=path)
    assert (info.value.row, info.value.line, info.value.column) == (2, 4, "rating")
    # A timestamp beyond int64 used to wrap to -2**63, an infinite rating was accepted.
    for u_data, column, reason in [
        ("1\t10\t4\t900\n2\t11\t5\t99999999999999999999\n", "timestamp", "not an integer"),
        ("1\t10\t4\t900\n2\t11\tinf\t800\n", "rating", "not a finite number"),
    ]:
        path = make_zip(tmp_path / "bad.zip", fake_100k(u_data))
        with pytest.raises(DataError) as info:
            load_movielens("ml-100k", path=path)
        assert (info.value.row, info.value.line, info.value.column) == (2, 2, column)
        assert info.value.reason.startswith(reason)
    csv_path = tmp_path / "ml-20m"
    csv_path.mkdir()
    (csv_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n\n1,10,4.0,5\n \n2,x,3.0,6\n")
    (csv_path / "movies.csv").write_text("movieId,title,genres\n10,A (2000),Drama\n")
    with pytest.raises(DataError) as info:
        load_movielens("ml-20m", path=csv_path)
    assert (info.value.row, info.value.line, info.value.column) == (2, 5, "movieId")


def test_the_cached_archive_gets_the_mode_a_plain_open_would_give(tmp_path: Path, server: dict) -> None:
    # mkstemp makes an owner-only (0600) file: renamed into a shared cache, other accounts could not read it.
    import os

    body = make_zip(tmp_path / "src.zip", fake_100k()).read_bytes()
    server["body"] = body
    cache = tmp_path / "cache"
    load_movielens(
        "ml-100k", cache_dir=cache, base_url=server["url"], expected_md5=hashlib.md5(body).hexdigest()
    )
    umask = os.umask(0o022)
    os.umask(umask)
    assert (cache / "ml-100k.zip").stat().st_mode & 0o777 == 0o666 & ~umask


def test_local_files_are_the_files_the_loader_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A run fingerprints local_files to refuse a resume on edited data: a file the loader reads but
    # RELEASE_FILES misses would be edited unnoticed.
    opened: list[str] = []
    real_open = MovieLensFiles.open

    def spy(self: MovieLensFiles, fname: str):  # returns open's context manager
        opened.append(fname)
        return real_open(self, fname)

    monkeypatch.setattr(MovieLensFiles, "open", spy)
    releases = {
        "ml-100k": {k.split("/", 1)[1]: v for k, v in fake_100k().items()},
        "ml-1m": {
            "ratings.dat": "1::10::3::978302109\n",
            "movies.dat": "10::Film (2001)::Comedy\n",
            "users.dat": "1::F::1::10::48067\n",
        },
        "ml-20m": {
            "ratings.csv": "userId,movieId,rating,timestamp\n1,10,4.0,1\n",
            "movies.csv": "movieId,title,genres\n10,X,Drama\n",
        },
    }
    for name, members in releases.items():
        folder = tmp_path / name / name  # the release folder inside the folder `path` names
        folder.mkdir(parents=True)
        for fname, content in {**members, "README.txt": "not read"}.items():
            (folder / fname).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        opened.clear()
        load_movielens(name, path=tmp_path / name)
        assert sorted(p.name for p in movielens.local_files(name, tmp_path / name)) == sorted(opened), name
        assert all(p.parent == folder for p in movielens.local_files(name, tmp_path / name))
    archive = make_zip(tmp_path / "ml-100k.zip", fake_100k())
    assert movielens.local_files("ml-100k", archive) == [archive]  # its members are read from it


def test_a_row_wider_than_the_layout_is_an_error_not_a_column_shift(tmp_path: Path) -> None:
    # Every row with a fifth field: pandas took the first field as the index, so user 1 rated as
    # user 10 item 4 with rating 900, silently. Now the first such row is located.
    path = make_zip(tmp_path / "ml-100k.zip", fake_100k("1\t10\t4\t900\t7\n2\t11\t5\t800\t8\n"))
    with pytest.raises(DataError) as info:
        load_movielens("ml-100k", path=path)
    assert str(info.value) == f"{path}:ml-100k/u.data, line 1 (row 1): expected 4 fields, saw 5"
    # Only a later row too wide: located too (pandas' own error did not give the row).
    path = make_zip(tmp_path / "late.zip", fake_100k("1\t10\t4\t900\n\n2\t11\t5\t800\t8\n"))
    with pytest.raises(DataError) as info:
        load_movielens("ml-100k", path=path)
    assert (info.value.row, info.value.line, info.value.reason) == (2, 3, "expected 4 fields, saw 5")
    # ml-20m's CSV with an extra column in every row: the header names 4, the rows hold 5.
    folder = tmp_path / "ml-20m"
    folder.mkdir()
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.0,5,x\n2,10,3.0,6,y\n")
    (folder / "movies.csv").write_text('movieId,title,genres\n10,"A, B (2000)",Drama\n')
    with pytest.raises(DataError) as info:
        load_movielens("ml-20m", path=folder)
    assert (info.value.row, info.value.line, info.value.reason) == (1, 2, "expected 4 fields, saw 5")


def test_trailing_separators_are_harmless(tmp_path: Path) -> None:
    # A trailing tab (an extra, empty field) on every row keeps every value where it belongs.
    data = load_movielens(
        "ml-100k", path=make_zip(tmp_path / "a.zip", fake_100k("3\t10\t4\t900\t\n1\t11\t5\t800\t\n"))
    )
    assert data.interactions.to_numpy().tolist() == [[3, 10, 4, 900], [1, 11, 5, 800]]
    folder = tmp_path / "ml-25m"
    folder.mkdir()
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.0,5,\n2,10,3.0,6,\n")
    (folder / "movies.csv").write_text('movieId,title,genres\n10,"A, B (2000)",Drama\n')
    data = load_movielens("ml-25m", path=folder)
    assert data.interactions.to_numpy().tolist() == [[1, 10, 4, 5], [2, 10, 3, 6]]
    assert data.items["title"].tolist() == ["A, B (2000)"]


def test_ml1m_unknown_code_after_a_blank_line_names_the_physical_line(tmp_path: Path) -> None:
    path = make_zip(
        tmp_path / "ml-1m.zip",
        {
            "ratings.dat": "1::10::3::5\n",
            "movies.dat": "10::X::Drama\n",
            "users.dat": "1::F::1::0::1\n\n2::M::7::0::1\n",
        },
    )
    with pytest.raises(DataError) as info:
        load_movielens("ml-1m", path=path)
    assert (info.value.row, info.value.line, info.value.column) == (2, 3, "age")
