"""The particles' noise, measured on their background, and noise whitening.

Real particles carry noise whose power falls with frequency (a detector's neighbouring pixels
correlate about 0.2 on real particles), unlike the white noise of most simulations. The noise
model (``estimate_noise``) is each image's variance and the stack's correlation between pixels
up to ``REACH`` of the box apart, measured on the background: the pixels beyond ``BACKGROUND`` of
the box radius (outside any particle the working scale lets through). A stack with too little
background for that falls back to white noise, and says so.

Whitening (``Whitening``, as ASPIRE does before its classification): each image's Fourier
transform divided by the square root of its optics group's noise power spectrum, so that the
noise is white and every frequency counts by its signal-to-noise ratio in alignment and
clustering, not by its noise power. The filter keeps the noise's variance. The job whitens the
particles (and the denoised particles) as the classification reads them; the denoiser sees them
as they are, and nothing written is whitened.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from cdae_em.core.ctf import apply_filter
from cdae_em.core.preprocess import radius_grid, rfft_weights

log = logging.getLogger(__name__)

BACKGROUND = 0.46  # background: pixels beyond this fraction of the box (the box radius is 0.5)
REACH = 0.25  # noise correlation measured up to this fraction of the box apart
MIN_BACKGROUND_PAIRS = 2000  # fewer background pixel pairs at some lag: white noise assumed (SE of a correlation ~0.02)
SPECTRUM_FLOOR = 0.05  # the whitening filter's noise power floor, relative to the mean (white noise: 1)
WHITENING_IMAGES = 2000  # particles per optics group the whitening filter is measured on (evenly spaced)


@dataclass
class NoiseModel:
    """Each measured image's noise variance and the stack's noise correlation between pixels
    (``correlation``: (box, box), lag (dy, dx) at [dy % box, dx % box], 1 at lag 0), as measured
    on the background."""

    variance: torch.Tensor  # (n,)
    correlation: torch.Tensor
    white: bool  # assumed white (too little background to measure the correlation)

    def power_spectrum(self) -> torch.Tensor:
        """The noise power per frequency on the rfft2 grid (box, box // 2 + 1), relative to white
        noise of the same variance (mean 1 over the full grid), clamped at zero."""
        return torch.fft.rfft2(self.correlation).real.clamp_min(0)

    def probes(self, box: int, generator: torch.Generator, device) -> torch.Tensor:
        """Noise of this covariance for each image (n, box, box): white noise filtered by the
        square root of the power spectrum the correlation gives (clamped at 0)."""
        white = torch.randn((len(self.variance), box, box), generator=generator).to(device)
        if not self.white:
            white = apply_filter(white, self.power_spectrum().sqrt().to(device))
        return white * self.variance.to(device).sqrt()[:, None, None]

    def describe(self) -> dict:
        c = self.correlation
        return {"noise": "white (too little background to measure its correlation)" if self.white else "measured",
                "neighbour_correlation": round(float(0.5 * (c[0, 1] + c[1, 0])), 4),
                "next_neighbour_correlation": round(float(0.5 * (c[0, 2] + c[2, 0])), 4)}


def estimate_noise(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 256) -> NoiseModel:
    """The noise model of ``images`` ((n, box, box), or an iterable of such batches) from their
    background (module docstring): the background's autocorrelation at every lag up to a quarter
    of the box (FFT of the masked, standardised images over the FFT of the mask, which counts the
    pixel pairs), tapered to zero over the outer half of that reach; the spectrum it gives is
    clamped at zero. Accumulated ``batch_size`` images at a time (memory bound by the batch)."""
    if isinstance(images, torch.Tensor):
        stack = images
        images = (stack[i:i + batch_size] for i in range(0, len(stack), batch_size))
    products, variances, box = None, [], 0
    for batch in images:
        x = batch.float().cpu()
        box = x.shape[-1]
        if products is None:
            mask = (radius_grid(box) > BACKGROUND * box).float()
            count = mask.sum().clamp_min(1)
            big = (2 * box, 2 * box)  # zero-padded: no wrap-around pairs
            products = torch.zeros(big)
        mean = (x * mask).sum((-2, -1)) / count  # the background's (a particle's own mean must not count as noise)
        var = (((x - mean[:, None, None]) * mask) ** 2).sum((-2, -1)) / count
        z = (x - mean[:, None, None]) / var.clamp_min(1e-12).sqrt()[:, None, None] * mask
        products += torch.fft.irfft2((torch.fft.rfft2(z, s=big).abs() ** 2).sum(0), s=big)
        variances.append(var)
    if products is None:
        raise ValueError("estimate_noise: no images")
    var = torch.cat(variances)
    n = len(var)
    pairs = torch.fft.irfft2(torch.fft.rfft2(mask, s=big).abs() ** 2, s=big) * n
    reach = max(1, int(REACH * box))
    lag = torch.fft.fftfreq(2 * box) * 2 * box
    r = torch.sqrt(lag[:, None] ** 2 + lag[None, :] ** 2)
    inside = r <= reach
    white = bool(pairs[inside].min() < MIN_BACKGROUND_PAIRS) or box < 8
    corr = torch.zeros(box, box)
    if white:
        corr[0, 0] = 1.0
        return NoiseModel(var, corr, True)
    # flat to half the reach, then a raised cosine to zero (a taper at short lags would bias the
    # correlation wide filters sum over)
    edge = ((r - reach / 2) / (reach / 2 + 1)).clamp(0, 1)
    taper = torch.where(inside, 0.5 * (1 + torch.cos(math.pi * edge)), torch.zeros_like(r))
    measured = products / pairs.clamp_min(1)
    # each image's background mean was taken away, and with it the part of the noise that the whole
    # background shares: measured = (rho - d) / (1 - d), d = sum over the background's pixel pairs
    # of rho / pixels^2 (the region mean's variance). Solved for rho by a few fixed-point steps.
    share = pairs / n / count**2
    rho = measured * taper
    for _ in range(3):
        d = float((rho * share).sum())
        rho = (measured * (1 - d) + d) * taper
    var = var / max(1 - d, 1e-3)
    for dy in range(-reach, reach + 1):  # onto the box's own (wrapped) lag grid
        for dx in range(-reach, reach + 1):
            if dy * dy + dx * dx <= reach * reach:
                corr[dy % box, dx % box] += rho[dy % (2 * box), dx % (2 * box)]
    corr[0, 0] = 1.0
    return NoiseModel(var, corr, False)


def whitening_filter(noise: NoiseModel) -> torch.Tensor:
    """The filter (rfft2 grid) that whitens noise of this model: 1 / sqrt(power spectrum), the
    spectrum floored at SPECTRUM_FLOOR of its mean, scaled so that the noise keeps its variance."""
    box = noise.correlation.shape[-1]
    psd = noise.power_spectrum().clamp_min(SPECTRUM_FLOOR)
    f = psd.rsqrt()
    # the whitened noise's variance relative to the input's: the full grid's mean of f^2 * psd
    full_mean = float((f**2 * noise.power_spectrum() * rfft_weights(box)).sum()) / (box * box)
    return f / math.sqrt(max(full_mean, 1e-12))


@dataclass
class Whitening:
    """Per optics group, the filter that whitens its particles' noise (rfft2 grid of the working
    box), and the group of each particle. ``apply`` whitens a batch of particles; ``relative`` is
    each group's filter over the stack's mean filter, the factor by which its whitened signal
    differs from that of a common reference."""

    filters: torch.Tensor  # (groups, box, box // 2 + 1), float32
    group: np.ndarray  # (n,) index into filters
    record: dict  # what was measured, for the summary

    def _filter(self, rows, device) -> torch.Tensor:
        """The filter of each of ``rows`` (indices or a slice)."""
        return self.filters.to(device)[torch.as_tensor(self.group[rows], device=device)]

    def apply(self, x: torch.Tensor, rows) -> torch.Tensor:
        return apply_filter(x.float(), self._filter(rows, x.device))

    def relative(self) -> torch.Tensor:
        """Each group's filter over the particle-weighted mean filter (groups, box, box // 2 + 1)."""
        counts = torch.as_tensor(np.bincount(self.group, minlength=len(self.filters)), dtype=torch.float32)
        mean = (self.filters * counts[:, None, None]).sum(0) / counts.sum()
        return self.filters / mean


