"""ItemIndex: every backend against exact search, the filters, persistence and the refusals.

Data: 2,000 unit-norm items in 16-d drawn around 40 cluster centres (trained embeddings cluster;
isotropic noise would make the ANN backends look worse than they are), continuous so there are no
score ties unless a test builds them on purpose. Indexes are built once per module.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from twotower.index import IndexConfig, ItemIndex, recall_at_k
from twotower.topk import CSR

faiss = pytest.importorskip("faiss")

N, DIM, K = 2000, 16, 10
# Settings for 2,000 items (the defaults are sized for 100k-1M), on one thread: OpenMP threads spin
# while they wait, which makes these tiny builds many times slower on a busy 2-core machine.
_SMALL = {"threads": 1, "pq_bits": 6}
CONFIGS = {
    "exact": IndexConfig(backend="exact"),
    "faiss-flat": IndexConfig(backend="faiss-flat", threads=1),
    "faiss-hnsw": IndexConfig(backend="faiss-hnsw", hnsw_m=16, ef_construction=80, ef_search=64, threads=1),
    "faiss-ivfpq": IndexConfig(backend="faiss-ivfpq", nlist=32, nprobe=8, refine=8, **_SMALL),
    "faiss-ivfpq-norefine": IndexConfig(
        backend="faiss-ivfpq", nlist=32, nprobe=8, pq_m=16, refine=0, **_SMALL
    ),
}
ANN = ("faiss-hnsw", "faiss-ivfpq", "faiss-ivfpq-norefine")


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((40, DIM))
    return _normalize(centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, DIM)))


ITEMS = _clustered(N, seed=1)
QUERIES = _clustered(50, seed=2)


def _exact(k: int, exclude=None, allowed=None) -> tuple[np.ndarray, np.ndarray]:
    """Reference by plain numpy: score everything, mask, sort by (score desc, id asc)."""
    scores = QUERIES @ ITEMS.T
    if allowed is not None:
        mask = np.full(N, -np.inf)
        mask[allowed] = 0.0
        scores = scores + mask
    for q, row in enumerate(exclude or []):
        scores[q, row] = -np.inf
    ids = np.stack([np.lexsort((np.arange(N), -s))[:k] for s in scores])
    top = np.take_along_axis(scores, ids, 1)
    return np.where(np.isneginf(top), -1, ids), top


@pytest.fixture(scope="module")
def indexes() -> dict[str, ItemIndex]:
    return {name: ItemIndex.build(ITEMS, cfg, "cosine", queries=QUERIES) for name, cfg in CONFIGS.items()}


def _assert_matches(name: str, ids: np.ndarray, scores: np.ndarray, ref_ids: np.ndarray, ref_scores) -> None:
    valid = ids >= 0
    # Returned scores are the raw inner products of the returned ids, in descending order.
    assert np.allclose(
        scores[valid], np.einsum("qkd,qd->qk", ITEMS[np.maximum(ids, 0)], QUERIES)[valid], atol=1e-5
    )
    assert np.all(np.diff(np.where(valid, scores, -1e9), axis=1) <= 1e-6)
    assert np.all(np.isneginf(scores[~valid]))
    if name in ANN:
        assert recall_at_k(ids, ref_ids) >= 0.9
    else:
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_agrees_with_exact_search(indexes, name):
    ids, scores = indexes[name].search(QUERIES, K)
    assert (
        ids.shape == scores.shape == (len(QUERIES), K)
        and ids.dtype == np.int64
        and scores.dtype == np.float32
    )
    _assert_matches(name, ids, scores, *_exact(K))
    report = indexes[name].build_report
    assert report["backend"] == CONFIGS[name].backend and report["n_items"] == N and report["dim"] == DIM
    assert report["recall_at_k"] >= (0.9 if name in ANN else 1.0)
    assert report["n_queries"] == (0 if name == "exact" else len(QUERIES))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("as_csr", [False, True])
def test_exclusions_never_returned(indexes, name, as_csr):
    rng = np.random.default_rng(3)
    top, _ = _exact(K)
    # Each query's own top 5 plus random items, and a long history for query 0 (600 items).
    lists = [np.concatenate([top[q, :5], rng.integers(0, N, 20)]) for q in range(len(QUERIES))]
    lists[0] = np.concatenate([lists[0], rng.choice(N, 600, replace=False)])
    exclude = lists
    if as_csr:
        rows = torch.from_numpy(np.repeat(np.arange(len(lists)), [len(x) for x in lists]))
        exclude = CSR.from_pairs(rows, torch.from_numpy(np.concatenate(lists)), len(lists))
    ids, scores = indexes[name].search(QUERIES, K, exclude=exclude)
    for q, row in enumerate(lists):
        assert not np.isin(ids[q], row).any()
    _assert_matches(name, ids, scores, *_exact(K, exclude=lists))


@pytest.mark.parametrize("name", CONFIGS)
def test_one_query_with_exclusions_answers_as_its_row_of_a_batch(indexes, name):
    # A served request is one query with its seen items excluded: the index takes a lean path for it,
    # which must give exactly the batch path's row (duplicates and out-of-catalogue ids included).
    rng = np.random.default_rng(4)
    top, _ = _exact(K)
    for q in range(len(QUERIES)):
        excluded = np.concatenate([top[q, :5], top[q, :2], rng.integers(0, N, 30), [N + 7]])
        one = indexes[name].search(QUERIES[q : q + 1], K, exclude=[excluded])
        pair = np.stack([QUERIES[q], QUERIES[(q + 1) % len(QUERIES)]])
        batch = indexes[name].search(pair, K, exclude=[excluded, np.zeros(0, np.int64)])
        np.testing.assert_array_equal(one[0][0], batch[0][0])
        # (scores: a product over a batch of 1 or 2 may round differently in the last bit)
        np.testing.assert_allclose(one[1][0], batch[1][0], rtol=0, atol=1e-6)
        assert not np.isin(one[0], excluded).any()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("size", [60, 1500])  # below / above allowed_exact_max: exact subset / IDSelector
def test_allowed_filter(indexes, name, size, monkeypatch):
    index = indexes[name]
    monkeypatch.setattr(index, "config", index.config.model_copy(update={"allowed_exact_max": 500}))
    allowed = np.random.default_rng(4).choice(N, size, replace=False)
    ids, scores = index.search(QUERIES, K, allowed=allowed)
    assert np.isin(ids, allowed).all()
    _assert_matches(name, ids, scores, *_exact(K, allowed=allowed))
    # Both filters at once.
    exclude = [allowed[:3]] * len(QUERIES)
    ids, scores = index.search(QUERIES, K, exclude=exclude, allowed=allowed)
    assert np.isin(ids, allowed[3:]).all()
    _assert_matches(name, ids, scores, *_exact(K, exclude=exclude, allowed=allowed))


@pytest.mark.parametrize("name", CONFIGS)
def test_padding_when_too_few_eligible(indexes, name):
    index = indexes[name]
    ids, scores = index.search(QUERIES[:3], K, allowed=[5, 7, 11, 13], exclude=[[7], [], [5, 7, 11, 13]])
    assert np.isin(ids[0, :3], [5, 11, 13]).all() and set(ids[0, :3]) == {5, 11, 13}
    assert set(ids[1, :4]) == {5, 7, 11, 13}
    assert (ids[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()
    assert (ids[1, 4:] == -1).all() and (ids[2] == -1).all() and np.isneginf(scores[2]).all()
    # Excluding all but 3 items of the whole catalogue leaves 3 results and 7 empty slots.
    ids, scores = index.search(QUERIES[:1], K, exclude=[np.arange(3, N)])
    np.testing.assert_array_equal(np.sort(ids[0, :3]), [0, 1, 2])
    assert (ids[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()


def test_rows_the_index_cannot_fill_fall_back_to_exact():
    # One probed list of ~60 items, of which an allowed set of 700 keeps ~20: FAISS returns fewer than
    # k=30, so those rows are answered by exact search and still come back full and exact.
    cfg = CONFIGS["faiss-ivfpq"].model_copy(update={"nprobe": 1, "allowed_exact_max": 500})
    index = ItemIndex.build(ITEMS, cfg, "cosine")
    allowed = np.random.default_rng(5).choice(N, 700, replace=False)
    ids, scores = index.search(QUERIES, 30, allowed=allowed, exclude=[allowed[:2]] * len(QUERIES))
    assert (ids >= 0).all() and np.isin(ids, allowed[2:]).all()
    assert recall_at_k(ids, _exact(30, allowed=allowed[2:])[0]) >= 0.9
    ids, scores = index.search(QUERIES, 100)  # no filter: still more than the one probed list holds
    assert (ids >= 0).all() and np.isfinite(scores).all()


@pytest.mark.parametrize("backend", ["exact", "faiss-flat"])
def test_hand_checked_tiny_case(backend):
    items = np.array([[1, 0], [0, 1], [-1, 0], [0.6, 0.8]], dtype=np.float32)
    index = ItemIndex.build(items, IndexConfig(backend=backend), "cosine")
    ids, scores = index.search(np.array([[1.0, 0.0]]), 4)
    np.testing.assert_array_equal(ids, [[0, 3, 1, 2]])
    np.testing.assert_allclose(scores, [[1.0, 0.6, 0.0, -1.0]], atol=1e-6)
    ids, scores = index.search(np.array([[0.0, 1.0]]), 6, exclude=[[3]])
    assert ids[0, 0] == 1 and set(ids[0, 1:3]) == {0, 2} and (ids[0, 3:] == -1).all()
    if backend == "exact":  # topk's tie rule: the lower index first among equal scores
        np.testing.assert_array_equal(ids[0, :3], [1, 0, 2])


def test_cosine_refuses_unnormalised_vectors():
    with pytest.raises(ValueError, match="not unit-norm"):
        ItemIndex.build(ITEMS * 2.0, IndexConfig(backend="faiss-flat"), "cosine")
    index = ItemIndex.build(ITEMS * 2.0, IndexConfig(backend="faiss-flat"), "dot")  # dot accepts any norm
    assert not index.normalized
    np.testing.assert_array_equal(index.search(QUERIES, K)[0], _exact(K)[0])


def test_config_is_validated():
    with pytest.raises(ValueError, match="extra"):
        IndexConfig(backend="faiss-hnsw", efsearch=10)
    with pytest.raises(ValueError):
        IndexConfig(backend="annoy")
    with pytest.raises(ValueError, match="must divide"):
        ItemIndex.build(ITEMS, IndexConfig(backend="faiss-ivfpq", pq_m=5), "cosine")
    with pytest.raises(ValueError, match="only 100 items"):
        ItemIndex.build(ITEMS[:100], IndexConfig(backend="faiss-ivfpq"), "cosine")
    with pytest.raises(ValueError, match="similarity"):
        ItemIndex.build(ITEMS, IndexConfig(), "euclidean")


def test_recall_report_without_queries_uses_items():
    index = ItemIndex.build(ITEMS, CONFIGS["faiss-hnsw"].model_copy(update={"recall_queries": 200}), "cosine")
    report = index.build_report
    assert report["n_queries"] == 200 and "item vectors" in report["recall_queries_source"]
    assert report["recall_at_k"] >= 0.95 and report["k"] == 100
    assert index.recall_vs_exact(QUERIES, K) >= 0.9


def test_recall_is_measured_at_a_k_the_faiss_index_answers_itself():
    """Over a quarter of the catalogue, search() goes exact: recall there is 1.0 by construction."""
    items = ITEMS[:200]
    index = ItemIndex.build(
        items, CONFIGS["faiss-hnsw"].model_copy(update={"recall_k": 100}), "cosine", QUERIES
    )
    report = index.build_report
    assert report["k"] == 50 and "lowered from 100" in report["recall_queries_source"]
    assert report["recall_at_k"] == index.recall_vs_exact(QUERIES, 50)
    exact = ItemIndex.build(items, IndexConfig(recall_k=100), "cosine", QUERIES).build_report
    assert exact["k"] == 100 and exact["recall_at_k"] == 1.0  # brute force answers any k exactly


@pytest.mark.parametrize("name", CONFIGS)
def test_save_load_round_trip(indexes, name, tmp_path):
    index = indexes[name]
    index.save(tmp_path)
    loaded = ItemIndex.load(tmp_path, "cosine")
    exclude = [[int(i)] for i in range(len(QUERIES))]
    before, after = index.search(QUERIES, K, exclude=exclude), loaded.search(QUERIES, K, exclude=exclude)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert loaded.build_report == json.loads(json.dumps(index.build_report))
    meta = json.loads((tmp_path / "index.json").read_text())
    assert meta["metric"] == "inner_product" and meta["similarity"] == "cosine" and meta["normalized"]
    with pytest.raises(ValueError, match="'cosine'.*'dot'"):
        ItemIndex.load(tmp_path, "dot")


def test_load_refuses_an_l2_index(indexes, tmp_path):
    indexes["faiss-flat"].save(tmp_path)
    l2 = faiss.IndexFlatL2(DIM)
    l2.add(ITEMS)
    faiss.write_index(l2, str(tmp_path / "index.faiss"))
    with pytest.raises(ValueError, match="METRIC_INNER_PRODUCT"):
        ItemIndex.load(tmp_path, "cosine")
    small = faiss.IndexFlatIP(DIM)
    small.add(ITEMS[:10])
    faiss.write_index(small, str(tmp_path / "index.faiss"))
    with pytest.raises(ValueError, match="holds 10 x 16"):
        ItemIndex.load(tmp_path, "cosine")


@pytest.mark.parametrize("name", CONFIGS)
def test_k_beyond_the_catalogue_returns_every_item_then_padding(indexes, name):
    ids, scores = indexes[name].search(QUERIES[:3], N + 5)
    assert ids.shape == scores.shape == (3, N + 5)
    np.testing.assert_array_equal(np.sort(ids[:, :N], axis=1), np.tile(np.arange(N), (3, 1)))
    assert (ids[:, N:] == -1).all() and np.isneginf(scores[:, N:]).all()
    assert np.isfinite(scores[:, :N]).all() and np.all(np.diff(scores[:, :N], axis=1) <= 1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_excluding_every_item_leaves_only_empty_slots(indexes, name):
    # A batch (one row also lists ids past the catalogue) and a single query (the serving path).
    for queries, exclude in [(QUERIES[:2], [np.arange(N), np.arange(N + 3)]), (QUERIES[:1], [np.arange(N)])]:
        ids, scores = indexes[name].search(queries, K, exclude=exclude)
        assert ids.shape == (len(queries), K) and (ids == -1).all() and np.isneginf(scores).all()


@pytest.mark.parametrize("name", CONFIGS)
def test_an_id_repeated_in_exclude_counts_once(indexes, name):
    # 700 copies of one id: counted as 700 exclusions it would send every row to the exact fallback
    # (k + 700 > N / 4) and a FAISS row would be judged short; the answer must be that of one copy.
    top, _ = _exact(K)
    exclude = [np.repeat(top[q, :1], 700) for q in range(len(QUERIES))]
    ids, scores = indexes[name].search(QUERIES, K, exclude=exclude)
    assert not np.isin(ids[:, :1], top[:, :1]).any() and (ids >= 0).all()
    _assert_matches(name, ids, scores, *_exact(K, exclude=[e[:1] for e in exclude]))


@pytest.mark.parametrize("name", CONFIGS)
def test_an_empty_query_batch_gives_empty_results(indexes, name):
    for exclude in (None, []):
        ids, scores = indexes[name].search(np.zeros((0, DIM), np.float32), K, exclude=exclude)
        assert ids.shape == scores.shape == (0, K) and ids.dtype == np.int64 and scores.dtype == np.float32


def test_a_huge_excluded_id_is_ignored_and_excludes_nothing_of_another_query():
    """Ids past the catalogue are ignored, however large: a raw 64-bit id (2**62) once wrapped around
    in CSR.from_pairs' int64 keys and excluded item 3 of query 1 instead (or crashed in bincount)."""
    items = np.array([[0, 1], [0.6, 0.8], [-1, 0], [1, 0]], np.float32)
    index = ItemIndex.build(items, IndexConfig(backend="exact"), "cosine")
    queries = np.tile([[1.0, 0.0]], (5, 1))
    want, _ = index.search(queries, 2)
    got, _ = index.search(queries, 2, exclude=[[], [], [], [], [2**62]])
    np.testing.assert_array_equal(got, want)
    ones = np.ones((2, 2), np.float32)  # items 0 and 3 tie at 1 (the lower first), item 1 scores 1.4
    for allowed in (None, [0, 3]):  # searched over all items, or a subset
        ids, _ = index.search(ones, 1, exclude=[[1, 0], [1, 2**62]], allowed=allowed)
        assert ids.tolist() == [[3], [0]]
        ids, _ = index.search(ones, 1, exclude=[[1, 0], [1, 2**63 - 1]], allowed=allowed)
        assert ids.tolist() == [[3], [0]]


