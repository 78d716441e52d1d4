"""What :class:`~twotower.index.ItemIndex` is built from: its config, input checks and the FAISS side.

Kept apart from the search logic in :mod:`twotower.index` because it answers other questions: which
backend parameters a config resolves to for a given catalogue, how a FAISS index of each kind is
constructed, when a FAISS file read back may be trusted (metric, kind, shape), and which per-search
parameters (HNSW ``efSearch``, IVF ``nprobe``, refine factor, ID filter) a fetch needs. FAISS is the
optional ``serve`` extra, so every FAISS call goes through :func:`import_faiss` and its clear error.

The metric is ALWAYS the inner product, the towers' training score. Cosine is the inner product of
L2-normalised vectors (the towers' output), so :func:`check_normalized` REFUSES item vectors that are
not unit-norm rather than normalising them, which would serve other scores than the model was trained with.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "NORM_TOLERANCE",
    "Backend",
    "IndexConfig",
    "Similarity",
    "as_matrix",
    "build_faiss",
    "check_faiss",
    "check_normalized",
    "faiss_search_params",
    "faiss_selector",
    "import_faiss",
    "resolve_params",
    "set_threads",
]

Backend = Literal["exact", "faiss-flat", "faiss-hnsw", "faiss-ivfpq"]
Similarity = Literal["dot", "cosine"]
NORM_TOLERANCE = 1e-3


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # faiss-cpu is the optional `serve` extra
        raise ImportError("FAISS backends need faiss-cpu: pip install twotower[serve]") from err
    return faiss


class IndexConfig(BaseModel):
    """How the index is built and searched. The HNSW defaults reach recall@100 >= .95 at <= 1 ms per
    query (1 thread, batch 1) on a clustered, normalised 1M x 64 catalogue (bench/serving.py)."""

    model_config = ConfigDict(extra="forbid")

    backend: Backend = "exact"
    hnsw_m: int = Field(32, ge=4, le=256)
    ef_construction: int = Field(100, ge=8)
    ef_search: int = Field(128, ge=1)  # raised to the fetch size when a search asks for more
    nlist: int | None = Field(None, ge=1)  # None: ~4 sqrt(N), at most N/39 (k-means wants 39 per list)
    nprobe: int = Field(32, ge=1)
    # None: the largest divisor of dim leaving >= 4 dims per code (16 bytes at dim 64): FAISS trained
    # 2-dim codes ~3x slower (36 s vs 13 s on 20k x 64 points, 1 thread). pq_m must divide dim.
    pq_m: int | None = Field(None, ge=1)
    pq_bits: int = Field(8, ge=1, le=16)
    refine: int = Field(8, ge=0)  # rerank refine * k PQ candidates with the exact vectors; 0 = off
    allowed_exact_max: int = Field(20_000, ge=0)  # allowed sets up to this size are searched exactly
    recall_k: int = Field(100, ge=1)  # at most n_items // 4 for FAISS: larger k are searched exactly
    recall_queries: int = Field(1000, ge=0)
    threads: int | None = Field(None, ge=1)  # FAISS OpenMP threads (process-wide); None: all cores


def as_matrix(x: Any, name: str, dim: int | None = None) -> np.ndarray:
    """``x`` as a contiguous float32 [n, dim] array (FAISS and the exact path both want one), finite."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float32).numpy()  # in torch: numpy has no bfloat16
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"{name} must be a 2-D float array [n, {dim or 'd'}], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return x


def check_normalized(items: np.ndarray, similarity: str) -> bool:
    """Whether the items are unit-norm; an error when ``similarity`` is cosine and they are not."""
    if similarity not in ("dot", "cosine"):
        raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
    err = np.abs(np.linalg.norm(items, axis=1) - 1.0)
    normalized = bool(np.all(err <= NORM_TOLERANCE))
    if similarity == "cosine" and not normalized:
        raise ValueError(
            f"similarity='cosine' but the item vectors are not unit-norm (|norm - 1| up to {err.max():.3g}). "
            "The index ranks by inner product, which equals cosine only for L2-normalised vectors; "
            "normalising here would serve scores that differ from training. Pass the item tower's "
            "normalised output, or build with similarity='dot'."
        )
    return normalized


