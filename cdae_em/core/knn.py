"""k nearest neighbours at scale: exact tiled search (``neighbours.nearest_neighbours``) where it is
fast, an approximate graph index (faiss HNSW, from the optional ``faiss-cpu`` package) above a
measured threshold, with its recall against exact kNN estimated on a sample of queries.

Exact search costs Q x N distances (Q queries among N vectors); HNSW costs about N log N to build
plus Q log N to search. Fine-tuning only needs the neighbours of its subset (4,000 queries by
default), for which exact search stays cheap at any N, so ``method="auto"`` switches to the index
only when its cost model says it is faster and faiss is installed. Timings and recall at 10^5-10^6
vectors: docs/scale.md (``python -m benchmarks.scale knn``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from cdae_em.core.neighbours import drop_far, nearest_candidates, nearest_neighbours

log = logging.getLogger(__name__)

# Cost model of "auto", seconds (fitted to ``python -m benchmarks.scale knn``, docs/scale.md):
# exact search costs EXACT_S_PER_PAIR per query x vector; the approximate index
# APPROX_S_PER_VECTOR per indexed vector (building) plus APPROX_S_PER_QUERY per query. Only the
# ratios matter: the index pays from about APPROX_S_PER_VECTOR / EXACT_S_PER_PAIR queries on.
EXACT_S_PER_PAIR = 5e-9
APPROX_S_PER_VECTOR = 1.0e-4
APPROX_S_PER_QUERY = 1.7e-4
HNSW_M = 32  # graph degree
HNSW_EF_CONSTRUCTION = 40  # less builds faster and loses recall (docs/notes.md)
HNSW_EF_SEARCH = 96  # >= k + 1; more is slower and more accurate (docs/notes.md)
HNSW_FROM_SELF = True  # searches start at the query's own node (see hnsw_search)
# The graph stores its vectors as 8-bit scalar codes (4x less memory to walk than float32, faster,
# the same recall after re-ranking) and returns HNSW_RERANK candidates, re-ranked by exact
# distance (docs/notes.md).
HNSW_RERANK = 48


@dataclass
class Neighbours:
    """Result of ``find_neighbours``: indices and distances (Q, k), nearest first, self excluded."""

    indices: torch.Tensor
    distances: torch.Tensor
    method: str  # "exact" or "hnsw"
    recall: float | None  # estimated recall@k against exact kNN (None: exact)
    seconds: float
    recall_seconds: float = 0.0  # of ``seconds``, what the recall estimate took


def faiss_available() -> bool:
    """Whether the optional ``faiss`` module (package ``faiss-cpu``) can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def choose_method(n: int, n_queries: int, method: str = "auto") -> str:
    """"exact" or "hnsw" for ``n`` vectors and ``n_queries`` queries (``method`` "auto", "exact" or
    "hnsw"; "hnsw" without faiss is an error)."""
    if method not in ("auto", "exact", "hnsw"):
        raise ValueError(f"kNN method must be auto, exact or hnsw, got {method!r}")
    if method == "hnsw" and not faiss_available():
        raise ImportError("kNN method hnsw needs the faiss-cpu package: pip install faiss-cpu")
    if method != "auto":
        return method
    exact = EXACT_S_PER_PAIR * float(n) * n_queries
    if exact <= APPROX_S_PER_VECTOR * n + APPROX_S_PER_QUERY * n_queries:
        return "exact"
    if not faiss_available():
        log.warning("kNN: %d x %d distances, exact search (install faiss-cpu for the faster approximate index)",
                    n_queries, n)
        return "exact"
    return "hnsw"