def test_search_refuses_bad_arguments(indexes):
    index = indexes["exact"]
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be >= 1"):
            index.search(QUERIES, k)
    with pytest.raises(ValueError, match="exclude has 1 rows but there are 50 queries"):
        index.search(QUERIES, K, exclude=[[1]])
    with pytest.raises(ValueError, match="non-negative"):
        index.search(QUERIES[:1], K, exclude=[[-1]])
    with pytest.raises(ValueError, match=r"allowed ids must lie in \[0, 2000\)"):
        index.search(QUERIES, K, allowed=[0, N])
    with pytest.raises(ValueError, match=r"queries must be a 2-D float array \[n, 16\]"):
        index.search(QUERIES[:, :8], K)


def test_torch_inputs_are_accepted(indexes):
    index = indexes["faiss-flat"]
    exclude = [torch.tensor([int(i)]) for i in range(len(QUERIES))]
    got = index.search(torch.from_numpy(QUERIES).double(), K, exclude=exclude)
    want = index.search(QUERIES, K, exclude=[[int(i)] for i in range(len(QUERIES))])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_ivfpq_on_a_small_catalogue_and_more_lists_than_items():
    items = ITEMS[:300]  # the auto nlist stays within the items (~39 training points per list)
    index = ItemIndex.build(items, IndexConfig(backend="faiss-ivfpq", threads=1), "cosine", queries=QUERIES)
    assert index.params["nlist"] == 300 // 39 and index.build_report["recall_at_k"] >= 0.9
    ids, scores = index.search(QUERIES, 310)
    np.testing.assert_array_equal(np.sort(ids[:, :300], axis=1), np.tile(np.arange(300), (len(QUERIES), 1)))
    assert (ids[:, 300:] == -1).all() and np.isneginf(scores[:, 300:]).all()
    with pytest.raises(ValueError, match="nlist=301 exceeds the 300 items"):
        ItemIndex.build(items, IndexConfig(backend="faiss-ivfpq", nlist=301, pq_bits=4, threads=1), "cosine")


