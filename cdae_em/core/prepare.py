"""What happens to the original particles before the model, and the alignment of the originals,
see them: CTF phase flipping (decided per data set by ``resolve_phase_flip``), Fourier
cropping/padding to the working box, and noise whitening (``measure_whitening``)."""

from __future__ import annotations

import logging
import numpy as np
import torch

from cdae_em.core.ctf import CtfAmplitudes, CtfParams, ctf_2d, phase_flip
from cdae_em.core.noise import Whitening, measure_whitening
from cdae_em.errors import InputError
from cdae_em.core.preprocess import equalise_histogram, fourier_resize, particle_mask, radial_mean_square
from cdae_em.io.images import ImageSource
from cdae_em.io.star import CTF_COLUMNS, ParticleTable
from cdae_em.settings import DenoiseSettings

log = logging.getLogger(__name__)


def resolve_phase_flip(table: ParticleTable, wanted: bool | None) -> bool:
    """Whether to phase-flip the particles of ``table``: ``wanted`` when given; auto (None) when
    every particle has CTF values and the images are not phase-flipped already
    (rlnCtfDataArePhaseFlipped). Flipping makes particles of different defocus add up coherently,
    which is what alignment to class averages needs at low SNR (docs/class2d.md)."""
    if wanted is not None:
        return bool(wanted)
    per = table.per_particle()
    if any(per[c].isna().any() for c in CTF_COLUMNS):
        log.info("%s: no CTF values for every particle: not phase flipping", table.path)
        return False
    for block in (table.optics, table.particles):
        if block is not None and "rlnCtfDataArePhaseFlipped" in block and (block["rlnCtfDataArePhaseFlipped"] == 1).any():
            log.info("%s: the images are phase-flipped already (rlnCtfDataArePhaseFlipped)", table.path)
            return False
    return True


class BatchPreparer:
    """What happens to original particles before the model sees them: optional CTF phase flip,
    then Fourier crop/pad to the working box, then optional noise whitening (``whitening``, measured
    at the working box by ``whitening_of``). ``prepare(batch, rows)`` -> tensor on ``device``."""

    def __init__(self, table: ParticleTable, settings: DenoiseSettings, box_in: int, device: torch.device,
                 whitening: Whitening | None = None):
        self.whitening = whitening
        per = table.per_particle()
        self.pixel = per["rlnImagePixelSize"].to_numpy()
        self.box_in, self.box, self.device = box_in, settings.box or box_in, device
        self.ctf = None
        if settings.phase_flip:
            missing = [c for c in CTF_COLUMNS if per[c].isna().any()]
            if missing:
                raise InputError(table.path, f"--phase-flip needs CTF values; missing {', '.join(missing)}")
            self.ctf = CtfParams.from_table(per)

    def amplitudes(self) -> CtfAmplitudes | None:
        """|CTF| of the prepared (phase-flipped, resized) particles, or None without phase flipping."""
        if self.ctf is None:
            return None
        scale = None
        if self.whitening is not None and len(self.whitening.filters) > 1:
            # groups whitened by different filters: their signal differs by each one's filter over
            # the mean one, a transfer function like |CTF| that alignment must weigh them by
            scale = (self.whitening.relative(), self.whitening.group)
        return CtfAmplitudes(self.ctf, self.pixel * self.box_in / self.box, self.box, scale)

    def __call__(self, batch: np.ndarray, rows) -> torch.Tensor:
        x = self.flip_and_resize(batch, rows)
        if self.whitening is not None:
            x = self.whitening.apply(x, rows)
        return x

    def flip_and_resize(self, batch: np.ndarray, rows) -> torch.Tensor:
        """The batch phase-flipped and resized, not whitened (what the whitening is measured on)."""
        x = torch.from_numpy(np.asarray(batch, dtype=np.float32)).to(self.device)
        if self.box < self.box_in:
            # crop first: the flip keeps or negates each Fourier coefficient, and the cropped image
            # holds the same coefficients, so flipping it with the CTF at its own (larger) pixel is
            # the same operation at a fraction of the cost
            x = fourier_resize(x, self.box)
            if self.ctf is not None:
                pixel = self.pixel[rows] * self.box_in / self.box
                x = phase_flip(x, ctf_2d(self.ctf.subset(rows), self.box, pixel, self.device))
            return x
        if self.ctf is not None:
            x = phase_flip(x, ctf_2d(self.ctf.subset(rows), self.box_in, self.pixel[rows], self.device))
        if self.box != self.box_in:
            x = fourier_resize(x, self.box)
        return x


