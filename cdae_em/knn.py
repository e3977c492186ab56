"""k nearest neighbours at scale: exact tiled search (``neighbours.nearest_neighbours``) where it is
fast, an approximate graph index (faiss HNSW, from the optional ``faiss-cpu`` package) above a
measured threshold, with its recall against exact kNN estimated on a sample of queries.

Exact search costs Q x N distances (Q queries among N vectors); HNSW costs about N log N to build
plus Q log N to search. Measured on the 2-core development CPU (32-d PCA features, k = 30,
``python -m benchmarks.scale knn``, docs/scale.md): exact all-pairs kNN takes ~48-140 s at 10^5
vectors and grows as N^2 (hours at 10^6), HNSW about a minute at 10^5 and minutes at 10^6 at
recall >= 0.95. Fine-tuning only needs the neighbours of its subset (Q = 4,000 by default), for
which exact search stays cheap even at 10^6 particles: ``method="auto"`` switches to HNSW only
when Q x N is above ``EXACT_MAX_PAIRS`` and faiss is installed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from cdae_em.neighbours import drop_far, nearest_neighbours

log = logging.getLogger(__name__)

# Q x N above which "auto" uses HNSW: there, exact search takes about as long as building and
# searching the index (measured: docs/scale.md).
EXACT_MAX_PAIRS = 2e9
HNSW_M = 32  # graph degree
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 64  # >= k + 1; more is slower and more accurate


@dataclass
class Neighbours:
    """Result of ``find_neighbours``: indices and distances (Q, k), nearest first, self excluded."""

    indices: torch.Tensor
    distances: torch.Tensor
    method: str  # "exact" or "hnsw"
    recall: float | None  # estimated recall@k against exact kNN (None: exact)
    seconds: float


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
    if float(n) * n_queries <= EXACT_MAX_PAIRS:
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
    idx = hnsw_search(x.numpy(), rows.numpy(), k, threads=threads)
    idx = torch.from_numpy(idx)
    dist = (x[rows][:, None, :] - x[idx]).norm(dim=-1)
    dist, order = torch.sort(dist, dim=1)
    idx = idx.gather(1, order)
    recall = estimate_recall(x, rows, idx, k, recall_sample, seed)
    if max_distance is not None:
        idx, dist = drop_far(idx, dist, rows, max_distance)
    seconds = time.perf_counter() - t0
    log.info("kNN (HNSW, M=%d, efSearch=%d): %d queries among %d in %.1f s, recall@%d %.3f (on %d exact queries)",
             HNSW_M, HNSW_EF_SEARCH, len(rows), n, seconds, k, recall, min(recall_sample, len(rows)))
    dev = features.device
    return Neighbours(idx.to(dev), dist.to(dev), "hnsw", recall, seconds)


def hnsw_search(x: np.ndarray, rows: np.ndarray, k: int, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
                ef_search: int = HNSW_EF_SEARCH, threads: int | None = None, batch: int = 65536) -> np.ndarray:
    """Approximate neighbours (len(rows), k) of ``x[rows]`` among ``x`` (float32, C order), self
    excluded, with a faiss HNSW graph. Deterministic for a given thread count."""
    import faiss

    if threads is not None:
        faiss.omp_set_num_threads(max(1, int(threads)))
    index = faiss.IndexHNSWFlat(x.shape[1], m)
    index.hnsw.efConstruction = ef_construction
    index.hnsw.efSearch = max(ef_search, k + 1)
    index.add(x)
    out = np.empty((len(rows), k), dtype=np.int64)
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        _, found = index.search(x[part], k + 1)
        out[start:start + len(part)] = _drop_self(found, part, k)
    return out


def _drop_self(found: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """(B, k + 1) results -> (B, k): each row's own index removed (else its last result); faiss's
    -1 (too few results) replaced by the row itself, which neighbour means treat as no neighbour."""
    found = np.where(found < 0, rows[:, None], found)
    is_self = found == rows[:, None]
    is_self[~is_self.any(axis=1), -1] = True  # self not found: drop the farthest instead
    first_self = is_self.argmax(axis=1)
    keep = np.ones_like(found, dtype=bool)
    keep[np.arange(len(found)), first_self] = False
    return found[keep].reshape(len(found), k)


def estimate_recall(x: torch.Tensor, rows: torch.Tensor, approx: torch.Tensor, k: int, sample: int = 1000,
                    seed: int = 0) -> float:
    """Mean fraction of the exact k nearest neighbours found in ``approx`` (rows of ``rows``), over
    ``sample`` seeded random queries (cost: sample x N distances)."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(rows), size=min(sample, len(rows)), replace=False))
    exact, _ = nearest_neighbours(x, k, queries=rows[pick])
    a, e = approx[pick].numpy(), exact.numpy()
    return float(np.mean([len(np.intersect1d(a[i], e[i])) / k for i in range(len(pick))]))