def measure_whitening(groups: np.ndarray, read, box: int, where: str = "particles",
                      max_images: int = WHITENING_IMAGES, batch_size: int = 256) -> Whitening | None:
    """The ``Whitening`` of a stack: ``groups`` the optics group of each particle (any labels),
    ``read(rows)`` its particles as the later stages see them (phase-flipped, at the working box;
    a tensor). Each group's spectrum from up to ``max_images`` evenly spaced particles; a group with
    too little background takes the whole stack's; None (not whitened, and said) where the whole
    stack has too little."""
    labels, group = np.unique(np.asarray(groups), return_inverse=True)

    def measure(rows: np.ndarray) -> NoiseModel:
        picked = rows[np.unique(np.linspace(0, len(rows) - 1, min(len(rows), max_images)).round().astype(np.int64))]
        return estimate_noise(read(picked[i:i + batch_size]) for i in range(0, len(picked), batch_size))

    pooled = measure(np.arange(len(group)))
    if pooled.white:
        log.warning("%s: too little background to measure the noise's spectrum (%d px box): not whitened", where, box)
        return None
    filters, record = [], {"groups": {}}
    for g, label in enumerate(labels):
        noise = pooled if len(labels) == 1 else measure(np.flatnonzero(group == g))
        own = not noise.white
        noise = noise if own else pooled
        filters.append(whitening_filter(noise))
        record["groups"][str(label)] = {"particles": int((group == g).sum()),
                                        "spectrum": "measured" if own else "the whole stack's (too little background)",
                                        **{k: v for k, v in noise.describe().items() if k != "noise"}}
    described = ", ".join(f"group {k}: {v['neighbour_correlation']:.2f}" for k, v in record["groups"].items())
    log.info("noise whitening: neighbouring pixels' noise correlation %s (whitened: 0)", described)
    return Whitening(torch.stack(filters).float(), group.astype(np.int64), record)
