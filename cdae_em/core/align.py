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

Polar sampling and the per-box geometry live in ``cdae_em.core.polar``; the neighbour search built on
this alignment in ``cdae_em.core.neighbours``.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from tqdm import tqdm

from cdae_em.core.polar import AlignmentGrid, Images, batch_rows, device_of, max_shift_disc, rotate
from cdae_em.core.preprocess import largest_mask_radius, radial_mean_square, translate

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Peaks of correlation maps and profiles
# ----------------------------------------------------------------------------------------------
def _peak_neighbourhood(maps: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Values (B, 5) of periodic maps (B, box, box) at flat peak indices: centre, x-1, x+1, y-1, y+1."""
    box = maps.shape[-1]
    iy, ix = flat // box, flat % box
    idx = torch.stack([flat, iy * box + (ix - 1) % box, iy * box + (ix + 1) % box,
                       ((iy - 1) % box) * box + ix, ((iy + 1) % box) * box + ix], dim=1)
    return maps.reshape(len(maps), -1).gather(1, idx)


def _subpixel(values: torch.Tensor, flat: torch.Tensor, box: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed (tx, ty) of CC peaks at flat indices of periodic (box, box) maps, refined by a 1D
    parabola through the peak and its two neighbours along each axis (``_peak_neighbourhood``
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


def _circular_parabola(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
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
        out.append((i.float() + _circular_parabola(cc, i)) * (180.0 / n_theta))
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
        norm = (ref_norm * _half_spectrum_norm(gf)).clamp_min(1e-12)
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
            best_values = torch.where(better[:, None], _peak_neighbourhood(maps, flat), best_values)
    tx, ty = _subpixel(best_values, best_flat, box)
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


def _crop_spectrum(f: torch.Tensor, m: int) -> torch.Tensor:
    """Frequencies |ky|, kx < m / 2 of rfft2 spectra (..., box, box // 2 + 1) as an m x m rfft2 layout."""
    box = f.shape[-2]
    if m == box:
        return f
    h = m // 2
    return torch.cat([f[..., :h, :h + 1], f[..., box - h:, :h + 1]], dim=-2)


def _half_spectrum_norm(f: torch.Tensor) -> torch.Tensor:
    """Norm of the real image whose rfft2 (..., m, m // 2 + 1) is f (Parseval), DC excluded."""
    m = f.shape[-2]
    p = f.abs().square()
    total = 2 * p.sum(dim=(-2, -1)) - p[..., 0].sum(-1) - p[..., -1].sum(-1) - p[..., 0, 0]
    return total.clamp_min(0).sqrt() / m


def _parseval_weights(m: int, device: torch.device) -> torch.Tensor:
    """Weights (m, m // 2 + 1) that make sum(w |F|^2) / m^2 the squared norm of a real image with
    rfft2 F, DC excluded (as ``_half_spectrum_norm``)."""
    w = torch.full((m, m // 2 + 1), 2.0, device=device)
    w[:, 0] = 1.0
    w[:, -1] = 1.0
    w[0, 0] = 0.0
    return w


class Shortlist(NamedTuple):
    """A cheaper search that picks, per image, the ``count`` references worth the full search: each
    reference's best CC over psi on a ``psi_step`` grid and shifts, at frequencies below ``band``."""

    count: int
    band: float
    psi_step: float


class _BandSearch:
    """The K references rotated by -psi on a grid over [0, 180) (psi + 180 reuses them: a 180 degree
    rotation turns the correlation into a convolution), masked after rotation, and their spectra
    cropped to the frequencies below ``band``: the FFT search of images against them."""

    def __init__(self, refs: torch.Tensor, grid: AlignmentGrid, psi_step: float, band: float | None,
                 ctf_aware: bool, keep_full: bool = True):
        dev, box, k = refs.device, grid.box, len(refs)
        self.m = box if band is None or band >= 0.5 else max(2, 2 * int(round(band * box)))
        self.factor = box / self.m  # pixels of the box per pixel of the band's CC maps
        self.disc, self.tx, self.ty = max_shift_disc(self.m, grid.max_shift / self.factor, dev)
        self.n_half = max(1, round(180.0 / psi_step))
        self.step = 180.0 / self.n_half
        psis = torch.arange(self.n_half, device=dev, dtype=torch.float32) * self.step
        # rows (ref, p): reference ref rotated by -psi_p, so that image ~ rotated ref shifted by -o
        rotated = rotate(refs.repeat_interleave(self.n_half, dim=0), -psis.repeat(k))
        full, self.full_norm = grid.reference(rotated)  # mask after rotation: same support for all psi
        del rotated
        self.full = full if keep_full else None
        self.band = _crop_spectrum(full, self.m)
        self.band_norm = _half_spectrum_norm(self.band).clamp_min(1e-12)
        # with the CTF, per image and row ||CTF| r_row| = sqrt(sum_f w_f |CTF_f|^2 |R_f|^2) / m
        self.power = (self.band.abs().square() * _parseval_weights(self.m, dev)).flatten(1) if ctf_aware else None

    def search(self, xf: torch.Tensor, amp: torch.Tensor | None, rows: torch.Tensor | None,
               memory_mb: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Best normalised CC over the shift disc, and where in the disc, of images (zero-mean rfft2
        ``xf``, B) against every row (``rows`` None) or against each image's own rows ((B, R)
        indices): (B, 2, R) each, [:, 0] at psi, [:, 1] at psi + 180. ``amp``: the images' |CTF|."""
        b, m = len(xf), self.m
        xc = _crop_spectrum(xf, m)
        xc_norm = _half_spectrum_norm(xc).clamp_min(1e-12)
        if amp is not None:  # <x, |CTF| r> = <|CTF| x, r>
            amp_sq = _crop_spectrum(amp, m).square().flatten(1)
            xc = xc * _crop_spectrum(amp, m)
        n_rows = len(self.band) if rows is None else rows.shape[1]
        per_row = m * (m // 2 + 1) * 8 * (2 if rows is None else 3) + m * m * 4 * 2 + len(self.disc) * 4
        chunk = max(1, int(memory_mb * 2**20 // (per_row * max(1, b))))
        scores = torch.empty((b, 2, n_rows), device=xf.device)
        where = torch.empty((b, 2, n_rows), dtype=torch.long, device=xf.device)
        for c0 in range(0, n_rows, chunk):
            c1 = min(c0 + chunk, n_rows)
            if rows is None:
                rf = self.band[None, c0:c1]
                if amp is None:
                    ref_norm = self.band_norm[None, c0:c1]
                else:
                    ref_norm = (amp_sq @ self.power[c0:c1].T).clamp_min(1e-24).sqrt() / m
            else:
                picked = rows[:, c0:c1]
                rf = self.band[picked]
                if amp is None:
                    ref_norm = self.band_norm[picked]
                else:
                    ref_norm = (self.power[picked] * amp_sq[:, None]).sum(-1).clamp_min(1e-24).sqrt() / m
            norm = xc_norm[:, None] * ref_norm
            # flip 0: cc(t) = sum_u ref_rot(u) x(u + t); flip 1 (psi + 180): ref_rot(-u), a convolution
            for f, product in enumerate((rf.conj() * xc[:, None], rf * xc[:, None])):
                maps = torch.fft.irfft2(product).flatten(2)[:, :, self.disc]
                peak, w = maps.max(dim=2)
                scores[:, f, c0:c1] = peak / norm
                where[:, f, c0:c1] = w
        return scores, where


def align_to_references(
    images: Images,
    references: torch.Tensor,
    psi_step: float = 5.0,
    max_shift: float | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    memory_mb: float = 256.0,
    progress: bool = False,
    mask_radius: float | None = None,
    band: float | None = 0.25,
    ctf: Images | None = None,
    rescore: int = 1,
    shortlist: Shortlist | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alignment of every image against K references: (class index, psi, origin, score).

    For every reference and psi on a psi_step grid over [0, 360) and every shift |t| <= max_shift
    (default box / 4) the normalised cross-correlation of the image with the masked reference
    rotated by -psi is computed by FFT; the best (reference, psi, shift) wins. This search uses
    only frequencies below ``band`` cycles/pixel (default 0.25, where the signal is at low SNR;
    None: all): the CC maps are then computed at box * 2 * band points, 4x cheaper at 0.25, with
    shifts on a 2 px grid. The ``rescore`` references that match best there (each at its best psi;
    1: the band's winner alone) are then compared at full resolution, where the best score wins:
    the shift from the full-resolution CC map within that grid step of the coarse peak (sub-pixel
    by a parabola), psi refined by a parabola through the neighbouring psi scores (the psi grid is
    180 / round(180 / psi_step) degrees). Views that differ only in fine detail are told apart there.
    The K * n_psi / 2 rotated references' FFTs are computed once. CC maps are computed in chunks of
    at most ``memory_mb``. The references are masked after rotation (radius ``mask_radius``,
    default estimated from the references with ``estimate_particle_radius``). ``images`` may be a
    numpy memmap; it is read ``batch_size`` rows at a time. The score is the full-resolution
    normalised CC. Returns tensors on the compute device.

    ``shortlist``: the search above runs only over the ``shortlist.count`` references that match
    each image best in a cheaper search (coarser psi grid, lower band), so that its cost grows
    with the shortlist, not with K; the cheaper search still meets all K references.

    ``ctf`` (rows as ``images``; (N, box, box // 2 + 1) on the rfft2 grid) makes the search
    CTF-aware for phase-flipped images x = |CTF| * projection + noise: each image is compared with
    the references multiplied by its own |CTF|, score = <x, |CTF| r> / (|x| ||CTF| r|), the
    least-squares match (computed as the image weighted by |CTF| against r).
    Without it, frequencies where the CTF is near zero (pure noise) count as much as the others.
    """
    dev = device_of(images, device)
    n, box = images.shape[0], images.shape[-1]
    refs = torch.as_tensor(references).to(device=dev, dtype=torch.float32)
    k = refs.shape[0]
    if mask_radius is None:
        mask_radius = estimate_particle_radius(refs)
    grid = AlignmentGrid(box, dev, psi_step, max_shift, mask_radius)
    search = _BandSearch(refs, grid, psi_step, band, ctf is not None)
    pre = (_BandSearch(refs, grid, shortlist.psi_step, shortlist.band, ctf is not None, keep_full=False)
           if shortlist is not None and shortlist.count < k else None)
    n_half, step, factor = search.n_half, search.step, search.factor
    if ctf is not None:
        full_weights = _parseval_weights(box, dev)
    out_ref, out_psi, out_origin, out_score = [], [], [], []
    for start in tqdm(range(0, n, batch_size), desc="align", unit="batch", leave=False, disable=not progress):
        x = batch_rows(images, slice(start, min(start + batch_size, n)), dev)
        b = len(x)
        bi = torch.arange(b, device=dev)
        xf = torch.fft.rfft2(x)
        xf[:, 0, 0] = 0  # zero mean
        xnorm = _half_spectrum_norm(xf).clamp_min(1e-12)
        amp = batch_rows(ctf, slice(start, start + b), dev) if ctf is not None else None
        if pre is None:  # candidates: every reference
            candidates, rows = torch.arange(k, device=dev).expand(b, k), None
        else:
            pre_scores, _ = pre.search(xf, amp, None, memory_mb)
            per_ref = pre_scores.reshape(b, 2, k, pre.n_half).amax(dim=(1, 3))
            candidates = per_ref.topk(shortlist.count, dim=1).indices  # (b, count)
            rows = (candidates[..., None] * n_half + torch.arange(n_half, device=dev)).reshape(b, -1)
        scores, where = search.search(xf, amp, rows, memory_mb)
        if amp is not None:
            xf = xf * amp
        n_cand = candidates.shape[1]
        # scores over a full psi circle per candidate: (b, n_cand, 2 * n_half)
        circle = scores.reshape(b, 2, n_cand, n_half).permute(0, 2, 1, 3).reshape(b, n_cand, 2 * n_half)
        # each candidate at its best band pose; the ``rescore`` best of them are compared with
        # the image at full resolution (their CC maps searched within one band step of the band's
        # peak) and the best full-resolution score wins
        pose = circle.argmax(dim=2)  # (b, n_cand)
        ranked = circle.gather(2, pose[..., None])[..., 0].topk(min(rescore, n_cand), dim=1).indices
        best = (torch.full((b,), -torch.inf, device=dev), torch.zeros(b, dtype=torch.long, device=dev),
                torch.zeros(b, device=dev), torch.zeros((b, 2), device=dev))
        for local in ranked.T:
            ref_idx = candidates[bi, local]
            p = pose[bi, local]
            flip, half_idx = p // n_half, p % n_half
            row = ref_idx * n_half + half_idx
            psi = (p.float() + _circular_parabola(circle[bi, local], p)) * step
            rf = search.full[row]
            product = torch.where(flip[:, None, None] == 1, rf * xf, rf.conj() * xf)
            maps = torch.fft.irfft2(product)
            w = where[bi, flip, local * n_half + half_idx]
            near = ((grid.disc_tx[None] - factor * search.tx[w][:, None]) ** 2
                    + (grid.disc_ty[None] - factor * search.ty[w][:, None]) ** 2) <= factor**2 + 1e-6
            values = torch.where(near, maps.flatten(1)[:, grid.disc], torch.full_like(near, -torch.inf, dtype=maps.dtype))
            peak, j = values.max(dim=1)
            flat = grid.disc[j]
            tx, ty = _subpixel(_peak_neighbourhood(maps, flat), flat, box)
            if amp is None:
                ref_norm = search.full_norm[row]
            else:
                ref_norm = (amp.square() * full_weights * rf.abs().square()).sum(dim=(-2, -1)).sqrt() / box
            score = peak / (xnorm * ref_norm.clamp_min(1e-12))
            better = score > best[0]
            best = (torch.where(better, score, best[0]), torch.where(better, ref_idx, best[1]),
                    torch.where(better, torch.remainder(psi, 360.0), best[2]),
                    torch.where(better[:, None], -torch.stack([tx, ty], dim=1), best[3]))
        out_score.append(best[0])
        out_ref.append(best[1])
        out_psi.append(best[2])
        out_origin.append(best[3])
    if n == 0:
        z = torch.zeros(0, device=dev)
        return torch.zeros(0, dtype=torch.long, device=dev), z, torch.zeros((0, 2), device=dev), z
    return torch.cat(out_ref), torch.cat(out_psi), torch.cat(out_origin), torch.cat(out_score)


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
