"""kNN at scale (cdae_em.core.knn): exact search for chosen queries, the HNSW index and its recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdae_em.core import knn
from cdae_em.core.knn import choose_method, find_neighbours
from cdae_em.core.neighbours import nearest_neighbours


def clustered(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, d, generator=gen) * 4
    return centres[torch.randint(0, 20, (n,), generator=gen)] + torch.randn(n, d, generator=gen)


def test_queries_match_all_rows():
    f = clustered(700)
    full_idx, full_dist = nearest_neighbours(f, 9, block_size=128)
    rows = torch.tensor([0, 5, 699, 350, 128, 127])
    idx, dist = nearest_neighbours(f, 9, block_size=128, queries=rows)
    assert torch.equal(idx, full_idx[rows]) and torch.allclose(dist, full_dist[rows])
    idx, dist = nearest_neighbours(f, 9, block_size=128, queries=rows, max_distance=float(full_dist[:, 4].median()))
    own = (idx == rows[:, None])
    assert own.any() and torch.all(dist[own] == 0)


def test_choose_method(monkeypatch):
    assert choose_method(1000, 1000) == "exact"
    assert choose_method(10**6, 4000) == "exact"  # fine-tuning's subset: exact even at 10^6
    monkeypatch.setattr(knn, "faiss_available", lambda: True)  # the choice, whether or not faiss is installed here
    assert choose_method(10**5, 10**5) != "exact" and choose_method(10**6, 10**5) != "exact"
    monkeypatch.setattr(knn, "faiss_available", lambda: False)
    assert choose_method(10**6, 10**6) == "exact"  # no faiss: exact, with a warning
    with pytest.raises(ImportError, match="faiss-cpu"):
        choose_method(10, 10, "hnsw")
    with pytest.raises(ValueError):
        choose_method(10, 10, "annoy")


def test_hnsw_recall_and_exact_distances():
    pytest.importorskip("faiss")
    f = clustered(3000, seed=1)
    rows = np.arange(0, 3000, 7)
    found = find_neighbours(f, 10, queries=rows, method="hnsw", recall_sample=200, threads=1)
    exact_idx, _ = nearest_neighbours(f, 10, queries=torch.as_tensor(rows))
    measured = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(found.indices.numpy(), exact_idx.numpy())])
    assert found.method == "hnsw" and found.indices.shape == (len(rows), 10)
    assert measured > 0.95 and abs(found.recall - measured) < 0.05
    assert not (found.indices == torch.as_tensor(rows)[:, None]).any()
    # distances are exact (recomputed), sorted
    direct = (f[rows][:, None, :] - f[found.indices]).norm(dim=-1)
    assert torch.allclose(found.distances, direct, atol=1e-4)
    assert torch.all(found.distances[:, 1:] >= found.distances[:, :-1])
    # deterministic for a given thread count
    again = find_neighbours(f, 10, queries=rows, method="hnsw", recall_sample=200, threads=1)
    assert torch.equal(again.indices, found.indices)


def test_auto_uses_hnsw_above_threshold(monkeypatch):
    pytest.importorskip("faiss")
    monkeypatch.setattr(knn, "EXACT_S_PER_PAIR", 1e-6)  # as if exact search were 200x slower
    f = clustered(1000, seed=2)
    assert find_neighbours(f, 5, method="auto", recall_sample=100).method == "hnsw"
    assert find_neighbours(f, 5, queries=np.arange(50), method="auto").method == "exact"


def test_hnsw_search_fewer_vectors_than_candidates():
    """20 vectors, 49 candidates asked of the index: faiss pads with -1, which must not reach the
    result; the re-ranked neighbours are the exact ones, self excluded."""
    pytest.importorskip("faiss")
    f = clustered(20, seed=3)
    rows = np.arange(20)
    idx, dist = knn.hnsw_search(f.numpy(), rows, 5, threads=1)
    exact_idx, exact_dist = nearest_neighbours(f, 5)
    assert (idx >= 0).all() and not (idx == rows[:, None]).any()
    assert np.array_equal(np.sort(idx, axis=1), np.sort(exact_idx.numpy(), axis=1))
    assert np.allclose(dist, exact_dist.numpy(), atol=1e-4)
