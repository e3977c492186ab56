"""RELION-side files of the External job: which RELION wrote the project (output-node flavour),
``RELION_OUTPUT_NODES.star``, and the Class2D-style ``run_it000_*`` files that RELION's Subset
selection (``relion_display``) and auto-selection (``relion_class_ranker``) open.

Everything here is derived from the core job's output contract (DESIGN.md section 3) and written
under a temporary name, then renamed. Where each table layout comes from in RELION's source is
noted next to it (RELION 3.1.4 / 4.0.2 / 5.0.1).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cdae_em.atomic import copy_file as atomic_copy
from cdae_em.atomic import partial_name
from cdae_em.atomic import write_text as atomic_write

log = logging.getLogger(__name__)

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
OUTPUT_NODES = "RELION_OUTPUT_NODES.star"

ROOT = "run_it000"  # the Class2D-style file root: run_it000_{optimiser,model,data}.star, _classes.mrcs
RELION_FILES = (OUTPUT_NODES, f"{ROOT}_optimiser.star", f"{ROOT}_model.star", f"{ROOT}_data.star",
                f"{ROOT}_classes.mrcs")

FLAVOURS = ("3.1", "4", "5")

# Node types per flavour. 5.0.1 src/pipeline_jobs.h: LABEL_CLASS2D_PARTS, LABEL_CLASS2D_OPT,
# LABEL_PARTS_CPIPE, LABEL_SELECT_CLAVS; 4.0.2 src/pipeline_jobs.h: the same names with the 4.0
# strings (its top-level types ParticlesData/ProcessData/ImagesData name the .Nodes/ directories
# that 4.0's GUI browses, and 5.0 renamed them); 3.1.4 src/pipeline_jobs.h: integer NODE_* codes
# (NODE_PART_DATA 3, NODE_2DREFS 5, NODE_MODEL 8, NODE_OPTIMISER 9). 3.1's Subset selection takes a
# *_model.star (NODE_MODEL), 4/5's an *_optimiser.star (LABEL_OPTIMISER_CPIPE).
NODE_TYPES = {
    "5": {"class2d_particles": "ParticleGroupMetadata.star.relion.class2d",
          "particles": "ParticleGroupMetadata.star.relion",
          "optimiser": "OptimiserData.star.relion.class2d",
          "class_averages": "Image2DGroupMetadata.star.relion.classaverages"},
    "4": {"class2d_particles": "ParticlesData.star.relion.class2d",
          "particles": "ParticlesData.star.relion",
          "optimiser": "ProcessData.star.relion.optimiser.class2d",
          "class_averages": "ImagesData.star.relion.classaverages"},
    "3.1": {"class2d_particles": 3, "particles": 3, "model": 8, "optimiser": 9, "class_averages": 5},
}


# ------------------------------------------------------------------------------------------------
# Which RELION is this?
# ------------------------------------------------------------------------------------------------
_VERSION = re.compile(r"^#\s*version\s+(\d+)", re.M)


def _head(path: Path, n: int = 20000) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read(n)
    except OSError:
        return None


def _version(text: str) -> int | None:
    m = _VERSION.search(text)
    return int(m.group(1)) if m else None


def detect_flavour(out_dir: Path, in_parts: str | None, project_dir: Path | None = None) -> tuple[str, str]:
    """The output-node flavour ("3.1", "4" or "5") of the RELION running this job, and why.

    Signals, most reliable first:
    1. ``OUT/job.star``, which RELION writes into the job directory before it launches the job
       (pipeliner.cpp ``PipeLine::runJob``: ``_job.write(_job.outputName)``): 5.0 writes
       ``# version 50001`` (metadata_table.h CURRENT_MDT_VERSION), 4.0 ``# version 30001`` with
       ``_rlnJobTypeLabel``, 3.1 ``_rlnJobType`` (an integer) and no label (``RelionJob::write``).
    2. the project's ``default_pipeline.star``: 5.0 has ``_rlnPipeLineNodeTypeLabelDepth``
       (``PipeLine::write``), 4.0 only ``_rlnPipeLineNodeTypeLabel``, 3.1 ``_rlnPipeLineNodeType``.
    3. the input STAR file's version line: 50001 is RELION 5; 30001 is written by both 3.1 and
       4.0, and is taken as 4; no version line (RELION 3.0 or a converted file) as 5.
    """
    project_dir = Path(project_dir or os.getcwd())
    text = _head(out_dir / "job.star")
    if text and "data_job" in text:
        version = _version(text) or 0
        if version >= 50000:
            return "5", f"{out_dir / 'job.star'} has '# version {version}' (RELION 5)"
        if "_rlnJobTypeLabel" in text:
            return "4", f"{out_dir / 'job.star'} has _rlnJobTypeLabel and '# version {version}' (RELION 4)"
        if "_rlnJobType" in text:
            return "3.1", f"{out_dir / 'job.star'} has an integer _rlnJobType (RELION 3.1)"
    text = _head(project_dir / "default_pipeline.star")
    if text and "data_pipeline_nodes" in text:
        if "_rlnPipeLineNodeTypeLabelDepth" in text or (_version(text) or 0) >= 50000:
            return "5", "default_pipeline.star is RELION 5's (node type label depths)"
        if "_rlnPipeLineNodeTypeLabel" in text:
            return "4", "default_pipeline.star has node type labels without depths (RELION 4)"
        if "_rlnPipeLineNodeType" in text:
            return "3.1", "default_pipeline.star has integer node types (RELION 3.1)"
    if in_parts:
        text = _head(project_dir / in_parts) if not Path(in_parts).is_absolute() else _head(Path(in_parts))
        if text is not None:
            version = _version(text)
            if version is not None and version >= 50000:
                return "5", f"{in_parts} has '# version {version}' (RELION 5)"
            if version is not None:
                return "4", f"{in_parts} has '# version {version}' (RELION 3.1 or 4; taken as 4)"
    return "5", "no RELION version found in the job or project files (taken as 5)"


# ------------------------------------------------------------------------------------------------
# STAR text the way RELION writes it
# ------------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        x = float(value)
        if not np.isfinite(x):
            return "999.000000" if x > 0 else "-999.000000"
        if x != 0.0 and (abs(x) < 1e-3 or abs(x) >= 1e6):
            return f"{x:.6e}"
        return f"{x:.6f}"
    text = str(value)
    return '""' if text == "" else text


def star_text(blocks: list[tuple[str, dict | list[dict]]], version: int, comment: str | None = None) -> str:
    """STAR text: a dict is a list block (``_label value``), a list of dicts a loop; every block
    preceded by ``# version N`` as RELION's MetaDataTable::write does."""
    out = []
    if comment:
        out += [f"# {line}" for line in comment.splitlines()]
    for name, block in blocks:
        out += ["", f"# version {version}", "", f"data_{name}", ""]
        if isinstance(block, dict):
            width = max(len(k) for k in block) + 2
            out += [f"_{k:<{width}}{_fmt(v)}" for k, v in block.items()]
        else:
            labels = list(block[0]) if block else []
            out.append("loop_ ")
            out += [f"_{label} #{i} " for i, label in enumerate(labels, 1)]
            for row in block:
                out.append(" ".join(f"{_fmt(row[label]):>12}" for label in labels) + " ")
        out.append(" ")
    return "\n".join(out) + "\n"