def find_neighbours(features: torch.Tensor, k: int, queries: np.ndarray | torch.Tensor | None = None,
                    method: str = "auto", max_distance: float | None = None, seed: int = 0,
                    recall_sample: int = 1000, threads: int | None = None) -> Neighbours:
    """k nearest neighbours of ``queries`` (rows of ``features``; default all) among all rows, self
    excluded, exact or approximate (``choose_method``). Approximate results have their distances
    recomputed exactly and their recall@k estimated against exact search on ``recall_sample``
    seeded random queries (logged, in ``Neighbours.recall``). ``max_distance`` as in
    ``nearest_neighbours``."""
    t0 = time.perf_counter()
    n = features.shape[0]
    if not 0 < k < n:
        raise ValueError(f"need 0 < k < N, got k={k}, N={n}")
    rows = torch.arange(n) if queries is None else torch.as_tensor(np.asarray(queries)).long().reshape(-1)
    chosen = choose_method(n, len(rows), method)
    if chosen == "exact":
        idx, dist = nearest_neighbours(features, k, max_distance=max_distance,
                                       queries=None if queries is None else rows.to(features.device))
        return Neighbours(idx, dist, "exact", None, time.perf_counter() - t0)
    x = features.detach().float().cpu()
    x = (x - x.mean(dim=0)).contiguous()
    idx, dist = hnsw_search(x.numpy(), rows.numpy(), k, threads=threads)
    idx, dist = torch.from_numpy(idx), torch.from_numpy(dist)
    t1 = time.perf_counter()
    recall = estimate_recall(x, rows, idx, k, recall_sample, seed)
    recall_seconds = time.perf_counter() - t1
    if max_distance is not None:
        idx, dist = drop_far(idx, dist, rows, max_distance)
    seconds = time.perf_counter() - t0
    log.info("kNN (HNSW, M=%d, efSearch=%d, 8-bit codes, %d re-ranked): %d queries among %d in %.1f s, "
             "recall@%d %.3f (on %d exact queries, %.1f s)", HNSW_M, HNSW_EF_SEARCH, HNSW_RERANK, len(rows), n, seconds,
             k, recall, min(recall_sample, len(rows)), recall_seconds)
    dev = features.device
    return Neighbours(idx.to(dev), dist.to(dev), "hnsw", recall, seconds, recall_seconds)


def hnsw_search(x: np.ndarray, rows: np.ndarray, k: int, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
                ef_search: int = HNSW_EF_SEARCH, threads: int | None = None, batch: int = 8192,
                from_self: bool = HNSW_FROM_SELF, rerank: int = HNSW_RERANK) -> tuple[np.ndarray, np.ndarray]:
    """Approximate neighbours (len(rows), k) of ``x[rows]`` among ``x`` (float32, C order), self
    excluded, nearest first, and their exact Euclidean distances, with a faiss HNSW graph over 8-bit
    scalar codes of ``x``: the ``max(rerank, k) + 1`` candidates it returns are re-ranked by their
    exact distances (``neighbours.nearest_candidates``). The queries are vectors of the graph, so
    with ``from_self`` each search starts at the query's own node on the bottom level
    (``search_level_0``) instead of descending from the top: no hops are spent getting there. Fewer
    than k neighbours found: the row itself at distance 0, which neighbour means treat as no
    neighbour. Deterministic for a given thread count."""
    import faiss

    if threads is not None:
        faiss.omp_set_num_threads(max(1, int(threads)))
    index = faiss.IndexHNSWSQ(x.shape[1], faiss.ScalarQuantizer.QT_8bit, m)
    index.hnsw.efConstruction = ef_construction
    n_found = max(rerank, k) + 1
    index.hnsw.efSearch = max(ef_search, n_found)
    index.train(x)
    index.add(x)
    xt = torch.from_numpy(x)
    out = np.empty((len(rows), k), dtype=np.int64)
    out_d = np.empty((len(rows), k), dtype=np.float32)
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        q = np.ascontiguousarray(x[part])
        if from_self:
            entry = np.ascontiguousarray(part, dtype=np.int32).reshape(-1, 1)  # storage_idx_t
            entry_d = np.zeros((len(part), 1), dtype=np.float32)
            coded = np.empty((len(part), n_found), dtype=np.float32)  # the codes' distances: not used
            found = np.empty((len(part), n_found), dtype=np.int64)
            index.search_level_0(len(part), faiss.swig_ptr(q), n_found, faiss.swig_ptr(entry),
                                 faiss.swig_ptr(entry_d), faiss.swig_ptr(coded), faiss.swig_ptr(found))
        else:
            found = index.search(q, n_found)[1]
        own = torch.from_numpy(part)
        idx, dist = nearest_candidates(xt, own, torch.from_numpy(found), k)
        missing = idx < 0
        out[start:start + len(part)] = torch.where(missing, own[:, None], idx).numpy()
        out_d[start:start + len(part)] = torch.where(missing, 0.0, dist).numpy()
    return out, out_d


def estimate_recall(x: torch.Tensor, rows: torch.Tensor, approx: torch.Tensor, k: int, sample: int = 1000,
                    seed: int = 0) -> float:
    """Mean fraction of the exact k nearest neighbours found in ``approx`` (rows of ``rows``), over
    ``sample`` seeded random queries (cost: sample x N distances)."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(rows), size=min(sample, len(rows)), replace=False))
    exact, _ = nearest_neighbours(x, k, queries=rows[pick])
    a, e = approx[pick].numpy(), exact.numpy()
    return float(np.mean([len(np.intersect1d(a[i], e[i])) / k for i in range(len(pick))]))
