"""Steps 1-2 of the classification (``cdae_em.classify.stage``): initial classes from rotation/shift-
invariant features clustered by k-means or hierarchical clustering, and each particle aligned onto
its class medoid."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering, KMeans, MiniBatchKMeans

from cdae_em.core.align import align_pairs, estimate_particle_radius
from cdae_em.core.averages import masked_rows
from cdae_em.core.neighbours import reduced_invariant_features
from cdae_em.runtime import distributed
from cdae_em.runtime.progress import report
from cdae_em.settings import ClassifySettings

log = logging.getLogger(__name__)


def cluster(features: np.ndarray, n_classes: int, method: str, seed: int = 0, hc_max: int = 5000) -> np.ndarray:
    """Labels (N,) from k-means or hierarchical (Ward) clustering of feature vectors."""
    n = len(features)
    if method == "kmeans":
        if n > 20000:
            km = MiniBatchKMeans(n_clusters=n_classes, random_state=seed, n_init=3, batch_size=4096)
        else:
            km = KMeans(n_clusters=n_classes, random_state=seed, n_init=10)
        return km.fit_predict(features)
    if method == "hierarchical":
        rng = np.random.default_rng(seed)
        sub = np.sort(rng.choice(n, size=min(n, hc_max), replace=False))
        sub_labels = AgglomerativeClustering(n_clusters=n_classes, linkage="ward").fit_predict(features[sub])
        if len(sub) == n:
            return sub_labels
        centres = np.stack([features[sub][sub_labels == k].mean(axis=0) for k in range(n_classes)])
        d = ((features[:, None, :] - centres[None]) ** 2).sum(-1)
        return d.argmin(axis=1)
    raise ValueError(f"unknown clustering method {method!r} (kmeans or hierarchical)")


class _Masked:
    """``images`` read through ``averages.masked_rows`` (masked, zero mean inside the mask) as an array-like."""

    def __init__(self, images, device):
        self.images, self.device, self.shape = images, device, images.shape

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows) -> torch.Tensor:
        return masked_rows(self.images, rows, self.device)


def initial_classes(images, settings: ClassifySettings, device: torch.device, max_shift: float,
                     initial_labels: np.ndarray | None, work: Path | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-2: labels from the invariant features (unless given), and each particle aligned onto
    its class medoid (the member nearest the class centre in feature space): labels, psi, origin, score."""
    n, k = len(images), settings.n_classes
    masked = _Masked(images, device)
    radius = estimate_particle_radius(masked[np.arange(min(n, 1000))])
    features = reduced_invariant_features(masked, radius, device, min(settings.n_components, n - 1), settings.seed,
                                          work).numpy()
    if initial_labels is not None:
        labels = np.asarray(initial_labels, dtype=int)
    else:
        labels = distributed.on_main(cluster, features, k, settings.method, settings.seed, settings.hc_max)
    log.info("initial %s classes from invariant features: sizes %s", settings.method, np.bincount(labels, minlength=k).tolist())
    centres = np.stack([features[labels == c].mean(axis=0) if np.any(labels == c) else features[0] for c in range(k)])
    dist = ((features - centres[labels]) ** 2).sum(axis=1)
    medoid = np.array([np.flatnonzero(labels == c)[np.argmin(dist[labels == c])] if np.any(labels == c) else 0
                       for c in range(k)])
    psi = np.zeros(n, np.float32)
    origin = np.zeros((n, 2), np.float32)
    score = np.zeros(n, np.float32)
    lo, hi = distributed.shard(n)
    for start in range(lo, hi, settings.batch_size):
        rows = slice(start, min(start + settings.batch_size, hi))
        refs = masked_rows(images, medoid[labels[rows]], device)
        p, o, s = align_pairs(masked_rows(images, rows, device), refs, psi_step=settings.psi_step, max_shift=max_shift,
                              mask_radius=radius)
        psi[rows], origin[rows], score[rows] = p.cpu().numpy(), o.cpu().numpy(), s.cpu().numpy()
        report(rows.stop - lo, hi - lo, "alignment to the class medoids")
    psi, origin, score = (distributed.gather_rows(torch.from_numpy(a[lo:hi])).numpy() for a in (psi, origin, score))
    return labels, psi, origin, score
