"""MovieLens loader (ml-100k, ml-1m, ml-20m, ml-25m): local folder, local zip, or verified download.

The MovieLens license forbids redistribution, so nothing here ships data: callers point ``path`` at
their own copy (a folder or the GroupLens ``.zip``, read in place with `zipfile`), or let the loader
download ``{base_url}{name}.zip`` into a cache, verified against the digest GroupLens publishes.

Output (see `MovieLensData`): interactions in FILE ORDER - benchmark splits of ml-100k depend on the
order of ``u.data`` - with int64 ids, float64 ratings and int64 Unix-second timestamps; a users table
(ml-100k and ml-1m only) and an items table with a ``|``-joined genre string and a release year.
Malformed files raise `DataError` naming the file (``archive.zip:member`` inside a zip), the line
and the column; reading the files (folder or zip, typed columns, located errors) is
`twotower.data.movielens_files`.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from twotower.data.errors import ChecksumError, DataError
from twotower.data.movielens_files import MovieLensFiles, line_of, read_delimited
from twotower.storage import temp_file_beside

MovieLensName = Literal["ml-100k", "ml-1m", "ml-20m", "ml-25m"]
DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens/"

# Digests of the official archives. GroupLens publishes an MD5 beside each zip
# ({base_url}{name}.zip.md5); these values were confirmed against several independent public loaders
# that hard-code them, e.g. eli-osherovich/papers_with_code (datasets/movielens/dl_config.py), whose
# table lists all four. GroupLens publishes no SHA-256, so none is pinned here.
CHECKSUMS: dict[str, dict[str, str | None]] = {
    "ml-100k": {"md5": "0e33842e24a9c977be4e0107933c0723", "sha256": None},
    "ml-1m": {"md5": "c4d9eecfca2ab87c1945afe126590906", "sha256": None},
    "ml-20m": {"md5": "cd245b17a1ae2cc31bb14903e1204af3", "sha256": None},
    "ml-25m": {"md5": "6b51fb2759a8657d3bfcbfc42b592ada", "sha256": None},
}

# ml-1m stores age as a bucket code; ml-100k's exact ages are mapped onto the same buckets.
AGE_BUCKETS = {1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
# ml-1m occupation codes, from the ml-1m README.
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
]  # fmt: skip
# Fallback for an ml-100k copy without u.genre: the 19 flags of u.item, in u.genre order.
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
]  # fmt: skip
_RATING_COLUMNS = {"user_id": "int64", "item_id": "int64", "rating": "float64", "timestamp": "int64"}
_TITLE_YEAR = re.compile(r"\((\d{4})(?:[-–]\d{0,4})?\)\s*$")  # "(1995)" or a range "(1994-1998)"


@dataclass
class MovieLensData:
    name: str
    interactions: pd.DataFrame  # user_id int64, item_id int64, rating float64, timestamp int64
    users: pd.DataFrame | None  # user_id, age, age_bucket, gender, occupation, zip_prefix
    items: pd.DataFrame  # item_id, title, genres ("|"-joined, "" for none), year (float, NaN unknown)


# The files each release's loader below reads (ml-100k's u.genre only when present). Kept beside the
# loaders: a run fingerprints them (`local_files`) to refuse a resume on data edited in place.
RELEASE_FILES: dict[str, tuple[str, ...]] = {
    "ml-100k": ("u.data", "u.genre", "u.item", "u.user"),
    "ml-1m": ("ratings.dat", "movies.dat", "users.dat"),
    "ml-20m": ("ratings.csv", "movies.csv"),
    "ml-25m": ("ratings.csv", "movies.csv"),
}


def local_files(name: str, path: str | Path) -> list[Path]:
    """The files ``load_movielens(name, path=path)`` reads: the zip itself, or the release's files in
    the folder (found as the loader finds them). Only those: a README or an unused file of the folder
    (ml-25m's 415 MB genome-scores.csv) is neither read nor worth hashing."""
    source = Path(path)
    if not source.is_dir():
        return [source]
    root = MovieLensFiles.folder_root(source, name)
    return [root / fname for fname in RELEASE_FILES[name] if (root / fname).is_file()]


# --- release layouts ------------------------------------------------------------------------------


def _interactions(frame: pd.DataFrame) -> pd.DataFrame:
    frame.columns = list(_RATING_COLUMNS)
    return frame.astype(_RATING_COLUMNS).reset_index(drop=True)


def _year_from_title(titles: pd.Series) -> pd.Series:
    return titles.str.extract(_TITLE_YEAR, expand=False).astype(float)


def _age_bucket(age: pd.Series) -> pd.Series:
    lower = np.array(sorted(AGE_BUCKETS))
    # Bucket lower bounds are 1, 18, 25, ...; anything under 18 (including 0) is "Under 18".
    idx = np.clip(np.searchsorted(lower, age.to_numpy(), side="right") - 1, 0, None)
    return pd.Series([AGE_BUCKETS[int(lower[i])] for i in idx], index=age.index, dtype=str)


def _users(frame: pd.DataFrame) -> pd.DataFrame:
    frame["zip_prefix"] = frame["zip"].str.strip().str[:3]
    frame["age_bucket"] = _age_bucket(frame["age"])
    cols = ["user_id", "age", "age_bucket", "gender", "occupation", "zip_prefix"]
    return frame[cols].reset_index(drop=True)


def _load_100k(files: MovieLensFiles) -> MovieLensData:
    ratings = read_delimited(files, "u.data", list(_RATING_COLUMNS), sep="\t", numeric=_RATING_COLUMNS)
    genres = ML100K_GENRES
    if files.has("u.genre"):
        table = read_delimited(files, "u.genre", ["genre", "index"], sep="|", encoding="latin-1")
        table = table[table["genre"].str.strip() != ""]
        genres = table.assign(index=table["index"].astype(int)).sort_values("index")["genre"].tolist()
    head = ["item_id", "title", "release_date", "video_release_date", "imdb_url"]
    items = read_delimited(
        files, "u.item", head + genres, sep="|", encoding="latin-1",
        numeric={"item_id": "int64", **dict.fromkeys(genres, "int64")},
    )  # fmt: skip
    flags = items[genres].to_numpy(dtype=bool)
    names = np.array(genres, dtype=object)
    items["genres"] = ["|".join(names[row]) for row in flags]
    items["year"] = pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    items["year"] = items["year"].astype(float)
    users = read_delimited(
        files, "u.user", ["user_id", "age", "gender", "occupation", "zip"], sep="|", encoding="latin-1",
        numeric={"user_id": "int64", "age": "int64"},
    )  # fmt: skip
    return MovieLensData(
        "ml-100k", _interactions(ratings), _users(users), items[["item_id", "title", "genres", "year"]]
    )


def _load_1m(files: MovieLensFiles) -> MovieLensData:
    ratings = read_delimited(files, "ratings.dat", list(_RATING_COLUMNS), sep="::", numeric=_RATING_COLUMNS)
    items = read_delimited(
        files, "movies.dat", ["item_id", "title", "genres"], sep="::", encoding="latin-1",
        numeric={"item_id": "int64"},
    )  # fmt: skip
    items["year"] = _year_from_title(items["title"])
    users = read_delimited(
        files, "users.dat", ["user_id", "gender", "age", "occupation", "zip"], sep="::", encoding="latin-1",
        numeric={"user_id": "int64", "age": "int64", "occupation": "int64"},
    )  # fmt: skip
    for column, valid in (("age", set(AGE_BUCKETS)), ("occupation", set(range(len(ML1M_OCCUPATIONS))))):
        bad = ~users[column].isin(valid).to_numpy()
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            code = int(users[column].iloc[pos])
            raise DataError(
                files.label("users.dat"), f"unknown {column} code {code}", row=pos + 1,
                line=line_of(files, "users.dat", pos + 1, "\t"),
                column=column,
            )  # fmt: skip
    users["occupation"] = [ML1M_OCCUPATIONS[c] for c in users["occupation"]]
    return MovieLensData(
        "ml-1m", _interactions(ratings), _users(users), items[["item_id", "title", "genres", "year"]]
    )


def _load_csv_release(files: MovieLensFiles, name: str) -> MovieLensData:
    numeric = dict(zip(["userId", "movieId", "rating", "timestamp"], _RATING_COLUMNS.values(), strict=True))
    ratings = read_delimited(files, "ratings.csv", list(numeric), sep=",", header=True, numeric=numeric)
    items = read_delimited(
        files,
        "movies.csv",
        ["movieId", "title", "genres"],
        sep=",",
        header=True,
        numeric={"movieId": "int64"},
    )
    items = items.rename(columns={"movieId": "item_id"})
    # The sentinel means "no genres": an empty set, like an ml-100k item without flags.
    items["genres"] = items["genres"].replace("(no genres listed)", "")
    items["year"] = _year_from_title(items["title"])
    return MovieLensData(name, _interactions(ratings), None, items[["item_id", "title", "genres", "year"]])


_LOADERS = {
    "ml-100k": _load_100k,
    "ml-1m": _load_1m,
    "ml-20m": lambda f: _load_csv_release(f, "ml-20m"),
    "ml-25m": lambda f: _load_csv_release(f, "ml-25m"),
}


# --- download -------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$TWOTOWER_CACHE`` if set, else ``~/.cache/twotower``."""
    return Path(os.environ.get("TWOTOWER_CACHE") or Path.home() / ".cache" / "twotower")


def _download(url: str, dest: Path, digests: dict[str, str]) -> None:
    """Fetch ``url`` to ``dest`` atomically: a temp file in the same folder, verified, then renamed, so an
    interrupted or corrupt download never looks like a cached archive."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = temp_file_beside(dest)  # the mode open() would give (mkstemp's 0600 locks others out)
    tmp = Path(tmp_name)
    hashes = {algo: hashlib.new(algo, usedforsecurity=False) for algo in digests}
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=60)
            except OSError as exc:
                raise OSError(f"could not download {url}: {exc}") from exc
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        for h in hashes.values():
                            h.update(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename: a power loss must not leave a short archive
        for algo, expected in digests.items():
            actual = hashes[algo].hexdigest()
            if actual != expected.lower():
                raise ChecksumError(url, algo, expected, actual)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def load_movielens(
    name: MovieLensName,
    path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    base_url: str = DEFAULT_BASE_URL,
    download: bool = True,
    expected_md5: str | None = None,
    expected_sha256: str | None = None,
) -> MovieLensData:
    """Load a MovieLens release.

    ``path``: a folder holding the release's files (or its parent) or a ``.zip``; read as is, digests
    are never checked. Without ``path`` the archive is ``{cache_dir}/{name}.zip``, downloaded from
    ``{base_url}{name}.zip`` when absent (``download=True``) and verified against `CHECKSUMS`;
    ``expected_md5``/``expected_sha256``, when given, replace the pinned digests (e.g. for a mirror).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown MovieLens release {name!r}; choose one of {sorted(_LOADERS)}")
    if path is not None:
        source = Path(path)
        if not source.exists():
            raise FileNotFoundError(f"{source}: no such file or folder")
    else:
        source = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        source = source / f"{name}.zip"
        if not source.is_file():
            url = f"{base_url.rstrip('/')}/{name}.zip"
            if not download:
                raise FileNotFoundError(
                    f"{source} is not cached and download=False; pass path= or download=True"
                )
            overrides = {"md5": expected_md5, "sha256": expected_sha256}
            chosen = overrides if any(overrides.values()) else CHECKSUMS[name]
            digests = {algo: d for algo, d in chosen.items() if d}
            if not digests:
                raise ValueError(
                    f"no published checksum is known for {url}; pass expected_md5= or expected_sha256="
                )
            _download(url, source, digests)
    files = MovieLensFiles(source, name)
    try:
        return _LOADERS[name](files)
    finally:
        files.close()
