"""What happens to the original particles before the model, and the alignment of the originals,
see them: CTF phase flipping (decided per data set by ``resolve_phase_flip``) and Fourier
cropping/padding to the working box."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from cdae_em.core.ctf import CtfAmplitudes, CtfParams, ctf_2d, phase_flip
from cdae_em.errors import InputError
from cdae_em.core.preprocess import fourier_resize
from cdae_em.io.star import ParticleTable

if TYPE_CHECKING:
    from cdae_em.settings import DenoiseSettings

log = logging.getLogger(__name__)

CTF_LABELS = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
              "rlnAmplitudeContrast"]


def resolve_phase_flip(table: ParticleTable, wanted: bool | None) -> bool:
    """Whether to phase-flip the particles of ``table``: ``wanted`` when given; auto (None) when
    every particle has CTF values and the images are not phase-flipped already
    (rlnCtfDataArePhaseFlipped). Flipping makes particles of different defocus add up coherently,
    which is what alignment to class averages needs at low SNR (docs/class2d.md)."""
    if wanted is not None:
        return bool(wanted)
    per = table.per_particle()
    if any(per[c].isna().any() for c in CTF_LABELS):
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
            missing = [c for c in CTF_LABELS if per[c].isna().any()]
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