def resolve_params(config: IndexConfig, n: int, dim: int) -> dict[str, Any]:
    """The effective backend parameters (auto values filled in), validated against the data."""
    if config.backend == "faiss-hnsw":
        return {"hnsw_m": config.hnsw_m, "ef_construction": config.ef_construction,
                "ef_search": config.ef_search}  # fmt: skip
    if config.backend != "faiss-ivfpq":
        return {}
    nlist = config.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
    if nlist > n:
        raise ValueError(f"nlist={nlist} exceeds the {n} items: every inverted list needs training points")
    pq_m = config.pq_m or max(m for m in range(1, dim + 1) if dim % m == 0 and (4 * m <= dim or m == 1))
    if dim % pq_m:
        raise ValueError(f"pq_m={pq_m} must divide the vector dimension {dim}")
    if n < 2**config.pq_bits:
        raise ValueError(
            f"IVF-PQ with pq_bits={config.pq_bits} trains {2**config.pq_bits} centroids per sub-quantizer "
            f"but there are only {n} items: lower pq_bits or use backend 'faiss-flat'"
        )
    return {"nlist": nlist, "nprobe": min(config.nprobe, nlist), "pq_m": pq_m, "pq_bits": config.pq_bits,
            "refine": config.refine}  # fmt: skip


def set_threads(config: IndexConfig) -> None:
    if config.threads is not None:
        import_faiss().omp_set_num_threads(config.threads)  # process-wide: FAISS has one OpenMP pool


def build_faiss(items: np.ndarray, params: dict[str, Any], config: IndexConfig) -> Any:
    """The FAISS index of ``config.backend`` over ``items``, trained where the kind needs it."""
    faiss = import_faiss()
    set_threads(config)
    (n, dim), ip = items.shape, faiss.METRIC_INNER_PRODUCT
    if config.backend == "faiss-flat":
        index = faiss.IndexFlatIP(dim)
    elif config.backend == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], ip)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
    else:
        ivf = faiss.IndexIVFPQ(
            faiss.IndexFlatIP(dim), dim, params["nlist"], params["pq_m"], params["pq_bits"], ip
        )
        ivf.nprobe = params["nprobe"]
        index = ivf
        if params["refine"]:  # the exact vectors beside the codes; searches pass k_factor explicitly
            index = faiss.IndexRefineFlat(ivf)
            index.k_factor = float(params["refine"])
        # k-means wants ~40 points per centroid; far more only slows training. Training the refine
        # wrapper trains the IVF-PQ (the flat refinement needs none).
        n_train = min(n, 40 * max(params["nlist"], 2 ** params["pq_bits"]))
        sample = np.sort(np.random.default_rng(0).choice(n, n_train, replace=False))
        index.train(items[sample])
    index.add(items)
    return index


def check_faiss(index: Any, shape: tuple[int, int], backend: str) -> None:
    """Refuse a FAISS index that would rank differently from the trained inner product."""
    faiss = import_faiss()
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(
            f"the FAISS index has metric_type {index.metric_type}, not METRIC_INNER_PRODUCT "
            f"({faiss.METRIC_INNER_PRODUCT}): an L2 index ranks differently from the trained inner product"
        )
    kinds = {"faiss-flat": faiss.IndexFlat, "faiss-hnsw": faiss.IndexHNSW,
             "faiss-ivfpq": (faiss.IndexIVFPQ, faiss.IndexRefine)}  # fmt: skip
    if not isinstance(index, kinds[backend]):
        raise ValueError(f"index.json says {backend!r} but the FAISS file holds a {type(index).__name__}")
    if (index.ntotal, index.d) != shape:
        raise ValueError(
            f"the FAISS index holds {index.ntotal} x {index.d} vectors, not {shape[0]} x {shape[1]}"
        )


def faiss_selector(allowed: np.ndarray, n_items: int) -> Any:
    """A FAISS ID filter letting through only the ``allowed`` ids (sorted, unique, in [0, n_items))."""
    faiss = import_faiss()
    mask = np.zeros(n_items, bool)
    mask[allowed] = True
    bitmap = np.packbits(mask, bitorder="little")  # IDSelectorBitmap tests bit (i & 7) of byte i >> 3
    selector = faiss.IDSelectorBitmap(n_items, faiss.swig_ptr(bitmap))
    selector.keep_alive = bitmap  # FAISS keeps a raw pointer: the array must live as long
    return selector


def faiss_search_params(backend: str, params: dict[str, Any], fetch: int, selector: Any) -> Any:
    """Per-search FAISS parameters for a fetch of ``fetch`` candidates (None: the index's own)."""
    faiss = import_faiss()
    if backend == "faiss-hnsw":
        # An efSearch below the fetch size would return fewer than `fetch` candidates.
        return faiss.SearchParametersHNSW(efSearch=max(params["ef_search"], fetch), sel=selector)
    if backend == "faiss-ivfpq":
        ivf = faiss.SearchParametersIVF(nprobe=params["nprobe"], sel=selector)
        refine = float(params["refine"])
        return faiss.IndexRefineSearchParameters(k_factor=refine, base_index_params=ivf) if refine else ivf
    return None if selector is None else faiss.SearchParameters(sel=selector)
