"""A quality figure for the denoised particles that needs no ground truth: how well each aligned
denoised particle agrees with the class average of the *original* particles.

The class averages of the originals are what a user trusts (hundreds of noisy images, aligned and
averaged); a denoiser that shows the particle gives denoised images that correlate with them, one
that invents structure (blobs, texture) does not. Reported per class in summary.json, gallery.png
and the log (RELION's run.out), with a warning when it is low.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

LOW_AGREEMENT = 0.3  # mean correlation below which the denoised particles are not to be trusted


@torch.no_grad()
def denoised_agreement(denoised, labels: np.ndarray, psi: np.ndarray, origin: np.ndarray, averages: np.ndarray,
                       device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Mean correlation per class (K,) of the aligned, masked denoised particles with their class's
    average (K, box, box; resized to the particles' box if needed), inside the particle mask."""
    from cdae_em.core.align import apply_alignment
    from cdae_em.core.averages import masked_rows
    from cdae_em.core.preprocess import fourier_resize, particle_mask

    k, box = len(averages), denoised.shape[-1]
    refs = torch.as_tensor(np.asarray(averages, dtype=np.float32), device=device)
    if refs.shape[-1] != box:
        refs = fourier_resize(refs, box)
    mask = particle_mask(box, device=device) > 0.5
    refs = refs[:, mask]
    refs = (refs - refs.mean(dim=1, keepdim=True)) / refs.std(dim=1, keepdim=True).clamp_min(1e-12)
    sums = np.zeros(k)
    for start in range(0, len(denoised), batch_size):
        rows = slice(start, min(start + batch_size, len(denoised)))
        x = apply_alignment(masked_rows(denoised, rows, device), torch.as_tensor(psi[rows], device=device, dtype=torch.float32),
                            torch.as_tensor(origin[rows], device=device, dtype=torch.float32))[:, mask]
        x = (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True).clamp_min(1e-12)
        lab = torch.as_tensor(labels[rows], device=device)
        corr = (x * refs[lab]).mean(dim=1).cpu().numpy()
        np.add.at(sums, labels[rows], corr)
    return sums / np.maximum(np.bincount(labels, minlength=k), 1)


def agreement_summary(per_class: np.ndarray, counts: np.ndarray) -> dict:
    """The figure for summary.json (and a logged line, a warning when low)."""
    mean = float((per_class * counts).sum() / max(counts.sum(), 1))
    record = {"per_class": np.round(per_class, 3).tolist(), "mean": round(mean, 3),
              "what": "mean correlation of each aligned denoised particle with its class average of the originals"}
    log.info("denoised particles vs class averages of the originals: mean correlation %.2f (per class: %s)",
             mean, " ".join(f"{c:.2f}" for c in per_class))
    if mean < LOW_AGREEMENT:
        record["warning"] = (f"low agreement ({mean:.2f} < {LOW_AGREEMENT}): the denoised particles may not show "
                             "the particle; use the class averages of the originals")
        log.warning("the denoised particles agree poorly with the class averages of the originals (mean correlation "
                    "%.2f < %.2f): do not trust them; the classes and averages of the originals are unaffected",
                    mean, LOW_AGREEMENT)
    return record
