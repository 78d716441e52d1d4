"""The item index used for serving: exact or FAISS (flat, HNSW, IVF-PQ) top-K by inner product.

The metric is ALWAYS the inner product, the towers' training score; a cosine index refuses item
vectors that are not unit-norm. The config, those input checks and everything FAISS-specific (building,
checking a loaded file, per-search parameters) live in :mod:`twotower.index_backends`; this module
holds the search logic on top of them and the index's files.

``search`` is correct for every backend, whatever the filters:

- ``exclude`` (per query, e.g. seen items): FAISS over-fetches ``k + n_excluded`` and filters; rows
  the index cannot fill (probed IVF lists run out, an HNSW walk stuck behind a filter, a history too
  long to over-fetch) are answered exactly.
- ``allowed`` (one item filter for all queries): a small set is searched exactly (cheap, and a graph
  walks poorly through a sparse filter); a large one goes to FAISS as an ``IDSelectorBitmap``.
- Scores are raw inner products: IVF-PQ without ``refine`` scores with PQ approximations, so its
  candidates are rescored with the item vectors, kept beside the FAISS index (exact paths need them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twotower.index_backends import (
    IndexConfig,
    Similarity,
    as_matrix,
    build_faiss,
    check_faiss,
    check_normalized,
    faiss_search_params,
    faiss_selector,
    import_faiss,
    resolve_params,
    set_threads,
)
from twotower.storage import _atomic_write, load_tensors, read_json, save_tensors, write_json
from twotower.topk import CSR, topk_items

__all__ = ["IndexConfig", "ItemIndex", "recall_at_k"]

_EMPTY = -np.inf


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth|, empty (-1) slots ignored."""
    hits = sum(np.intersect1d(f[f >= 0], t[t >= 0]).size for f, t in zip(found, truth, strict=True))
    total = int((truth >= 0).sum())
    return hits / total if total else 1.0


