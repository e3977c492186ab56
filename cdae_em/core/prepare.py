"""What happens to the original particles before the model, and the alignment of the originals,
see them: CTF phase flipping (decided per data set by ``resolve_phase_flip``) and Fourier
cropping/padding to the working box."""

from __future__ import annotations

import logging
import numpy as np
import torch

from cdae_em.core.ctf import CtfAmplitudes, CtfParams, ctf_2d, phase_flip
from cdae_em.errors import InputError
from cdae_em.core.preprocess import equalise_histogram, fourier_resize, particle_mask
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
    then Fourier crop/pad to the working box. ``prepare(batch, rows)`` -> tensor on ``device``."""

    def __init__(self, table: ParticleTable, settings: DenoiseSettings, box_in: int, device: torch.device):
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
        return CtfAmplitudes(self.ctf, self.pixel * self.box_in / self.box, self.box)

    def __call__(self, batch: np.ndarray, rows) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(batch, dtype=np.float32)).to(self.device)
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
                 equalise_diameter: float | None = None):
        self.preparer = None if prepare is None else BatchPreparer(table, prepare, box_in, device)
        self.box = self.preparer.box if self.preparer is not None else box_in
        # |CTF| of phase-flipped images, for CTF-aware classification (None when not phase-flipped)
        self.ctf = None if self.preparer is None else self.preparer.amplitudes()
        self.equalise_mask = None if equalise_diameter is None else particle_mask(self.box, equalise_diameter or None)

    def __call__(self, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if self.preparer is not None:
            images = self.preparer(images, rows).cpu().numpy()
        if self.equalise_mask is not None:
            images = equalise_histogram(torch.from_numpy(np.asarray(images, dtype=np.float32)), self.equalise_mask).numpy()
        return images


def prepared_images(source, project_dir: str | None, prepare: DenoiseSettings | None = None, device=None,
                    equalise_diameter: float | None = None) -> ImageSource:
    """The particles of ``source`` (a STAR file, table or stack) as an ``ImageSource`` whose
    ``[rows]`` are ``Prepared`` as asked; close it (or use ``with``)."""
    images = ImageSource(source, project_dir=project_dir)
    try:
        images.transform = Prepared(images.table, images.box, prepare, device, equalise_diameter)
    except BaseException:
        images.close()
        raise
    return images
