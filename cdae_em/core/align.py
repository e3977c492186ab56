"""2D alignment of particle images (in-plane rotation + shift) in RELION's convention: what CDAE
fine-tuning (Lei & Yang 2021) needs to align each particle's neighbours onto it before averaging
(see ``cdae_em.core.neighbours``) and what 2D classification needs to align particles to class averages.

Convention (RELION, ``rlnAnglePsi`` psi in degrees, origin o = (rlnOriginX, rlnOriginY) in pixels):
the aligned image is the raw image translated by +o, then rotated by R(+psi), R = [[c, -s], [s, c]]
acting on (x, y) = (column - box // 2, row - box // 2)::

    aligned(r) = raw(R^T r - o)

Applying a particle's (psi, o) brings it into its reference's orientation. A projection made with
``euler_to_matrix(0, 0, psi)`` and then ``translate``-d by s is brought back to the psi = 0, unshifted
projection by (psi, o = -s), as in ``cdae_em.simulate.simulator``.

All functions take float32 tensors (N, box, box) indexed [y, x] on any device (or, where stated, a
numpy array / memmap, read in batches) and never modify their input.

Polar sampling, the per-box geometry and spectral helpers live in ``cdae_em.core.polar``; the
alignment of many images to K references (2D classification's rounds) in ``cdae_em.core.multiref``;
the neighbour search built on this alignment in ``cdae_em.core.neighbours``.
"""

from __future__ import annotations

import logging
import torch

