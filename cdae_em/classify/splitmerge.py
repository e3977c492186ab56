"""Split-and-merge moves for 2D classification: out of the local optima that hard assignment
settles in.

Multi-reference alignment with hard assignment often converges with two different views sharing
one class while a single view is split over two classes (with K fixed, one mistake forces the
other). Each move merges the two most alike classes and splits the most heterogeneous one, keeping
K; the classification then runs a few rounds from the new references and keeps the move only if
it raises the k-means objective (``explained_energy``).

- Heterogeneity of a class: its members (a sample of at most ``sample``) aligned onto the class
  and masked; the top eigenvalue of the covariance of what they do not share (``class_residuals``)
  divided by the edge of the Marchenko-Pastur law for white noise of the same variance per pixel.
  Two views in one class add a spike above that edge; one view (noise, small misalignments) stays
  near it. For phase-flipped particles with their |CTF|, the residuals are taken from the
  CTF-corrected average, each weighted by the member's |CTF|: otherwise the largest spike is the
  spread of defocus (each member's |CTF| shapes it differently), and the split follows defocus,
  not views.
- The split: the sample divided in two along that first principal component (1D two-means); the
  two halves' means are the new references.
- The merge: the pair of class averages with the highest normalised cross-correlation after
  aligning one onto the other, or (``merge_by="cost"``) the pair whose merge costs the objective
  least; the merged reference is their member-weighted mean.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from cdae_em.core.align import align_pairs, apply_alignment
from cdae_em.core.averages import WIENER, ring_average
from cdae_em.core.ctf import frequency_grid
from cdae_em.core.polar import batch_rows
from cdae_em.core.preprocess import particle_mask

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


def class_residuals(aligned: torch.Tensor, amp: torch.Tensor | None = None, band: float | None = None) -> torch.Tensor:
    """What the aligned members of one class (m, box, box) do not share: each member minus the class
    average. With ``amp`` (each member's |CTF| on the rfft2 grid, ring-averaged so that it holds for
    the aligned image; phase-flipped members x = |CTF| v + noise) the average is the CTF-corrected
    one, v = sum |CTF| x / (sum CTF^2 + WIENER m), and each residual is |CTF| (x - |CTF| v): members
    then differ by the view they show, not by their defocus, weighted as the CTF-aware comparison
    weighs them. ``band``: frequencies above it (cycles/pixel) dropped."""
    box = aligned.shape[-1]
    f = torch.fft.rfft2(aligned)
    if amp is None:
        residual = f - f.mean(dim=0)
    else:
        average = (amp * f).sum(dim=0) / (amp.square().sum(dim=0) + WIENER * len(f))
        residual = amp * (f - amp * average)
    if band is not None:
        fy, fx = frequency_grid(box, f.device)
        residual = residual * ((fy**2 + fx**2) <= band**2)
    return torch.fft.irfft2(residual, s=(box, box))


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


def pair_to_merge(references: np.ndarray, counts: np.ndarray, exclude: int, mask_radius: float | None = None,
                  by: str = "correlation") -> tuple[int, int, float, float, torch.Tensor]:
    """(a, b, cost, score, b aligned onto a): the two classes (neither ``exclude``) to merge, with b
    aligned onto a: by ``"correlation"`` the pair whose averages correlate best (``score``, the
    normalised cross-correlation); by ``"cost"`` the pair whose merge lowers the k-means objective
    least, Ward's ``cost`` n_a n_b / (n_a + n_b) |mean_a - mean_b|^2 / N. Each mean carries noise of
    variance sigma^2 / n, which adds the same sigma^2 per pixel to every pair's cost: the cost is
    fair to a small, noisy class, which the correlation passes over."""
    k = len(references)
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k) if exclude not in (a, b)]
    refs = torch.as_tensor(references, dtype=torch.float32)
    ia = torch.tensor([p[0] for p in pairs])
    ib = torch.tensor([p[1] for p in pairs])
    psi, origin, score = align_pairs(refs[ib], refs[ia], mask_radius=mask_radius)
    b_on_a = apply_alignment(refs[ib], psi, origin)
    n = torch.as_tensor(np.asarray(counts, dtype=np.float64))
    weight = (n[ia] * n[ib] / (n[ia] + n[ib]).clamp_min(1.0) / max(float(n.sum()), 1.0)).float()
    cost = weight * (refs[ia] - b_on_a).square().flatten(1).sum(dim=1)
    if by not in ("correlation", "cost"):
        raise ValueError(f"unknown merge criterion {by!r} (correlation or cost)")
    best = int(torch.argmax(score)) if by == "correlation" else int(torch.argmin(cost))
    return pairs[best][0], pairs[best][1], float(cost[best]), float(score[best]), b_on_a[best]


def propose(read: Callable[[np.ndarray], torch.Tensor], labels: np.ndarray, psi: np.ndarray, origin: np.ndarray,
            references: np.ndarray, counts: np.ndarray, seed: int, sample: int = 400, min_members: int = 20,
            mask_radius: float | None = None, ctf=None, band: float | None = None, merge_by: str = "correlation") -> tuple[np.ndarray, dict] | None:
    """New references (K, box, box) for one merge-and-split move, and what it does; None when no
    class has enough members to split or fewer than 3 classes remain.

    ``read(rows)`` returns the images ``rows`` masked and zero-mean as the classification compares
    them (on the CPU); only a sample of each class's members is read. ``ctf``: the |CTF| of
    phase-flipped particles (``cdae_em.core.ctf.CtfAmplitudes``) and ``band``, for ``class_residuals``;
    ``merge_by``: see ``pair_to_merge``.
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
        amp = None if ctf is None else ring_average(batch_rows(ctf, rows, torch.device("cpu")))
        ratio, scores = heterogeneity(class_residuals(aligned, amp, band), inside)
        side = two_means_1d(scores)
        if min(int(side.sum()), int((~side).sum())) < min_members // 2:
            continue
        if best is None or ratio > best[0]:
            best = (ratio, c, aligned[side].mean(dim=0), aligned[~side].mean(dim=0), int(side.sum()), len(rows))
    if best is None:
        return None
    ratio, split, half_a, half_b, n_a, n_sampled = best
    a, b, cost, similarity, b_on_a = pair_to_merge(references, counts, exclude=split, mask_radius=mask_radius, by=merge_by)
    refs = torch.as_tensor(references, dtype=torch.float32)
    wa, wb = float(counts[a]), float(counts[b])
    new = refs.clone()
    new[a] = (wa * refs[a] + wb * b_on_a) / max(wa + wb, 1.0)
    new[split], new[b] = half_a, half_b
    move = {"split": split, "split_ratio": round(ratio, 3), "split_sizes": [n_a, n_sampled - n_a],
            "merge": [a, b], "merge_score": round(similarity, 4),
            "merge_cost": round(cost, 3)}
    return new.numpy(), move
