"""Training pairs for pre-training the cascade: realistic noisy particles and their clean images,
drawn on the fly from projections of many structures.

What real stacks have and one map at one size, one contrast and SNR 0.1 does not (the cause of the
shipped model's failure on held-out particles, see docs/denoiser.md): both contrast polarities
(protein bright after RELION extraction with inverted contrast, dark in raw micrographs), particles
spanning 40-90% of the box, CTFs over a realistic defocus range, phase-flipped or not, SNR from 0.01
to 0.5, random in-plane rotation and shifts, and resolution that varies with the data.

``ProjectionBank`` renders each structure once (Gaussian atoms -> map -> Fourier-slice projections at
random views) in a box 1.5x the training box, so that zooming out and Fourier cropping give
anti-aliased particles of any size. ``PairSampler.sample`` then draws a batch: a projection, a
random zoom/rotation/shift (one affine resampling), a random blur, Fourier crop to the box, CTF,
polarity, and noise; clean images have zero mean and unit variance over the box, and
SNR = 1 / noise variance, as in ``cdae_em.simulate.simulator``.

Real-data conditions (``PairSettings`` white_fraction, bfactor, background_fraction): noise with random detector-like power spectra, a B-factor on the signal,
ice gradients and carbon edges. A background normalised as RELION's Extract does is not simulated:
each cascade block standardises its input, so the model sees the same image either way.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cdae_em.core.ctf import CtfParams, ctf_2d
from cdae_em.data import DATA_DIR
from cdae_em.core.geometry import euler_to_matrix, random_views
from cdae_em.core.preprocess import fourier_resize, soft_circular_mask
from cdae_em.simulate.realism import (bfactor_envelope, coloured_noise, frequency_grid, ice_and_carbon,
                                      random_noise_shapes)
from cdae_em.simulate.structure import Atoms, atoms_to_map

log = logging.getLogger(__name__)

RENDER_FILL = 0.9  # the largest diameter spans this fraction of the render box


def pretrain_structures_path() -> Path:
    """The atomic models shipped for pre-training (see ``cdae_em/data/make_pretrain_structures.py``)."""
    return DATA_DIR / "pretrain_structures.npz"


def load_structures(path: str | Path | None = None) -> dict[str, Atoms]:
    """Atomic models by name from a packed ``.npz`` (default: the shipped set)."""
    path = Path(path or pretrain_structures_path())
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        return {m["name"]: Atoms(xyz=z[f"{m['name']}_xyz"], weight=z[f"{m['name']}_weight"], path=path)
                for m in meta}


@dataclass
class PairSettings:
    """What the training pairs look like. Lengths in Angstrom, shifts/blur in pixels of ``box``."""

    box: int = 64
    fill: tuple[float, float] = (0.45, 0.9)  # largest diameter / box
    snr: tuple[float, float] = (0.01, 0.5)  # log-uniform
    ctf_fraction: float = 0.9  # images with a CTF (the rest: plain projections)
    phase_flipped_fraction: float = 0.3  # of the images with a CTF
    dark_fraction: float = 0.0  # protein dark (raw contrast); the rest bright (as RELION extracts: inverted)
    defocus: tuple[float, float] = (5000.0, 35000.0)
    max_astigmatism: float = 1000.0
    max_shift: float = 3.0
    max_blur: float = 1.5  # Gaussian sigma, px: the data's resolution varies
    # real-data conditions (cdae_em.simulate.realism); white_fraction=1, bfactor=(0, 0),
    # background_fraction=0 and fill=(0.4, 0.9) give the white-noise pairs the 0.2 weights learned
    white_fraction: float = 0.25  # pairs with white noise; the rest coloured, with random spectra
    bfactor: tuple[float, float] = (0.0, 200.0)  # A^2, uniform
    background_fraction: float = 0.5  # pairs with ice gradients (in the clean image: they are there)
    carbon_fraction: float = 0.15  # of those, with a carbon edge across the box
    views_per_structure: int = 1500
    val_fraction: float = 0.1  # views kept for validation only
    seed: int = 0


class ProjectionBank:
    """Projections (views, R, R) of each structure at random orientations, psi = 0, in a render box
    R = 1.5 * box where the structure's largest diameter spans ``RENDER_FILL`` of R."""

    def __init__(self, structures: dict[str, Atoms], settings: PairSettings,
                 maps: dict[str, tuple[torch.Tensor, float]] | None = None):
        from cdae_em.simulate.simulator import MapProjector

        self.render = 2 * int(round(0.75 * settings.box))
        rng = np.random.default_rng([settings.seed, 17])
        self.names, self.images, self.diameters, self.render_fill = [], [], [], []
        sources = [(name, structures[name], None) for name in sorted(structures)]
        sources += [(name, None, maps[name]) for name in sorted(maps or {})]
        for name, atoms, volume_and_pixel in sources:
            rot, tilt = random_views(settings.views_per_structure, rng)
            matrices = euler_to_matrix(rot, tilt, np.zeros_like(rot))
            if atoms is not None:
                diameter = 2 * float(np.sqrt((atoms.xyz**2).sum(1)).max())
                fill = RENDER_FILL
                volume = torch.from_numpy(atoms_to_map(atoms, self.render, diameter / (fill * self.render)))
                images = MapProjector(volume)(matrices)
            else:  # a density map: the particle fills what it fills in the map's box
                volume, pixel = volume_and_pixel
                diameter = map_diameter(volume) * pixel
                fill = min(1.0, diameter / (pixel * volume.shape[-1]))
                images = fourier_resize(MapProjector(volume)(matrices), self.render)
            self.names.append(name)
            self.images.append(images.to(torch.float16))
            self.diameters.append(diameter)
            self.render_fill.append(fill)
            log.info("pre-training structure %s: diameter %.0f A, %d views", name, diameter, len(images))
        # zero outside the particle's circle: zooming out must not show the render box's edges
        self.mask = soft_circular_mask(self.render, radius=0.5 * self.render - 3, width=3)
        self.n_val = max(1, int(round(settings.views_per_structure * settings.val_fraction)))


