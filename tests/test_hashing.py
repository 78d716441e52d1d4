"""Stable hashed id buckets: known answers, stability across processes, range, and the encoder's kind."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from conftest import tiny_config
from twotower.experiment import train_run
from twotower.features import FeatureEncoder, FeatureSpec, HashedIdFeature
from twotower.hashing import hash_key, hash_keys, int_buckets, mix64, to_buckets

# SplitMix64 reference outputs (Vigna's splitmix64.c, first value of a generator seeded with x):
# our int hash of x is exactly that value.
SPLITMIX_0 = 0xE220A8397B1DCDAF
SPLITMIX_1234567 = 6457827717110365317


def test_integer_hash_is_splitmix64_known_answers():
    assert hash_key(0) == SPLITMIX_0
    assert hash_key(1234567) == SPLITMIX_1234567
    assert mix64(np.array([0, 1234567]))[1] == SPLITMIX_1234567
    # The bucket a config with num_buckets 2**20 gives id 1234567, by hand: 1 + the low 20 bits of
    # h = 0x599ED017FB08FC85, i.e. 1 + 0x8FC85 = 588934.
    assert SPLITMIX_1234567 == 0x599ED017FB08FC85
    assert int_buckets(np.array([1234567]), 2**20)[0] == 1 + 0x8FC85 == 588934


def test_string_hash_is_blake2b_little_endian():
    expected = int.from_bytes(hashlib.blake2b(b"user-42", digest_size=8).digest(), "little")
    assert hash_key("user-42") == expected == 12029086546990375023
    assert hash_key("1") != hash_key(1)  # keys are typed, like vocabulary keys
    assert hash_key(0.5) != hash_key("0.5")


def test_vectorised_equals_scalar_including_negative_and_extreme_ids():
    ids = [0, 1, -1, 2**63 - 1, -(2**63), 987654321]
    assert [int(h) for h in mix64(np.array(ids, dtype=np.int64))] == [hash_key(i) for i in ids]
    assert [int(h) for h in hash_keys(ids + ["a"])] == [hash_key(k) for k in ids + ["a"]]
    big = 2**64 + 5  # beyond int64: reduced to its low 64 bits, like any int64 wrap-around
    assert hash_key(big) == hash_key(5)


def test_buckets_in_range_and_spread():
    rng = np.random.default_rng(0)
    ids = rng.integers(-(2**62), 2**62, size=200_000)
    buckets = int_buckets(ids, 1000)
    assert buckets.min() >= 1 and buckets.max() <= 1000
    counts = np.bincount(buckets, minlength=1001)[1:]
    # 200 per bucket on average; a good hash keeps every bucket within a loose band of it.
    assert counts.min() > 120 and counts.max() < 290
    assert to_buckets(np.array([0], dtype=np.uint64), 1)[0] == 1
    with pytest.raises(ValueError):
        to_buckets(np.array([1], dtype=np.uint64), 0)


_CHILD = """
import json, sys
import pandas as pd
from twotower.features import FeatureEncoder
enc = FeatureEncoder([{"type": "hashed_id", "name": "user_id", "num_buckets": 1000}])
enc.fit(pd.DataFrame({"user_id": []}))
ids = ["alice", "bob", "carol", 7, 123456789]
print(json.dumps(enc.transform(pd.DataFrame({"user_id": pd.Series(ids, dtype=object)}))["user_id"].tolist()))
"""


def test_buckets_stable_across_processes_with_different_hash_seeds():
    # The child's string hash() is salted differently from this process's (another PYTHONHASHSEED);
    # the buckets must not care.
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    here = [int(to_buckets(hash_keys([k]), 1000)[0]) for k in ["alice", "bob", "carol", 7, 123456789]]
    assert json.loads(done.stdout) == here


def test_spec_is_strict():
    adapter = TypeAdapter(FeatureSpec)
    spec = adapter.validate_python({"type": "hashed_id", "name": "user_id", "num_buckets": 1048576})
    assert isinstance(spec, HashedIdFeature) and spec.column == "user_id"
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "hashed_id", "name": "u", "num_buckets": 8, "buckets": 3})
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "hashed_id", "name": "u"})  # num_buckets is required
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "hashed_id", "name": "u", "num_buckets": 0})


def test_encoder_transform_record_fields_and_round_trip():
    enc = FeatureEncoder([HashedIdFeature(name="user_id", num_buckets=64, embedding_dim=8)])
    enc.fit(pd.DataFrame({"user_id": [1, 2]}), id_values=[1, 2, 2])  # nothing is learned from either
    frame = pd.DataFrame({"user_id": pd.Series([5, "5", 5.0, None, "  ", "x"], dtype=object)})
    out = enc.transform(frame)["user_id"]
    assert out.dtype == torch.int64
    expected = [int(to_buckets(hash_keys([k]), 64)[0]) for k in (5, "5", 5)]
    assert out.tolist() == [*expected, 0, 0, int(to_buckets(hash_keys(["x"]), 64)[0])]
    # An int64 column takes the vectorised path and must agree with the object path.
    assert enc.transform(pd.DataFrame({"user_id": [5, 6]}))["user_id"][0] == out[0]
    for value, want in zip(frame["user_id"], out.tolist(), strict=True):
        assert enc.transform_record({"user_id": value})["user_id"].tolist() == [want]
    (field,) = enc.fields()
    assert (field.kind, field.cardinality, field.embedding_dim) == ("categorical", 65, 8)
    again = FeatureEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert torch.equal(again.transform(frame)["user_id"], out)
    with pytest.raises(ValueError, match="at most one"):
        FeatureEncoder([{"type": "id", "name": "a"}, {"type": "hashed_id", "name": "b", "num_buckets": 4}])


@pytest.mark.usefixtures("one_torch_thread")
def test_a_run_trains_on_hashed_user_ids(tmp_path):
    cfg = tiny_config(epochs=1)
    features = cfg.features.model_validate(
        {
            "user": [{"type": "hashed_id", "name": "user_id", "num_buckets": 512}],
            "item": [{"type": "id", "name": "item_id"}],
        }
    )
    metrics = train_run(cfg.model_copy(update={"features": features}), tmp_path, progress=False)
    assert np.isfinite(metrics["recall@10"]) and metrics["epochs_run"] == 1
    state = json.loads((tmp_path / "model.json").read_text())["user_encoder"]["state"]
    assert state == {"user_id": {"num_buckets": 512}}  # no vocabulary stored


def test_numpy_scalars_and_whole_floats_hash_as_their_canonical_keys():
    """np.float64 is a float whose repr is "np.float64(0.5)": it hashed apart from 0.5. np.int64 and int64
    arrays raised TypeError, and 7.0 hashed apart from 7, the key twotower.features makes of it."""
    assert hash_key(np.float64(0.5)) == hash_key(0.5)
    assert hash_key(np.float32(0.5)) == hash_key(0.5)
    assert hash_key(np.int64(7)) == hash_key(7) == hash_key(7.0) == hash_key(np.float64(7.0))
    assert hash_key(np.str_("alice")) == hash_key("alice")
    ids = np.array([-3, 0, 7, 2**62], dtype=np.int64)
    assert hash_keys(ids).tolist() == mix64(ids).tolist() == [hash_key(int(i)) for i in ids]
    assert hash_keys(list(ids)).tolist() == mix64(ids).tolist()
