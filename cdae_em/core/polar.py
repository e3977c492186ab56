"""Polar sampling and per-box geometry shared by 2D alignment (``cdae_em.core.align``) and the
neighbour search (``cdae_em.core.neighbours``): batches of images as tensors, rotation about the box
centre in RELION's convention, Fourier amplitudes resampled on polar rings, the disc of shifts a
cross-correlation search covers, :class:`AlignmentGrid`, which bundles them for one box size, and
the band-limited spectra and their norms that the FFT searches (``cdae_em.core.multiref``) compare.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cdae_em.core.preprocess import largest_mask_radius, soft_circular_mask

#: images as the alignment functions take them: a tensor, or a numpy array / memmap read in batches
Images = torch.Tensor | np.ndarray


def device_of(images: Images, device: torch.device | str | None) -> torch.device:
    """The device to compute on: ``device`` if given, else the images' own (numpy: CPU)."""
    if device is not None:
        return torch.device(device)
    return images.device if isinstance(images, torch.Tensor) else torch.device("cpu")


def batch_rows(images: Images, rows: slice | torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows of a tensor or numpy array / memmap as a float32 tensor on ``device``."""
    if isinstance(images, torch.Tensor):
        if isinstance(rows, torch.Tensor):
            rows = rows.to(images.device)
        out = images[rows]
    else:
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()
        out = images[rows]
        if not isinstance(out, torch.Tensor):  # array views (e.g. masked rows) may hand back device tensors
            out = torch.from_numpy(np.ascontiguousarray(out))
    return out.to(device=device, dtype=torch.float32)


def rotate(images: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """Rotate by R(+psi) about pixel box // 2: out(r) = images(R^T r), bilinear, zeros outside."""
    n, box = images.shape[0], images.shape[-1]
    t = torch.deg2rad(psi.to(device=images.device, dtype=torch.float32)).reshape(n, 1)
    c, s = torch.cos(t), torch.sin(t)
    # grid_sample coordinates (align_corners=False): pixel j sits at (2 j + 1) / box - 1, i.e. at
    # u_j + 1 / box with u_j = 2 (j - box // 2) / box; source (x, y) = R^T (x, y) about the centre
    u = 2.0 * (torch.arange(box, device=images.device, dtype=torch.float32) - box // 2) / box
    along_x = torch.stack([c * u + 1.0 / box, -s * u + 1.0 / box], dim=-1)  # (n, box, 2)
    along_y = torch.stack([s * u, c * u], dim=-1)
    grid = along_x[:, None, :, :] + along_y[:, :, None, :]  # (n, rows, cols, 2), one broadcast add
    out = F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0]


def polar_sampler(box: int, radii: torch.Tensor, n_theta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear gather of an rfft2 amplitude map (flattened) on a polar grid over angles [0, pi).

    Returns (index, weight), each (R * n_theta * 4,). Amplitudes of real images are centrosymmetric,
    |F(-k)| = |F(k)|, so a frequency with kx < 0 is read at -k inside the rfft2 half-plane.
    """
    dev = radii.device
    theta = torch.arange(n_theta, device=dev, dtype=torch.float32) * (math.pi / n_theta)
    kx = radii[:, None] * torch.cos(theta)[None]
    ky = radii[:, None] * torch.sin(theta)[None]
    x0, y0 = torch.floor(kx), torch.floor(ky)
    fx, fy = kx - x0, ky - y0
    corners = [(x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
               (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)]
    half = box // 2 + 1
    index, weight = [], []
    for cx, cy, w in corners:
        cx, cy = cx.long(), cy.long()
        neg = cx < 0
        cx, cy = torch.where(neg, -cx, cx), torch.where(neg, -cy, cy)
        index.append(torch.remainder(cy, box) * half + cx)
        weight.append(w)
    return torch.stack(index, dim=-1).reshape(-1), torch.stack(weight, dim=-1).reshape(-1)


def polar_amplitudes(
    images: torch.Tensor, mask: torch.Tensor, sampler: tuple[torch.Tensor, torch.Tensor], n_radii: int, n_theta: int,
    oversample: int = 1,
) -> torch.Tensor:
    """Fourier amplitudes |F| of the masked, zero-mean images on the polar grid: (N, R, n_theta).

    ``oversample`` > 1 zero-pads the images to oversample * box first (a finer Fourier grid, so
    the bilinear polar resampling is more accurate; the sampler must be built for that size).
    """
    x = images - images.mean(dim=(-2, -1), keepdim=True)
    size = oversample * images.shape[-1]
    amp = torch.fft.rfft2(x * mask, s=(size, size)).abs().reshape(len(images), -1)
    index, weight = sampler
    return (amp[:, index] * weight).reshape(len(images), n_radii, n_theta, 4).sum(dim=-1)


def max_shift_disc(
    box: int, max_shift: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices of the cross-correlation map within |t| <= max_shift, and their (tx, ty)."""
    t = torch.fft.fftfreq(box, 1.0 / box, device=device)  # 0, 1, ..., -1 (signed shifts)
    ty, tx = torch.meshgrid(t, t, indexing="ij")
    inside = (tx**2 + ty**2 <= max_shift**2 + 1e-6).reshape(-1)
    index = torch.nonzero(inside).reshape(-1)
    return index, tx.reshape(-1)[index], ty.reshape(-1)[index]


class AlignmentGrid:
    """Fixed per-box geometry of the alignment and neighbour search: mask, polar sampler of the
    Fourier amplitudes, and the disc of shifts searched."""

    def __init__(self, box: int, device: torch.device, psi_step: float, max_shift: float | None,
                 mask_radius: float | None = None, r_min: float = 2.0, r_max: float | None = None,
                 oversample: int = 1):
        self.box = box
        self.oversample = oversample
        self.mask = soft_circular_mask(box, mask_radius if mask_radius is not None else largest_mask_radius(box),
                                       device=device)
        r_max = r_max if r_max is not None else box / 4
        self.radii = torch.arange(r_min, r_max + 1e-6, 1.0, device=device, dtype=torch.float32)
        n = max(math.ceil(180.0 / psi_step), math.ceil(math.pi * r_max))
        self.n_theta = n + (n % 2)
        self.sampler = polar_sampler(oversample * box, oversample * self.radii, self.n_theta)
        self.max_shift = float(max_shift) if max_shift is not None else box / 4
        self.disc, self.disc_tx, self.disc_ty = max_shift_disc(box, self.max_shift, device)

    def spectrum(self, images: torch.Tensor) -> torch.Tensor:
        """Angular FFT (N, R, T // 2 + 1) of the ring-centred polar amplitudes, normalised per image."""
        p = polar_amplitudes(images, self.mask, self.sampler, len(self.radii), self.n_theta, self.oversample)
        p = p - p.mean(dim=-1, keepdim=True)
        p = p / p.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
        return torch.fft.rfft(p, dim=-1)

    def reference(self, refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked, zero-mean references' rfft2 and norms (the masks keep noise outside the particle out)."""
        a = refs - refs.mean(dim=(-2, -1), keepdim=True)
        a = a * self.mask
        a = a - a.mean(dim=(-2, -1), keepdim=True)
        return torch.fft.rfft2(a), a.flatten(1).norm(dim=1)


def crop_spectrum(f: torch.Tensor, m: int) -> torch.Tensor:
    """Frequencies |ky|, kx < m / 2 of rfft2 spectra (..., box, box // 2 + 1) as an m x m rfft2 layout."""
    box = f.shape[-2]
    if m == box:
        return f
    h = m // 2
    return torch.cat([f[..., :h, :h + 1], f[..., box - h:, :h + 1]], dim=-2)


def half_spectrum_norm(f: torch.Tensor) -> torch.Tensor:
    """Norm of the real image whose rfft2 (..., m, m // 2 + 1) is f (Parseval), DC excluded."""
    m = f.shape[-2]
    p = f.abs().square()
    total = 2 * p.sum(dim=(-2, -1)) - p[..., 0].sum(-1) - p[..., -1].sum(-1) - p[..., 0, 0]
    return total.clamp_min(0).sqrt() / m


def parseval_weights(m: int, device: torch.device) -> torch.Tensor:
    """Weights (m, m // 2 + 1) that make sum(w |F|^2) / m^2 the squared norm of a real image with
    rfft2 F, DC excluded (as ``half_spectrum_norm``)."""
    w = torch.full((m, m // 2 + 1), 2.0, device=device)
    w[:, 0] = 1.0
    w[:, -1] = 1.0
    w[0, 0] = 0.0
    return w
