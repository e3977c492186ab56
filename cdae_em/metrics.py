"""Quality measures against simulated ground truth: PSNR and FRC for denoising.

(Clustering scores live with the classification code.)
"""

from __future__ import annotations

import numpy as np


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


def frc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fourier ring correlation of two images (box, box) or the mean over stacks, per ring 0..box//2."""
    a = np.asarray(a, dtype=np.float64).reshape((-1,) + np.shape(a)[-2:])
    b = np.asarray(b, dtype=np.float64).reshape(a.shape)
    box = a.shape[-1]
    fa, fb = np.fft.fft2(a), np.fft.fft2(b)
    f = np.fft.fftfreq(box) * box
    ring = np.rint(np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)).astype(int).ravel()
    keep = ring <= box // 2
    cross = (fa * fb.conj()).real.sum(axis=0).ravel()
    pa, pb = (np.abs(fa) ** 2).sum(axis=0).ravel(), (np.abs(fb) ** 2).sum(axis=0).ravel()
    num = np.bincount(ring[keep], cross[keep], minlength=box // 2 + 1)
    den = np.sqrt(np.bincount(ring[keep], pa[keep], minlength=box // 2 + 1)
                  * np.bincount(ring[keep], pb[keep], minlength=box // 2 + 1))
    return num / np.maximum(den, 1e-30)


def frc_resolution(curve: np.ndarray, pixel_size: float, threshold: float = 0.5) -> float:
    """Resolution (Angstrom) where an FRC curve first drops below ``threshold`` (0.5 by default,
    for comparisons against a noise-free reference); Nyquist if it never does."""
    box = 2 * (len(curve) - 1)
    below = np.flatnonzero(curve[1:] < threshold)
    ring = (below[0] + 1) if len(below) else len(curve) - 1
    return float(box * pixel_size / max(ring, 1))


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