def _exclusion_pairs(exclude: Any, n_q: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the excluded (query, item) pairs, from a CSR or a list of id arrays."""
    if isinstance(exclude, CSR):
        n_rows, lengths = exclude.n_rows, exclude.lengths().cpu().numpy()
        cols = exclude.indices.cpu().numpy().astype(np.int64)
    else:
        lists = [np.asarray(e, dtype=np.int64).reshape(-1) for e in exclude]
        n_rows, lengths = len(lists), [len(e) for e in lists]
        cols = np.concatenate(lists) if lists else np.zeros(0, np.int64)
    if n_rows != n_q:
        raise ValueError(f"exclude has {n_rows} rows but there are {n_q} queries")
    if cols.size and cols.min() < 0:
        raise ValueError("excluded item ids must be non-negative")
    return np.repeat(np.arange(n_q), lengths), cols


def _restrict(pairs: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exclusion pairs of the given query rows, renumbered 0..len(rows)-1."""
    new_row = np.full(int(max(pairs[0].max(initial=0), rows.max()) + 1), -1)
    new_row[rows] = np.arange(len(rows))
    keep = new_row[pairs[0]] >= 0
    return new_row[pairs[0][keep]], pairs[1][keep]


class ItemIndex:
    """Top-K items by inner product; build with :meth:`build`, reopen with :meth:`load`."""

    def __init__(self, items: np.ndarray, config: IndexConfig, similarity: Similarity, faiss_index: Any,
                 normalized: bool, build_report: dict[str, Any]) -> None:  # fmt: skip
        self.items, self.config, self.similarity = items, config, similarity
        self.faiss_index, self.normalized, self.build_report = faiss_index, normalized, build_report
        self.params = resolve_params(config, *items.shape)
        self.n_items, self.dim = items.shape
        self._items_t = torch.from_numpy(items)

    @classmethod
    def build(cls, items: Any, config: IndexConfig, similarity: Similarity, queries: Any = None) -> ItemIndex:
        """Build over ``items`` [N, d]; build_report's recall is measured on ``queries`` (e.g. user
        embeddings) or, without them, on items (each then finds itself: a slightly optimistic proxy)."""
        items = as_matrix(items, "items")
        n, dim = items.shape
        if n == 0:
            raise ValueError("cannot build an index over zero items")
        normalized = check_normalized(items, similarity)
        params = resolve_params(config, n, dim)
        start = time.perf_counter()
        faiss_index = None if config.backend == "exact" else build_faiss(items, params, config)
        # Measured where the index answers: search() sends a k over a quarter of the catalogue to brute
        # force, so recall there would be 1.0 by construction and say nothing of the k served through
        # FAISS. The report's k is lowered to n // 4 then (and says so).
        k = min(config.recall_k, n)
        lowered = config.backend != "exact" and k > max(1, n // 4)
        k = max(1, n // 4) if lowered else k
        report: dict[str, Any] = {"backend": config.backend, "params": params, "n_items": n, "dim": dim,
                                  "build_seconds": time.perf_counter() - start, "k": k,
                                  "recall_at_k": None, "n_queries": 0}  # fmt: skip
        index = cls(items, config, similarity, faiss_index, normalized, report)
        if config.backend == "exact":
            report.update(recall_at_k=1.0, recall_queries_source="exact backend: 1.0 by construction")
        elif config.recall_queries == 0:
            report.update(recall_queries_source="not computed (recall_queries=0)")
        else:
            source = "sample of the item vectors (no queries given)" if queries is None else "given queries"
            queries = as_matrix(items if queries is None else queries, "queries", dim)
            if len(queries) > config.recall_queries:
                pick = np.random.default_rng(0).choice(len(queries), config.recall_queries, replace=False)
                queries = queries[np.sort(pick)]
            recall = index.recall_vs_exact(queries, report["k"])
            if lowered:
                source += (
                    f"; k lowered from {config.recall_k} to n_items // 4 (larger k are answered exactly)"
                )
            report.update(recall_at_k=recall, n_queries=len(queries), recall_queries_source=source)
        return index

    def recall_vs_exact(self, queries: Any, k: int) -> float:
        """recall@k of this index against exact search over the same vectors."""
        queries = as_matrix(queries, "queries", self.dim)
        return recall_at_k(self.search(queries, k)[0], self._exact(queries, k, None, None)[0])

    def search(self, queries: Any, k: int, exclude: Any = None, allowed: Any = None
               ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Top-k ``(ids int64 [Q, k], scores float32 [Q, k])`` by inner product, descending; empty
        slots are (-1, -inf). ``exclude``: a CSR or list of id arrays, one per query (ids past the
        catalogue are ignored, negative ones refused); ``allowed``: the only item ids that may appear
        (the same for every query)."""
        queries = as_matrix(queries, "queries", self.dim)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        pairs = None if exclude is None else _exclusion_pairs(exclude, len(queries))
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64).reshape(-1)
            if not np.all(allowed[1:] > allowed[:-1]):  # already sorted and unique: skip the hash pass
                allowed = np.unique(allowed)
            if allowed.size and (allowed[0] < 0 or allowed[-1] >= self.n_items):
                raise ValueError(f"allowed ids must lie in [0, {self.n_items})")
        small = allowed is not None and len(allowed) <= self.config.allowed_exact_max
        if self.faiss_index is None or len(queries) == 0 or small:
            return self._exact(queries, k, pairs, allowed)
        return self._approx(queries, k, pairs, allowed)

    def _exact(self, queries: np.ndarray, k: int, pairs: tuple | None, allowed: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Brute force by twotower.topk (ties: lower index first), over the allowed subset if any."""
        items, csr = self._items_t, None
        ids = np.full((len(queries), k), -1, np.int64)
        scores = np.full((len(queries), k), _EMPTY, np.float32)
        if allowed is not None:
            if len(allowed) == 0:
                return ids, scores
            # index_select, not advanced indexing: 0.25 ms instead of 3.3 ms for 14k of 100k rows
            items = self._items_t.index_select(0, torch.from_numpy(allowed))
        if pairs is not None:
            rows, cols = pairs
            if allowed is not None:  # exclusions move to their positions in the sorted subset
                pos = np.minimum(np.searchsorted(allowed, cols), len(allowed) - 1)
                hit = allowed[pos] == cols
                rows, cols = rows[hit], pos[hit]
            else:  # ids past the catalogue are ignored; dropped here, they cannot inflate the CSR either
                inside = cols < self.n_items
                rows, cols = rows[inside], cols[inside]
            csr = CSR.from_pairs(torch.from_numpy(rows), torch.from_numpy(cols), len(queries))
        top_ids, top_scores = topk_items(torch.from_numpy(queries), items, k, exclude=csr)
        ids[:, : top_ids.shape[1]], scores[:, : top_ids.shape[1]] = top_ids.numpy(), top_scores.numpy()
        if allowed is not None:
            ids = np.where(ids >= 0, allowed[np.maximum(ids, 0)], -1)
        return ids, scores

    def _approx(self, queries: np.ndarray, k: int, pairs: tuple | None, allowed: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        n_q, n = len(queries), self.n_items
        rescore = self.config.backend == "faiss-ivfpq" and not self.params["refine"]
        if pairs is None and allowed is None and k <= n // 4:  # the common case, kept lean for latency
            scores, ids = self.faiss_index.search(queries, k, params=self._params(k, None))
            scores[ids < 0] = _EMPTY
            self._fill_exact(queries, k, None, None, np.flatnonzero(ids[:, -1] < 0), ids, scores)
            return self._rescore(queries, ids) if rescore else (ids, scores)
        if n_q == 1 and pairs is not None and allowed is None:  # one request with exclusions: serving
            lean = self._approx_one(queries, k, pairs[1])
            if lean is not None:
                return self._rescore(queries, lean[0]) if rescore else lean
        excl_keys, n_excl = np.zeros(0, np.int64), np.zeros(n_q, np.int64)
        if pairs is not None:
            rows, cols = pairs
            inside = (cols < n) if allowed is None else np.isin(cols, allowed)
            # Unique (row, item) keys: an item twice in a history must not be counted twice.
            excl_keys = np.unique(rows[inside] * n + cols[inside])
            n_excl = np.bincount(excl_keys // n, minlength=n_q)
        wanted = np.minimum(k, (n if allowed is None else len(allowed)) - n_excl)  # fillable slots
        selector = None if allowed is None else faiss_selector(allowed, self.n_items)
        ids = np.full((n_q, k), -1, np.int64)
        scores = np.full((n_q, k), _EMPTY, np.float32)
        # Fetching over a quarter of the catalogue is slower than brute force: such rows go exact. The rest
        # go in groups of similar fetch size (k + n_excluded in powers of 2), not all at the batch's largest.
        heavy = k + n_excl > n // 4
        self._fill_exact(queries, k, pairs, allowed, np.flatnonzero(heavy), ids, scores)
        group = np.where(heavy, -1, np.ceil(np.log2(k + n_excl)).astype(np.int64))
        for todo in [np.flatnonzero(group == g) for g in np.unique(group[group >= 0])]:
            fetch = min(n, k + int(n_excl[todo].max()))
            dist, cand = self.faiss_index.search(queries[todo], fetch, params=self._params(fetch, selector))
            if excl_keys.size:  # drop the excluded; a stable argsort moves the rest forward, in order
                cand[np.isin(todo[:, None] * n + cand, excl_keys)] = -1
                order = np.argsort(cand < 0, axis=1, kind="stable")[:, :k]
                cand, dist = np.take_along_axis(cand, order, 1), np.take_along_axis(dist, order, 1)
            got = cand[:, :k] >= 0  # FAISS puts its empty slots (-1) last
            ids[todo, : got.shape[1]] = cand[:, :k]
            scores[todo, : got.shape[1]] = np.where(got, dist[:, :k], _EMPTY)
            # A full list of fetch >= k + n_excluded loses at most n_excluded, so a row is short only if FAISS
            # returned fewer (probed IVF lists ran out, HNSW stuck behind the filter): exact search fills it.
            short = got.sum(1) < wanted[todo]
            self._fill_exact(queries, k, pairs, allowed, todo[short], ids, scores)
        return self._rescore(queries, ids) if rescore else (ids, scores)

    def _approx_one(self, query: np.ndarray, k: int, excluded: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray] | None:  # fmt: skip
        """The batch path below for a single query, without its grouping and 2-D bookkeeping (about
        half a millisecond of a served request): fetch k + |excluded|, drop the excluded. None when
        the general path must decide (a fetch that large goes exact; FAISS came back short)."""
        n = self.n_items
        excluded = np.unique(excluded[excluded < n])
        fetch = k + len(excluded)
        if fetch > n // 4:
            return None
        dist, cand = self.faiss_index.search(query, fetch, params=self._params(fetch, None))
        keep = cand[0] >= 0
        if excluded.size:
            keep &= ~np.isin(cand[0], excluded)
        found, found_scores = cand[0][keep][:k], dist[0][keep][:k]
        if len(found) < min(k, n - len(excluded)):
            return None
        ids = np.full((1, k), -1, np.int64)
        scores = np.full((1, k), _EMPTY, np.float32)
        ids[0, : len(found)], scores[0, : len(found)] = found, found_scores
        return ids, scores

    def _fill_exact(self, queries, k, pairs, allowed, rows: np.ndarray, ids, scores) -> None:
        """Exact results for the given query rows, written into ids/scores in place."""
        if rows.size:
            sub = None if pairs is None else _restrict(pairs, rows)
            ids[rows], scores[rows] = self._exact(queries[rows], k, sub, allowed)

    def _rescore(self, queries: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products for the candidates, re-sorted by (score desc, id asc)."""
        scores = np.einsum("qkd,qd->qk", self.items[np.maximum(ids, 0)], queries).astype(np.float32)
        scores[ids < 0] = _EMPTY
        order = np.lexsort((ids, -scores), axis=1)
        return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)

    def _params(self, fetch: int, selector: Any) -> Any:
        """FAISS search parameters for this backend and a fetch of ``fetch`` (see faiss_search_params)."""
        return faiss_search_params(self.config.backend, self.params, fetch, selector)

    def save(self, directory: str | Path) -> None:
        """vectors.safetensors, index.faiss, then index.json (last: it marks a complete index)."""
        directory = Path(directory)
        # Saving over an index: its index.json goes first, or a save that fails half-way would leave the
        # new vectors beside the old FAISS file under a description that still loads.
        (directory / "index.json").unlink(missing_ok=True)
        save_tensors(directory / "vectors.safetensors", {"items": torch.from_numpy(self.items)})
        faiss = import_faiss() if self.faiss_index is not None else None
        if faiss is not None:
            # faiss writes the temporary path itself; _atomic_write fsyncs and renames it into place.
            _atomic_write(directory / "index.faiss", lambda _h, tmp: faiss.write_index(self.faiss_index, tmp))
        meta = {"backend": self.config.backend, "metric": "inner_product", "similarity": self.similarity,
                "n_items": self.n_items, "dim": self.dim, "normalized": self.normalized,
                "faiss_version": faiss and faiss.__version__, "config": self.config.model_dump()}  # fmt: skip
        write_json(directory / "index.json", {**meta, "build_report": self.build_report})

    @classmethod
    def load(cls, directory: str | Path, similarity: Similarity) -> ItemIndex:
        """Reopen a saved index, refusing one whose metric, similarity or shape does not match."""
        directory = Path(directory)
        meta = read_json(directory / "index.json")
        if meta.get("metric") != "inner_product" or meta.get("similarity") != similarity:
            raise ValueError(
                f"index at {directory} was built for metric {meta.get('metric')!r} with similarity "
                f"{meta.get('similarity')!r}, but the model uses similarity {similarity!r}: rebuild the index"
            )
        config = IndexConfig.model_validate(meta["config"])
        items = load_tensors(directory / "vectors.safetensors")["items"].numpy()
        if items.shape != (meta["n_items"], meta["dim"]):
            raise ValueError(
                f"vectors {items.shape} disagree with index.json ({meta['n_items']}, {meta['dim']})"
            )
        normalized = check_normalized(items, similarity)
        faiss_index = None
        if config.backend != "exact":
            set_threads(config)
            faiss_index = import_faiss().read_index(str(directory / "index.faiss"))
            check_faiss(faiss_index, items.shape, config.backend)
        return cls(items, config, similarity, faiss_index, normalized, meta["build_report"])
