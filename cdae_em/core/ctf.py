"""Contrast transfer function in RELION's parameterisation, and phase flipping.

Parameters per particle (arrays of length N or scalars): defocus U/V in Angstrom, astigmatism angle
in degrees, voltage in kV, spherical aberration Cs in mm, amplitude contrast Q0, phase shift in
degrees. The CTF is evaluated on the ``rfft2`` grid of a box (N, box, box // 2 + 1), so that it can
multiply ``torch.fft.rfft2`` of real images directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CtfParams:
    """CTF parameters of a batch of particles (each field broadcastable to shape (N,))."""

    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    voltage: np.ndarray
    cs: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift: np.ndarray | float = 0.0

    def __len__(self) -> int:
        return len(np.atleast_1d(self.defocus_u))

    def subset(self, rows) -> "CtfParams":
        """The parameters of particles ``rows`` (a slice or index array)."""
        n = len(self)
        pick = lambda v: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,))[rows]  # noqa: E731
        return CtfParams(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))

    @classmethod
    def from_table(cls, table) -> "CtfParams":
        """Read the CTF columns of a per-particle table (see ``ParticleTable.per_particle``)."""
        return cls(
            defocus_u=table["rlnDefocusU"].to_numpy(float),
            defocus_v=table["rlnDefocusV"].to_numpy(float),
            defocus_angle=table["rlnDefocusAngle"].to_numpy(float),
            voltage=table["rlnVoltage"].to_numpy(float),
            cs=table["rlnSphericalAberration"].to_numpy(float),
            amplitude_contrast=table["rlnAmplitudeContrast"].to_numpy(float),
            phase_shift=table["rlnPhaseShift"].to_numpy(float) if "rlnPhaseShift" in table else 0.0,
        )


def electron_wavelength(voltage_kv: np.ndarray | float) -> np.ndarray:
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + 0.978466e-6 * v))


def _col(values, n: int, device) -> torch.Tensor:
    arr = np.array(np.broadcast_to(np.asarray(values, dtype=np.float64), (n,)))
    return torch.as_tensor(arr, device=device).view(n, 1, 1)


def frequency_grid(box: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial frequencies (fy, fx) in cycles per pixel on the rfft2 grid of a box."""
    fy = torch.fft.fftfreq(box, device=device, dtype=torch.float64)
    fx = torch.fft.rfftfreq(box, device=device, dtype=torch.float64)
    return torch.meshgrid(fy, fx, indexing="ij")


def ctf_2d(
    params: CtfParams,
    box: int,
    pixel_size: np.ndarray | float,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """CTF values (N, box, box // 2 + 1), float32, on the rfft2 grid.

    As RELION writes it: CTF = -sin(K1 * deltaf * s^2 + K2 * s^4 - phase_shift - atan(Q0 / sqrt(1 - Q0^2))),
    K1 = pi * lambda, K2 = pi / 2 * Cs * lambda^3,
    with deltaf = -(mean defocus + half astigmatism * cos(2 (azimuth - defocus angle))), so for
    underfocus (positive defocus) the CTF starts positive at low frequency (sin of the amplitude
    contrast phase) and has its first zero where pi * lambda * dz * s^2 + atan(...) = pi.
    """
    n = len(params)
    fy, fx = frequency_grid(box, device)
    # The Nyquist column of an even box stands for both +0.5 and -0.5: make it symmetric in fy so
    # that the filter stays Hermitian (otherwise irfft2 silently drops part of it).
    fy = torch.where(fx == 0.5, fy.abs(), fy)
    px = _col(pixel_size, n, device)
    sy, sx = fy / px, fx / px  # 1/Angstrom
    s2 = sx**2 + sy**2
    azimuth = torch.atan2(sy, sx)
    lam = _col(electron_wavelength(params.voltage), n, device)
    cs = _col(params.cs, n, device) * 1e7  # mm -> Angstrom
    du, dv = _col(params.defocus_u, n, device), _col(params.defocus_v, n, device)
    ang = torch.deg2rad(_col(params.defocus_angle, n, device))
    q0 = _col(params.amplitude_contrast, n, device)
    phase = torch.deg2rad(_col(params.phase_shift, n, device))
    deltaf = -(0.5 * (du + dv) + 0.5 * (du - dv) * torch.cos(2.0 * (azimuth - ang)))
    k1 = math.pi * lam
    k2 = 0.5 * math.pi * cs * lam**3
    k3 = torch.atan(q0 / torch.sqrt(1.0 - q0**2))
    ctf = -torch.sin(k1 * deltaf * s2 + k2 * s2**2 - phase - k3)
    return ctf.to(torch.float32)


def apply_filter(images: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """Multiply real images (N, box, box) by a filter given on their rfft2 grid."""
    box = images.shape[-1]
    return torch.fft.irfft2(torch.fft.rfft2(images) * filt, s=(box, box))


def phase_flip(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Phase-flip images: multiply their Fourier transform by the sign of the CTF.

    Flipping is its own inverse wherever the CTF is not exactly zero, and leaves amplitudes alone.
    """
    return apply_filter(images, torch.sign(ctf))


class CtfAmplitudes:
    """|CTF| of each particle on the rfft2 grid of the working box, as a read-only array-like
    (``len``, ``shape``, ``[rows]`` -> float32 array (n, box, box // 2 + 1)), computed per read.

    For phase-flipped particles x = |CTF| * projection + noise: the classification weighs them by
    it again to compare them with CTF-free references (``cdae_em.core.multiref.align_to_references``).
    ``pixel_size`` (per particle or scalar) is that of the working box (after any resizing).
    ``scale`` (filters (groups, box, box // 2 + 1), group of each particle) multiplies each
    particle's |CTF| by its group's filter: another transfer function the particles went through
    (a noise-whitening filter that differs between optics groups).
    """

    def __init__(self, params: CtfParams, pixel_size: np.ndarray | float, box: int,
                 scale: tuple[torch.Tensor, np.ndarray] | None = None):
        self.params, self.box, self.scale = params, box, scale
        self.pixel = np.broadcast_to(np.asarray(pixel_size, dtype=np.float64), (len(params),))
        self.shape = (len(params), box, box // 2 + 1)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        rows = np.atleast_1d(np.asarray(rows))
        amplitude = ctf_2d(self.params.subset(rows), self.box, self.pixel[rows]).abs()
        if self.scale is not None:
            filters, group = self.scale
            amplitude = amplitude * filters[torch.as_tensor(group[rows])]
        return amplitude.numpy()
