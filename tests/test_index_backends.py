"""index_backends: parameter resolution, input checks, FAISS construction and the checks of a loaded file.

The search behaviour built on these is tested end to end in test_index.py; here each piece is checked
on its own, on small hand-sized data.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twotower.index_backends import (
    IndexConfig,
    as_matrix,
    build_faiss,
    check_faiss,
    check_normalized,
    faiss_search_params,
    faiss_selector,
    resolve_params,
)


def _unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_resolve_fills_the_auto_values_and_checks_them_against_the_data():
    assert resolve_params(IndexConfig(backend="exact"), 10, 8) == {}
    assert resolve_params(IndexConfig(backend="faiss-flat"), 10, 8) == {}
    hnsw = resolve_params(IndexConfig(backend="faiss-hnsw", hnsw_m=8, ef_search=40), 10, 8)
    assert hnsw == {"hnsw_m": 8, "ef_construction": 100, "ef_search": 40}
    # nlist ~ 4 sqrt(N) capped at N / 39; pq_m the largest divisor of dim leaving >= 4 dims per code.
    ivf = resolve_params(IndexConfig(backend="faiss-ivfpq"), 10_000, 64)
    assert ivf == {"nlist": 256, "nprobe": 32, "pq_m": 16, "pq_bits": 8, "refine": 8}
    assert resolve_params(IndexConfig(backend="faiss-ivfpq"), 1000, 64)["nlist"] == 1000 // 39
    assert resolve_params(IndexConfig(backend="faiss-ivfpq", nlist=4, nprobe=32), 1000, 6)["nprobe"] == 4
    assert resolve_params(IndexConfig(backend="faiss-ivfpq"), 1000, 6)["pq_m"] == 1  # only 1 leaves >= 4 dims
    with pytest.raises(ValueError, match="exceeds"):
        resolve_params(IndexConfig(backend="faiss-ivfpq", nlist=500, pq_bits=4), 300, 8)
    with pytest.raises(ValueError, match="must divide"):
        resolve_params(IndexConfig(backend="faiss-ivfpq", pq_m=3), 1000, 8)
    with pytest.raises(ValueError, match="only 100 items"):
        resolve_params(IndexConfig(backend="faiss-ivfpq"), 100, 8)


def test_as_matrix_accepts_tensors_and_refuses_bad_shapes_and_values():
    out = as_matrix(torch.ones(3, 4, dtype=torch.float64), "items")
    assert out.dtype == np.float32 and out.shape == (3, 4) and out.flags["C_CONTIGUOUS"]
    with pytest.raises(ValueError, match=r"\[n, 5\]"):
        as_matrix(np.ones((3, 4)), "queries", dim=5)
    with pytest.raises(ValueError, match="2-D"):
        as_matrix(np.ones(4), "items")
    with pytest.raises(ValueError, match="NaN"):
        as_matrix(np.array([[1.0, np.nan]]), "items")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_as_matrix_takes_half_precision_tensors(dtype):
    """A half-precision model's embeddings; numpy has no bfloat16, so it is converted in torch."""
    x = torch.tensor([[0.5, -1.25], [3.0, 0.0]], dtype=dtype)
    out = as_matrix(x, "items", dim=2)
    assert out.dtype == np.float32 and out.tolist() == [[0.5, -1.25], [3.0, 0.0]]


def test_cosine_needs_unit_norm_vectors_and_dot_takes_any():
    items = _unit(20, 8)
    assert check_normalized(items, "cosine") and check_normalized(items, "dot")
    assert not check_normalized(items * 3, "dot")
    with pytest.raises(ValueError, match="not unit-norm"):
        check_normalized(items * 3, "cosine")
    with pytest.raises(ValueError, match="'dot' or 'cosine'"):
        check_normalized(items, "l2")


