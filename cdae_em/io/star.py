"""Particle STAR files: read and write RELION 3.0 and 3.1/4/5 tables without losing anything.

A :class:`ParticleTable` keeps every data block and column of the file it was read from, so that
output STAR files carry the user's metadata (and any non-RELION columns, e.g. from cryoSPARC via
csparc2star) through unchanged. Parsing and formatting are done by the ``starfile`` package; this
module adds the RELION conventions: which block holds the particles, the optics groups, the
``# version`` lines and the file flavour.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import starfile

from cdae_em.io.atomic_write import write_text
from cdae_em.errors import InputError

log = logging.getLogger(__name__)

#: RELION labels whose values are names: kept as strings even where they look like numbers
STRING_LABELS = [
    "rlnImageName",
    "rlnImageOriginalName",
    "rlnReconstructImageName",
    "rlnMicrographName",
    "rlnMicrographOriginalName",
    "rlnMicrographMovieName",
    "rlnMicrographMetadata",
    "rlnMicrographGainName",
    "rlnMicrographDefectFile",
    "rlnMicrographNameNoDW",
    "rlnCtfImage",
    "rlnCtfPowerSpectrum",
    "rlnOpticsGroupName",
    "rlnMtfFileName",
    "rlnGroupName",
    "rlnReferenceImage",
]

#: per-particle imaging parameters returned by :meth:`ParticleTable.per_particle`
#: the CTF parameters every particle needs for phase flipping (RELION labels)
CTF_COLUMNS = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
               "rlnAmplitudeContrast"]
PER_PARTICLE_LABELS = [
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
]

DEFAULT_VERSION_LINE = "# version 30001"
_VERSION_RE = re.compile(r"^#\s*version\s+\d+")


@dataclass
class ParticleTable:
    """A particle STAR file in memory: all its blocks, and which one holds the particles."""

    path: Path | None  # the file it was read from (for messages and relative image paths)
    blocks: dict[str, pd.DataFrame | dict]  # every data block in file order, keys without "data_"
    particles_key: str  # key of the particle table in ``blocks``
    flavour: str  # "3.0" (one table, no optics) or "3.1" (data_optics + data_particles)
    version_line: str | None = None  # e.g. "# version 30001" as read; written back

    @property
    def particles(self) -> pd.DataFrame:
        return self.blocks[self.particles_key]

    @property
    def optics(self) -> pd.DataFrame | None:
        """The optics table (3.1 flavour), or None."""
        if self.flavour != "3.1":
            return None
        return self.blocks["optics"]

    def __len__(self) -> int:
        return len(self.particles)

    def optics_rows(self) -> np.ndarray:
        """Row of the optics table for each particle (3.1 flavour), checking every group exists."""
        optics = self.optics
        assert optics is not None
        particles = self.particles
        if "rlnOpticsGroup" not in particles.columns:
            if len(optics) != 1:
                raise InputError(
                    self.path,
                    f"particles have no rlnOpticsGroup column but data_optics has {len(optics)} "
                    "groups",
                )
            return np.zeros(len(particles), dtype=np.intp)
        if "rlnOpticsGroup" not in optics.columns:
            raise InputError(self.path, "data_optics has no rlnOpticsGroup column")
        groups = pd.Index(optics["rlnOpticsGroup"])
        if not groups.is_unique:
            raise InputError(self.path, "data_optics lists an optics group more than once")
        rows = groups.get_indexer(particles["rlnOpticsGroup"])
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            first = int(missing[0])
            group = particles["rlnOpticsGroup"].iloc[first]
            raise InputError(
                self.path, f"unknown optics group {group}: no such row in data_optics", row=first + 1
            )
        return rows

    def per_particle(self) -> pd.DataFrame:
        """Pixel size, box and CTF parameters for every particle, one row each.

        Columns are PER_PARTICLE_LABELS, all float64 (rlnImageSize too, so that it can be NaN).
        Values come from the particle table where it has the column, else from the particle's
        optics group. Missing CTF values are NaN (phase shift 0); a missing pixel size is NaN and
        left for the caller to decide on.
        """
        particles = self.particles
        optics = self.optics
        rows = self.optics_rows() if optics is not None else None

        def column(label: str) -> np.ndarray | None:
            if label in particles.columns:
                return pd.to_numeric(particles[label], errors="coerce").to_numpy(np.float64)
            if optics is not None and label in optics.columns:
                values = pd.to_numeric(optics[label], errors="coerce").to_numpy(np.float64)
                return values[rows]
            return None

        out = {}
        for label in PER_PARTICLE_LABELS:
            values = column(label)
            if values is None:
                values = np.full(len(particles), 0.0 if label == "rlnPhaseShift" else np.nan)
            out[label] = values
        if np.isnan(out["rlnImagePixelSize"]).all():
            detector, mag = column("rlnDetectorPixelSize"), column("rlnMagnification")
            if detector is not None and mag is not None:
                out["rlnImagePixelSize"] = detector * 1e4 / mag
        return pd.DataFrame(out, index=particles.index)

    def pixel_size(self) -> float:
        """The one pixel size (Angstrom) of all particles; an InputError if it is missing, not
        positive, or differs between optics groups (or rows): cdae-em does not rescale groups."""
        pixel = self.per_particle()["rlnImagePixelSize"].to_numpy()
        bad = np.flatnonzero(~(pixel > 0) | ~np.isfinite(pixel))
        if len(bad):
            row = int(bad[0])
            value = pixel[row]
            where = ""
            if self.optics is not None and "rlnImagePixelSize" not in self.particles.columns:
                where = f" of optics group {self.particles['rlnOpticsGroup'].iloc[row]}" \
                    if "rlnOpticsGroup" in self.particles.columns else " in data_optics"
            if np.isnan(value):
                problem = (f"no pixel size{where} (rlnImagePixelSize, or rlnDetectorPixelSize and "
                           "rlnMagnification)")
            else:
                problem = f"pixel size{where} is {value:g}: it must be a positive number of Angstrom"
            raise InputError(self.path, problem, row=row + 1)
        values = np.unique(np.round(pixel, 6))
        if len(values) > 1:
            if self.optics is not None and "rlnOpticsGroup" in self.particles.columns:
                groups = pd.Series(pixel).groupby(self.particles["rlnOpticsGroup"].to_numpy()).first()
                listed = ", ".join(f"group {g}: {p:g} A" for g, p in groups.items())
                raise InputError(self.path, f"optics groups have different pixel sizes ({listed}); cdae-em "
                                 "needs one: rescale the particles to one pixel size (e.g. relion_image_handler "
                                 "--rescale_angpix) or process each optics group separately")
            row = int(np.flatnonzero(np.round(pixel, 6) != np.round(pixel[0], 6))[0])
            raise InputError(self.path, f"pixel size {pixel[row]:g} A differs from row 1's {pixel[0]:g} A; "
                             "cdae-em needs one pixel size for all particles", row=row + 1)
        return float(pixel[0])

    def subset(self, keep: np.ndarray) -> ParticleTable:
        """A copy with only the particle rows where ``keep`` (boolean, one per particle) is true;
        every other block as it is."""
        blocks = {k: (v.copy() if isinstance(v, pd.DataFrame) else dict(v)) for k, v in self.blocks.items()}
        blocks[self.particles_key] = self.particles[np.asarray(keep, dtype=bool)].reset_index(drop=True)
        return ParticleTable(self.path, blocks, self.particles_key, self.flavour, self.version_line)

    def with_columns(
        self,
        particles: Mapping[str, Any] | None = None,
        optics: Mapping[str, Any] | None = None,
    ) -> ParticleTable:
        """A copy with particle and optics columns added (at the end) or replaced in place.

        In the 3.0 flavour there is no optics table: ``optics`` values go to the particle table
        (a scalar or a one-element sequence applies to every particle), so the file stays 3.0.
        """
        blocks = {k: (v.copy() if isinstance(v, pd.DataFrame) else dict(v)) for k, v in self.blocks.items()}
        table = ParticleTable(self.path, blocks, self.particles_key, self.flavour, self.version_line)
        target = table.particles
        for label, values in (particles or {}).items():
            target[label] = _column_values(values, len(target), label)
        if optics:
            if table.flavour == "3.1":
                optics_df = table.blocks["optics"]
                for label, values in optics.items():
                    optics_df[label] = _column_values(values, len(optics_df), label)
            else:
                for label, values in optics.items():
                    if not np.isscalar(values) and len(values) == 1:
                        values = list(values)[0]
                    target[label] = _column_values(values, len(target), label)
        return table


def _column_values(values: Any, n: int, label: str) -> Any:
    """Check an array-like has ``n`` values (scalars broadcast) and return it ready for pandas."""
    if np.isscalar(values):
        return values
    if isinstance(values, pd.Series):
        values = values.to_numpy()
    if len(values) != n:
        raise ValueError(f"column {label}: {len(values)} values for a table of {n} rows")
    return values


def read_particles(path: str | Path) -> ParticleTable:
    """Read a particle STAR file (RELION 3.0, 3.1/4/5, or converted from cryoSPARC)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a file")
    try:
        raw = starfile.read(path, always_dict=True, parse_as_string=STRING_LABELS)
    except Exception as exc:  # starfile/pandas raise many kinds on malformed text
        problem = f"{type(exc).__name__}: {exc}"
        if "Length mismatch" in str(exc):
            problem = "a row has more values than its table has columns"
        raise InputError(path, f"cannot parse as a STAR file ({problem})") from exc
    blocks = {name: block for name, block in raw.items() if block is not None}
    if not blocks:
        raise InputError(path, "not a STAR file: no data_ block found")

    candidates = [
        name
        for name, block in blocks.items()
        if isinstance(block, pd.DataFrame) and "rlnImageName" in block.columns
    ]
    if not candidates:
        raise InputError(path, "no particle table: no block has an rlnImageName column")
    key = "particles" if "particles" in candidates else candidates[0]
    particles = blocks[key]
    if len(particles) == 0:
        raise InputError(path, f"empty particle table (data_{key} has no rows)")
    missing = np.flatnonzero(particles["rlnImageName"].isna().to_numpy())
    if len(missing):
        raise InputError(path, "no rlnImageName", row=int(missing[0]) + 1)

    has_optics = isinstance(blocks.get("optics"), pd.DataFrame) and key != "optics"
    table = ParticleTable(
        path=path,
        blocks=blocks,
        particles_key=key,
        flavour="3.1" if has_optics else "3.0",
        version_line=_read_version_line(path),
    )
    if table.optics is not None:
        table.optics_rows()  # fail now on unknown optics groups, not halfway through a job
    log.debug("read %d particles from %s (RELION %s flavour)", len(table), path, table.flavour)
    return table


