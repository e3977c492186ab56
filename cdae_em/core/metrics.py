"""Quality measures: PSNR and FRC for denoising, half-set FRC/SSNR/resolution of class averages,
clustering scores against simulated truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_RESOLUTION = 999.0  # Angstrom: RELION's "not known"


def psnr(estimate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio (dB) of each estimate (N, box, box) against its reference.

    Both are first standardised (zero mean, unit variance per image), as the paper compares images
    of different intensity scales; the peak is the reference's max - min after standardisation.
    """
    est = _standardise(np.asarray(estimate, dtype=np.float64))
    ref = _standardise(np.asarray(reference, dtype=np.float64))
    mse = np.mean((est - ref) ** 2, axis=(-2, -1))
    peak = ref.max(axis=(-2, -1)) - ref.min(axis=(-2, -1))
    return 10.0 * np.log10(peak**2 / np.maximum(mse, 1e-12))


def _standardise(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=(-2, -1), keepdims=True)
    std = x.std(axis=(-2, -1), keepdims=True)
    return (x - mean) / np.maximum(std, 1e-12)


def rings(box: int) -> tuple[np.ndarray, np.ndarray]:
    """Fourier ring of every pixel of an unshifted (box, box) FFT, flattened, and which pixels lie
    on rings 0..box//2 (the rest, the corners, are left out of every per-ring measure)."""
    f = np.fft.fftfreq(box) * box
    ring = np.rint(np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)).astype(int).ravel()
    return ring, ring <= box // 2


