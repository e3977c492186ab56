"""Neighbours for CDAE fine-tuning: rotation- and shift-invariant features, PCA, exact k-nearest
neighbours in blocks, and the mean of each particle's neighbours aligned onto it (the target of
Algorithm 1, eq. 6, made rotation-aware).

Which features, and why: Fourier amplitudes (shift invariant) of the 2x zero-padded image,
resampled on polar rings up to box/4, then an FFT over the angle; the features are the magnitudes
of the angular harmonics h_m(r) (rotation invariant) plus cross-ring products h_m(r) conj(h_m(r+d)),
d = 1, 2, which keep the relative phase between rings and so tell a view from its mirror (plain
magnitudes cannot: about as many neighbours were mirror views as true views). A mask fitted to
the particle (``estimate_particle_radius``) matters at low SNR. The measurements behind these
choices are in docs/notes.md.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cdae_em.runtime import distributed
from cdae_em.io.memory import Releaser, Streamed
from cdae_em.core.preprocess import soft_circular_mask
from cdae_em.runtime.progress import report
from cdae_em.runtime.workarrays import shared_work_array
from cdae_em.core.align import align_prepared, apply_alignment, estimate_particle_radius
from cdae_em.core.polar import AlignmentGrid, Images, batch_rows, device_of, polar_amplitudes, polar_sampler

log = logging.getLogger(__name__)


def invariant_features(
    images: Images,
    n_radii: int | None = None,
    n_angular: int = 16,
    mask_radius: float | None = None,
    kind: str = "bispectrum",
    r_max: float | None = None,
    oversample: int = 2,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Features (N, d) invariant to in-plane rotation and shift, for neighbour search.

    The image (zero mean, soft mask of ``mask_radius``, default: estimated particle radius) is
    Fourier transformed; its amplitudes |F| (shift invariant up to the mask) are resampled on
    ``n_radii`` rings from 1 to ``r_max`` Fourier pixels (default box / 4, the low-frequency band
    where the signal is; one ring per pixel by default) over angles [0, pi) (|F| is
    centrosymmetric); an FFT along the angle gives per ring r harmonics h_m(r), m < n_angular,
    which a rotation multiplies by exp(-i m psi). Features:

    - ``kind="amplitude"``: |h_m(r)| (R * M values). Invariant, but blind to the relative angle of
      the rings *and to mirroring*: a particle seen from the opposite side (its mirror image,
      which no rotation aligns) gets the same features, and was as often a neighbour as the right
      view in tests.
    - ``kind="bispectrum"`` (default): |h_m(r)| plus the bispectrum-like cross-ring products
      h_m(r) conj(h_m(r + d)), d = 1, 2, m >= 1 (real and imaginary parts, scaled by
      |.|^-1/2 to stay in amplitude units). These are also rotation invariant but keep the
      angular phase between rings and change sign under mirroring (better neighbours: see
      docs/notes.md).

    ``oversample`` = 2 zero-pads before the FFT, so that the polar resampling interpolates a finer
    grid.
    """
    dev = device_of(images, device)
    n, box = images.shape[0], images.shape[-1]
    if kind not in ("amplitude", "bispectrum"):
        raise ValueError(f"kind must be 'amplitude' or 'bispectrum', got {kind!r}")
    if mask_radius is None:
        mask_radius = estimate_particle_radius(images, device=dev)
        log.info("invariant features: mask radius %.1f px (estimated particle radius)", mask_radius)
    r_max = float(r_max) if r_max is not None else box / 4
    r_max = min(r_max, box / 2 - 1)
    r_min = 1.0
    if n_radii is None:
        n_radii = int(round(r_max - r_min)) + 1
    radii = torch.linspace(r_min, r_max, n_radii, device=dev)
    n_theta = max(2 * n_angular, math.ceil(math.pi * r_max))
    n_theta += n_theta % 2
    sampler = polar_sampler(oversample * box, oversample * radii, n_theta)
    mask = soft_circular_mask(box, mask_radius, device=dev)
    out = []
    for start in range(0, n, batch_size):
        x = batch_rows(images, slice(start, min(start + batch_size, n)), dev)
        p = polar_amplitudes(x, mask, sampler, n_radii, n_theta, oversample)
        h = torch.fft.rfft(p, dim=-1)[:, :, :n_angular] / n_theta  # (b, R, M)
        feats = [h.abs().flatten(1)]
        if kind == "bispectrum":
            for d in (1, 2):
                if d >= n_radii:
                    break
                q = h[:, d:, 1:] * h[:, :-d, 1:].conj()
                q = q / q.abs().clamp_min(1e-12).sqrt()
                feats += [q.real.flatten(1), q.imag.flatten(1)]
        out.append(torch.cat(feats, dim=1))
    return torch.cat(out) if out else torch.zeros((0, 0), device=dev)


