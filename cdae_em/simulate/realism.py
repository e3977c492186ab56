"""What real particle stacks have and white-noise simulations do not: detector noise whose power
falls with frequency (neighbouring pixels correlated), signal damped at high frequency (a B-factor),
a background normalised as RELION's Extract does, and ice or carbon in the box.

One noise model, used by the simulator (``cdae-em simulate --noise coloured``), the pre-training
pairs and the benchmarks. The noise power spectrum, as a function of spatial frequency f (cycles per
pixel), is

    PSD(f) = floor + (1 - floor) * exp(-f / falloff) + bump * exp(-(f / 0.05)^2)

then scaled so that the noise has unit variance over the box. ``floor`` is the flat part that
remains at high frequency, ``falloff`` how fast the rest falls, ``bump`` the extra power at the
lowest frequencies (ice thickness, uneven illumination). ``REAL_NOISE`` is fitted by eye to the
background of the real RELION-extracted particles in tests/data/real (200 px; lag-1 pixel correlation 0.23,
power at Nyquist 0.18 of that at 0.05 cycles/px; the model: 0.20 and 0.20).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cdae_em.core.preprocess import radius_grid, rfft_weights


@dataclass(frozen=True)
class NoiseShape:
    """Parameters of the noise power spectrum (module docstring)."""

    floor: float = 1.0
    falloff: float = 0.25
    bump: float = 0.0

    @property
    def white(self) -> bool:
        return self.floor >= 1.0 and self.bump == 0.0


WHITE = NoiseShape()
REAL_NOISE = NoiseShape(floor=0.15, falloff=0.2, bump=0.6)


def frequency_grid(box: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """|f| in cycles per pixel on the rfft2 grid of a ``box`` image, (box, box // 2 + 1)."""
    fy = torch.fft.fftfreq(box, device=device)[:, None]
    fx = torch.fft.rfftfreq(box, device=device)[None, :]
    return torch.sqrt(fy**2 + fx**2)


def noise_psd(box: int, shape: NoiseShape | list[NoiseShape], device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise power per rfft2 coefficient, normalised to unit variance in real space:
    (box, box // 2 + 1) for one shape, (n, box, box // 2 + 1) for a list."""
    shapes = [shape] if isinstance(shape, NoiseShape) else list(shape)
    f = frequency_grid(box, device)[None]
    floor = torch.tensor([s.floor for s in shapes], device=device)[:, None, None]
    falloff = torch.tensor([s.falloff for s in shapes], device=device)[:, None, None]
    bump = torch.tensor([s.bump for s in shapes], device=device)[:, None, None]
    psd = floor + (1 - floor) * torch.exp(-f / falloff) + bump * torch.exp(-((f / 0.05) ** 2))
    psd[:, 0, 0] = 0.0  # zero-mean noise
    # variance in real space = sum over the full spectrum / box^4 * box^2
    psd = psd * (box * box) / (psd * rfft_weights(box, device)).sum(dim=(-2, -1), keepdim=True)
    return psd[0] if isinstance(shape, NoiseShape) else psd


def coloured_noise(n: int, box: int, shape: NoiseShape | list[NoiseShape], rng: np.random.Generator,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` images of unit-variance Gaussian noise with the power spectrum of ``shape`` (one shape
    for all, or one per image); white noise for the white shape, drawn exactly as before."""
    white = torch.from_numpy(rng.standard_normal((n, box, box), dtype=np.float32)).to(device)
    shapes = [shape] * n if isinstance(shape, NoiseShape) else list(shape)
    if all(s.white for s in shapes):
        return white
    amplitude = noise_psd(box, shapes, device).sqrt()
    return torch.fft.irfft2(torch.fft.rfft2(white) * amplitude, s=(box, box))


def random_noise_shapes(n: int, rng: np.random.Generator, white_fraction: float = 0.2) -> list[NoiseShape]:
    """Noise spectra for pre-training: ``white_fraction`` white, the rest with floor 0.05-0.6,
    falloff 0.05-0.3 cycles/px (log-uniform) and a low-frequency bump 0-1.5: lag-1 pixel
    correlations 0.01-0.34 (median 0.09), real particles' 0.2-0.25 inside."""
    white = rng.random(n) < white_fraction
    floor = rng.uniform(0.05, 0.6, n)
    falloff = np.exp(rng.uniform(np.log(0.05), np.log(0.3), n))
    bump = rng.uniform(0.0, 1.5, n)
    return [WHITE if w else NoiseShape(float(a), float(b), float(c)) for w, a, b, c in zip(white, floor, falloff, bump)]


def lag1_correlation(shape: NoiseShape, box: int = 128) -> float:
    """The correlation of neighbouring pixels (along x) of noise with this spectrum."""
    psd = noise_psd(box, shape).double()
    cov = torch.fft.irfft2(psd, s=(box, box))
    return float(cov[0, 1] / cov[0, 0])


def bfactor_envelope(box: int, pixel_size: torch.Tensor | np.ndarray | float, bfactor: torch.Tensor | np.ndarray | float,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """exp(-B s^2 / 4) on the rfft2 grid (s in 1/Angstrom), per image: (n, box, box // 2 + 1)."""
    px = torch.as_tensor(np.atleast_1d(pixel_size), dtype=torch.float32, device=device)[:, None, None]
    b = torch.as_tensor(np.atleast_1d(bfactor), dtype=torch.float32, device=device)[:, None, None]
    s = frequency_grid(box, device)[None] / px
    return torch.exp(-b * s**2 / 4)


def relion_normalise(images: torch.Tensor, background_radius: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image scaled so that its background (pixels beyond ``background_radius``, default 75%
    of the box radius as RELION's Extract) has mean 0 and standard deviation 1; returns the images
    and the (mean, std) used, so that a clean image can be put in the same frame."""
    box = images.shape[-1]
    radius = 0.75 * box / 2 if background_radius is None else background_radius
    outside = radius_grid(box, images.device) > radius
    bg = images[:, outside]
    mean = bg.mean(dim=1)[:, None, None]
    std = bg.std(dim=1).clamp_min(1e-12)[:, None, None]
    return (images - mean) / std, mean, std


def ice_and_carbon(n: int, box: int, rng: np.random.Generator, carbon_fraction: float = 0.1,
                   ice_amplitude: float = 0.3) -> torch.Tensor:
    """Backgrounds (n, box, box) in units of the clean particle's standard deviation: a smooth ice
    gradient on every image (a plane plus a blurred random field, up to ``ice_amplitude``) and, on
    ``carbon_fraction`` of them, the edge of a carbon film (a soft step of 1-3x the particle's
    contrast) crossing the box at a random angle and offset."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, box), torch.linspace(-1, 1, box), indexing="ij")
    gy, gx = (torch.from_numpy(rng.uniform(-1, 1, n).astype(np.float32))[:, None, None] for _ in range(2))
    field = torch.from_numpy(rng.standard_normal((n, box, box), dtype=np.float32))
    f = frequency_grid(box)
    field = torch.fft.irfft2(torch.fft.rfft2(field) * torch.exp(-((f / 0.03) ** 2)), s=(box, box))
    field = field / field.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    amp = torch.from_numpy(rng.uniform(0, ice_amplitude, n).astype(np.float32))[:, None, None]
    ice = amp * (0.5 * (gy * yy + gx * xx) + 0.5 * field)
    carbon = rng.random(n) < carbon_fraction
    angle = rng.uniform(0, 2 * math.pi, n)
    offset = rng.uniform(-0.9, 0.9, n)
    level = rng.uniform(1.0, 3.0, n) * np.where(rng.random(n) < 0.5, 1.0, -1.0) * carbon
    d = (torch.from_numpy(np.cos(angle).astype(np.float32))[:, None, None] * xx
         + torch.from_numpy(np.sin(angle).astype(np.float32))[:, None, None] * yy
         - torch.from_numpy(offset.astype(np.float32))[:, None, None])
    step = torch.sigmoid(d * box / 3.0) * torch.from_numpy(level.astype(np.float32))[:, None, None]
    return ice + step
