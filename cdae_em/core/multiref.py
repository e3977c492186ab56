"""Multi-reference alignment: every image against K references (2D classification's rounds), the
best reference, psi and origin of each, in RELION's convention (``cdae_em.core.align``). The search
is by FFT cross-correlation over a psi grid, within a frequency band, each match scored by
normalised CC or by least-squares distance (``criterion``); with a ``Shortlist`` each
image is searched in full only against the references that match it best in a cheaper search over
all K, so that a round's cost grows slowly with K (docs/scale.md)."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from tqdm import tqdm

from cdae_em.core.align import circular_parabola, estimate_particle_radius, peak_neighbourhood, subpixel_peak
from cdae_em.core.polar import (AlignmentGrid, Images, batch_rows, crop_spectrum, device_of, half_spectrum_norm,
                                max_shift_disc, parseval_weights, rotate)

log = logging.getLogger(__name__)


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
        self.band = crop_spectrum(full, self.m)
        self.band_norm = half_spectrum_norm(self.band).clamp_min(1e-12)
        # with the CTF, per image and row ||CTF| r_row| = sqrt(sum_f w_f |CTF_f|^2 |R_f|^2) / m
        self.power = (self.band.abs().square() * parseval_weights(self.m, dev)).flatten(1) if ctf_aware else None

    def search(self, xf: torch.Tensor, amp: torch.Tensor | None, rows: torch.Tensor | None,
               memory_mb: float, criterion: str = "correlation") -> tuple[torch.Tensor, torch.Tensor]:
        """Best score over the shift disc, and where in the disc, of images (zero-mean rfft2
        ``xf``, B) against every row (``rows`` None) or against each image's own rows ((B, R)
        indices): (B, 2, R) each, [:, 0] at psi, [:, 1] at psi + 180. ``amp``: the images' |CTF|.
        The score is the normalised CC, or with ``criterion`` "distance" 2 <x, r> - ||r||^2 (the
        squared distance between image and reference, less ||x||^2, negated; see ``_score``)."""
        b, m = len(xf), self.m
        xc = crop_spectrum(xf, m)
        xc_norm = half_spectrum_norm(xc).clamp_min(1e-12)
        if amp is not None:  # <x, |CTF| r> = <|CTF| x, r>
            amp_sq = crop_spectrum(amp, m).square().flatten(1)
            xc = xc * crop_spectrum(amp, m)
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
            # flip 0: cc(t) = sum_u ref_rot(u) x(u + t); flip 1 (psi + 180): ref_rot(-u), a convolution
            for f, product in enumerate((rf.conj() * xc[:, None], rf * xc[:, None])):
                maps = torch.fft.irfft2(product).flatten(2)[:, :, self.disc]
                peak, w = maps.max(dim=2)
                scores[:, f, c0:c1] = _score(peak, xc_norm[:, None], ref_norm, criterion)
                where[:, f, c0:c1] = w
        return scores, where


def _score(peak: torch.Tensor, x_norm: torch.Tensor, ref_norm: torch.Tensor, criterion: str) -> torch.Tensor:
    """The match of images with references from their CC peak <x, r> and norms: the normalised CC
    ("correlation"), or 2 <x, r> - ||r||^2 ("distance": -||x - r||^2 up to the image's own ||x||^2,
    so the nearest reference in least squares scores highest, as in k-means and RELION's likelihood).
    The distance leaves the scale of the match fixed: an image that holds only part of a
    reference's signal (a fragment, an empty box) is nearer a weak average than a strong one."""
    if criterion == "distance":
        return 2 * peak - ref_norm.square()
    return peak / (x_norm * ref_norm.clamp_min(1e-12))


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
    criterion: str = "correlation",
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

    ``criterion``: what picks the reference, psi and shift: the normalised CC ("correlation") or
    the least-squares distance to the reference ("distance", see ``_score``; with the CTF, to the
    reference multiplied by the image's |CTF|). The returned score is the normalised CC either way.
    """
    if criterion not in ("correlation", "distance"):
        raise ValueError(f"unknown criterion {criterion!r}")
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
        full_weights = parseval_weights(box, dev)
    out_ref, out_psi, out_origin, out_score = [], [], [], []
    for start in tqdm(range(0, n, batch_size), desc="align", unit="batch", leave=False, disable=not progress):
        x = batch_rows(images, slice(start, min(start + batch_size, n)), dev)
        b = len(x)
        bi = torch.arange(b, device=dev)
        xf = torch.fft.rfft2(x)
        xf[:, 0, 0] = 0  # zero mean
        xnorm = half_spectrum_norm(xf).clamp_min(1e-12)
        amp = batch_rows(ctf, slice(start, start + b), dev) if ctf is not None else None
        if pre is None:  # candidates: every reference
            candidates, rows = torch.arange(k, device=dev).expand(b, k), None
        else:
            pre_scores, _ = pre.search(xf, amp, None, memory_mb, criterion)
            per_ref = pre_scores.reshape(b, 2, k, pre.n_half).amax(dim=(1, 3))
            candidates = per_ref.topk(shortlist.count, dim=1).indices  # (b, count)
            rows = (candidates[..., None] * n_half + torch.arange(n_half, device=dev)).reshape(b, -1)
        scores, where = search.search(xf, amp, rows, memory_mb, criterion)
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
        # (criterion, index, psi, origin, normalised CC) of the best so far
        best = (torch.full((b,), -torch.inf, device=dev), torch.zeros(b, dtype=torch.long, device=dev),
                torch.zeros(b, device=dev), torch.zeros((b, 2), device=dev), torch.zeros(b, device=dev))
        for local in ranked.T:
            ref_idx = candidates[bi, local]
            p = pose[bi, local]
            flip, half_idx = p // n_half, p % n_half
            row = ref_idx * n_half + half_idx
            psi = (p.float() + circular_parabola(circle[bi, local], p)) * step
            rf = search.full[row]
            product = torch.where(flip[:, None, None] == 1, rf * xf, rf.conj() * xf)
            maps = torch.fft.irfft2(product)
            w = where[bi, flip, local * n_half + half_idx]
            near = ((grid.disc_tx[None] - factor * search.tx[w][:, None]) ** 2
                    + (grid.disc_ty[None] - factor * search.ty[w][:, None]) ** 2) <= factor**2 + 1e-6
            values = torch.where(near, maps.flatten(1)[:, grid.disc], torch.full_like(near, -torch.inf, dtype=maps.dtype))
            peak, j = values.max(dim=1)
            flat = grid.disc[j]
            tx, ty = subpixel_peak(peak_neighbourhood(maps, flat), flat, box)
            if amp is None:
                ref_norm = search.full_norm[row]
            else:
                ref_norm = (amp.square() * full_weights * rf.abs().square()).sum(dim=(-2, -1)).sqrt() / box
            cc = _score(peak, xnorm, ref_norm, "correlation")
            value = cc if criterion == "correlation" else _score(peak, xnorm, ref_norm, criterion)
            better = value > best[0]
            best = (torch.where(better, value, best[0]), torch.where(better, ref_idx, best[1]),
                    torch.where(better, torch.remainder(psi, 360.0), best[2]),
                    torch.where(better[:, None], -torch.stack([tx, ty], dim=1), best[3]),
                    torch.where(better, cc, best[4]))
        out_score.append(best[4])
        out_ref.append(best[1])
        out_psi.append(best[2])
        out_origin.append(best[3])
    if n == 0:
        z = torch.zeros(0, device=dev)
        return torch.zeros(0, dtype=torch.long, device=dev), z, torch.zeros((0, 2), device=dev), z
    return torch.cat(out_ref), torch.cat(out_psi), torch.cat(out_origin), torch.cat(out_score)