def feature_array(images, work: Path, radius: float, device: torch.device, chunk: int = 8192) -> np.memmap:
    """The invariant features of ``images`` in the work array ``work/features.npy`` (N, d): each
    rank computes its rows; every rank gets the whole array once all are written. Keeps resident
    memory flat in N (N x ~1,100 float32 at 64 px would be 4.4 GB at 10^6 particles)."""

    n = len(images)
    d = invariant_features(distributed.RowShard(images, 0, 1), mask_radius=radius, device=device).shape[1]
    if distributed.world().main:
        work.mkdir(parents=True, exist_ok=True)
    feats = shared_work_array(work / "features.npy", n, 0, shape=(n, d))
    pages = Releaser(feats)
    lo, hi = distributed.shard(n)
    for start in range(lo, hi, chunk):
        stop = min(start + chunk, hi)
        feats[start:stop] = invariant_features(distributed.RowShard(images, start, stop), mask_radius=radius,
                                               device=device).cpu().numpy()
        pages.step(feats[start:stop].nbytes)
        report(stop - lo, hi - lo, "invariant features")  # status.json: this rank's images done
    feats.flush()
    pages.now()
    distributed.barrier()
    return feats


def reduced_invariant_features(images, radius: float, device: torch.device, n_components: int, seed: int = 0,
                               work: Path | None = None, rows: np.ndarray | None = None) -> torch.Tensor:
    """The invariant features of ``images`` reduced by PCA (``reduce_features``; of ``rows`` only,
    if given), on the CPU. With a ``work`` directory the full features go to its memory-mapped work
    array (``feature_array``), removed once reduced; without, they are held (and gathered across
    ranks) in memory."""
    if work is None:
        feats = distributed.per_row(invariant_features, images, mask_radius=radius, device=device).cpu()
        return reduce_features(feats, n_components=n_components, seed=seed, rows=rows)
    feats = feature_array(images, work, radius, device)
    reduced = reduce_features(Streamed(feats), n_components=n_components, seed=seed, rows=rows)
    del feats
    if distributed.world().main:  # every rank has it mapped already (feature_array's barrier)
        (work / "features.npy").unlink(missing_ok=True)
    return reduced


EXACT_PCA_MAX_DIM = 8192  # covariance 512 MB, eigh about a minute on 2 cores