def _read_version_line(path: Path) -> str | None:
    """The first ``# version NNNNN`` comment before the first table's rows, if any."""
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if _VERSION_RE.match(line):
                return line
            if line.startswith("loop_"):
                return None
    return None


def _format_float(x: float) -> str:
    """Floats the way RELION writes them: fixed 6 decimals, scientific where that would lose them."""
    if math.isfinite(x) and x != 0.0 and (abs(x) < 1e-3 or abs(x) >= 1e6):
        return f"{x:.6e}"
    return f"{x:.6f}"


def _block_text(name: str, block: pd.DataFrame | dict) -> str:
    """One data block as STAR text (starfile's formatting, without its file header)."""
    text = starfile.to_string({name: block}, float_format=_format_float, na_rep="nan")
    return text.split("\n", 1)[1].lstrip("\n")  # drop the "# Created by ..." line


def write_star(table: ParticleTable, path: str | Path) -> None:
    """Write ``table`` atomically (temporary file, then rename) in the flavour it was read in.

    In the 3.1 flavour every block is preceded by the version line, as RELION writes it.
    """
    path = Path(path)
    version = table.version_line
    if table.flavour == "3.1" and version is None:
        version = DEFAULT_VERSION_LINE
    write_text(path, star_text(table.blocks, version))
    log.debug("wrote %d particles to %s", len(table), path)


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """A one-table STAR file (``data_``), written atomically (class lists and the like)."""
    write_star(ParticleTable(path=None, blocks={"": df}, particles_key="", flavour="3.0"), path)


def star_text(blocks: Mapping[str, pd.DataFrame | dict], version_line: str | None = None) -> str:
    """STAR text of ``blocks`` (name without ``data_`` -> table, or -> {label: value}), each block
    preceded by ``version_line`` (e.g. "# version 50001") when given, as RELION writes them."""
    parts = []
    for name, block in blocks.items():
        if version_line is not None:
            parts.append(f"\n{version_line}\n\n")
        parts.append(_block_text(name, block))
    return "".join(parts)


def new_particle_table(particles: pd.DataFrame, optics: pd.DataFrame) -> ParticleTable:
    """A fresh RELION 3.1-flavour table (data_optics + data_particles), e.g. for simulated data."""
    return ParticleTable(
        path=None,
        blocks={"optics": optics.reset_index(drop=True), "particles": particles.reset_index(drop=True)},
        particles_key="particles",
        flavour="3.1",
        version_line=DEFAULT_VERSION_LINE,
    )
