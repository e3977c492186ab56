"""The Class2D-style files of the External job, for RELION's Subset selection (``relion_display``)
and auto-selection (``relion_class_ranker``): ``run_it000_{classes.mrcs, data.star, model.star,
optimiser.star}``, derived from the core job's outputs (class averages, particles.star, and the
half-set FRC/SSNR the job computed with the class averages). Written under temporary names, then
renamed; where each layout comes from in RELION's source is noted next to it (5.0.1)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cdae_em.io.atomic_write import copy_file as atomic_copy
from cdae_em.core.metrics import NO_RESOLUTION, HalfSetStats, radial_power
from cdae_em.protocols.relion_files import ROOT, write_relion_star

log = logging.getLogger(__name__)


def write_classification_files(out_dir: Path, job: str, n_classes: int, pixel_size: float, box: int,
                               particle_diameter: float, ctf_phase_flipped: bool, version: int,
                               stats: HalfSetStats, psi_step: float | None = None) -> None:
    """run_it000_{classes.mrcs, data.star, model.star, optimiser.star} from the job's outputs.

    - ``relion_display --gui --i X_optimiser.star`` (5.0.1 src/displayer.cpp
      ``Displayer::runGui``/``Displayer::run``) reads ``optimiser_general/_rlnModelStarFile``, then
      ``model_classes/_rlnReferenceImage`` (a class is its row number unless _rlnClassNumber is
      there), and the particles from ``X_data.star`` (the optimiser name with ``_optimiser.star``
      replaced); saving selected classes copies the data.star rows whose rlnClassNumber matches
      (``multiViewerCanvas::makeStarFileSelectedParticles``).
    - ``relion_class_ranker`` (5.0.1 src/class_ranker.cpp ``ClassRanker::initialise``) reads
      rlnModelStarFile, rlnExperimentalDataStarFile, rlnDoCorrectCtf (and stops if it is 0),
      rlnDoIgnoreCtfUntilFirstPeak, rlnCtfDataArePhaseFlipped, rlnDoOnlyFlipCtfPhases,
      rlnParticleDiameter, then the whole model with ``MlModel::read`` (5.0.1 src/ml_model.cpp),
      whose required labels are all written below.
    """
    job_rel = job
    classes_name = f"{ROOT}_classes.mrcs"
    atomic_copy(out_dir / "class_averages.mrcs", out_dir / classes_name)
    signal = radial_power(_read_stack(out_dir / "class_averages.mrcs"))  # (K, rings)
    atomic_copy(out_dir / "particles.star", out_dir / f"{ROOT}_data.star")

    from cdae_em.io.star import read_particles

    table = read_particles(out_dir / "particles.star")
    counts = np.bincount(table.particles["rlnClassNumber"].to_numpy(np.int64) - 1, minlength=n_classes)
    n_optics = len(table.optics) if table.optics is not None else 1
    shells = box // 2 + 1
    ring = np.arange(shells)
    angstrom = np.where(ring > 0, box * pixel_size / np.maximum(ring, 1), NO_RESOLUTION)
    resolved = stats.resolution[counts > 0]
    current = float(resolved.min()) if len(resolved) else NO_RESOLUTION
    origins = None
    p = table.particles
    if "rlnOriginXAngst" in p:
        origins = np.concatenate([p["rlnOriginXAngst"].to_numpy(float), p["rlnOriginYAngst"].to_numpy(float)])
    elif "rlnOriginX" in p:
        origins = np.concatenate([p["rlnOriginX"].to_numpy(float), p["rlnOriginY"].to_numpy(float)]) * pixel_size
    sigma_offset = float(np.sqrt(np.mean(origins ** 2))) if origins is not None and len(origins) else 0.0

    comment = (
        "Written by cdae-em (RELION External job) from its own outputs so that RELION's Subset\n"
        "selection can open them; this is not a RELION refinement. Measured here: class\n"
        "distributions, half-set FRC/SSNR and estimated resolutions, noise spectrum, offsets.\n"
        "Accuracies are 999 (not estimated); other ML-specific values are neutral placeholders."
    )
    general = {
        "rlnReferenceDimensionality": 2,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": box,
        "rlnCurrentResolution": current,
        "rlnCurrentImageSize": box,
        "rlnPaddingFactor": 2.0,
        "rlnIsHelix": 0,
        "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": pixel_size,
        "rlnNrClasses": n_classes,
        "rlnNrBodies": 1,
        "rlnNrGroups": 1,
        "rlnNrOpticsGroups": n_optics,
        "rlnTau2FudgeFactor": 1.0,
        "rlnNormCorrectionAverage": 1.0,
        "rlnSigmaOffsetsAngst": sigma_offset,
        "rlnOrientationalPriorMode": 0,
        "rlnSigmaPriorRotAngle": 0.0,
        "rlnSigmaPriorTiltAngle": 0.0,
        "rlnSigmaPriorPsiAngle": 0.0,
        "rlnLogLikelihood": 0.0,
        "rlnAveragePmax": 1.0,  # hard assignments: each particle belongs to one class and one pose
    }
    fractions = counts / max(counts.sum(), 1)
    classes = [{
        "rlnReferenceImage": f"{k:06d}@{job_rel}{classes_name}",
        "rlnClassDistribution": float(fractions[k - 1]),
        "rlnAccuracyRotations": NO_RESOLUTION,  # RELION's "not known"; class_ranker measures them itself
        "rlnAccuracyTranslationsAngst": NO_RESOLUTION,
        "rlnEstimatedResolution": float(stats.resolution[k - 1]),
        "rlnOverallFourierCompleteness": float(np.mean(stats.ssnr[k - 1, 1:] >= 1.0)) if counts[k - 1] else 0.0,
        "rlnClassPriorOffsetX": 0.0,
        "rlnClassPriorOffsetY": 0.0,
    } for k in range(1, n_classes + 1)]
    groups = [{"rlnGroupNumber": 1, "rlnGroupName": "all_particles", "rlnGroupNrParticles": int(counts.sum()),
               "rlnGroupScaleCorrection": 1.0}]
    blocks: dict = {"model_general": general, "model_classes": classes, "model_groups": groups}
    for k in range(n_classes):
        noise_of_average = stats.noise / max(int(counts[k]), 1)
        blocks[f"model_class_{k + 1}"] = [{
            "rlnSpectralIndex": int(i),
            "rlnResolution": float(i / (box * pixel_size)),
            "rlnAngstromResolution": float(angstrom[i]),
            "rlnSsnrMap": float(stats.ssnr[k, i]),
            "rlnGoldStandardFsc": float(stats.frc[k, i]),
            "rlnFourierCompleteness": float(stats.ssnr[k, i] >= 1.0),
            "rlnReferenceSigma2": float(noise_of_average[i]),
            "rlnReferenceTau2": float(max(signal[k, i] - noise_of_average[i], 0.0)),
        } for i in ring]
    noise_rows = [{"rlnSpectralIndex": int(i), "rlnResolution": float(i / (box * pixel_size)),
                   "rlnSigma2Noise": float(stats.noise[i])} for i in ring]
    # 4.0/5.0 read model_optics_group_N per optics group; 3.1 (and pre-4 files) model_group_N per group
    for g in range(n_optics):
        blocks[f"model_optics_group_{g + 1}"] = noise_rows
    blocks["model_group_1"] = noise_rows
    write_relion_star(out_dir / f"{ROOT}_model.star", blocks, version, comment)

    optimiser = {
        "rlnOutputRootName": f"{job_rel}run",
        "rlnModelStarFile": f"{job_rel}{ROOT}_model.star",
        "rlnExperimentalDataStarFile": f"{job_rel}{ROOT}_data.star",
        "rlnCurrentIteration": 0,
        "rlnNumberOfIterations": 0,
        # class averages of phase-flipped particles are RELION's "only flip phases" CTF correction
        "rlnDoCorrectCtf": int(ctf_phase_flipped),
        "rlnDoOnlyFlipCtfPhases": int(ctf_phase_flipped),
        "rlnDoIgnoreCtfUntilFirstPeak": 0,
        "rlnCtfDataArePhaseFlipped": 0,  # the input images themselves are not phase-flipped
        "rlnParticleDiameter": particle_diameter,
        "rlnDoSkipAlign": 0,
        "rlnDoSkipRotate": 0,
    }
    if psi_step:
        optimiser["rlnPsiStep"] = float(psi_step)
    write_relion_star(out_dir / f"{ROOT}_optimiser.star", {"optimiser_general": optimiser}, version, comment)


def _read_stack(path: Path) -> np.ndarray:
    """An MRC stack (or single image) as (n, box, box) float32."""
    import mrcfile

    with mrcfile.open(path, permissive=True) as mrc:
        data = np.asarray(mrc.data, dtype=np.float32)
    return data[None] if data.ndim == 2 else data
