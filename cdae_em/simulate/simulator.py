"""Simulated particle stacks with known truth: projections of a 3D map or atomic model, in-plane
rotation, shifts, CTF and white noise at a chosen SNR, written as RELION 3.1 STAR + MRC stacks.

Definitions (also in ``cdae-em simulate --help``):
- clean image: the projection, shifted, CTF-modulated, then scaled to zero mean and unit variance
  over the box (so every row of every SNR level carries the same signal);
- SNR: variance of the clean image over the box divided by the variance of the added Gaussian
  noise, per image; a noisy image at SNR s is clean + noise of variance 1/s, white by default or
  with a detector-like power spectrum (``noise``, see ``cdae_em.simulate.realism``), optionally
  then normalised as RELION's Extract does (background mean 0, std 1);
- an SNR ladder writes the *same* clean projections at several SNRs (independent noise per level),
  paired by row, for pre-training the cascade.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cdae_em.io.atomic_write import write_text
from cdae_em.core.ctf import CtfParams, apply_filter, ctf_2d
from cdae_em.errors import InputError, OutputError
from cdae_em.core.geometry import euler_to_matrix, even_views, random_views
from cdae_em.core.preprocess import fourier_resize, translate
from cdae_em.simulate import junk
from cdae_em.simulate.realism import (WHITE, NoiseShape, bfactor_envelope, coloured_noise, lag1_correlation,
                                      relion_normalise)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Projection sources
# ----------------------------------------------------------------------------------------------
class MapProjector:
    """Projections of a cubic volume (box, box, box), indexed [z, y, x], by the Fourier slice theorem.

    Pixel (x, y) of the projection with matrix A is the line integral over z of the volume at
    A^T (x, y, z), coordinates relative to the box centre box // 2 (RELION's convention). The volume
    is zero-padded ``pad`` times and pre-divided by the trilinear kernel's transform (gridding
    correction), so trilinear interpolation of its 3D transform gives accurate central slices at a
    cost of box^2 samples per projection instead of box^3 in real space. Measured against the
    analytic projection of an off-centre Gaussian blob (sigma 2.5 px, 48 px box, pad 2): max error
    0.8% of the peak for general views, 3% for slices on grid planes (where the gridding correction
    over-corrects); pad 3 halves both at 1.5x the time and 3.4x the memory.
    """

    def __init__(self, volume: torch.Tensor, pad: int = 2):
        box = volume.shape[-1]
        size = pad * box
        device = volume.device
        c = torch.arange(size, device=device, dtype=torch.float32) - size // 2
        sinc = torch.sinc(c / size) ** 2  # transform of the trilinear (triangle) kernel
        padded = torch.zeros((size, size, size), device=device, dtype=torch.float32)
        lo = size // 2 - box // 2
        padded[lo:lo + box, lo:lo + box, lo:lo + box] = volume
        padded = padded / (sinc[:, None, None] * sinc[None, :, None] * sinc[None, None, :])
        f = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(padded)))
        self.spectrum = torch.stack([f.real, f.imag])[None]  # (1, 2, size, size, size)
        self.box, self.size = box, size
        k = torch.arange(box, device=device, dtype=torch.float32) - box // 2
        ky, kx = torch.meshgrid(k, k, indexing="ij")
        # frequencies of a box-sized image in units of the padded grid's spacing, as (x, y, 0)
        self.plane = torch.stack([kx, ky, torch.zeros_like(kx)], dim=-1).reshape(-1, 3) * pad

    def __call__(self, matrices: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        out = []
        scale = 2.0 / (self.size - 1)
        offset = (self.size // 2) * scale - 1.0
        for start in range(0, len(matrices), batch_size):
            a = torch.as_tensor(matrices[start:start + batch_size], dtype=torch.float32, device=self.plane.device)
            freq = torch.einsum("pi,bij->bpj", self.plane, a)  # A^T k for every image frequency k
            grid = (freq * scale + offset).reshape(1, len(a), self.box, self.box, 3)
            s = F.grid_sample(self.spectrum, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            slices = torch.complex(s[0, 0], s[0, 1])  # (b, box, box), centred spectrum
            images = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(slices, dim=(-2, -1))), dim=(-2, -1))
            out.append(images.real)
        return torch.cat(out) if out else torch.empty((0, self.box, self.box))


@dataclass
class Source:
    """What the simulator projects: a density map or an atomic model, at a box and pixel size."""

    kind: str  # "map" or "atoms"
    path: str
    box: int
    pixel_size: float
    volume: torch.Tensor | None = None
    atoms: object | None = None
    resolution: float | None = None
    _projector: MapProjector | None = field(default=None, repr=False)

    def project(self, matrices: np.ndarray) -> torch.Tensor:
        if self.kind == "map":
            if self._projector is None:
                self._projector = MapProjector(self.volume)
            images = self._projector(matrices)
            if images.shape[-1] != self.box:
                images = fourier_resize(images, self.box)
            return images
        from cdae_em.simulate.structure import project_atoms

        return torch.as_tensor(project_atoms(self.atoms, matrices, self.box, self.pixel_size, self.resolution))


ATOM_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".cif.gz")


def load_source(
    path: str | Path | None = None,
    box: int | None = None,
    pixel_size: float | None = None,
    resolution: float | None = None,
) -> Source:
    """Open what to project: an MRC map, a PDB/mmCIF model, or (``path=None``) the embedded map.

    For a map, ``box`` resamples the projections in Fourier space (the pixel size scales with it);
    ``pixel_size`` overrides the map header. For a model, the default pixel size makes the
    molecule span about 65% of the box.
    """
    if path is None:
        from cdae_em.data import default_map_path

        path = default_map_path()
    path = Path(path)
    name = path.name.lower()
    if name.endswith(ATOM_SUFFIXES):
        from cdae_em.simulate.structure import centre, read_atoms

        atoms = centre(read_atoms(path))
        box = box or 64
        if pixel_size is None:
            radius = float(np.sqrt((atoms.xyz**2).sum(axis=1)).max())
            pixel_size = round(max(2 * radius / (0.65 * box), 0.5), 2)
        return Source("atoms", str(path), box, pixel_size, atoms=atoms, resolution=resolution)
    from cdae_em.io.stacks import read_map

    volume, voxel = read_map(path)
    if pixel_size is not None:
        voxel = pixel_size
    if not np.isfinite(voxel) or voxel <= 0:
        raise InputError(path, "map has no voxel size in its header; give --pixel-size")
    voxel = round(float(voxel), 6)
    map_box = volume.shape[0]
    box = box or map_box
    return Source("map", str(path), box, voxel * map_box / box, volume=torch.as_tensor(volume, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------
# Simulation
# ----------------------------------------------------------------------------------------------
@dataclass
class SimulationSettings:
    """What to simulate. Angles in degrees, shifts in pixels, defocus in Angstrom."""

    n_particles: int = 1000
    n_views: int | None = None  # a fixed set of views (one class each); None: random orientations
    in_plane: bool = False  # random in-plane rotation psi in [0, 360)
    max_shift: float = 0.0  # uniform random shifts in [-max_shift, max_shift] pixels, x and y
    ctf: bool = False
    defocus_range: tuple[float, float] = (10000.0, 30000.0)
    astigmatism: float = 0.0  # |defocusU - defocusV| drawn uniformly up to this, random angle
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    snrs: list[float | None] = field(default_factory=lambda: [0.1])  # None = clean
    # protein dark, as in raw micrographs (RELION extraction with "invert contrast = No"); the
    # default, bright protein, is what RELION extraction gives with its default "invert contrast = Yes"
    dark: bool = False
    # what real stacks have (cdae_em.simulate.realism): the noise's power spectrum (white by
    # default), a B-factor (A^2) damping the signal, and RELION Extract's background normalisation
    noise: NoiseShape = WHITE
    bfactor: float = 0.0
    normalise: bool = False
    # picks that are not particles, as a cleaning job gets them (``cdae_em.simulate.junk``)
    junk_fraction: float = 0.0
    seed: int = 0
    batch_size: int = 128


@dataclass
class Truth:
    """Per-particle ground truth drawn for a simulation (all arrays of length n)."""

    view: np.ndarray  # 0-based view id (fixed views), or -1 (random orientations)
    rot: np.ndarray
    tilt: np.ndarray
    psi: np.ndarray
    shift_x: np.ndarray  # pixels; the particle centre sits at box // 2 + shift
    shift_y: np.ndarray
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    junk: junk.Junk | None = None  # which rows are junk picks (None: none), and what each needs


def draw_truth(settings: SimulationSettings, rng: np.random.Generator) -> Truth:
    """Draw orientations, shifts and defocus for every particle (seeded)."""
    n = settings.n_particles
    if settings.n_views:
        view_rot, view_tilt = even_views(settings.n_views)
        view = rng.integers(0, settings.n_views, n)
        rot, tilt = view_rot[view], view_tilt[view]
    else:
        view = np.full(n, -1)
        rot, tilt = random_views(n, rng)
    psi = rng.uniform(0.0, 360.0, n) if settings.in_plane else np.zeros(n)
    s = settings.max_shift
    shift_x, shift_y = (rng.uniform(-s, s, n), rng.uniform(-s, s, n)) if s > 0 else (np.zeros(n), np.zeros(n))
    if settings.ctf:
        lo, hi = settings.defocus_range
        mean = rng.uniform(lo, hi, n)
        astig = rng.uniform(0.0, settings.astigmatism, n)
        du, dv = mean + astig / 2, mean - astig / 2
        angle = rng.uniform(0.0, 180.0, n)
    else:
        du = dv = angle = np.zeros(n)
    return Truth(view, rot, tilt, psi, shift_x, shift_y, du, dv, angle)


def clean_images(source: Source, truth: Truth, rows: slice, settings: SimulationSettings) -> torch.Tensor:
    """Clean images for ``rows``: projection, shift, B-factor, CTF, then zero mean and unit variance."""
    matrices = euler_to_matrix(truth.rot[rows], truth.tilt[rows], truth.psi[rows])
    images = source.project(matrices)
    if truth.junk is not None:
        images = junk.add_partners_and_cuts(source, truth.junk, rows, images)
    shifts = np.stack([truth.shift_x[rows], truth.shift_y[rows]], axis=1)
    if np.any(shifts):
        images = translate(images, shifts)
    if settings.bfactor > 0:
        images = apply_filter(images, bfactor_envelope(source.box, source.pixel_size, settings.bfactor))
    if settings.ctf:
        n = len(images)
        params = CtfParams(truth.defocus_u[rows], truth.defocus_v[rows], truth.defocus_angle[rows],
                           np.full(n, settings.voltage), np.full(n, settings.cs),
                           np.full(n, settings.amplitude_contrast))
        images = apply_filter(images, ctf_2d(params, source.box, source.pixel_size))
    mean = images.mean(dim=(1, 2), keepdim=True)
    std = images.std(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    if truth.junk is not None:
        std = junk.junk_scale(std, truth.junk, rows)
    images = (mean - images) / std if settings.dark else (images - mean) / std
    if truth.junk is not None:
        images = junk.fill_empty_boxes(images, truth.junk, rows, settings.seed)
    return images


def level_name(snr: float | None) -> str:
    """File stem for one SNR level: 'clean' or 'snr0.1'."""
    return "clean" if snr is None else f"snr{snr:g}"


def parse_snrs(text: str) -> list[float | None]:
    """Parse '0.1,0.4,0.6,clean' into [0.1, 0.4, 0.6, None]."""
    levels: list[float | None] = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("clean", "inf"):
            levels.append(None)
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"not an SNR: {item!r} (use numbers > 0 or 'clean')") from None
        if not value > 0:
            raise ValueError(f"SNR must be > 0, got {item}")
        levels.append(value)
    return levels


def simulate(
    source: Source,
    settings: SimulationSettings,
    out_dir: str | Path,
    overwrite: bool = False,
    single_name: str | None = "particles",
) -> dict:
    """Simulate particles and write them under ``out_dir``; returns the manifest it writes.

    Files: for each noisy SNR level a STAR + stack (``particles.star``/``particles.mrcs`` when there
    is one level and ``single_name`` is set, else ``particles_snr0.1.star`` ...), ``clean.mrcs``,
    ``truth.star`` (same rows, images = clean stack, true angles/origins/defocus, view id as
    rlnClassNumber) and ``simulation.json`` (settings, files, timings). Stacks are written in
    streamed batches under temporary names and renamed only when all are complete.
    """
    from cdae_em.io.stacks import StackWriter
    from cdae_em.io.star import new_particle_table, write_star

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "simulation.json").exists() and not overwrite:
        raise OutputError(f"{out}: already holds a simulation (simulation.json); pass --overwrite to replace it")
    noisy = [s for s in settings.snrs if s is not None]
    stems = {s: (single_name if (single_name and len(noisy) == 1) else f"particles_{level_name(s)}") for s in noisy}

    t0 = time.perf_counter()
    rng = np.random.default_rng(settings.seed)
    truth = draw_truth(settings, rng)
    if settings.junk_fraction > 0:
        picks = junk.draw_junk(len(truth.view), settings.junk_fraction, settings.seed, source.box)
        truth = replace(truth, view=np.where(picks.kind == junk.PARTICLE, truth.view, -1), junk=picks)
    noise_rngs = {s: np.random.default_rng([settings.seed, i + 1]) for i, s in enumerate(noisy)}
    n, box, px = settings.n_particles, source.box, source.pixel_size
    log.info("simulating %d particles of %d x %d px at %.3f A/px from %s (%s); SNR levels: %s",
             n, box, box, px, source.path, source.kind, ", ".join(level_name(s) for s in settings.snrs))

    measured = {s: [0.0, 0.0] for s in noisy}  # signal and noise sums of squares
    with contextlib.ExitStack() as stack:
        clean_writer = stack.enter_context(StackWriter(out / "clean.mrcs", n, box, px))
        writers = {s: stack.enter_context(StackWriter(out / f"{stems[s]}.mrcs", n, box, px)) for s in noisy}
        for start in tqdm(range(0, n, settings.batch_size), desc="simulate", unit="batch", leave=False, disable=None):
            rows = slice(start, min(start + settings.batch_size, n))
            clean = clean_images(source, truth, rows, settings).cpu().numpy().astype(np.float32)
            clean_writer.write(start, clean)
            for s, writer in writers.items():
                noise = coloured_noise(len(clean), box, settings.noise, noise_rngs[s]).numpy() / np.float32(np.sqrt(s))
                image = clean + noise
                if settings.normalise:
                    image = relion_normalise(torch.from_numpy(image))[0].numpy()
                writer.write(start, image)
                measured[s][0] += float(np.square(clean).sum())
                measured[s][1] += float(np.square(noise).sum())
    t_images = time.perf_counter() - t0

    optics = pd.DataFrame({
        "rlnOpticsGroup": [1],
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnAmplitudeContrast": [settings.amplitude_contrast],
        "rlnSphericalAberration": [settings.cs],
        "rlnVoltage": [settings.voltage],
        "rlnImagePixelSize": [px],
        "rlnImageSize": [box],
        "rlnImageDimensionality": [2],
    })
    names = np.arange(1, n + 1)
    common = {}
    if settings.ctf:
        common.update(rlnDefocusU=truth.defocus_u, rlnDefocusV=truth.defocus_v,
                      rlnDefocusAngle=truth.defocus_angle, rlnCtfBfactor=np.zeros(n), rlnPhaseShift=np.zeros(n))
    for s in noisy:
        particles = pd.DataFrame({"rlnImageName": [f"{i:06d}@{stems[s]}.mrcs" for i in names],
                                  **common, "rlnOpticsGroup": np.ones(n, dtype=int)})
        write_star(new_particle_table(particles, optics), out / f"{stems[s]}.star")
    truth_particles = pd.DataFrame({
        "rlnImageName": [f"{i:06d}@clean.mrcs" for i in names],
        **common,
        "rlnOpticsGroup": np.ones(n, dtype=int),
        "rlnAngleRot": truth.rot, "rlnAngleTilt": truth.tilt, "rlnAnglePsi": truth.psi,
        "rlnOriginXAngst": origin_from_shift(truth.shift_x, px),
        "rlnOriginYAngst": origin_from_shift(truth.shift_y, px),
        "rlnClassNumber": truth.view + 1,
        **({"cdaeTrueKind": truth.junk.kind} if truth.junk is not None else {}),
    })
    write_star(new_particle_table(truth_particles, optics), out / "truth.star")

    manifest = {
        "source": {"kind": source.kind, "path": source.path, "pixel_size": px, "box": box},
        "settings": {**asdict(settings), "snrs": [level_name(s) for s in settings.snrs],
                     "noise_lag1_correlation": round(lag1_correlation(settings.noise), 4)},
        "levels": {level_name(s): {"star": f"{stems[s]}.star", "stack": f"{stems[s]}.mrcs",
                                   "measured_snr": measured[s][0] / max(measured[s][1], 1e-30)} for s in noisy},
        "clean": "clean.mrcs",
        "truth": "truth.star",
        "seconds": round(time.perf_counter() - t0, 3),
        "images_per_second": round(n / max(t_images, 1e-9), 1),
    }
    write_text(out / "simulation.json", json.dumps(manifest, indent=2))
    log.info("wrote %d particles to %s in %.1f s (%.0f images/s)", n, out, manifest["seconds"], manifest["images_per_second"])
    return manifest


def origin_from_shift(shift_pixels: np.ndarray, pixel_size: float) -> np.ndarray:
    """RELION origin (Angstrom) of a particle whose centre sits ``shift_pixels`` from the box centre.

    RELION centres a particle by translating its image by +origin (ml_optimiser.cpp,
    getFourierTransformsAndCtfs: ``selfTranslate(img(), my_old_offset)``), so origin = -shift.
    """
    return -np.asarray(shift_pixels, dtype=np.float64) * pixel_size
