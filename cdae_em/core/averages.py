"""Class averages for 2D classification: the aligned particles of each class summed and averaged,
plain or CTF-corrected (for phase-flipped particles), and the Wiener filter of each average by its
half-set SSNR, and the origins that centre each class average (RELION's --center_classes).

All sums stream the images in batches (``distributed``-aware: each rank sums its rows, the sums are
added over ranks); images are read through ``masked_rows``, as the classification compares them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cdae_em.runtime import distributed
from cdae_em.core.align import apply_alignment, shift_in_raw_frame
from cdae_em.core.ctf import frequency_grid
from cdae_em.core.metrics import frc, ssnr_from_frc
from cdae_em.core.polar import batch_rows
from cdae_em.core.preprocess import particle_mask

log = logging.getLogger(__name__)

WIENER = 0.1  # the CTF-corrected averages' regulariser, per particle (CTF^2 is at most 1)


def ring_index(box: int, device: torch.device) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Ring index of every rfft2 frequency (flattened), the number of rings, and frequencies per ring."""
    fy, fx = frequency_grid(box, device)
    rings = torch.round(torch.sqrt(fy**2 + fx**2) * box).long().flatten()
    n_rings = int(rings.max()) + 1
    return rings, n_rings, torch.bincount(rings, minlength=n_rings).float()