def reduce_features(features: torch.Tensor | np.ndarray, n_components: int = 32, seed: int = 0, whiten: bool = False,
                    batch_bytes: int = 2**24, rows: np.ndarray | None = None) -> torch.Tensor:
    """Project features onto their top principal components: (N, d) -> (N, n_components), float32.

    ``features`` may be a numpy array or memmap (read in batches; the result is on the CPU);
    ``rows`` restricts it to those rows (the result has one row per entry of ``rows``). They are
    read ``batch_bytes`` of float64 at a time, so memory does not grow with N (batches of a fixed
    65,536 rows of ~1,100 features held 1.4 GB).

    Not whitened by default: whitening gives the many noise-dominated minor components the same
    weight as the signal-rich major ones and made neighbours worse in tests (fraction within 20
    degrees 0.25 -> 0.20 at SNR 0.1). For d <= EXACT_PCA_MAX_DIM the covariance is accumulated in
    float64 in batches and diagonalised exactly (deterministic; ``seed`` unused): memory d^2, not
    N d (invariant features of 256 px images have d ~4,800). Larger d uses ``torch.pca_lowrank``
    under a seeded RNG, on all rows in memory. Component signs are fixed (largest loading positive).
    """
    if not isinstance(features, torch.Tensor) or rows is not None:
        source, picked = features, rows

        class _Rows:  # rows of a tensor or array, read in batches as float tensors
            shape = (len(picked) if picked is not None else len(source), source.shape[1])
            device = source.device if isinstance(source, torch.Tensor) else torch.device("cpu")

            def __getitem__(self, sl):
                got = source[picked[sl]] if picked is not None else source[sl]
                return torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got

            def double(self):
                return self[slice(None)].double()

        features = _Rows()
    n, d = features.shape
    dev = features.device
    q = min(n_components, d, n)
    batch_size = max(1, batch_bytes // (8 * d))
    mean = torch.zeros(d, dtype=torch.float64, device=dev)
    for s in range(0, n, batch_size):
        mean += features[s:s + batch_size].double().sum(0)
    mean /= max(n, 1)
    if d <= EXACT_PCA_MAX_DIM:
        cov = torch.zeros((d, d), dtype=torch.float64, device=dev)
        for s in range(0, n, batch_size):
            x = features[s:s + batch_size].double() - mean
            cov += x.T @ x
        cov /= max(n - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)[:q]
        evals, comps = evals[order], evecs[:, order]
    else:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            _, sv, v = torch.pca_lowrank(features.double() - mean, q=q, center=False)
        comps, evals = v[:, :q], sv[:q] ** 2 / max(n - 1, 1)
    comps = comps * torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
    scale = evals.clamp_min(1e-30).rsqrt() if whiten else torch.ones_like(evals)
    out = torch.empty((n, q), dtype=torch.float32, device=dev)
    for s in range(0, n, batch_size):
        out[s:s + batch_size] = ((features[s:s + batch_size].double() - mean) @ comps * scale).float()
    return out


def nearest_neighbours(
    features: torch.Tensor, k: int, block_size: int = 4096, max_distance: float | None = None,
    queries: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours (Euclidean) of every row (or of the rows ``queries``) among all
    the others: (indices, distances).

    indices (Q, k) int64 and distances (Q, k), nearest first, self excluded, Q = N or len(queries)
    (row r belongs to queries[r]). Computed in (block_size x block_size) tiles of |x|^2 - 2 q.x
    (memory O(block_size^2), never N x N), keeping a running top (k + margin) per row; the final
    candidates' distances are recomputed directly from differences (no cancellation) and
    re-sorted, so results match ``torch.cdist``. Cost: Q x N distances, so asking only for the
    rows that are needed (``queries``) saves the rest. With ``max_distance``, neighbours farther
    than it are replaced by the point itself (index i, distance 0): a neighbour mean then counts
    x_i again instead of an unrelated particle, so averaging stays correct; callers can count real
    neighbours as (indices != query index).
    """
    n = features.shape[0]
    if not 0 < k < n:
        raise ValueError(f"need 0 < k < N, got k={k}, N={n}")
    dev = features.device
    x = features.float()
    x = x - x.mean(dim=0)  # distances unchanged; less cancellation in |a|^2 + |b|^2 - 2ab
    sq = (x * x).sum(dim=1)
    kk = min(n - 1, k + max(8, k // 2))
    qrows = torch.arange(n, device=dev) if queries is None else torch.as_tensor(np.asarray(queries)).to(dev).long()
    nq = len(qrows)
    idx_out = torch.empty((nq, k), dtype=torch.long, device=dev)
    dist_out = torch.empty((nq, k), dtype=torch.float32, device=dev)
    for r0 in range(0, nq, block_size):
        r1 = min(r0 + block_size, nq)
        rows = qrows[r0:r1]
        q = x[rows]
        best_d = torch.full((r1 - r0, 0), torch.inf, device=dev)
        best_i = torch.zeros((r1 - r0, 0), dtype=torch.long, device=dev)
        for c0 in range(0, n, block_size):
            c1 = min(c0 + block_size, n)
            # |q|^2 is the same along a row, so ranking needs only |x|^2 - 2 q.x (one fused addmm)
            d2 = torch.addmm(sq[None, c0:c1], q, x[c0:c1].T, alpha=-2.0)
            own = (rows >= c0) & (rows < c1)  # exclude self
            if own.any():
                d2[own.nonzero().reshape(-1), rows[own] - c0] = torch.inf
            vals, ids = torch.topk(d2, min(kk, c1 - c0), dim=1, largest=False)
            best_d = torch.cat([best_d, vals], dim=1)
            best_i = torch.cat([best_i, ids + c0], dim=1)
            if best_d.shape[1] > kk:
                best_d, sel = torch.topk(best_d, kk, dim=1, largest=False)
                best_i = best_i.gather(1, sel)
        idx_out[r0:r1], dist_out[r0:r1] = nearest_candidates(x, rows, best_i, k)
    if max_distance is not None:
        idx_out, dist_out = drop_far(idx_out, dist_out, qrows, max_distance)
    return idx_out, dist_out


def nearest_candidates(x: torch.Tensor, rows: torch.Tensor, candidates: torch.Tensor, k: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` of ``candidates`` (Q, c: row indices of ``x``, -1 for none) nearest to ``x[rows]``,
    by Euclidean distance computed directly from the differences (no cancellation), nearest first,
    each query's own row excluded: (Q, k) indices and distances. Where fewer than ``k`` candidates
    are left, the index is -1 and the distance inf."""
    d = (x[rows][:, None, :] - x[candidates.clamp_min(0)]).norm(dim=-1)
    d = torch.where((candidates == rows[:, None]) | (candidates < 0), torch.full_like(d, torch.inf), d)
    d, order = torch.sort(d, dim=1)
    return candidates.gather(1, order[:, :k]), d[:, :k]


def drop_far(idx: torch.Tensor, dist: torch.Tensor, rows: torch.Tensor, max_distance: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours farther than ``max_distance`` replaced by the query row itself (distance 0)."""
    far = dist > max_distance
    self_idx = rows.to(idx.device)[:, None].expand_as(idx)
    log.info("nearest neighbours: %.1f%% of neighbours beyond %.3g replaced by the point itself",
             100.0 * float(far.float().mean()), max_distance)
    return torch.where(far, self_idx, idx), torch.where(far, torch.zeros_like(dist), dist)


def aligned_neighbour_means(
    images: Images,
    neighbours: torch.Tensor | np.ndarray,
    psi_step: float = 5.0,
    max_shift: float | None = None,
    batch_size: int = 256,
    progress: bool = False,
    refine: bool = True,
    mask_radius: float | None = None,
    n_candidates: int = 2,
    device: torch.device | str | None = None,
    out: torch.Tensor | np.ndarray | None = None,
    rows: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor | np.ndarray:
    """CDAE targets: for every i, the mean of x_i and its neighbours x_j (j in neighbours[i]), each
    x_j aligned onto x_i (rotation + shift, ``align_pairs``'s method).

    x_i itself is in the mean with weight 1, like one more neighbour: the result is
    (x_i + sum_j aligned_j) / (k + 1), in x_i's frame. A neighbour index equal to i (what
    ``nearest_neighbours`` puts for neighbours beyond ``max_distance``) adds x_i again, unaligned.

    Round 1 aligns each x_j onto x_i alone. At low SNR that single noisy reference gives wrong
    angles for part of the pairs, so with ``refine`` (default) round 2 re-aligns every raw x_j onto
    the leave-one-out mean of round 1, (x_i + sum_{l != j} aligned_l) / k: about k times less
    noisy than x_i, and without x_j's own noise (which would otherwise pull x_j onto its own earlier
    alignment); with that cleaner reference one amplitude rotation candidate (and its 180 degree
    partner) is enough. Each output is one interpolation of the raw images (no resampling of
    resamplings). The references still contain x_i's noise, so a little of it is reinforced
    ("noise bias"). ``refine`` costs about twice the time (what it gains: docs/notes.md).

    ``rows`` (default: all) selects the centre images i: then neighbours[r] belongs to rows[r]
    and the result has len(rows) images, in that order. Neighbour indices always index ``images``.

    ``images`` may be a numpy memmap (read in batches); ``batch_size`` counts image pairs per batch
    (rounded down to whole centre images, at least one). Results go to ``out`` if given (e.g. a
    writable memmap), else to a new float32 tensor on images.device (CPU for numpy input).
    ``mask_radius`` defaults to ``estimate_particle_radius(images)``.
    """
    dev = device_of(images, device)
    box = images.shape[-1]
    nb = torch.as_tensor(np.asarray(neighbours) if not isinstance(neighbours, torch.Tensor) else neighbours)
    nb = nb.to(device=dev, dtype=torch.long)
    if rows is None:
        centres = torch.arange(images.shape[0], device=dev)
    else:
        centres = torch.as_tensor(np.asarray(rows) if not isinstance(rows, torch.Tensor) else rows)
        centres = centres.to(device=dev, dtype=torch.long).reshape(-1)
    n = len(centres)
    if nb.ndim != 2 or nb.shape[0] != n:
        raise ValueError(f"neighbours must be (number of centre images, k) = ({n}, k), got {tuple(nb.shape)}")
    k = nb.shape[1]
    if mask_radius is None:
        mask_radius = estimate_particle_radius(images, device=dev)
        log.info("neighbour means: mask radius %.1f px (estimated particle radius)", mask_radius)
    grid = AlignmentGrid(box, dev, psi_step, max_shift, mask_radius)
    if out is None:
        out_dev = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        out = torch.empty((n, box, box), dtype=torch.float32, device=out_dev)
    per = max(1, batch_size // max(k, 1))
    for start in tqdm(range(0, n, per), desc="neighbour means", unit="batch", leave=False, disable=not progress):
        batch = slice(start, min(start + per, n))
        centre = centres[batch]
        b = len(centre)
        xi = batch_rows(images, centre, dev)
        if k == 0:
            total = xi
        else:
            cols = nb[batch].reshape(-1)
            xj = batch_rows(images, cols, dev)
            identity = cols == centre.repeat_interleave(k)
            spec_j = grid.spectrum(xj)
            ref_fft, ref_norm = grid.reference(xi)
            ref_spec = grid.spectrum(xi)
            psi, origin, _ = align_prepared(xj, ref_fft.repeat_interleave(k, 0), ref_norm.repeat_interleave(k, 0),
                                             spec_j, ref_spec.repeat_interleave(k, 0), grid, n_candidates)
            aligned = _apply_or_keep(xj, psi, origin, identity).reshape(b, k, box, box)
            total = xi + aligned.sum(dim=1)
            if refine and k > 1:
                loo = ((total[:, None] - aligned) / k).reshape(b * k, box, box)
                ref_fft, ref_norm = grid.reference(loo)
                psi, origin, _ = align_prepared(xj, ref_fft, ref_norm, spec_j, grid.spectrum(loo), grid, 1)
                aligned = _apply_or_keep(xj, psi, origin, identity).reshape(b, k, box, box)
                total = xi + aligned.sum(dim=1)
        mean = total / (k + 1)
        if isinstance(out, torch.Tensor):
            out[start:start + b] = mean.to(out.device)
        else:
            out[start:start + b] = mean.cpu().numpy()
        report(start + b, n, "neighbour means")
    return out


def _apply_or_keep(images: torch.Tensor, psi: torch.Tensor, origin: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """apply_alignment, except rows in ``keep`` (a particle paired with itself) stay as they are."""
    psi = torch.where(keep, torch.zeros_like(psi), psi)
    origin = torch.where(keep[:, None], torch.zeros_like(origin), origin)
    aligned = apply_alignment(images, psi, origin)
    return torch.where(keep[:, None, None], images, aligned)