def test_load_refuses_vectors_that_disagree_with_the_metadata(indexes, tmp_path):
    indexes["exact"].save(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**meta, "n_items": N + 1}))
    with pytest.raises(ValueError, match="disagree with index.json"):
        ItemIndex.load(tmp_path, "cosine")
    # A dot index over unnormalised vectors relabelled cosine: refused at load as at build.
    ItemIndex.build(ITEMS * 2.0, IndexConfig(), "dot").save(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    assert meta["normalized"] is False
    (tmp_path / "index.json").write_text(json.dumps({**meta, "similarity": "cosine"}))
    with pytest.raises(ValueError, match="not unit-norm"):
        ItemIndex.load(tmp_path, "cosine")


def test_saving_over_another_backend_loads_the_new_one(indexes, tmp_path):
    indexes["faiss-hnsw"].save(tmp_path)
    indexes["exact"].save(tmp_path)  # the stale index.faiss is left, but index.json decides
    loaded = ItemIndex.load(tmp_path, "cosine")
    assert loaded.config.backend == "exact" and loaded.faiss_index is None
    np.testing.assert_array_equal(loaded.search(QUERIES, K)[0], _exact(K)[0])


def test_a_save_failing_half_way_over_an_index_leaves_nothing_that_loads(indexes, tmp_path, monkeypatch):
    """index.json marks a complete index: a failed save must not leave the old one's beside new vectors."""
    indexes["faiss-flat"].save(tmp_path)
    other = ItemIndex.build(_clustered(N, seed=3), CONFIGS["faiss-flat"], "cosine")

    def disk_full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faiss, "write_index", disk_full)
    with pytest.raises(OSError, match="No space left"):
        other.save(tmp_path)  # vectors.safetensors is already the new one by then
    with pytest.raises(FileNotFoundError, match="index.json"):
        ItemIndex.load(tmp_path, "cosine")
