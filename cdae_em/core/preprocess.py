"""Image preprocessing on batches (torch tensors, CPU or GPU): Fourier resizing, shifts, soft
circular masks (the particle mask and its defaults), histogram equalisation.

CTF phase flipping lives in ``cdae_em.core.ctf``. All functions take and return float32 tensors of shape
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


#: width (pixels) of the raised-cosine edge of soft masks
MASK_EDGE = 3.0
#: the particle mask's default diameter, as a fraction of the box (``--mask-diameter`` not given)
PARTICLE_MASK_FRACTION = 0.9
#: the particle mask's edge (pixels), inside its diameter
PARTICLE_MASK_EDGE = 4.0


def rfft_weights(box: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """How many full-grid frequencies each rfft2 column of a ``box`` image stands for (1 or 2): sums
    over the rfft2 grid weighted by it are sums over the whole spectrum."""
    w = torch.full((box // 2 + 1,), 2.0, device=device)
    w[0] = 1.0
    if box % 2 == 0:
        w[-1] = 1.0
    return w


def radial_mean_square(batches, box: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, int]:
    """Over the image batches (tensors of ``box`` px), the mean of each image's squared deviation
    from its own mean per 1 px radial bin (radius rounded, clamped to box // 2): (profile, pixels
    per bin, images). Noise adds the same to every bin, the particles only where they are: the
    radial variance profile the particle-size estimates read."""
    n_bins = box // 2 + 1
    r = torch.round(radius_grid(box, device)).long().clamp(max=box // 2).reshape(-1)
    counts = torch.bincount(r, minlength=n_bins).double()
    sums = torch.zeros(n_bins, dtype=torch.float64, device=device)
    n = 0
    for x in batches:
        x = x - x.mean(dim=(-2, -1), keepdim=True)
        sums += torch.bincount(r, weights=(x.double() ** 2).sum(0).reshape(-1), minlength=n_bins)
        n += len(x)
    return sums / (counts * max(n, 1)), counts, n


def largest_mask_radius(box: int, width: float = MASK_EDGE) -> float:
    """The largest radius (pixels) of a soft mask whose edge of ``width`` still fits in the box."""
    return box / 2 - width


def soft_circular_mask(
    box: int, radius: float | None = None, width: float = MASK_EDGE, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A (box, box) mask: 1 inside ``radius``, a raised-cosine edge ``width`` pixels wide, then 0.

    The default radius is the largest whose edge fits in the box (``largest_mask_radius``).
    """
    if radius is None:
        radius = largest_mask_radius(box, width)
    r = radius_grid(box, device)
    edge = 0.5 * (1.0 + torch.cos(math.pi * (r - radius) / max(width, 1e-6)))
    return torch.where(r <= radius, torch.ones_like(r), torch.where(r < radius + width, edge, torch.zeros_like(r)))


def default_mask_diameter(box: float) -> float:
    """The particle mask's diameter (in the unit of ``box``) when none is given."""
    return PARTICLE_MASK_FRACTION * box


def particle_mask(box: int, diameter: float | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The soft mask around the particle used for histogram equalisation and classification:
    ``diameter`` pixels (default ``default_mask_diameter``), its edge inside that diameter."""
    if diameter is None:
        diameter = default_mask_diameter(box)
    return soft_circular_mask(box, radius=diameter / 2 - PARTICLE_MASK_EDGE / 2, width=PARTICLE_MASK_EDGE,
                              device=device)


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