from cdae_em.core.polar import AlignmentGrid, Images, batch_rows, device_of, half_spectrum_norm, rotate
from cdae_em.core.preprocess import largest_mask_radius, radial_mean_square, translate

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Peaks of correlation maps and profiles
# ----------------------------------------------------------------------------------------------
def peak_neighbourhood(maps: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Values (B, 5) of periodic maps (B, box, box) at flat peak indices: centre, x-1, x+1, y-1, y+1."""
    box = maps.shape[-1]
    iy, ix = flat // box, flat % box
    idx = torch.stack([flat, iy * box + (ix - 1) % box, iy * box + (ix + 1) % box,
                       ((iy - 1) % box) * box + ix, ((iy + 1) % box) * box + ix], dim=1)
    return maps.reshape(len(maps), -1).gather(1, idx)


def subpixel_peak(values: torch.Tensor, flat: torch.Tensor, box: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed (tx, ty) of CC peaks at flat indices of periodic (box, box) maps, refined by a 1D
    parabola through the peak and its two neighbours along each axis (``peak_neighbourhood``
    values; offsets clamped to +-0.5)."""
    iy, ix = flat // box, flat % box

    def offset(m: torch.Tensor, c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        den = m - 2 * c + p
        off = torch.where(den < 0, 0.5 * (m - p) / den.clamp(max=-1e-12), torch.zeros_like(c))
        return off.clamp(-0.5, 0.5)

    c = values[:, 0]
    dx = offset(values[:, 1], c, values[:, 2])
    dy = offset(values[:, 3], c, values[:, 4])
    tx = torch.where(ix >= box // 2, ix - box, ix).float() + dx
    ty = torch.where(iy >= box // 2, iy - box, iy).float() + dy
    return tx, ty


def circular_parabola(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Sub-sample offset (-0.5 .. 0.5) of peaks ``index`` of circular 1D profiles (B, T)."""
    n = values.shape[-1]
    c = values.gather(-1, index[:, None])[:, 0]
    m = values.gather(-1, ((index - 1) % n)[:, None])[:, 0]
    p = values.gather(-1, ((index + 1) % n)[:, None])[:, 0]
    den = m - 2 * c + p
    ok = torch.isfinite(den) & (den < 0)
    off = torch.where(ok, 0.5 * (m - p) / torch.where(ok, den, -torch.ones_like(den)), torch.zeros_like(c))
    return off.clamp(-0.5, 0.5)


def shift_in_raw_frame(t: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """Origin o = R(psi)^T t for a shift t found after rotating by psi (aligned(r) = rot(r - t))."""
    a = torch.deg2rad(psi)
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([c * t[:, 0] + s * t[:, 1], -s * t[:, 0] + c * t[:, 1]], dim=1)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def apply_alignment(images: torch.Tensor, psi: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Aligned images in RELION's convention: translate by +origin, then rotate by R(+psi).

    aligned(r) = raw(R^T r - o). images (N, box, box), psi (N,) degrees, origin (N, 2) pixels
    (ox, oy). The shift is a Fourier phase ramp (exact, periodic); the rotation is bilinear
    (``grid_sample``, zeros outside the box), which slightly low-passes the image.
    """
    n = images.shape[0]
    dev = images.device
    psi = torch.as_tensor(psi, dtype=torch.float32, device=dev).reshape(-1).expand(n)
    origin = torch.as_tensor(origin, dtype=torch.float32, device=dev).reshape(-1, 2).expand(n, 2)
    shifted = translate(images, origin) if n and bool(origin.abs().max() > 0) else images
    return rotate(shifted, psi)


def _rotation_candidates(
    img_spec: torch.Tensor, ref_spec: torch.Tensor, n_theta: int, n_candidates: int
) -> torch.Tensor:
    """Best ``n_candidates`` angles in [0, 180) (degrees, (B, n)) rotating the image's amplitudes
    onto the reference's: peaks of the circular cross-correlation over angle, summed over rings."""
    cc = torch.fft.irfft((ref_spec * img_spec.conj()).sum(dim=1), n=n_theta, dim=-1)  # (B, T)
    peak = (cc >= torch.roll(cc, 1, -1)) & (cc >= torch.roll(cc, -1, -1))
    ranked = torch.where(peak, cc, torch.full_like(cc, -torch.inf))
    n_candidates = min(n_candidates, n_theta)
    _, idx = torch.topk(ranked, n_candidates, dim=-1)
    out = []
    for c in range(n_candidates):
        i = idx[:, c]
        out.append((i.float() + circular_parabola(cc, i)) * (180.0 / n_theta))
    return torch.stack(out, dim=1)


def align_prepared(
    images: torch.Tensor, ref_fft: torch.Tensor, ref_norm: torch.Tensor, img_spec: torch.Tensor,
    ref_spec: torch.Tensor, grid: AlignmentGrid, n_candidates: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align images (B) onto prepared references (B): rotation candidates from Fourier amplitudes,
    each tried at psi and psi + 180 with an FFT shift search; keeps the best normalised CC."""
    b, box = images.shape[0], grid.box
    angles = _rotation_candidates(img_spec, ref_spec, grid.n_theta, n_candidates)
    dev = images.device
    best_score = torch.full((b,), -torch.inf, device=dev)
    best_psi = torch.zeros(b, device=dev)
    best_values = torch.zeros((b, 5), device=dev)
    best_flat = torch.zeros(b, dtype=torch.long, device=dev)
    for c in range(angles.shape[1]):
        g = rotate(images, angles[:, c])
        gf = torch.fft.rfft2(g)
        gf[:, 0, 0] = 0  # zero mean
        norm = (ref_norm * half_spectrum_norm(gf)).clamp_min(1e-12)
        # psi: cc(t) = sum_r ref(r) g(r - t); psi + 180 rotates g to g(-r), which makes it a convolution
        for flip, product in ((0.0, ref_fft * gf.conj()), (180.0, ref_fft * gf)):
            maps = torch.fft.irfft2(product)
            peak, k = maps.flatten(1)[:, grid.disc].max(dim=1)
            score = peak / norm
            flat = grid.disc[k]
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best_psi = torch.where(better, angles[:, c] + flip, best_psi)
            best_flat = torch.where(better, flat, best_flat)
            best_values = torch.where(better[:, None], peak_neighbourhood(maps, flat), best_values)
    tx, ty = subpixel_peak(best_values, best_flat, box)
    psi = torch.remainder(best_psi, 360.0)
    origin = shift_in_raw_frame(torch.stack([tx, ty], dim=1), psi)
    return psi, origin, best_score


def align_pairs(
    images: torch.Tensor,
    references: torch.Tensor,
    psi_step: float = 5.0,
    max_shift: float | None = None,
    n_candidates: int = 2,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    mask_radius: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align each image onto its own reference: (B, box, box) x (B, box, box) -> (psi, origin, score).

    apply_alignment(images, psi, origin) then best matches the references. Method: the rotation is
    estimated from Fourier amplitudes (shift invariant) resampled on polar rings 2 .. box/4 and
    circularly cross-correlated over angle by FFT (angular sampling <= psi_step, refined by a
    parabola); the ``n_candidates`` best peaks are each tried at psi and psi + 180 (amplitudes
    cannot tell them apart), the image rotated and the shift found by FFT cross-correlation with the
    masked reference within |t| <= max_shift (default box / 4), sub-pixel by a parabola. The score
    is the normalised cross-correlation (zero-mean masked reference, zero-mean rotated image over
    the box). The soft mask (radius ``mask_radius``, default ``largest_mask_radius(box)``) applies to the reference
    and to both amplitude spectra; pass the particle radius (``estimate_particle_radius``) at low
    SNR. Returns tensors on the compute device (default images.device).
    """
    dev = device_of(images, device)
    n, box = images.shape[0], images.shape[-1]
    grid = AlignmentGrid(box, dev, psi_step, max_shift, mask_radius)
    out = ([], [], [])
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        x, r = batch_rows(images, rows, dev), batch_rows(references, rows, dev)
        ref_fft, ref_norm = grid.reference(r)
        res = align_prepared(x, ref_fft, ref_norm, grid.spectrum(x), grid.spectrum(r), grid, n_candidates)
        for lst, v in zip(out, res):
            lst.append(v)
    if n == 0:
        return torch.zeros(0, device=dev), torch.zeros((0, 2), device=dev), torch.zeros(0, device=dev)
    return tuple(torch.cat(v) for v in out)  # type: ignore[return-value]


def estimate_particle_radius(images: Images, max_images: int = 1000, threshold: float = 0.05,
                             margin: float = 2.0, device: torch.device | str | None = None) -> float:
    """Radius (pixels) of the disc holding the particles' signal, estimated from the data.

    White noise adds the same variance at every radius while the particles add variance only where
    they are, so the mean over (up to ``max_images`` evenly spaced) images of x^2 per 1 px radial
    bin, less its median over the outer ring (r > 0.8 * box / 2), is the particles' radial
    variance profile (shifts included). Going outwards from its peak, the radius is where it first
    drops below both ``threshold`` of the peak and 4 standard errors of a noise-only bin, plus
    ``margin``, clamped to [box / 8, ``largest_mask_radius(box)``]. Used as the default mask:
    masking to the particle is what makes features and correlations usable at low SNR (see
    docs/notes.md). Particles filling the box (no noise-only outer ring) give the maximum.
    """
    dev = device_of(images, device)
    n, box = images.shape[0], images.shape[-1]
    rows = torch.linspace(0, n - 1, min(n, max_images)).round().long().unique()
    batches = (batch_rows(images, rows[start:start + 256], dev) for start in range(0, len(rows), 256))
    profile, counts, _ = radial_mean_square(batches, box, dev)
    outer = int(0.8 * box / 2)
    floor = profile[outer:box // 2].median()
    excess = profile - floor
    # x^2 of Gaussian noise has variance 2 sigma^4: standard error of a bin's mean
    noise_se = floor.clamp_min(0) * torch.sqrt(2.0 / (counts * max(len(rows), 1)))
    limit = torch.maximum(threshold * excess.max(), 4.0 * noise_se)
    peak = int(excess.argmax())
    below = torch.nonzero(excess[peak:] < limit[peak:]).reshape(-1)
    radius = float(peak + int(below[0])) + margin if len(below) else largest_mask_radius(box)
    return float(min(max(radius, box / 8), largest_mask_radius(box)))
