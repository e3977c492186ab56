"""Image preprocessing on batches (torch tensors, CPU or GPU): normalisation, Fourier resizing,
soft circular masks.

CTF phase flipping lives in ``cdae_em.ctf``. All functions take and return float32 tensors of shape
(N, box, box) and never modify their input.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def radius_grid(box: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Distance of each pixel from the box centre (pixel box // 2, RELION's convention)."""
    c = torch.arange(box, device=device, dtype=torch.float32) - box // 2
    return torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)


def soft_circular_mask(
    box: int, radius: float | None = None, width: float = 3.0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A (box, box) mask: 1 inside ``radius``, a raised-cosine edge ``width`` pixels wide, then 0.

    The default radius leaves room for the edge inside the box: box / 2 - width.
    """
    if radius is None:
        radius = box / 2 - width
    r = radius_grid(box, device)
    edge = 0.5 * (1.0 + torch.cos(math.pi * (r - radius) / max(width, 1e-6)))
    return torch.where(r <= radius, torch.ones_like(r), torch.where(r < radius + width, edge, torch.zeros_like(r)))


def background_mask(box: int, radius: float | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (box, box) mask of the background: pixels outside ``radius``.

    The default is RELION's ``--bg_radius`` default, 75% of half the box.
    """
    if radius is None:
        radius = 0.75 * box / 2
    return radius_grid(box, device) > radius


def normalise(images: torch.Tensor, bg_radius: float | None = None, eps: float = 1e-8) -> torch.Tensor:
    """RELION-style normalisation: zero mean and unit standard deviation of the background.

    The background is the area outside ``bg_radius`` pixels (default 75% of half the box), where a
    centred particle has no signal, so noise levels become comparable between micrographs. Like
    relion_preprocess --norm (image.cpp, normalise) but without its background plane (ramp) fit.
    """
    bg = background_mask(images.shape[-1], bg_radius, images.device)
    values = images[:, bg]
    mean = values.mean(dim=1)
    std = values.std(dim=1, correction=0).clamp_min(eps)
    return (images - mean[:, None, None]) / std[:, None, None]


def fourier_resize(images: torch.Tensor, new_box: int) -> torch.Tensor:
    """Crop (downsample) or pad (upsample) images in Fourier space to ``new_box`` pixels.

    The pixel size changes by box / new_box; the mean value of each image is kept. Cropping is the
    right low-pass for binning particles before denoising (no aliasing).
    """
    box = images.shape[-1]
    if new_box == box:
        return images.clone()
    f = torch.fft.fftshift(torch.fft.fft2(images, norm="forward"), dim=(-2, -1))
    out = torch.zeros(images.shape[:-2] + (new_box, new_box), dtype=f.dtype, device=f.device)
    m = min(box, new_box)
    src = slice(box // 2 - m // 2, box // 2 - m // 2 + m)
    dst = slice(new_box // 2 - m // 2, new_box // 2 - m // 2 + m)
    out[..., dst, dst] = f[..., src, src]
    out = torch.fft.ifftshift(out, dim=(-2, -1))
    return torch.fft.ifft2(out, norm="forward").real.to(images.dtype)


def translate(images: torch.Tensor, shifts: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Shift images by (dx, dy) pixels (sub-pixel, periodic) with a Fourier phase ramp.

    ``shifts`` is (N, 2): positive dx moves content towards larger x (the last array axis).
    """
    box = images.shape[-1]
    shifts = torch.as_tensor(shifts, dtype=torch.float64, device=images.device).reshape(-1, 2)
    fy = torch.fft.fftfreq(box, device=images.device, dtype=torch.float64)
    fx = torch.fft.rfftfreq(box, device=images.device, dtype=torch.float64)
    phase = -2.0 * math.pi * (fx[None, None, :] * shifts[:, 0, None, None] + fy[None, :, None] * shifts[:, 1, None, None])
    ramp = torch.polar(torch.ones_like(phase), phase).to(torch.complex64)
    return torch.fft.irfft2(torch.fft.rfft2(images) * ramp, s=(box, box))


def equalise_histogram(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation inside a particle mask (CDAE's enhancement step, Algorithm 1 line 8).

    Each pixel becomes the fraction of the image's pixels *inside the mask* (weight > 0.5) that are
    <= its value, so the masked histogram is flat on [0, 1]; it is then centred (minus 0.5) and
    multiplied by the (soft) mask: values in [-0.5, 0.5], zero on average inside the mask and zero
    outside it, so that the mask's edge does not become the strongest feature of every image.
    """
    inside = mask > 0.5
    values = images[:, inside]
    ordered, _ = torch.sort(values, dim=1)
    flat = images.reshape(len(images), -1).contiguous()
    ranks = torch.searchsorted(ordered.contiguous(), flat, right=True).to(images.dtype)
    cdf = (ranks / ordered.shape[1]).reshape(images.shape)
    return (cdf - 0.5) * mask
