"""Classes given by another program (``--classes-from``), e.g. RELION Class2D's ``_data.star``:
each particle's class, psi and origin read from that file and matched to the job's particles by
``rlnImageName``, so that the job scores and selects those classes (and measures each particle's
fit and crowding) exactly as it does its own. The same rule can then be compared across programs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from cdae_em.classify.stage import Classification
from cdae_em.core.align import apply_alignment
from cdae_em.core.averages import class_means, masked_rows
from cdae_em.errors import InputError
from cdae_em.io.star import ParticleTable, read_particles

log = logging.getLogger(__name__)


def read_assignment(path: str | Path, table: ParticleTable, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (0 .. K-1), psi (degrees) and origins (pixels of ``table``'s particles, RELION's
    convention) of ``table``'s particles, row for row, from the STAR file ``path``."""
    given = read_particles(path)
    p = given.particles
    missing = [c for c in ("rlnImageName", "rlnClassNumber", "rlnAnglePsi") if c not in p]
    if missing:
        raise InputError(path, f"has no {', '.join(missing)} column: not the particles of a 2D classification")
    row = {name: i for i, name in enumerate(p["rlnImageName"])}
    names = table.particles["rlnImageName"]
    found = np.array([row.get(name, -1) for name in names])
    if (found < 0).any():
        raise InputError(path, f"has no row for {int((found < 0).sum())} of the {len(names)} particles "
                               f"(first: {names.iloc[int(np.argmax(found < 0))]})")
    classes = p["rlnClassNumber"].to_numpy()[found].astype(int)
    if classes.min() < 1 or classes.max() > n_classes:
        raise InputError(path, f"class numbers run from {classes.min()} to {classes.max()}, not within 1..K={n_classes}")
    psi = p["rlnAnglePsi"].to_numpy(np.float64)[found]
    if "rlnOriginXAngst" in p:
        pixel = given.per_particle()["rlnImagePixelSize"].to_numpy(np.float64)[found]
        origin = np.stack([p["rlnOriginXAngst"].to_numpy(np.float64)[found],
                           p["rlnOriginYAngst"].to_numpy(np.float64)[found]], axis=1) / pixel[:, None]
    elif "rlnOriginX" in p:  # RELION 3.0: pixels
        origin = np.stack([p["rlnOriginX"].to_numpy(np.float64)[found], p["rlnOriginY"].to_numpy(np.float64)[found]], axis=1)
    else:
        origin = np.zeros((len(found), 2))
    return classes - 1, psi.astype(np.float32), origin.astype(np.float32)


def given_classes(path: str | Path, images, n_classes: int, device: torch.device, batch_size: int = 128) -> Classification:
    """The classification in ``path`` of ``images`` (the job's prepared particles, whose ``table``
    and ``box`` are the input's): class averages of ``images``, and each particle's fit to its class
    (normalised cross-correlation within the mask, as the job's own rounds score it)."""
    labels, psi, origin = read_assignment(path, images.table, n_classes)
    origin = origin * (images.shape[-1] / images.box)  # into the working box
    references, counts = class_means(images, labels, psi, origin, n_classes, device, batch_size)
    refs = torch.as_tensor(references, device=device)
    score = np.zeros(len(labels), np.float32)
    for start in range(0, len(labels), batch_size):
        rows = slice(start, min(start + batch_size, len(labels)))
        x = apply_alignment(masked_rows(images, rows, device), torch.as_tensor(psi[rows], device=device),
                            torch.as_tensor(origin[rows], device=device))
        r = refs[torch.as_tensor(labels[rows], device=device)]
        dot = (x * r).flatten(1).sum(1)
        score[rows] = (dot / (x.flatten(1).norm(dim=1) * r.flatten(1).norm(dim=1)).clamp_min(1e-12)).cpu().numpy()
    log.info("classes from %s: %d particles in %d of %d classes", path, len(labels), int((counts > 0).sum()), n_classes)
    return Classification(labels=labels, psi=psi, origin=origin, score=score, references=references,
                          history=[])
