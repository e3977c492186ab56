"""Crowding: how strongly another particle-sized blob of density sits just outside each particle,
what tells aggregates (particles overlapping other particles) from single particles. An aggregate's
central particle fits its class as well as a single particle does, so neither the class's
consistency nor a particle's cross-correlation with its class sees it (docs/notes.md).

Each particle is brought onto its class (its psi and origin) and correlated with a matched filter,
the particles' rotational average (a blob of the particle's size and radial profile, whatever its
view); the largest response at positions beyond the particle's radius is a partner's. Searching
the image itself, not its residual from the class average, measured better: with many small
classes the averages are noisy (docs/notes.md). For a single particle the response is a maximum
of filtered noise, alike for all particles, so it is returned as a robust z-score over the
particles (median, 1.4826 x median absolute deviation).
"""

from __future__ import annotations

import numpy as np
import torch

from cdae_em.core.align import apply_alignment
from cdae_em.core.polar import Images, batch_rows, device_of


def rotational_template(averages: torch.Tensor, counts: np.ndarray, radius: float) -> torch.Tensor:
    """The particles' rotational average (box, box): the radial profile of the count-weighted mean
    of the class averages less its level beyond ``radius`` + 2 px, zero beyond ``radius`` + 1 px,
    zero mean over its disc. It has the particles' contrast, so either contrast correlates positively."""
    box = averages.shape[-1]
    weights = torch.as_tensor(np.asarray(counts, dtype=np.float64) / max(float(np.sum(counts)), 1.0),
                              dtype=averages.dtype, device=averages.device)
    mean = (averages * weights[:, None, None]).sum(dim=0)
    c = torch.arange(box, device=averages.device, dtype=averages.dtype) - box // 2
    r = torch.hypot(c[:, None], c[None, :])
    ring = r.round().long().flatten()
    profile = torch.zeros(int(ring.max()) + 1, dtype=mean.dtype, device=mean.device).index_add_(0, ring, mean.flatten())
    profile = profile / torch.bincount(ring).clamp_min(1).to(mean.dtype)
    beyond = (r > radius + 2) & (r < box / 2)
    level = mean[beyond].mean() if beyond.any() else mean.new_zeros(())
    disc = r <= radius + 1
    template = torch.where(disc, profile[ring].reshape(box, box) - level, torch.zeros_like(mean))
    template[disc] -= template[disc].mean()
    return template


def robust_z(values: np.ndarray) -> np.ndarray:
    """(values - median) / (1.4826 x median absolute deviation); zeros where the spread is zero."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return values
    median = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - median))
    return (values - median) / spread if spread > 0 else np.zeros_like(values)


def crowding(images: Images, averages: torch.Tensor | np.ndarray, counts: np.ndarray, psi: np.ndarray,
             origin: np.ndarray, radius: float, device: torch.device | str | None = None,
             batch_size: int = 128) -> np.ndarray:
    """Each particle's crowding, a robust z-score (module docstring). ``images`` (N, box, box; e.g.
    the whitened, phase-flipped originals, read in batches), ``psi`` / ``origin`` their alignment onto
    their class (RELION's convention, pixels), ``averages`` (K, box, box) the class averages of those
    images, ``counts`` (K,) the class sizes, ``radius`` the particle's radius in pixels."""
    dev = device_of(images, device)
    n, box = len(images), images.shape[-1]
    template = rotational_template(torch.as_tensor(np.asarray(averages), dtype=torch.float32, device=dev), counts, radius)
    c = torch.arange(box, device=dev, dtype=torch.float32) - box // 2
    r = torch.hypot(c[:, None], c[None, :])
    inscribed = r <= box / 2 - 1  # rotation onto the class leaves the corners empty
    outside = inscribed & (r > radius)
    # linear (zero-padded) correlation: response[p] = sum_u image(u) template(u - p)
    size = 2 * box
    padded = torch.zeros((size, size), device=dev)
    padded[:box, :box] = template
    matched = torch.fft.rfft2(torch.roll(padded, (-(box // 2), -(box // 2)), (0, 1))).conj()
    peak = np.zeros(n)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        x = apply_alignment(batch_rows(images, rows, dev).to(torch.float32),
                            torch.as_tensor(psi[rows], dtype=torch.float32, device=dev),
                            torch.as_tensor(origin[rows], dtype=torch.float32, device=dev))
        x = (x - x[:, inscribed].mean(dim=1)[:, None, None]) * inscribed
        big = torch.zeros((len(rows), size, size), device=dev)
        big[:, :box, :box] = x
        response = torch.fft.irfft2(torch.fft.rfft2(big) * matched, s=(size, size))[:, :box, :box]
        peak[rows] = response[:, outside].amax(dim=1).cpu().numpy()
    return robust_z(peak)