def test_built_indexes_use_the_inner_product_and_pass_their_own_check():
    faiss = pytest.importorskip("faiss")
    items = _unit(300, 8)
    for backend in ("faiss-flat", "faiss-hnsw"):
        config = IndexConfig(backend=backend, hnsw_m=8, threads=1)
        index = build_faiss(items, resolve_params(config, 300, 8), config)
        assert index.metric_type == faiss.METRIC_INNER_PRODUCT and index.ntotal == 300
        check_faiss(index, items.shape, backend)
        with pytest.raises(ValueError, match="holds 300 x 8 vectors, not 301 x 8"):
            check_faiss(index, (301, 8), backend)
    flat = build_faiss(items, {}, IndexConfig(backend="faiss-flat", threads=1))
    with pytest.raises(ValueError, match="FAISS file holds a"):
        check_faiss(flat, items.shape, "faiss-hnsw")
    l2 = faiss.IndexFlatL2(8)
    l2.add(items)
    with pytest.raises(ValueError, match="METRIC_INNER_PRODUCT"):
        check_faiss(l2, items.shape, "faiss-flat")


def test_selector_and_search_params_restrict_and_widen_a_search():
    pytest.importorskip("faiss")
    items = _unit(300, 8)
    flat = build_faiss(items, {}, IndexConfig(backend="faiss-flat", threads=1))
    allowed = np.arange(0, 300, 7)  # 43 ids
    search = faiss_search_params("faiss-flat", {}, 50, faiss_selector(allowed, 300))
    _, ids = flat.search(items[:5], 50, params=search)
    # A flat index under the filter returns exactly the allowed ids, then empty (-1) slots.
    assert (np.sort(ids[:, :43], axis=1) == allowed).all() and (ids[:, 43:] == -1).all()
    assert faiss_search_params("faiss-flat", {}, 10, None) is None
    # An efSearch below the fetch size would return fewer than the fetch: it is raised to it.
    hnsw = {"hnsw_m": 8, "ef_construction": 100, "ef_search": 16}
    assert faiss_search_params("faiss-hnsw", hnsw, 50, None).efSearch == 50
    assert faiss_search_params("faiss-hnsw", hnsw, 5, None).efSearch == 16
    ivf = faiss_search_params("faiss-ivfpq", {"nprobe": 3, "refine": 0}, 10, None)
    assert ivf.nprobe == 3
    refined = faiss_search_params("faiss-ivfpq", {"nprobe": 3, "refine": 4}, 10, None)
    assert refined.k_factor == 4.0


def test_norm_tolerance_is_the_documented_one():
    items = _unit(4, 8)
    assert check_normalized(items * (1 + 0.9e-3), "cosine")
    with pytest.raises(ValueError, match="up to 0.0011"):
        check_normalized(items * (1 + 1.1e-3), "cosine")


def test_ivfpq_index_trains_and_searches_by_inner_product():
    faiss = pytest.importorskip("faiss")
    items = _unit(300, 8)
    for refine in (0, 4):
        config = IndexConfig(backend="faiss-ivfpq", nlist=4, nprobe=4, pq_bits=4, refine=refine, threads=1)
        params = resolve_params(config, 300, 8)
        index = build_faiss(items, params, config)
        assert index.is_trained and index.ntotal == 300 and index.metric_type == faiss.METRIC_INNER_PRODUCT
        check_faiss(index, items.shape, "faiss-ivfpq")
        # every list probed: an item finds itself among the PQ candidates; refined with the exact
        # vectors, its own (unit) vector is its best match and the score the exact inner product
        dist, ids = index.search(items[:20], 5, params=faiss_search_params("faiss-ivfpq", params, 5, None))
        if refine:
            np.testing.assert_array_equal(ids[:, 0], np.arange(20))
            np.testing.assert_allclose(dist[:, 0], 1.0, atol=1e-5)
        else:
            assert (ids == np.arange(20)[:, None]).any(axis=1).mean() >= 0.7


def test_selector_with_no_allowed_ids_lets_nothing_through():
    pytest.importorskip("faiss")
    items = _unit(50, 8)
    flat = build_faiss(items, {}, IndexConfig(backend="faiss-flat", threads=1))
    selector = faiss_selector(np.zeros(0, np.int64), 50)
    _, ids = flat.search(items[:3], 5, params=faiss_search_params("faiss-flat", {}, 5, selector))
    assert (ids == -1).all()
    selector = faiss_selector(np.array([49]), 50)  # the last id: the bitmap's last byte, bit 1
    _, ids = flat.search(items[:3], 5, params=faiss_search_params("faiss-flat", {}, 5, selector))
    assert (ids[:, 0] == 49).all() and (ids[:, 1:] == -1).all()
