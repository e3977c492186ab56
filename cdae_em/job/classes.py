"""Stage 2 of a job: the classes of its particles (found by ``cdae_em.classify.stage``, or given by
another program with ``--classes-from``), each particle's crowding, and the result saved in the job
directory (classes.npz) so that a rerun resumes after it."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from cdae_em.io.atomic_write import atomic_path
from cdae_em.runtime import distributed
from cdae_em.runtime.progress import JobProgress
from cdae_em.runtime.workarrays import WORK_DIR, remove_work
from cdae_em.settings import JobSettings

log = logging.getLogger(__name__)


def classes_stage(settings: JobSettings, job_dir: Path, device, should_stop, progress: JobProgress,
                    summary: dict, timings: dict) -> tuple:
    """3. classification: of the denoised particles (then alignment rounds on the originals), or
    with ``stages="classify"`` of the input particles as they are. Returns labels, psi, origin,
    score, references, the box the origins are in and each particle's crowding (None: not
    measured)."""
    from cdae_em.classify.stage import classify
    from cdae_em.core.averages import class_means
    from cdae_em.core.prepare import prepared_images, prepared_particles, whitening_record

    out = Path(settings.out_dir)
    progress.stage(2, "classify")
    result_file = job_dir / "classes.npz"
    if result_file.exists():
        saved = np.load(result_file)
        labels, psi, origin, score, refs = (saved[k] for k in ("labels", "psi", "origin", "score", "references"))
        summary["classify"] = json.loads(str(saved["history"]))
        if "whitening" in saved.files:  # (classes saved by an earlier version have no record)
            summary["whitening"] = json.loads(str(saved["whitening"]))
        log.info("stage 2/3 classify: already done (resuming)")
        crowd = saved["crowding"] if "crowding" in saved.files else None  # (not saved by earlier versions)
        return labels, psi, origin, score, refs, int(saved["box"]), None if crowd is None or not crowd.size else crowd
    log.info("stage 2/3 classify: K=%d by %s", settings.n_classes, settings.classify.method)
    t = time.perf_counter()
    cs = settings.classify
    work = out / WORK_DIR  # the invariant features' work array (memory-mapped, removed after use)

    def given(images):
        from cdae_em.classify.given import given_classes

        return given_classes(settings.classes_from, images, settings.n_classes, device, cs.batch_size)
    if settings.stages == "classify":
        with prepared_particles(Path(settings.particles), settings.project_dir, settings.denoise, device) as images:
            whitening = images.transform.preparer.whitening
            result = (given(images) if settings.classes_from else
                      classify(images, cs, device, should_stop, work=work, ctf=images.ctf))
            box = images.shape[-1]
            crowd = distributed.on_main(_crowding, images, result, settings, summary, device)
        refs = result.references
    else:
        # the denoised stacks are faithful images unless --equalise: equalise them here for clustering
        diameter = None
        if not settings.denoise.equalise:
            diameter = 0.0 if settings.denoise.mask_diameter is None else settings.denoise.mask_diameter / _pixel_size(out)
        # the (phase-flipped, resized, whitened) originals keep the detail alignment needs; the
        # denoised particles are whitened by the same filter for clustering (docs/notes.md)
        with prepared_particles(Path(settings.particles), settings.project_dir, settings.denoise, device) as originals, \
                prepared_images(out / "denoised_particles.star", settings.project_dir, equalise_diameter=diameter,
                                whitening=originals.transform.preparer.whitening) as denoised:
            whitening = originals.transform.preparer.whitening
            box = denoised.shape[-1]
            if settings.classes_from:
                result = given(originals)
            elif settings.align_on == "denoised":
                result = classify(denoised, cs, device, should_stop, work=work)
            else:
                # Initial classes from the denoised particles' invariant features, then the
                # alignment rounds on the originals
                init = classify(denoised, replace(cs, n_iter=0), device, should_stop,
                                work=work).labels
                result = classify(originals, cs, device, should_stop, initial_labels=init, work=work, ctf=originals.ctf)
            crowd = distributed.on_main(_crowding, originals, result, settings, summary, device)
            refs, _ = class_means(denoised, result.labels, result.psi, result.origin, settings.n_classes, device,
                                  cs.batch_size)
    labels, psi, origin, score = result.labels, result.psi, result.origin, result.score
    summary["classify"] = result.history
    summary["whitening"] = whitening_record(settings.denoise, whitening)
    if distributed.world().main and not settings.keep_work:
        remove_work(out)
    if distributed.world().main:
        with atomic_path(result_file) as tmp, open(tmp, "wb") as f:
            np.savez(f, labels=labels, psi=psi, origin=origin, score=score, references=refs, box=box,
                     crowding=np.zeros(0) if crowd is None else crowd,
                     history=json.dumps(result.history), whitening=json.dumps(summary["whitening"]))
    timings["classify"] = round(time.perf_counter() - t, 2)
    return labels, psi, origin, score, refs, box, crowd


def _crowding(images, result, settings: JobSettings, summary: dict, device) -> np.ndarray | None:
    """Each particle's crowding (``cdae_em.core.crowding``) in ``images``, the working box's prepared
    particles; None (and a log line) where the particle's diameter is not known."""
    from cdae_em.core.crowding import crowding
    from cdae_em.core.prepare import estimate_particle_diameter

    diameter = (summary.get("working_scale") or {}).get("particle_diameter_px")  # native pixels
    if not diameter and settings.denoise.mask_diameter:
        diameter = settings.denoise.mask_diameter / images.table.pixel_size()
    diameter = diameter or estimate_particle_diameter(images)
    if not diameter:
        log.info("crowding not measured: the particles' diameter is not known (give --mask-diameter)")
        return None
    counts = np.bincount(result.labels, minlength=len(result.references))
    radius = diameter / 2 * images.shape[-1] / images.box
    return crowding(images, result.references, counts, result.psi, result.origin, radius, device,
                    settings.classify.batch_size)


def _pixel_size(out: Path) -> float:
    """Pixel size of the denoised stacks (Angstrom)."""
    from cdae_em.io.star import read_particles

    return float(read_particles(out / "denoised_particles.star").pixel_size())
