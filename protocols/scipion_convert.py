"""Conversion between Scipion particle sets and the STAR/MRC files of a cdae-em job.

Input: a SetOfParticles -> a RELION 3.1 particle STAR file written with the core's STAR writer
(one optics group from the set's acquisition and sampling rate, per-particle CTF where the set has
one, ``rlnImageId`` = the particle's Scipion id). MRC stacks are referenced where they are; other
formats are converted to MRC stacks with Scipion's ImageHandler (which needs Xmipp for them).

Output: the job's STAR files are read back row by row with emtable; particle alignments become
Scipion 2D transforms the way scipion-em-relion reads RELION 2D classification results
(rotation by +rlnAnglePsi, shift = +rlnOriginX/YAngst / pixel size, no inversion).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from emtable import Table

import pwem.convert.transformations as tfs
from pwem.objects import Transform

from cdae_em.io import images
from cdae_em.io.star import new_particle_table, write_star

#: extensions that are MRC files, read by cdae-em directly (Scipion may add ":mrc"/":mrcs" hints)
MRC_EXTENSIONS = (".mrc", ".mrcs", ".st", ".ali", ".map", ".rec")

OPTICS_GROUP_NAME = "opticsGroup1"


def split_format_hint(filename: str) -> tuple[str, str]:
    """``"a/b.mrc:mrcs"`` -> (``"a/b.mrc"``, ``"mrcs"``); no hint -> (filename, "")."""
    base, sep, hint = filename.rpartition(":")
    if sep and hint and "/" not in hint and base:
        return base, hint.lower()
    return filename, ""


def is_mrc(filename: str) -> bool:
    path, hint = split_format_hint(filename)
    if hint:
        return hint in ("mrc", "mrcs")
    return path.lower().endswith(MRC_EXTENSIONS)


def image_name(index: int, path: str) -> str:
    """RELION image name: ``N@path`` (1-based), or just ``path`` for a single-image file."""
    return f"{int(index)}@{path}" if index and int(index) > 0 else path


def convert_to_mrc(filename: str, out_dir: str) -> str:
    """Convert a non-MRC image stack to ``out_dir/<name>.mrcs`` (same image order)."""
    from pwem.emlib.image import ImageHandler

    path, _ = split_format_hint(filename)
    out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".mrcs")
    stem, n = os.path.splitext(out)[0], 1
    while os.path.exists(out):  # two inputs with the same base name
        out = f"{stem}_{n}.mrcs"
        n += 1
    try:
        ImageHandler().convertStack(path, out)
    except Exception as exc:  # noqa: BLE001 - ImageHandler raises bare Exceptions
        raise RuntimeError(
            f"cdae-em reads MRC stacks; converting {path} to MRC failed ({exc}). Install Xmipp "
            "(scipion-em-xmipp), or convert the particles to MRC first."
        ) from exc
    return out


def particles_to_star(particles, star_path: str, convert_dir: str) -> int:
    """Write the enabled particles of ``particles`` (in id order) to a RELION 3.1 STAR file.

    Image paths are written absolute, so the job can run from any directory. Returns the number
    of particles written.
    """
    acq = particles.getAcquisition()
    pixel = float(particles.getSamplingRate())
    box = int(particles.getXDim())
    has_ctf = bool(particles.hasCTF())
    converted: dict[str, str] = {}

    names, ids, mics, coords_x, coords_y = [], [], [], [], []
    defocus_u, defocus_v, defocus_angle, phase_shift = [], [], [], []
    for particle in particles.iterItems(orderBy="id"):
        if not particle.isEnabled():
            continue
        index, filename = particle.getLocation()
        if is_mrc(filename):
            path = os.path.abspath(split_format_hint(filename)[0])
        else:
            if filename not in converted:
                os.makedirs(convert_dir, exist_ok=True)
                converted[filename] = os.path.abspath(convert_to_mrc(filename, convert_dir))
            path = converted[filename]
        names.append(image_name(index, path))
        ids.append(int(particle.getObjId()))
        coord = particle.getCoordinate() if particle.hasCoordinate() else None
        if coord is not None:
            mics.append(coord.getMicName() or f"mic{coord.getMicId()}")
            coords_x.append(float(coord.getX()))
            coords_y.append(float(coord.getY()))
        if has_ctf:
            ctf = particle.getCTF()
            defocus_u.append(float(ctf.getDefocusU()))
            defocus_v.append(float(ctf.getDefocusV()))
            defocus_angle.append(float(ctf.getDefocusAngle()))
            phase_shift.append(float(ctf.getPhaseShift() or 0.0))

    columns: dict[str, list] = {"rlnImageName": names, "rlnImageId": ids}
    if len(mics) == len(names) and names:
        columns.update(rlnMicrographName=mics, rlnCoordinateX=coords_x, rlnCoordinateY=coords_y)
    columns["rlnOpticsGroup"] = [1] * len(names)
    if has_ctf:
        columns.update(rlnDefocusU=defocus_u, rlnDefocusV=defocus_v, rlnDefocusAngle=defocus_angle,
                       rlnPhaseShift=phase_shift)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": [OPTICS_GROUP_NAME],
        "rlnOpticsGroup": [1],
        "rlnVoltage": [float(acq.getVoltage() or 300.0)],
        "rlnSphericalAberration": [float(acq.getSphericalAberration() or 2.7)],
        "rlnAmplitudeContrast": [float(acq.getAmplitudeContrast() or 0.1)],
        "rlnImagePixelSize": [pixel],
        "rlnImageSize": [box],
        "rlnImageDimensionality": [2],
        # the core phase-flips (auto) only particles that are not flipped already
        "rlnCtfDataArePhaseFlipped": [int(bool(particles.isPhaseFlipped()))],
    })
    write_star(new_particle_table(pd.DataFrame(columns), optics), star_path)
    return len(names)


def resolve_image_path(path: str, star_dir: str, project_dir: str) -> str:
    """An image path from an output STAR file as Scipion stores it: relative to the project
    directory where it lies under it, else absolute."""
    if os.path.isabs(path):
        full = path
    else:
        full = os.path.join(project_dir, path)
        if not os.path.exists(full):
            full = os.path.join(star_dir, path)
    full = os.path.abspath(full)
    project_dir = os.path.abspath(project_dir)
    if full.startswith(project_dir + os.sep):
        return os.path.relpath(full, project_dir)
    return full


def parse_image_name(name: str) -> tuple[int, str]:
    """``"3@x.mrcs"`` -> (3, ``"x.mrcs"``) (Scipion's 1-based index); ``"x.mrc"`` -> (1, ...)."""
    index, path = images.parse_image_name(name)
    return index + 1, path


def read_star_rows(star_path: str, block: str | None = "particles"):
    """Rows of one block of a STAR file (emtable; ``block=None``: the first), as an iterator."""
    return Table.iterRows(star_path if block is None else f"{block}@{star_path}")


def read_optics(star_path: str) -> Table:
    return Table(fileName=star_path, tableName="optics")


def read_alignment(star_path: str) -> dict[int, tuple[int, float, float, float]]:
    """``rlnImageId`` -> (class, psi, originXAngst, originYAngst) from the job's particles.star."""
    result = {}
    for row in read_star_rows(star_path):
        result[int(row.rlnImageId)] = (
            int(row.rlnClassNumber),
            float(getattr(row, "rlnAnglePsi", 0.0)),
            float(getattr(row, "rlnOriginXAngst", 0.0)),
            float(getattr(row, "rlnOriginYAngst", 0.0)),
        )
    return result


def alignment_2d_matrix(psi: float, origin_x_angst: float, origin_y_angst: float, pixel_size: float) -> np.ndarray:
    """The 4x4 Scipion matrix of a RELION 2D alignment (as scipion-em-relion's Reader builds it
    for ALIGN_2D): in-plane rotation by psi, shift in pixels."""
    matrix = tfs.euler_matrix(0.0, 0.0, np.deg2rad(psi), "szyz")
    matrix[0, 3] = origin_x_angst / pixel_size
    matrix[1, 3] = origin_y_angst / pixel_size
    return matrix


def set_alignment_2d(particle, psi: float, origin_x_angst: float, origin_y_angst: float, pixel_size: float) -> None:
    transform = Transform()
    transform.setMatrix(alignment_2d_matrix(psi, origin_x_angst, origin_y_angst, pixel_size))
    particle.setTransform(transform)