class Prepared:
    """An ``ImageSource`` transform: the particles as a stage works on them. With ``prepare``, as
    the model sees them (``BatchPreparer``: phase flip, working box); with ``equalise_diameter``
    (pixels; 0: the default mask), histogram-equalised inside the particle mask (the paper's step
    before clustering)."""

    def __init__(self, table: ParticleTable, box_in: int, prepare: DenoiseSettings | None = None, device=None,
                 equalise_diameter: float | None = None, whitening: Whitening | None = None):
        self.preparer = None if prepare is None else BatchPreparer(table, prepare, box_in, device, whitening)
        # images already at the working box (the denoised stacks): whitened here
        self.whitening = whitening if prepare is None else None
        self.box = self.preparer.box if self.preparer is not None else box_in
        # |CTF| of phase-flipped images, for CTF-aware classification (None when not phase-flipped)
        self.ctf = None if self.preparer is None else self.preparer.amplitudes()
        self.equalise_mask = None if equalise_diameter is None else particle_mask(self.box, equalise_diameter or None)

    def __call__(self, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if self.preparer is not None:
            images = self.preparer(images, rows).cpu().numpy()
        elif self.whitening is not None:
            images = self.whitening.apply(torch.from_numpy(np.asarray(images, dtype=np.float32)), rows).numpy()
        if self.equalise_mask is not None:
            images = equalise_histogram(torch.from_numpy(np.asarray(images, dtype=np.float32)), self.equalise_mask).numpy()
        return images


def prepared_images(source, project_dir: str | None, prepare: DenoiseSettings | None = None, device=None,
                    equalise_diameter: float | None = None, whitening: Whitening | None = None) -> ImageSource:
    """The particles of ``source`` (a STAR file, table or stack) as an ``ImageSource`` whose
    ``[rows]`` are ``Prepared`` as asked; close it (or use ``with``)."""
    images = ImageSource(source, project_dir=project_dir)
    try:
        images.transform = Prepared(images.table, images.box, prepare, device, equalise_diameter, whitening)
    except BaseException:
        images.close()
        raise
    return images


def whitening_of(table: ParticleTable, images: ImageSource, settings: DenoiseSettings,
                 device: torch.device | None = None) -> Whitening | None:
    """The noise whitening of these particles as ``settings`` prepare them (phase flip, working
    box), per optics group; None where ``settings.whiten`` is off or the background is too small
    to measure the noise (said in the log)."""
    if not settings.whiten:
        return None
    preparer = BatchPreparer(table, settings, images.box, device or torch.device("cpu"))
    groups = table.optics_rows() if table.optics is not None else np.zeros(len(table), dtype=np.int64)
    return measure_whitening(groups, lambda rows: preparer.flip_and_resize(images.read(rows), rows).cpu(),
                             preparer.box, where=str(table.path))


def prepared_particles(source, project_dir: str | None, settings: DenoiseSettings, device=None) -> ImageSource:
    """The original particles of ``source`` as the classification sees them: phase-flipped, at
    the working box and whitened as ``settings`` say (``prepared_images``); the whitening is
    ``.transform.preparer.whitening`` (the classification applies it to the denoised stacks too)."""
    images = ImageSource(source, project_dir=project_dir)
    try:
        whitening = whitening_of(images.table, images, settings)
        images.transform = Prepared(images.table, images.box, settings, device, whitening=whitening)
    except BaseException:
        images.close()
        raise
    return images


def whitening_record(settings: DenoiseSettings, whitening: Whitening | None) -> dict:
    """What summary.json says of the noise whitening: per optics group the noise measured, and
    which images were whitened."""
    if whitening is None:
        return {"whitened": False, "why": "--no-whiten" if not settings.whiten else
                "too little background to measure the noise's spectrum"}
    return {"whitened": True, **whitening.record,
            "domain": "clustering and alignment on whitened particles (originals and denoised alike); the "
                      "denoised stacks and class averages written are not whitened"}


#: the scale the shipped weights were trained at (their metadata says it for any weights file):
#: particles of TRAINED_FILL times the TRAINED_BOX across
TRAINED_BOX = 64
TRAINED_FILL = (0.45, 0.9)
SCALE_BOX = 48  # the particles' extent is measured on images Fourier-cropped to this box (noise averaged)
ENERGY_FRACTION = 0.95  # the particle's radius holds this fraction of its variance


def estimate_particle_diameter(images: ImageSource, max_images: int = 1000) -> float | None:
    """The particles' diameter in pixels of their box, from up to ``max_images`` evenly spaced
    particles, or None where the data do not show it.

    Noise adds the same variance at every radius of the box, the particles only where they are.
    On images Fourier-cropped to SCALE_BOX (which averages most of the noise away and keeps the
    particle's low-resolution extent), the mean squared pixel per radius, less its median over the
    outer ring, is the particles' radial variance profile; the particle's radius holds
    ENERGY_FRACTION of it (summed over the pixels at each radius). None where that sum does not
    stand 4 standard errors above the noise (too few particles for their SNR)."""
    n, box = len(images), images.box
    small = min(box, SCALE_BOX)
    rows = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(np.int64))
    batches = (fourier_resize(torch.from_numpy(images.read(rows[start:start + 256])), small)
               for start in range(0, len(rows), 256))
    profile, counts, _ = radial_mean_square(batches, small)
    edge = int(0.8 * small / 2)
    floor = profile[edge:small // 2].median()
    # the particles' variance per radius, weighted by the pixels at that radius: where it lies
    energy = ((profile - floor).clamp_min(0) * counts)[:edge]
    noise = (floor.clamp_min(1e-12) * torch.sqrt(2.0 / (counts * len(rows))) * counts)[:edge]
    if energy.sum() < 4 * noise.pow(2).sum().sqrt():
        return None
    radius = int(torch.nonzero(energy.cumsum(0) >= ENERGY_FRACTION * energy.sum())[0]) + 0.5
    return float(2 * radius * box / small)


def working_box(box: int, diameter: float | None, trained_box: int = TRAINED_BOX,
                trained_fill: tuple[float, float] = TRAINED_FILL) -> int:
    """The box at which particles of ``diameter`` pixels (in a ``box`` px box) are as many pixels
    across as the weights were trained on: ``box`` where they already are (or the diameter is
    unknown), else Fourier-cropped so that they are at the middle of the trained range (to the
    nearest even box with no prime factor above 7). Never pads: smaller particles stay at their box."""
    largest = trained_fill[1] * trained_box
    if diameter is None or diameter <= largest:
        return box
    target = 0.5 * (trained_fill[0] + trained_fill[1]) * trained_box
    exact = max(16.0, box * target / diameter)
    return min((b for b in range(16, box + 1, 2) if _fft_friendly(b)), key=lambda b: (abs(b - exact), -b))


def _fft_friendly(n: int) -> bool:
    """No prime factor above 7 (FFTs of other sizes are several times slower)."""
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1