def ring_means(values: torch.Tensor) -> torch.Tensor:
    """Values on the rfft2 grid (N, box, box // 2 + 1) averaged over each Fourier ring: (N, rings)."""
    box = values.shape[-2]
    index, n_rings, per_ring = ring_index(box, values.device)
    flat = values.reshape(-1, box * (box // 2 + 1))
    sums = torch.zeros((len(flat), n_rings), device=values.device, dtype=values.dtype).index_add_(1, index, flat)
    return sums / per_ring


def ring_average(values: torch.Tensor) -> torch.Tensor:
    """Values on the rfft2 grid (..., box, box // 2 + 1) averaged over each Fourier ring, on the same
    grid: what stays the same when the image turns (e.g. a particle's |CTF|; exact without astigmatism)."""
    index = ring_index(values.shape[-2], values.device)[0]
    return ring_means(values)[:, index].reshape(values.shape)


def masked_rows(images, rows, device) -> torch.Tensor:
    """Images ``rows`` ready to compare: zero mean inside a circular mask, masked.

    Histogram-equalised particles are bright discs on a zero background; without this the disc
    would dominate every cross-correlation and all classes would look alike.
    """
    x = torch.from_numpy(np.asarray(images[rows], dtype=np.float32)).to(device)
    mask = particle_mask(x.shape[-1], device=device)  # the denoiser's default mask
    inside = mask > 0.5
    mean = x[:, inside].mean(dim=1)
    return (x - mean[:, None, None]) * mask


def class_means(images, labels: np.ndarray, psi: np.ndarray, origin: np.ndarray, n_classes: int,
                device: torch.device, batch_size: int = 256, ctf=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means of the aligned images (K, box, box) and the class counts (K,).

    With ``ctf`` (|CTF| of phase-flipped ``images``, row for row; see ``cdae_em.core.ctf.CtfAmplitudes``)
    the CTF-corrected least-squares averages instead: per frequency sum |CTF| x / (sum CTF^2 + WIENER n),
    CTF^2 averaged over rings so that it turns with the images (exact without astigmatism)."""
    sums, power = class_sums(images, labels, psi, origin, n_classes, device, batch_size, ctf)
    counts = np.bincount(labels, minlength=n_classes)
    return averages_from_sums(sums, power, counts), counts


def class_sums(images, groups: np.ndarray, psi: np.ndarray, origin: np.ndarray, n_groups: int,
               device: torch.device, batch_size: int, ctf=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per group: the sum of the aligned images (G, box, box; with ``ctf`` each image multiplied by
    its |CTF| first) and with ``ctf`` the sum of the ring-averaged CTF^2 (G, rings)."""
    box = images.shape[-1]
    sums = torch.zeros((n_groups, box, box), device=device)
    power = None
    if ctf is not None:
        power = torch.zeros((n_groups, ring_index(box, device)[1]), device=device)
    lo, hi = distributed.shard(len(images))  # each rank its rows; the sums are added over ranks
    for start in range(lo, hi, batch_size):
        rows = slice(start, min(start + batch_size, hi))
        x, classes = masked_rows(images, rows, device), torch.as_tensor(groups[rows], device=device)
        if ctf is not None:
            amp = batch_rows(ctf, rows, device)
            x = torch.fft.irfft2(torch.fft.rfft2(x) * amp, s=(box, box))
            power.index_add_(0, classes, ring_means(amp.square()))
        x = apply_alignment(x, torch.as_tensor(psi[rows], device=device, dtype=torch.float32),
                            torch.as_tensor(origin[rows], device=device, dtype=torch.float32))
        sums.index_add_(0, classes, x)
    return distributed.all_reduce_sum(sums), None if power is None else distributed.all_reduce_sum(power)


def averages_from_sums(sums: torch.Tensor, power: torch.Tensor | None, counts: np.ndarray) -> np.ndarray:
    """The averages from ``class_sums``: plain means, or with ``power`` CTF-corrected ones."""
    n_groups, box = sums.shape[0], sums.shape[-1]
    n = torch.as_tensor(np.maximum(counts, 1), device=sums.device, dtype=torch.float32)[:, None, None]
    if power is None:
        return (sums / n).cpu().numpy()
    rings = ring_index(box, sums.device)[0]
    den = power[:, rings].reshape(n_groups, box, box // 2 + 1) + WIENER * n
    return torch.fft.irfft2(torch.fft.rfft2(sums) / den, s=(box, box)).cpu().numpy()


def ssnr_filter(half_a: np.ndarray, half_b: np.ndarray, n_a: np.ndarray, n_b: np.ndarray) -> np.ndarray:
    """Per class and Fourier ring, the Wiener weight SSNR / (1 + SSNR) of the class average, its
    SSNR from the FRC of the averages of its two halves (K, box, box each, of ``n_a``/``n_b``
    particles): (K, box // 2 + 1). Classes with fewer than 2 particles in a half get the
    count-weighted mean weight of the others (all ones if there are none)."""
    k, box = len(half_a), half_a.shape[-1]
    weights = np.ones((k, box // 2 + 1))
    valid = (np.asarray(n_a) >= 2) & (np.asarray(n_b) >= 2)
    for c in np.flatnonzero(valid):
        ssnr = ssnr_from_frc(frc(half_a[c], half_b[c]))
        weights[c] = ssnr / (1.0 + ssnr)
    if valid.any() and not valid.all():
        size = (np.asarray(n_a) + np.asarray(n_b))[valid].astype(np.float64)
        weights[~valid] = (weights[valid] * size[:, None]).sum(axis=0) / size.sum()
    return weights


def apply_ring_filter(images: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each image (K, box, box) multiplied in Fourier space by its weight per ring (K, box // 2 + 1)."""
    box = images.shape[-1]
    rings = ring_index(box, torch.device("cpu"))[0].clamp(max=weights.shape[1] - 1)
    w = torch.as_tensor(weights, dtype=torch.float32)[:, rings].reshape(len(images), box, box // 2 + 1)
    return torch.fft.irfft2(torch.fft.rfft2(torch.as_tensor(images, dtype=torch.float32)) * w, s=(box, box)).numpy()


def centred_origins(references: np.ndarray, labels: np.ndarray, psi: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Origins that put each class average's centre of mass at the box centre, as 3D work expects.

    The mass is the squared intensity inside the particle mask (either contrast). Shifting the
    aligned images by -s changes each member's origin o to o - R(psi)^T s (the convention of
    ``align.apply_alignment``)."""
    box = references.shape[-1]
    refs = torch.as_tensor(references, dtype=torch.float64)
    refs = refs - refs.mean(dim=(-2, -1), keepdim=True)
    weight = refs.square() * particle_mask(box).double()
    coords = torch.arange(box, dtype=torch.float64) - box // 2
    total = weight.sum(dim=(-2, -1)).clamp_min(1e-30)
    com = torch.stack([(weight.sum(dim=-2) * coords).sum(-1) / total,
                       (weight.sum(dim=-1) * coords).sum(-1) / total], dim=1)  # (K, 2): x, y
    raw = shift_in_raw_frame(com[torch.as_tensor(labels)].float(), torch.as_tensor(psi, dtype=torch.float32))
    log.info("class averages centred: shifts up to %.2f px", float(com.norm(dim=1).max()))
    return (torch.as_tensor(origin, dtype=torch.float32) - raw).numpy()