def ring_sums(values: np.ndarray) -> np.ndarray:
    """Sums per Fourier ring 0..box//2 of (..., box, box) values laid out as an unshifted FFT."""
    box = values.shape[-1]
    ring, keep = rings(box)
    flat = values.reshape((-1, box * box))[:, keep]
    out = np.stack([np.bincount(ring[keep], v, minlength=box // 2 + 1) for v in flat])
    return out.reshape(values.shape[:-2] + (box // 2 + 1,))


def radial_power(images: np.ndarray) -> np.ndarray:
    """Mean power per Fourier ring 0..box//2 (orthonormal FFT) of (..., box, box) images."""
    box = images.shape[-1]
    counts = ring_sums(np.ones((box, box)))
    return ring_sums(np.abs(np.fft.fft2(images, norm="ortho")) ** 2) / np.maximum(counts, 1)


def frc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fourier ring correlation of two images (box, box) or the mean over stacks, per ring 0..box//2."""
    a = np.asarray(a, dtype=np.float64).reshape((-1,) + np.shape(a)[-2:])
    b = np.asarray(b, dtype=np.float64).reshape(a.shape)
    fa, fb = np.fft.fft2(a), np.fft.fft2(b)
    num = ring_sums((fa * fb.conj()).real.sum(axis=0))
    den = np.sqrt(ring_sums((np.abs(fa) ** 2).sum(axis=0)) * ring_sums((np.abs(fb) ** 2).sum(axis=0)))
    return num / np.maximum(den, 1e-30)


def frc_resolution(curve: np.ndarray, pixel_size: float, threshold: float = 0.5) -> float:
    """Resolution (Angstrom) where an FRC curve first drops below ``threshold`` (0.5 by default,
    for comparisons against a noise-free reference); Nyquist if it never does."""
    box = 2 * (len(curve) - 1)
    below = np.flatnonzero(curve[1:] < threshold)
    ring = (below[0] + 1) if len(below) else len(curve) - 1
    return float(box * pixel_size / max(ring, 1))


@dataclass
class HalfSetStats:
    """Per class: half-set FRC, SSNR of the full average, estimated resolution; and the noise power
    spectrum of one particle. Curves are per Fourier ring 0..box//2."""

    frc: np.ndarray  # (K, rings)
    ssnr: np.ndarray  # (K, rings)
    resolution: np.ndarray  # (K,) Angstrom, NO_RESOLUTION where unknown
    noise: np.ndarray  # (rings,)

    def to_json(self) -> dict:
        """Lists, rounded, for summary.json (the SSNR follows from the FRC)."""
        return {"frc": np.round(self.frc, 4).tolist(), "resolution": np.round(self.resolution, 2).tolist(),
                "noise": [float(f"{x:.6g}") for x in self.noise]}

    @classmethod
    def from_json(cls, d: dict) -> HalfSetStats:
        """The statistics as ``to_json`` wrote them."""
        frc_curves = np.asarray(d["frc"], dtype=np.float64)
        return cls(frc_curves, ssnr_from_frc(frc_curves), np.asarray(d["resolution"], dtype=np.float64),
                   np.asarray(d["noise"], dtype=np.float64))


def ssnr_from_frc(curves: np.ndarray) -> np.ndarray:
    """SSNR of the full average from its half-set FRC, 2 FRC / (1 - FRC), per ring (..., rings); at
    least 1 at the origin ring, which carries no resolution information."""
    curves = np.clip(np.asarray(curves, dtype=np.float64), -1.0, 1.0)
    ssnr = np.maximum(2 * curves / np.maximum(1 - curves, 1e-6), 0.0)
    ssnr[..., 0] = np.maximum(ssnr[..., 0], 1.0)
    return ssnr


def random_halves(labels: np.ndarray, n_classes: int, seed: int = 0) -> np.ndarray:
    """0 or 1 per particle: each class split into two random halves (the second the smaller)."""
    rng = np.random.default_rng(seed)
    half = np.zeros(len(labels), dtype=np.int64)
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        half[rng.permutation(rows)[: len(rows) // 2]] = 1
    return half


def half_set_stats(a: np.ndarray, b: np.ndarray, n_a: np.ndarray, n_b: np.ndarray,
                   pixel_size: float) -> HalfSetStats:
    """Compare the averages of each class's two halves, (K, box, box) each from ``n_a``/``n_b``
    particles: FRC -> SSNR of the full average (2 FRC / (1 - FRC)) -> estimated resolution where
    the SSNR first drops below 1, as RELION's ``MlModel::calculateTotalFourierCoverage`` defines
    it. The noise power of one particle comes from the half differences: P(A - B) / (1/n_A + 1/n_B)."""
    n_classes, box = len(a), a.shape[-1]
    shells = box // 2 + 1
    curves = np.zeros((n_classes, shells))
    for c in np.flatnonzero((np.asarray(n_a) > 0) & (np.asarray(n_b) > 0)):
        curves[c] = np.clip(frc(a[c], b[c]), -1.0, 1.0)
    ssnr = ssnr_from_frc(curves)
    resolution = np.full(n_classes, NO_RESOLUTION)
    for c in range(n_classes):
        if min(n_a[c], n_b[c]) < 1:
            continue
        below = np.flatnonzero(ssnr[c, 1:] < 1.0)
        last = int(below[0]) if len(below) else shells - 1  # the last ring before the first SSNR < 1
        resolution[c] = box * pixel_size / last if last > 0 else NO_RESOLUTION
    both = (np.asarray(n_a) > 0) & (np.asarray(n_b) > 0)
    noise = np.zeros(shells)
    if both.any():
        weight = 1.0 / (1.0 / n_a[both] + 1.0 / n_b[both])
        noise = (radial_power((a - b)[both]) * weight[:, None]).sum(axis=0) / both.sum()
    return HalfSetStats(curves, ssnr, resolution, noise)


def clustering_scores(truth: np.ndarray, labels: np.ndarray) -> dict:
    """Clustering quality of ``labels`` against true classes ``truth`` (both (N,) integers).

    - Hungarian-matched: classes are paired one-to-one with true views to maximise agreement
      (scipy's linear_sum_assignment); precision, recall and F1 per true view, then macro-averaged
      (a true view with no matched class scores 0).
    - Pair counting: over all pairs of particles, precision = fraction of pairs put in one class
      that share a true view, recall = fraction of same-view pairs put in one class, F1 their
      harmonic mean (the definition used for clustering in the CDAE paper's Table 2).
    - ARI and NMI from scikit-learn.
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    truth, labels = np.asarray(truth), np.asarray(labels)
    c = contingency_matrix(truth, labels)  # (true views, classes)
    rows, cols = linear_sum_assignment(-c)
    view_size, class_size = c.sum(axis=1), c.sum(axis=0)
    precision = np.zeros(len(view_size))
    recall = np.zeros(len(view_size))
    precision[rows] = c[rows, cols] / np.maximum(class_size[cols], 1)
    recall[rows] = c[rows, cols] / np.maximum(view_size[rows], 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    pairs = lambda m: (m * (m - 1) / 2).sum()  # noqa: E731
    together, same_view, same_class = pairs(c), pairs(view_size), pairs(class_size)
    pp = together / same_class if same_class else 0.0
    pr = together / same_view if same_view else 0.0
    return {
        "hungarian_precision": float(precision.mean()), "hungarian_recall": float(recall.mean()),
        "hungarian_f1": float(f1.mean()),
        "pair_precision": float(pp), "pair_recall": float(pr),
        "pair_f1": float(2 * pp * pr / (pp + pr)) if pp + pr > 0 else 0.0,
        "ari": float(adjusted_rand_score(truth, labels)), "nmi": float(normalized_mutual_info_score(truth, labels)),
    }
