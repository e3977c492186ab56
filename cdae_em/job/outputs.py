"""The job's output files (the contract in ``cdae_em.job.runner``) from a classification: aligned class
averages of the original particles (and the half-set FRC/SSNR of each class, from the same
pass), particles.star with classes and alignments, class_averages.star/.mrcs and the gallery.
Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cdae_em.core.align import apply_alignment
from cdae_em.core.figures import gallery, raw_denoised_pairs
from cdae_em.core.metrics import half_set_stats, random_halves
from cdae_em.denoise.stage import star_path_name
from cdae_em.settings import DenoiseSettings
from cdae_em.core.prepare import BatchPreparer
from cdae_em.io.stacks import write_stack
from cdae_em.io.images import ImageSource
from cdae_em.io.star import ParticleTable, write_star, write_table
from cdae_em.job.selection import average_noise, class_scores, write_selection

log = logging.getLogger(__name__)


def original_class_averages(table: ParticleTable, images: ImageSource, labels: np.ndarray, psi: np.ndarray,
                            origin: np.ndarray, n_classes: int, phase_flipped: bool, device: torch.device,
                            batch_size: int = 256, should_stop: Callable[[], None] | None = None) -> np.ndarray:
    """Aligned per-class means (K, box, box) of the original particles (origins in their pixels)."""
    box = images.box
    # the same phase flip the denoiser applies, at the original box
    prepare = BatchPreparer(table, DenoiseSettings(phase_flip=phase_flipped), box, device)
    sums = torch.zeros((n_classes, box, box), device=device)
    for start, batch in images.batches(batch_size):
        if should_stop is not None:
            should_stop()
        rows = slice(start, start + len(batch))
        x = prepare(batch, rows)
        x = apply_alignment(x, torch.as_tensor(psi[rows], dtype=torch.float32, device=device),
                            torch.as_tensor(origin[rows], dtype=torch.float32, device=device))
        sums.index_add_(0, torch.as_tensor(labels[rows], device=device), x)
    counts = np.bincount(labels, minlength=n_classes)
    return (sums / torch.as_tensor(np.maximum(counts, 1), dtype=torch.float32, device=device)[:, None, None]).cpu().numpy()


def write_outputs(settings, table: ParticleTable, labels: np.ndarray, psi: np.ndarray, origin: np.ndarray,
                  score: np.ndarray, references: np.ndarray, work_box: int, device: torch.device,
                  should_stop: Callable[[], None] | None = None, diameter_px: float | None = None,
                  crowding: np.ndarray | None = None) -> dict:
    """Write particles.star, class_averages.{mrcs,star} (with each class's score), the selection
    (particles_selected.star, class_averages_selected.star), class_averages_denoised.mrcs and
    gallery.png. ``diameter_px``: the particle's diameter in the input's pixels, if known;
    ``crowding``: each particle's (``cdae_em.core.crowding``), if measured."""
    out = Path(settings.out_dir)
    k = settings.n_classes
    per = table.per_particle()
    pixel = table.pixel_size()  # one for all particles (the job refused anything else)
    with ImageSource(table, project_dir=settings.project_dir) as images:
        scale = images.box / work_box  # origins were found in the working box
        origin_px = origin * scale
        # each class averaged as two random halves in the same pass, for the half-set FRC/SSNR
        halves = labels * 2 + random_halves(labels, k)
        half_means = original_class_averages(table, images, halves, psi, origin_px, 2 * k,
                                             settings.average_phase_flipped, device, settings.denoise.batch_size,
                                             should_stop)
        box = images.box
    counts = np.bincount(labels, minlength=k)
    n_half = np.bincount(halves, minlength=2 * k).reshape(k, 2)
    averages = (half_means[0::2] * n_half[:, :1, None] + half_means[1::2] * n_half[:, 1:, None]) \
        / np.maximum(counts, 1)[:, None, None]
    stats = half_set_stats(half_means[0::2], half_means[1::2], n_half[:, 0], n_half[:, 1], pixel)
    write_stack(out / "class_averages.mrcs", averages.astype(np.float32), pixel)
    write_stack(out / "class_averages_denoised.mrcs", references.astype(np.float32), pixel * scale)

    # the fit of each particle to its class: normalised cross-correlation with the class reference
    updates = {"rlnClassNumber": labels + 1, "rlnAnglePsi": psi.astype(np.float64),
               "cdaeClassFit": np.round(score.astype(np.float64), 4)}
    if crowding is not None:  # another particle overlapping this one: a robust z-score over the particles
        updates["cdaeCrowding"] = np.round(crowding.astype(np.float64), 3)
    if table.flavour == "3.1":
        updates["rlnOriginXAngst"] = origin_px[:, 0] * per["rlnImagePixelSize"].to_numpy()
        updates["rlnOriginYAngst"] = origin_px[:, 1] * per["rlnImagePixelSize"].to_numpy()
    else:  # RELION 3.0 keeps origins in pixels
        updates["rlnOriginX"], updates["rlnOriginY"] = origin_px[:, 0], origin_px[:, 1]
    write_star(table.with_columns(particles=updates), out / "particles.star")

    import pandas as pd

    avg_name = star_path_name(out / "class_averages.mrcs")
    if diameter_px is None and settings.denoise.mask_diameter:
        diameter_px = settings.denoise.mask_diameter / pixel
    noise = average_noise(half_means[0::2], half_means[1::2], n_half[:, 0], n_half[:, 1])
    class_score, score_parts = class_scores(averages, stats.ssnr, counts, diameter_px, noise)
    classes = pd.DataFrame({
        "rlnReferenceImage": [f"{i:06d}@{avg_name}" for i in range(1, k + 1)],
        "rlnClassNumber": np.arange(1, k + 1),
        "rlnClassDistribution": counts / counts.sum(),
        "cdaeParticleCount": counts,
        "rlnClassScore": np.round(class_score, 4),
    })
    write_table(classes, out / "class_averages.star")
    selection = write_selection(out, settings.select_threshold)
    agreement = None
    if (out / "denoised_particles.star").exists():
        from cdae_em.core.prepare import prepared_images
        from cdae_em.core.quality import agreement_summary, denoised_agreement

        with prepared_images(out / "denoised_particles.star", settings.project_dir) as den:
            per_class = denoised_agreement(den, labels, psi, origin, averages, device, settings.denoise.batch_size)
        agreement = agreement_summary(per_class, counts)
    pairs = raw_denoised_pairs(out / "denoised_particles.star", settings.particles, settings.project_dir)
    gallery(out / "gallery.png", averages, counts, pairs,
            agreement=None if agreement is None else np.asarray(agreement["per_class"]),
            selected=np.isin(np.arange(1, k + 1), selection["classes"]), scores=class_score)
    log.info("class sizes: %s", counts.tolist())
    return {"class_sizes": counts.tolist(), "box": int(box), "pixel_size": pixel,
            "class_scores": {"score": np.round(class_score, 4).tolist(), **score_parts}, "selection": selection,
            "mean_alignment_score": float(score.mean()), "half_sets": stats.to_json(),
            **({"denoised_agreement": agreement} if agreement is not None else {})}
