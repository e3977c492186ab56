"""Automatic class selection, the step after 2D classification in a cleaning job: each class gets
a score in [0, 1] (``rlnClassScore`` in class_averages.star), and the classes scoring at least a
threshold are selected: ``particles_selected.star`` (their particles, every input column and
block kept) and ``class_averages_selected.star``.

The score (docs/selection.md has the recipe's measurements) asks two things of a class:
- **consistency**: do its particles agree with each other? The spectral SSNR of the class average
  (from the half-set FRC) divided by the class size is the SSNR of one member; averaged over the
  Fourier rings from 2 to a quarter of the box, it is near 0 for junk (empty boxes, aggregates with
  partners anywhere, fragments cut anywhere), whatever the class size. It is divided by that of a
  typical good class, so that the score does not depend on the data's SNR: the particle-weighted
  ``REFERENCE_QUANTILE`` quantile over the classes of at least ``MIN_SHARE`` of the particles (the
  best class's alone is a noisy maximum where K is large and the classes small; the quantile is
  still a good class's with up to ~85% junk);
- **compactness**: is the average a particle, centred in its box? The fraction of the average's
  signal power inside the particle's diameter (carbon edges and aggregates spread it to the box's
  edges). The noise left in the average (estimated per pixel from the difference of its two
  half-set averages) is subtracted first: it spreads evenly over the box, and in the small classes
  of a large K it would otherwise pull every class towards the disc's share of the box's area.
Score = consistency x compactness, clamped to [0, 1].

Within a selected class, a particle that fits its class far worse than the others (its
cdaeClassFit, the normalised cross-correlation with the class reference, more than ``FIT_Z``
robust standard deviations below the class median) is left out too: fragments, empty boxes and
carbon edges that the classification put among good particles. So is a particle whose crowding
(``cdae_em.core.crowding``: another particle-sized blob just outside it, as in an aggregate) is
more than ``CROWDING_Z`` robust standard deviations above the particles' median.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import starfile

from cdae_em.core.crowding import robust_z
from cdae_em.errors import InputError
from cdae_em.io.star import read_particles, write_star, write_table
from cdae_em.job.result import SELECTION
from cdae_em.settings import setting

log = logging.getLogger(__name__)

SELECTED_PARTICLES, SELECTED_CLASSES = SELECTION
THRESHOLD = setting("select_threshold")  # its default chosen on the (not held-out) default map: docs/selection.md
MIN_SHARE = 0.01  # classes smaller than this share of the particles never set the reference consistency
REFERENCE_QUANTILE = 0.85  # the particle-weighted quantile of member SSNR that counts as full consistency
MARGIN_PX = 2.0  # the particle's extent: its diameter plus this margin on each side
FIT_Z = -2.0  # particles of a selected class fitting it worse than this (robust z of cdaeClassFit) are left out
CROWDING_Z = 2.7  # particles of a selected class more crowded than this (cdaeCrowding) are left out: on the
# (not held-out) default map's junk stack, 1% of the single particles are (docs/selection.md)


def class_scores(averages: np.ndarray, ssnr: np.ndarray, counts: np.ndarray,
                 diameter_px: float | None = None, noise: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Each class's score in [0, 1] (module docstring), and its parts per class for the summary.
    ``averages`` (K, box, box), ``ssnr`` (K, rings) of the class averages, ``counts`` (K,),
    ``diameter_px`` the particle's diameter in the averages' pixels (None: 0.9 of the box),
    ``noise`` (K, box, box) an estimate of the noise left in each average (``average_noise``)."""
    k, box = averages.shape[0], averages.shape[-1]
    counts = np.asarray(counts, dtype=np.float64)
    diameter = 0.9 * box if diameter_px is None else float(diameter_px)
    band = ssnr[:, 2:max(3, box // 4)]
    per_particle = np.where(counts > 0, band.mean(axis=1) / np.maximum(counts, 1), 0.0)
    big = (counts >= MIN_SHARE * counts.sum()) & (counts > 0)
    pool = big if big.any() else counts > 0
    order = np.argsort(per_particle[pool])
    weight = np.cumsum(counts[pool][order]) / max(counts[pool].sum(), 1.0)
    reference = per_particle[pool][order][np.searchsorted(weight, REFERENCE_QUANTILE)] if pool.any() else 0.0
    consistency = np.clip(per_particle / reference, 0.0, 1.0) if reference > 0 else np.zeros(k)
    c = np.arange(box) - box // 2
    r = np.hypot(c[:, None], c[None, :])
    background = averages[:, r > 0.45 * box].mean(axis=1)[:, None, None]
    power = (averages - background) ** 2
    if noise is not None:
        power = power - noise**2
    total = power.reshape(k, -1).sum(axis=1)
    inside = np.where(total > 0, power[:, r <= diameter / 2 + MARGIN_PX].sum(axis=1) / np.maximum(total, 1e-30), 0.0)
    inside = np.clip(inside, 0.0, 1.0)
    score = np.where(counts > 0, np.clip(consistency * inside, 0.0, 1.0), 0.0)
    parts = {"consistency": np.round(consistency, 4).tolist(), "compactness": np.round(inside, 4).tolist(),
             "member_ssnr": [float(f"{x:.4g}") for x in per_particle]}
    return score, parts


def average_noise(half_a: np.ndarray, half_b: np.ndarray, n_a: np.ndarray, n_b: np.ndarray) -> np.ndarray:
    """The noise of each class's whole average (n_a h_a + n_b h_b) / n, estimated per pixel from its
    two half-set averages (K, box, box) of n_a and n_b members: (h_a - h_b) sqrt(n_a n_b) / n, which
    has the variance of that noise where the halves share their signal; 0 where a half is empty."""
    n_a, n_b = np.asarray(n_a, dtype=np.float64), np.asarray(n_b, dtype=np.float64)
    factor = np.sqrt(n_a * n_b) / np.maximum(n_a + n_b, 1)
    return (half_a - half_b) * factor[:, None, None]


def write_selection(out_dir: str | Path, threshold: float = THRESHOLD.default) -> dict:
    """From a finished job's particles.star and class_averages.star (with rlnClassScore): the
    classes scoring at least ``threshold``, written as particles_selected.star and
    class_averages_selected.star (atomically); returns what was selected."""
    problem = THRESHOLD.option.bound_problem(threshold)
    if problem:  # scores lie in [0, 1]
        raise InputError(None, f"selection threshold {threshold}: {problem}")
    out = Path(out_dir)
    classes_file, particles_file = out / "class_averages.star", out / "particles.star"
    for path in (classes_file, particles_file):
        if not path.is_file():
            raise InputError(path, "not found: not the directory of a finished cdae-em classification")
    try:
        classes = next(iter(starfile.read(classes_file, always_dict=True).values()))
    except Exception as exc:
        raise InputError(classes_file, f"cannot parse as a STAR file ({type(exc).__name__}: {exc})") from None
    if "rlnClassScore" not in classes:
        raise InputError(classes_file, "has no rlnClassScore column (written by cdae-em before class selection): "
                                       "rerun the job")
    chosen = classes["rlnClassNumber"][classes["rlnClassScore"] >= threshold].astype(int).to_numpy()
    table = read_particles(particles_file)
    labels = table.particles["rlnClassNumber"].astype(int).to_numpy()
    keep = np.isin(labels, chosen)
    in_chosen = int(keep.sum())
    if "cdaeClassFit" in table.particles:
        keep &= fit_z(labels, table.particles["cdaeClassFit"].to_numpy(np.float64)) >= FIT_Z
    fitting = int(keep.sum())
    if "cdaeCrowding" in table.particles:
        keep &= table.particles["cdaeCrowding"].to_numpy(np.float64) <= CROWDING_Z
    if not keep.any():
        for name in (SELECTED_PARTICLES, SELECTED_CLASSES):  # no empty table for a pipeline to pick up
            (out / name).unlink(missing_ok=True)
        log.warning("no class scores %.2f or more (best %.3f): nothing selected, no %s written", threshold,
                    float(classes["rlnClassScore"].max()), SELECTED_PARTICLES)
    else:
        write_star(table.subset(keep), out / SELECTED_PARTICLES)
        selected = classes[classes["rlnClassNumber"].isin(chosen)].reset_index(drop=True)
        write_table(selected, out / SELECTED_CLASSES)
    record = {"threshold": threshold, "classes": chosen.tolist(), "particles": int(keep.sum()),
              "of_particles": int(len(keep)), "left_out_for_poor_fit": in_chosen - fitting,
              "left_out_for_crowding": fitting - int(keep.sum())}
    log.info("class selection (score >= %.2f): %d of %d classes, %d of %d particles (of their members %d left out "
             "for a poor fit to their class, %d for crowding) -> %s", threshold, len(chosen), len(classes),
             record["particles"], len(keep), record["left_out_for_poor_fit"], record["left_out_for_crowding"],
             out / SELECTED_PARTICLES)
    return record


def fit_z(labels: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """Each particle's fit to its class as a robust z-score within the class (``crowding.robust_z``);
    0 in classes whose fits do not vary."""
    z = np.zeros(len(fit))
    for c in np.unique(labels):
        members = labels == c
        z[members] = robust_z(fit[members])
    return z