def remove_relion_files(out_dir: Path) -> None:
    """Remove the files this module writes (before a run, and after an abort)."""
    for name in RELION_FILES:
        (out_dir / name).unlink(missing_ok=True)
        partial_name(out_dir / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# RELION_OUTPUT_NODES.star
# ------------------------------------------------------------------------------------------------
def output_nodes(job: str, flavour: str) -> list[tuple[str, str | int]]:
    """(node name, node type) for every output RELION should register; ``job`` is the --o
    directory as RELION gave it (project-relative, ending in '/')."""
    types = NODE_TYPES[flavour]
    nodes = [
        (job + "particles.star", types["class2d_particles"]),
        (job + "denoised_particles.star", types["particles"]),
        (job + f"{ROOT}_optimiser.star", types["optimiser"]),
        (job + "class_averages.star", types["class_averages"]),
    ]
    if flavour == "3.1":  # 3.1's Subset selection opens a *_model.star (NODE_MODEL)
        nodes.insert(3, (job + f"{ROOT}_model.star", types["model"]))
    return nodes


def write_output_nodes(out_dir: Path, job: str, flavour: str) -> list[tuple[str, str | int]]:
    """RELION_OUTPUT_NODES.star, read by pipeliner.cpp ``PipeLine::getOutputNodesFromStarFile``:
    table ``output_nodes`` with ``_rlnPipeLineNodeName`` and ``_rlnPipeLineNodeTypeLabel`` (4.0.2,
    5.0.1) or the integer ``_rlnPipeLineNodeType`` (3.1.4)."""
    nodes = output_nodes(job, flavour)
    column = "rlnPipeLineNodeType" if flavour == "3.1" else "rlnPipeLineNodeTypeLabel"
    rows = [{"rlnPipeLineNodeName": name, column: kind} for name, kind in nodes]
    version = 50001 if flavour == "5" else 30001
    atomic_write(out_dir / OUTPUT_NODES, star_text([("output_nodes", rows)], version))
    return nodes


# ------------------------------------------------------------------------------------------------
# Class2D-style files for Subset selection
# ------------------------------------------------------------------------------------------------
@dataclass
class HalfSetStats:
    """Per class: half-set FRC curve, SSNR of the full average, estimated resolution; and the
    per-particle noise power spectrum."""

    frc: np.ndarray  # (K, shells)
    ssnr: np.ndarray  # (K, shells)
    resolution: np.ndarray  # (K,) Angstrom (999 where unknown)
    noise: np.ndarray  # (shells,)
    signal: np.ndarray  # (K, shells) radial power of the class averages


def _radial_power(images: np.ndarray) -> np.ndarray:
    """Mean power per Fourier ring 0..box//2 (orthonormal FFT) of (n, box, box) images."""
    box = images.shape[-1]
    f = np.fft.fftfreq(box) * box
    ring = np.rint(np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)).astype(int).ravel()
    keep = ring <= box // 2
    counts = np.bincount(ring[keep], minlength=box // 2 + 1)
    power = np.abs(np.fft.fft2(images, norm="ortho")) ** 2
    out = [np.bincount(ring[keep], p.ravel()[keep], minlength=box // 2 + 1) / np.maximum(counts, 1) for p in power]
    return np.array(out)


def half_set_stats(particles_star: Path, averages: np.ndarray, n_classes: int, phase_flipped: bool,
                   project_dir: str | None, batch_size: int = 256,
                   should_stop: Callable[[], None] | None = None) -> HalfSetStats:
    """Split every class into two random halves, average each (same alignment and CTF handling as
    the job's class averages), and compare them: FRC -> SSNR of the full average (2 FRC / (1 - FRC))
    -> estimated resolution where the SSNR first drops below 1, as RELION's
    ``MlModel::calculateTotalFourierCoverage`` defines it. The noise power per particle comes from
    the half-set differences: P(A - B) / (1/n_A + 1/n_B)."""
    import torch

    from cdae_em.metrics import frc
    from cdae_em.outputs import original_class_averages
    from cdae_em.stacks import ImageSource
    from cdae_em.star import read_particles

    table = read_particles(particles_star)
    p = table.particles
    per = table.per_particle()
    pixel = per["rlnImagePixelSize"].to_numpy()
    labels = np.array(p["rlnClassNumber"].to_numpy(np.int64)) - 1
    psi = np.array(p["rlnAnglePsi"].to_numpy(np.float64)) if "rlnAnglePsi" in p else np.zeros(len(p))
    if "rlnOriginXAngst" in p:
        origin = np.stack([p["rlnOriginXAngst"].to_numpy(np.float64) / pixel,
                           p["rlnOriginYAngst"].to_numpy(np.float64) / pixel], axis=1)
    elif "rlnOriginX" in p:
        origin = np.stack([p["rlnOriginX"].to_numpy(np.float64), p["rlnOriginY"].to_numpy(np.float64)], axis=1)
    else:
        origin = np.zeros((len(p), 2))
    rng = np.random.default_rng(0)
    half = np.zeros(len(p), dtype=np.int64)
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        half[rng.permutation(rows)[: len(rows) // 2]] = 1
    with ImageSource(table, project_dir=project_dir) as images:
        halves = original_class_averages(table, images, labels * 2 + half, psi, origin, 2 * n_classes, phase_flipped,
                                         torch.device("cpu"), batch_size=batch_size, should_stop=should_stop)
        box = images.box
    a, b = halves[0::2], halves[1::2]
    n_b = np.bincount(labels[half == 1], minlength=n_classes)
    n_a = np.bincount(labels[half == 0], minlength=n_classes)
    shells = box // 2 + 1
    curves = np.zeros((n_classes, shells))
    ssnr = np.zeros((n_classes, shells))
    resolution = np.full(n_classes, 999.0)
    px = float(np.median(pixel))
    for c in range(n_classes):
        if min(n_a[c], n_b[c]) < 1:
            continue
        curves[c] = np.clip(frc(a[c], b[c]), -1.0, 1.0)
        ssnr[c] = np.maximum(2 * curves[c] / np.maximum(1 - curves[c], 1e-6), 0.0)
        ssnr[c, 0] = max(ssnr[c, 0], 1.0)  # the origin shell carries no resolution information
        below = np.flatnonzero(ssnr[c, 1:] < 1.0)
        maxres = int(below[0]) if len(below) else shells - 1  # last shell before the first SSNR < 1
        resolution[c] = box * px / maxres if maxres > 0 else 999.0
    both = (n_a > 0) & (n_b > 0)
    if both.any():
        diff_power = _radial_power((a - b)[both])
        weight = 1.0 / (1.0 / n_a[both] + 1.0 / n_b[both])
        noise = (diff_power * weight[:, None]).sum(axis=0) / both.sum()
    else:
        noise = np.zeros(shells)
    return HalfSetStats(curves, ssnr, resolution, noise, _radial_power(averages))


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
    atomic_copy(out_dir / "particles.star", out_dir / f"{ROOT}_data.star")

    from cdae_em.star import read_particles

    table = read_particles(out_dir / "particles.star")
    counts = np.bincount(table.particles["rlnClassNumber"].to_numpy(np.int64) - 1, minlength=n_classes)
    n_optics = len(table.optics) if table.optics is not None else 1
    shells = box // 2 + 1
    ring = np.arange(shells)
    angstrom = np.where(ring > 0, box * pixel_size / np.maximum(ring, 1), 999.0)
    resolved = stats.resolution[counts > 0]
    current = float(resolved.min()) if len(resolved) else 999.0
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
        "rlnAccuracyRotations": 999.0,  # RELION's "not known"; class_ranker then measures them itself
        "rlnAccuracyTranslationsAngst": 999.0,
        "rlnEstimatedResolution": float(stats.resolution[k - 1]),
        "rlnOverallFourierCompleteness": float(np.mean(stats.ssnr[k - 1, 1:] >= 1.0)) if counts[k - 1] else 0.0,
        "rlnClassPriorOffsetX": 0.0,
        "rlnClassPriorOffsetY": 0.0,
    } for k in range(1, n_classes + 1)]
    groups = [{"rlnGroupNumber": 1, "rlnGroupName": "all_particles", "rlnGroupNrParticles": int(counts.sum()),
               "rlnGroupScaleCorrection": 1.0}]
    blocks: list = [("model_general", general), ("model_classes", classes), ("model_groups", groups)]
    for k in range(n_classes):
        noise_of_average = stats.noise / max(int(counts[k]), 1)
        blocks.append((f"model_class_{k + 1}", [{
            "rlnSpectralIndex": int(i),
            "rlnResolution": float(i / (box * pixel_size)),
            "rlnAngstromResolution": float(angstrom[i]),
            "rlnSsnrMap": float(stats.ssnr[k, i]),
            "rlnGoldStandardFsc": float(stats.frc[k, i]),
            "rlnFourierCompleteness": float(stats.ssnr[k, i] >= 1.0),
            "rlnReferenceSigma2": float(noise_of_average[i]),
            "rlnReferenceTau2": float(max(stats.signal[k, i] - noise_of_average[i], 0.0)),
        } for i in ring]))
    noise_rows = [{"rlnSpectralIndex": int(i), "rlnResolution": float(i / (box * pixel_size)),
                   "rlnSigma2Noise": float(stats.noise[i])} for i in ring]
    # 4.0/5.0 read model_optics_group_N per optics group; 3.1 (and pre-4 files) model_group_N per group
    for g in range(n_optics):
        blocks.append((f"model_optics_group_{g + 1}", noise_rows))
    blocks.append(("model_group_1", noise_rows))
    atomic_write(out_dir / f"{ROOT}_model.star", star_text(blocks, version, comment))

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
    atomic_write(out_dir / f"{ROOT}_optimiser.star",
                 star_text([("optimiser_general", optimiser)], version, comment))
