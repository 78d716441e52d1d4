"""Atomic writes: the old file or the new one, never a truncated one; modes a plain open would give."""

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower.chunked_export import SafetensorsAppender
from twotower.storage import (
    atomic_write_text,
    load_tensors,
    read_json,
    save_tensors,
    staging_dir_beside,
    write_json,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _expected_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def test_files_get_the_mode_open_would_give_not_mkstemps_0600(tmp_path):
    """mkstemp makes owner-only files: a model exported by a training job could not be served by a
    service account. Every atomic writer hands its file the umask's mode instead."""
    write_json(tmp_path / "a.json", {"x": 1})
    save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(2)})
    with SafetensorsAppender(tmp_path / "e.safetensors", "emb", (2, 3), torch.float32) as out:
        out.append(torch.zeros(2, 3))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _expected_mode() == _mode(plain)
    for name in ("a.json", "t.safetensors", "e.safetensors"):
        assert _mode(tmp_path / name) == _mode(plain), name
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    write_json(path, {"version": 1})
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_json(path, {"version": 2, "bad": object()})
    assert read_json(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_json_round_trip_converts_tensors_numpy_scalars_and_paths(tmp_path):
    path = tmp_path / "sub" / "m.json"  # the directory is created
    write_json(path, {"t": torch.tensor([1.5, 2.0]), "n": np.int64(3), "p": Path("/a/b")})
    assert read_json(path) == {"n": 3, "p": "/a/b", "t": [1.5, 2.0]}
    assert path.read_text().endswith("\n")


def test_tensors_that_share_memory_are_saved_as_separate_copies(tmp_path):
    """safetensors refuses aliased tensors (tied weights, views); save_tensors de-aliases them."""
    base = torch.arange(6.0)
    path = tmp_path / "w.safetensors"
    save_tensors(path, {"all": base, "view": base[2:4], "tied": base}, metadata={"k": "v"})
    loaded = load_tensors(path)
    assert torch.equal(loaded["view"], torch.tensor([2.0, 3.0]))
    assert torch.equal(loaded["tied"], base) and torch.equal(loaded["all"], base)


def test_text_is_written_as_utf8(tmp_path):
    atomic_write_text(tmp_path / "r.md", "nDCG@10 ± std → ok")
    assert (tmp_path / "r.md").read_bytes().decode("utf-8") == "nDCG@10 ± std → ok"


def test_staging_directories_get_the_mode_mkdir_would_give(tmp_path):
    """An export or ranker directory is staged and renamed into place: it must not stay 0700."""
    staged = staging_dir_beside(tmp_path / "export")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert staged.parent == tmp_path and staged.name.startswith(".export.")
    assert _mode(staged) == _mode(plain)


def test_a_truncated_json_or_safetensors_file_is_an_error_naming_it(tmp_path):
    """The parsers' own errors ("Expecting ',' delimiter", "invalid header length") do not say which
    file; the error does, and is still a ValueError and a SafetensorError for callers catching either."""
    from safetensors import SafetensorError

    write_json(tmp_path / "m.json", {"a": [1, 2, 3]})
    broken = tmp_path / "broken.json"
    broken.write_bytes((tmp_path / "m.json").read_bytes()[:9])
    with pytest.raises(ValueError, match="broken.json"):
        read_json(broken)
    save_tensors(tmp_path / "w.safetensors", {"w": torch.ones(64)})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "w.safetensors").read_bytes()[:40])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_tensors(cut)
    with pytest.raises(SafetensorError, match="cut.safetensors"):
        load_tensors(cut)


def test_numpy_arrays_are_written_as_lists(tmp_path):
    """_json_default took any object with .item() for a numpy scalar: an array raised "can only convert
    an array of size 1"."""
    write_json(tmp_path / "a.json", {"v": np.array([1, 2]), "m": np.zeros((2, 1), dtype=np.float32)})
    assert read_json(tmp_path / "a.json") == {"m": [[0.0], [0.0]], "v": [1, 2]}


def _strict_json(text: str):
    """json.loads as jq or JSON.parse read: the bare tokens NaN, Infinity and -Infinity are no JSON."""

    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_infinities_are_written_as_null_anywhere_in_the_tree(tmp_path):
    """json.dumps wrote NaN / Infinity tokens, which other tools refuse (the whole file with them)."""
    path = tmp_path / "metrics.json"
    obj = {
        "ndcg@10": math.nan,
        "nested": {"list": [1.5, math.inf, -math.inf, (2, math.nan)], "ok": 0.25},
        "numpy": {"f32": np.float32("nan"), "f64": np.float64("inf"), "array": np.array([1.0, np.nan])},
        "tensor": torch.tensor([[-math.inf, 3.0]]),
        "count": 7,
        "flag": True,
    }
    write_json(path, obj)
    expected = {
        "count": 7,
        "flag": True,
        "ndcg@10": None,
        "nested": {"list": [1.5, None, None, [2, None]], "ok": 0.25},
        "numpy": {"array": [1.0, None], "f32": None, "f64": None},
        "tensor": [[None, 3.0]],
    }
    assert _strict_json(path.read_text()) == expected
    assert read_json(path) == expected
    assert obj["ndcg@10"] != obj["ndcg@10"] and obj["nested"]["list"][1] == math.inf  # the input is kept


def test_json_is_read_as_utf8_whatever_the_locale(tmp_path):
    """read_text() without an encoding decodes with the locale's: a hand-written UTF-8 JSON file (an
    id "José") did not load under LANG=C."""
    import subprocess
    import sys

    path = tmp_path / "ids.json"
    path.write_bytes('{"id": "José"}'.encode())
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = f"from twotower.storage import read_json; print(ascii(read_json({str(path)!r})))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ascii({"id": "José"})


def test_the_rename_is_made_durable_by_syncing_the_directory(tmp_path, monkeypatch):
    """Until its directory is synced, a rename may be undone by a power loss."""
    synced: list[bool] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_json(tmp_path / "a.json", {"x": 1})
    assert synced == [False, True]
    synced.clear()
    save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(2)})
    assert synced == [False, True]