def map_diameter(volume: torch.Tensor, threshold: float = 0.05) -> float:
    """The particle's largest diameter in voxels: twice the largest distance from the box centre of
    a voxel above ``threshold`` x the map's maximum."""
    box = volume.shape[-1]
    c = torch.arange(box, dtype=torch.float32) - box // 2
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    inside = volume > threshold * volume.max()
    return 2.0 * float(r[inside].max()) if inside.any() else float(box)


class PairSampler:
    """Seeded batches of (noisy, clean) training pairs from a ``ProjectionBank``."""

    def __init__(self, bank: ProjectionBank, settings: PairSettings):
        self.bank, self.settings = bank, settings

    def sample(self, n: int, rng: np.random.Generator, validation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` pairs (noisy, clean), float32 (n, box, box); validation pairs use held-out views."""
        s, bank = self.settings, self.bank
        which = rng.integers(0, len(bank.names), n)
        n_views = len(bank.images[0])
        if validation:
            view = rng.integers(n_views - bank.n_val, n_views, n)
        else:
            view = rng.integers(0, n_views - bank.n_val, n)
        images = torch.stack([bank.images[w][v] for w, v in zip(which, view)]).float()
        fill = rng.uniform(*s.fill, n)
        zoom = fill / np.asarray(bank.render_fill)[which]
        blur = rng.uniform(0.0, s.max_blur, n)
        images = _band_limit(images, zoom, blur * bank.render / s.box) * bank.mask
        psi = rng.uniform(0.0, 2 * math.pi, n)
        shift = rng.uniform(-s.max_shift, s.max_shift, (n, 2)) / (s.box / 2)  # grid units of [-1, 1]
        images = _affine(images, zoom, psi, shift)
        images = fourier_resize(images, s.box)
        diameters = np.asarray(bank.diameters)[which]
        pixel = diameters / (fill * s.box)
        with_ctf = rng.random(n) < s.ctf_fraction
        flipped = rng.random(n) < s.phase_flipped_fraction
        mean_df = rng.uniform(*s.defocus, n)
        astig = rng.uniform(0.0, s.max_astigmatism, n)
        params = CtfParams(mean_df + astig / 2, mean_df - astig / 2, rng.uniform(0.0, 180.0, n),
                           np.full(n, 300.0), np.full(n, 2.7), rng.uniform(0.07, 0.1, n))
        ctf = ctf_2d(params, s.box, pixel)
        ctf = torch.where(torch.as_tensor(flipped)[:, None, None], ctf.abs(), ctf)
        ctf = torch.where(torch.as_tensor(with_ctf)[:, None, None], ctf, torch.ones_like(ctf))
        if s.bfactor[1] > 0:
            ctf = ctf * bfactor_envelope(s.box, pixel, rng.uniform(*s.bfactor, n))
        images = torch.fft.irfft2(torch.fft.rfft2(images) * ctf, s=(s.box, s.box))
        clean = images - images.mean(dim=(1, 2), keepdim=True)
        clean = clean / clean.std(dim=(1, 2), keepdim=True).clamp_min(1e-12)
        sign = torch.where(torch.as_tensor(rng.random(n) < s.dark_fraction), -1.0, 1.0)
        clean = clean * sign[:, None, None]
        if s.background_fraction > 0:
            with_bg = torch.as_tensor(rng.random(n) < s.background_fraction)[:, None, None]
            clean = clean + with_bg * ice_and_carbon(n, s.box, rng, s.carbon_fraction)
        snr = np.exp(rng.uniform(np.log(s.snr[0]), np.log(s.snr[1]), n))
        sigma = torch.as_tensor(1.0 / np.sqrt(snr), dtype=torch.float32)[:, None, None]
        if s.white_fraction >= 1:
            noise = torch.from_numpy(rng.standard_normal(clean.shape, dtype=np.float32))
        else:
            noise = coloured_noise(n, s.box, random_noise_shapes(n, rng, s.white_fraction), rng)
        return (clean + sigma * noise).float(), clean.float()

    def describe(self) -> dict:
        return {**asdict(self.settings), "structures": dict(zip(self.bank.names, np.round(self.bank.diameters, 1))),
                "render_box": self.bank.render}


def _band_limit(images: torch.Tensor, zoom: np.ndarray, sigma: np.ndarray) -> torch.Tensor:
    """Low-pass each image before it is shrunk by ``zoom`` (no aliasing), times a Gaussian blur of
    ``sigma`` pixels (the data's resolution)."""
    box = images.shape[-1]
    f = frequency_grid(box)[None]
    z = torch.as_tensor(zoom, dtype=torch.float32)[:, None, None]
    sg = torch.as_tensor(sigma, dtype=torch.float32)[:, None, None]
    cutoff = 0.5 * z
    filt = torch.clamp((cutoff - f) / 0.05 + 0.5, 0.0, 1.0) * torch.exp(-2 * math.pi**2 * sg**2 * f**2)
    return torch.fft.irfft2(torch.fft.rfft2(images) * filt, s=(box, box))


def _affine(images: torch.Tensor, zoom: np.ndarray, psi: np.ndarray, shift: np.ndarray) -> torch.Tensor:
    """Rotate by ``psi`` (radians), scale by ``zoom`` and shift (grid units) each image, bilinear."""
    z = torch.as_tensor(zoom, dtype=torch.float32)
    c, s = torch.cos(torch.as_tensor(psi, dtype=torch.float32)), torch.sin(torch.as_tensor(psi, dtype=torch.float32))
    t = torch.as_tensor(shift, dtype=torch.float32)
    # output pixel p samples the input at R(-psi) (p - t) / zoom
    theta = torch.stack([torch.stack([c / z, s / z, -(c * t[:, 0] + s * t[:, 1]) / z], 1),
                         torch.stack([-s / z, c / z, (s * t[:, 0] - c * t[:, 1]) / z], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape[:1]) + [1] + list(images.shape[1:]), align_corners=False)
    return F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def sampler_from_shipped(settings: PairSettings, path: str | Path | None = None) -> PairSampler:
    """A sampler over the shipped pre-training structures (or the ``.npz`` at ``path``)."""
    return PairSampler(ProjectionBank(load_structures(path), settings), settings)
