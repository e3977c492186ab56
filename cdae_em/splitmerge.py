"""Split-and-merge moves for 2D classification: out of the local optima that hard assignment
settles in.

Multi-reference alignment with hard assignment often converges with two different views sharing
one class while a single view is split over two classes (with K fixed, one mistake forces the
other). Each move merges the two most alike classes and splits the most heterogeneous one, keeping
K; the classification then runs a few rounds from the new references and keeps the move only if
it raises the k-means objective (``explained_energy``).

- Heterogeneity of a class: its members (a sample of at most ``sample``) aligned onto the class
  and masked; the top eigenvalue of their covariance divided by the edge of the Marchenko-Pastur
  law for white noise of the same variance per pixel. Two views in one class add a spike above
  that edge; one view (noise, small misalignments) stays near it.
- The split: the sample divided in two along its first principal component (1D two-means); the two
  halves' means are the new references.
- The merge: the pair of class averages with the highest normalised cross-correlation after
  aligning one onto the other; the merged reference is their member-weighted mean.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from cdae_em.align import align_pairs, apply_alignment
from cdae_em.preprocess import particle_mask

log = logging.getLogger(__name__)


def explained_energy(references: np.ndarray, counts: np.ndarray) -> float:
    """The k-means objective for aligned classes: sum_c n_c |mean_c|^2 / N.

    The within-class squared error is sum_i |x_i|^2 minus this, so higher is better. Each class
    mean carries its members' noise (|noise|^2 / n_c on average), which adds K |noise|^2 / N to the
    sum whatever the partition: partitions into the same K classes compare fairly.
    """
    counts = np.asarray(counts, dtype=np.float64)
    energy = (np.asarray(references, dtype=np.float64) ** 2).reshape(len(counts), -1).sum(axis=1)
    return float((counts * energy).sum() / max(counts.sum(), 1.0))


def heterogeneity(aligned: torch.Tensor, inside: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(ratio, scores on the first principal axis) of aligned images (m, box, box) within ``inside``:
    ratio = top eigenvalue of the covariance / the Marchenko-Pastur edge sigma^2 (1 + sqrt(d/m))^2."""
    x = aligned[:, inside].double()
    m, d = x.shape
    x = x - x.mean(dim=0)
    sigma2 = float(x.square().sum()) / (m * d)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    top = float(s[0]) ** 2 / m
    ratio = top / max(sigma2 * (1.0 + (d / m) ** 0.5) ** 2, 1e-30)
    return ratio, x @ vh[0]


def two_means_1d(t: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Boolean split of 1D values into two groups by Lloyd's algorithm (started at the mean)."""
    side = t > t.mean()
    for _ in range(iterations):
        if side.all() or not side.any():
            break
        cut = 0.5 * (t[side].mean() + t[~side].mean())
        new = t > cut
        if torch.equal(new, side):
            break
        side = new
    return side


def most_alike_pair(references: np.ndarray, exclude: int, mask_radius: float | None = None) -> tuple[int, int, float]:
    """(a, b, score): the two classes (neither ``exclude``) whose averages correlate best after
    aligning b onto a."""
    k = len(references)
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k) if exclude not in (a, b)]
    refs = torch.as_tensor(references, dtype=torch.float32)
    ia = torch.tensor([p[0] for p in pairs])
    ib = torch.tensor([p[1] for p in pairs])
    _, _, score = align_pairs(refs[ib], refs[ia], mask_radius=mask_radius)
    best = int(torch.argmax(score))
    return pairs[best][0], pairs[best][1], float(score[best])


def propose(read: Callable[[np.ndarray], torch.Tensor], labels: np.ndarray, psi: np.ndarray, origin: np.ndarray,
            references: np.ndarray, counts: np.ndarray, seed: int, sample: int = 400, min_members: int = 20,
            mask_radius: float | None = None) -> tuple[np.ndarray, dict] | None:
    """New references (K, box, box) for one merge-and-split move, and what it does; None when no
    class has enough members to split or fewer than 3 classes remain.

    ``read(rows)`` returns the images ``rows`` masked and zero-mean as the classification compares
    them (on the CPU); only a sample of each class's members is read.
    """
    k, box = references.shape[0], references.shape[-1]
    if k < 3:
        return None
    rng = np.random.default_rng(seed)
    inside = particle_mask(box) > 0.5
    best = None
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if len(members) < 2 * min_members:
            continue
        rows = np.sort(rng.choice(members, size=min(sample, len(members)), replace=False))
        aligned = apply_alignment(read(rows).cpu(), torch.as_tensor(psi[rows]), torch.as_tensor(origin[rows]))
        ratio, scores = heterogeneity(aligned, inside)
        side = two_means_1d(scores)
        if min(int(side.sum()), int((~side).sum())) < min_members // 2:
            continue
        if best is None or ratio > best[0]:
            best = (ratio, c, aligned[side].mean(dim=0), aligned[~side].mean(dim=0), int(side.sum()), len(rows))
    if best is None:
        return None
    ratio, split, half_a, half_b, n_a, n_sampled = best
    a, b, similarity = most_alike_pair(references, exclude=split, mask_radius=mask_radius)
    refs = torch.as_tensor(references, dtype=torch.float32)
    p, o, _ = align_pairs(refs[b:b + 1], refs[a:a + 1], mask_radius=mask_radius)
    b_on_a = apply_alignment(refs[b:b + 1], p, o)[0]
    wa, wb = float(counts[a]), float(counts[b])
    new = refs.clone()
    new[a] = (wa * refs[a] + wb * b_on_a) / max(wa + wb, 1.0)
    new[split], new[b] = half_a, half_b
    move = {"split": split, "split_ratio": round(ratio, 3), "split_sizes": [n_a, n_sampled - n_a],
            "merge": [a, b], "merge_score": round(similarity, 4)}
    return new.numpy(), move
