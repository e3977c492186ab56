"""Atomic models as sums of Gaussian atoms: reading PDB/mmCIF, density maps and projections.

Used to build the embedded default map and to simulate particles of known structure for tests.
Each atom is an isotropic 3D Gaussian with sigma = 0.225 * resolution (UCSF Chimera molmap's
convention) and scattering weight Z (its atomic number; hydrogens are dropped).

Geometry follows ``cdae_em.geometry``: a point r (Angstrom, relative to the box centre) sits at
voxel index ``n // 2 + r / pixel_size`` on each axis, with x on the last array axis; a rotation
matrix A sends it to (A r)[:2] in the projection image.

Scale: every 1D Gaussian factor is normalised so that its *sampled* values sum to 1 over the
(unbounded) pixel lattice, not by the continuous formula 1 / (sqrt(2 pi) sigma). So the voxels of
one atom sum to its weight exactly, whatever its sub-voxel position and however narrow the Gaussian
(the continuous formula would be off by a few percent for sigma below a voxel), and the z-sum of
``atoms_to_map`` equals ``project_atoms`` for the identity rotation. Values are "weight per voxel"
(the density integrated over the voxel), so the projection is the line integral in voxel units.
"""

from __future__ import annotations

import gzip
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdae_em.errors import InputError

log = logging.getLogger(__name__)

#: Chimera molmap's sigma per Angstrom of resolution.
SIGMA_PER_RESOLUTION = 0.225

_SYMBOLS = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se "
    "Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy "
    "Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U"
).split()
#: Atomic number of each element symbol (upper case); deuterium counts as hydrogen.
ATOMIC_NUMBER: dict[str, int] = {s.upper(): z for z, s in enumerate(_SYMBOLS, start=1)}
ATOMIC_NUMBER["D"] = 1

#: Residue names of water, skipped unless asked for.
WATER_NAMES = frozenset({"HOH", "WAT", "DOD", "H2O", "SOL", "TIP", "TIP3"})

_PDB_SUFFIXES = {".pdb", ".ent", ".pdb1"}
_CIF_SUFFIXES = {".cif", ".mmcif"}


@dataclass
class Atoms:
    """Heavy atoms of a model: positions (N, 3) in Angstrom and scattering weights (N,) = Z."""

    xyz: np.ndarray
    weight: np.ndarray
    path: Path | None = None

    def __post_init__(self) -> None:
        self.xyz = np.asarray(self.xyz, dtype=np.float64).reshape(-1, 3)
        self.weight = np.asarray(self.weight, dtype=np.float64).reshape(-1)
        if len(self.xyz) != len(self.weight):
            raise ValueError(f"{len(self.xyz)} positions but {len(self.weight)} weights")

    def __len__(self) -> int:
        return len(self.weight)

    def diameter(self) -> float:
        """Largest distance between two atoms, in Angstrom.

        Exact up to 4,000 atoms; beyond, taken over the extreme atoms in 500 directions (which
        include the farthest pair, or a pair within a fraction of a percent of it).
        """
        xyz = self.xyz
        if len(xyz) < 2:
            return 0.0
        if len(xyz) > 4000:  # the farthest pair lies on the convex hull: keep extreme points
            dirs = _sphere_directions(500)
            idx = np.unique(np.concatenate([(xyz @ dirs.T).argmax(0), (xyz @ dirs.T).argmin(0)]))
            xyz = xyz[idx]
        d2 = ((xyz[:, None, :] - xyz[None, :, :]) ** 2).sum(-1)
        return float(np.sqrt(d2.max()))


def _sphere_directions(n: int) -> np.ndarray:
    """``n`` unit vectors spread over the sphere (Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1.0 - 2.0 * i / n)
    theta = np.pi * (1.0 + 5.0**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)


# --------------------------------------------------------------------------------------------
# Reading


def read_atoms(path: str | Path, keep_water: bool = False) -> Atoms:
    """Read the heavy atoms of the first model of a PDB or mmCIF file (optionally gzipped).

    Hydrogens are dropped, waters skipped unless ``keep_water``; of an atom's alternate locations
    only the first listed is kept. Raises InputError for a missing or unreadable file, an unknown
    format, unknown elements, or a file without atoms.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8", errors="replace")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(path, f"cannot read: {exc}") from exc

    fmt = _detect_format(path, text)
    if fmt == "cif":
        elements, xyz = _parse_cif(path, text, keep_water)
    else:
        elements, xyz = _parse_pdb(path, text, keep_water)

    z = np.empty(len(elements), dtype=np.float64)
    for i, e in enumerate(elements):
        number = ATOMIC_NUMBER.get(e.upper())
        if number is None:
            raise InputError(path, f"unknown element {e!r} (atom {i + 1})")
        z[i] = number
    heavy = z > 1
    if not heavy.any():
        raise InputError(path, "no (non-hydrogen, non-water) atoms found")
    log.info("%s: %d atoms (%d hydrogens dropped)", path, heavy.sum(), (~heavy).sum())
    return Atoms(xyz=np.asarray(xyz, dtype=np.float64)[heavy], weight=z[heavy], path=path)


def _detect_format(path: Path, text: str) -> str:
    """'pdb' or 'cif', from the file name's suffix and else from the content."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in _CIF_SUFFIXES:
        return "cif"
    if suffix in _PDB_SUFFIXES:
        return "pdb"
    if re.search(r"^\s*_atom_site\.", text, re.MULTILINE):
        return "cif"
    if re.search(r"^(ATOM  |HETATM)", text, re.MULTILINE):
        return "pdb"
    raise InputError(path, "unknown format: expected a PDB or mmCIF file with atom records")


def _element_from_pdb_name(name4: str) -> str:
    """Guess the element from a PDB atom name (columns 13-16) when columns 77-78 are blank.

    Two-letter elements start in column 13 ("FE  ", "CA  " = calcium); one-letter ones in column 14
    (" CA " = C-alpha). Four-character names starting in column 13 are usually hydrogens ("HG21").
    """
    name4 = name4.ljust(4)
    if name4[0] in " 0123456789":
        letters = [c for c in name4[1:] if c.isalpha()]
        return letters[0] if letters else ""
    if name4[2:].strip() == "" and name4[:2].upper() in ATOMIC_NUMBER:
        return name4[:2]
    return name4[0]


def _parse_pdb(path: Path, text: str, keep_water: bool) -> tuple[list[str], list[tuple]]:
    """Elements and coordinates of the ATOM/HETATM records of the first model."""
    elements: list[str] = []
    xyz: list[tuple[float, float, float]] = []
    seen: set[tuple] = set()
    guessed = 0
    for row, line in enumerate(text.splitlines(), start=1):
        record = line[:6]
        if record == "ENDMDL" or (record == "MODEL " and xyz):
            break
        if record not in ("ATOM  ", "HETATM"):
            continue
        resname = line[17:20].strip()
        if not keep_water and resname.upper() in WATER_NAMES:
            continue
        if line[16:17].strip():  # alternate location: keep the first one listed
            key = (line[12:16], resname, line[21:22], line[22:27])  # name, res, chain, seq+icode
            if key in seen:
                continue
            seen.add(key)
        try:
            x, y, z = float(line[30:38]), float(line[38:46]), float(line[46:54])
        except ValueError:
            raise InputError(path, "bad coordinates in atom record", row=row) from None
        element = line[76:78].strip() if len(line) > 76 else ""
        element = re.sub(r"[^A-Za-z]", "", element)
        if not element:
            element = _element_from_pdb_name(line[12:16])
            guessed += 1
        if not element:
            raise InputError(path, "cannot tell the element of an atom", row=row)
        elements.append(element)
        xyz.append((x, y, z))
    if guessed:
        log.warning("%s: element column blank for %d atoms, guessed from atom names", path, guessed)
    if not xyz:
        raise InputError(path, "no ATOM/HETATM records found")
    return elements, xyz


_CIF_TOKEN = re.compile(r"""'(?:[^']|'(?=\S))*'(?=\s|$)|"(?:[^"]|"(?=\S))*"(?=\s|$)|\S+""")


def _cif_tokens(line: str) -> list[str]:
    """Split a CIF data line into values (quotes end only before whitespace, as CIF requires).

    ``shlex`` would reject unquoted primes (O5') that mmCIF allows, hence a CIF-aware tokenizer.
    """
    out = []
    for tok in _CIF_TOKEN.findall(line):
        if len(tok) >= 2 and tok[0] == tok[-1] and tok[0] in "'\"":
            tok = tok[1:-1]
        out.append(tok)
    return out


def _parse_cif(path: Path, text: str, keep_water: bool) -> tuple[list[str], list[tuple]]:
    """Elements and coordinates of the ``_atom_site`` loop of an mmCIF file (first model)."""
    lines = text.splitlines()
    i, n = 0, len(lines)
    columns: list[str] = []
    while i < n:
        if lines[i].strip() == "loop_":
            j = i + 1
            while j < n and lines[j].strip() == "":
                j += 1
            if j < n and lines[j].strip().startswith("_atom_site."):
                while j < n and lines[j].strip().startswith("_atom_site."):
                    columns.append(lines[j].strip().split()[0][len("_atom_site."):])
                    j += 1
                i = j
                break
        i += 1
    if not columns:
        raise InputError(path, "no _atom_site loop found")

    def col(*names: str) -> int | None:
        for name in names:
            if name in columns:
                return columns.index(name)
        return None

    cx, cy, cz = col("Cartn_x"), col("Cartn_y"), col("Cartn_z")
    if cx is None or cy is None or cz is None:
        raise InputError(path, "_atom_site loop has no Cartn_x/Cartn_y/Cartn_z columns")
    c_elem = col("type_symbol")
    c_name = col("label_atom_id", "auth_atom_id")
    c_res = col("label_comp_id", "auth_comp_id")
    c_model = col("pdbx_PDB_model_num")
    c_alt = col("label_alt_id")
    key_cols = [c for c in (col("label_asym_id", "auth_asym_id"),
                            col("label_seq_id", "auth_seq_id"),
                            col("pdbx_PDB_ins_code"), c_res, c_name) if c is not None]
    if c_elem is None and c_name is None:
        raise InputError(path, "_atom_site loop has neither type_symbol nor atom names")

    elements: list[str] = []
    xyz: list[tuple[float, float, float]] = []
    seen: set[tuple] = set()
    first_model = None
    pending: list[str] = []
    ncol = len(columns)
    for row in range(i, n):
        line = lines[row]
        stripped = line.strip()
        if not pending and (stripped.startswith(("_", "loop_", "data_", "#"))):
            break
        if stripped == "":
            continue
        pending.extend(_cif_tokens(line))
        if len(pending) < ncol:
            continue
        values, pending = pending[:ncol], pending[ncol:]
        if c_model is not None:
            if first_model is None:
                first_model = values[c_model]
            elif values[c_model] != first_model:
                continue
        if not keep_water and c_res is not None and values[c_res].upper() in WATER_NAMES:
            continue
        if c_alt is not None and values[c_alt] not in (".", "?"):
            key = tuple(values[c] for c in key_cols)
            if key in seen:  # a second alternate location
                continue
            seen.add(key)
        try:
            xyz.append((float(values[cx]), float(values[cy]), float(values[cz])))
        except ValueError:
            raise InputError(path, "bad coordinates in _atom_site", row=row + 1) from None
        element = values[c_elem] if c_elem is not None else ""
        if element in ("", ".", "?") and c_name is not None:
            element = "".join(c for c in values[c_name] if c.isalpha())[:1]
        elements.append(element.capitalize())
    if pending:
        raise InputError(path, f"_atom_site loop ends in an incomplete row ({len(pending)} values)")
    if not xyz:
        raise InputError(path, "the _atom_site loop holds no atoms")
    return elements, xyz


def centre(atoms: Atoms) -> Atoms:
    """The same atoms shifted so that their weighted centre (centre of scattering) is the origin."""
    c = (atoms.xyz * atoms.weight[:, None]).sum(0) / atoms.weight.sum()
    return Atoms(xyz=atoms.xyz - c, weight=atoms.weight.copy(), path=atoms.path)


# --------------------------------------------------------------------------------------------
# Densities


def _sigma_voxels(pixel_size: float, resolution: float | None) -> float:
    """Gaussian sigma in voxels for a resolution in Angstrom (default 2 * pixel_size)."""
    if pixel_size <= 0:
        raise ValueError(f"pixel size must be positive, got {pixel_size}")
    if resolution is None:
        resolution = 2.0 * pixel_size
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    return SIGMA_PER_RESOLUTION * resolution / pixel_size


def _profiles(u: torch.Tensor, box: int, s: float) -> torch.Tensor:
    """1D Gaussian factors (..., box) centred at voxel positions ``u`` (...), each summing to 1
    over the unbounded lattice (so an atom near the edge loses what falls outside the box).

    Only the voxels within 8 sigma of each centre are evaluated (beyond, exp(-32) is negligible),
    then scattered into place: a few times faster than evaluating the whole box.
    """
    half = int(np.ceil(8.0 * s)) + 1
    base = torch.floor(u).unsqueeze(-1)
    idx = base + torch.arange(-half, half + 1, dtype=u.dtype)  # (..., 2 * half + 1) voxel indices
    vals = torch.exp(-0.5 * ((idx - u.unsqueeze(-1)) / s) ** 2)
    vals = vals / vals.sum(-1, keepdim=True)
    # voxels outside the box go to two spill columns (0 and box + 1), dropped at the end
    col = (idx + 1).clamp_(0, box + 1).to(torch.int64)
    out = torch.zeros(u.shape + (box + 2,), dtype=u.dtype)
    out.scatter_add_(-1, col, vals)
    return out[..., 1:box + 1]


def _check_box(atoms: Atoms, box: int, pixel_size: float, what: str, radius: np.ndarray) -> None:
    """Warn when atoms fall outside the box (their density is then cut off)."""
    if box < 1:
        raise ValueError(f"box must be positive, got {box}")
    half = (box // 2) * pixel_size
    outside = int((radius > half).sum())
    if outside:
        log.warning("%s: %d of %d atoms lie outside the %d-voxel box at %.3g A/pixel",
                    what, outside, len(atoms), box, pixel_size)


def atoms_to_map(atoms: Atoms, box: int, pixel_size: float,
                 resolution: float | None = None, max_elements: int = 2**22) -> np.ndarray:
    """Density map (box, box, box) float32, indexed [z, y, x], of Gaussian atoms.

    Each atom contributes weight * gz (x) gy (x) gx with sampled 1D Gaussians of sigma
    0.225 * resolution, each normalised to sum 1 over the lattice: the voxels of an atom inside the
    box sum to its weight. Evaluated separably, a chunk of atoms per matrix product
    (``max_elements`` bounds the chunk's (atoms, box^2) outer-product array).
    """
    s = _sigma_voxels(pixel_size, resolution)
    _check_box(atoms, box, pixel_size, "atoms_to_map", np.abs(atoms.xyz).max(1) if len(atoms) else
               np.zeros(0))
    u = torch.from_numpy(box // 2 + atoms.xyz / pixel_size)  # (N, 3): x, y, z voxel positions
    w = torch.from_numpy(atoms.weight)
    out = torch.zeros((box, box * box), dtype=torch.float64)
    chunk = max(1, min(4096, max_elements // (box * box)))
    for start in range(0, len(atoms), chunk):
        g = _profiles(u[start:start + chunk], box, s)  # (n, 3, box)
        gyx = (g[:, 1, :, None] * g[:, 0, None, :]).reshape(len(g), box * box)
        out += (g[:, 2] * w[start:start + chunk, None]).T @ gyx
    return out.reshape(box, box, box).numpy().astype(np.float32)


def project_atoms(atoms: Atoms, matrices: np.ndarray, box: int, pixel_size: float,
                  resolution: float | None = None, max_elements: int = 2**22) -> np.ndarray:
    """Projections (M, box, box) float32, indexed [view, y, x], of the atoms rotated by each A.

    Analytic: an atom at r lands at (A r)[:2] as a 2D Gaussian of the map's sigma and weight, so the
    projection equals the z-sum of ``atoms_to_map`` of the rotated atoms (the line integral in voxel
    units). Image = Gy^T diag(w) Gx, batched over views with torch matmuls; ``max_elements`` bounds
    the size of the per-chunk factor arrays.
    """
    mats = np.asarray(matrices, dtype=np.float64)
    if mats.ndim == 2:
        mats = mats[None]
    if mats.shape[1:] != (3, 3):
        raise ValueError(f"expected rotation matrices of shape (M, 3, 3), got {mats.shape}")
    s = _sigma_voxels(pixel_size, resolution)
    n_views, n_atoms = len(mats), len(atoms)
    _check_box(atoms, box, pixel_size, "project_atoms", np.linalg.norm(atoms.xyz, axis=1))
    out = torch.zeros((n_views, box, box), dtype=torch.float64)
    if n_atoms == 0:
        return out.numpy().astype(np.float32)
    view_chunk = max(1, min(n_views, max_elements // (box * min(n_atoms, 4096))))
    atom_chunk = max(1, min(n_atoms, max_elements // (box * view_chunk)))
    xyz_all = torch.from_numpy(atoms.xyz).to(torch.float32)
    w = torch.from_numpy(atoms.weight).to(torch.float32)
    for v0 in range(0, n_views, view_chunk):
        rot = torch.from_numpy(mats[v0:v0 + view_chunk, :2, :]).to(torch.float32)  # (V, 2, 3)
        acc = torch.zeros((len(rot), box, box), dtype=torch.float64)
        for a0 in range(0, n_atoms, atom_chunk):
            xyz = xyz_all[a0:a0 + atom_chunk]
            u = box // 2 + torch.einsum("vij,nj->vni", rot, xyz) / pixel_size  # (V, n, 2)
            g = _profiles(u, box, s)  # (V, n, 2, box): x then y factors
            gy = g[:, :, 1] * w[a0:a0 + atom_chunk, None]
            acc += torch.bmm(gy.transpose(1, 2), g[:, :, 0]).to(torch.float64)
        out[v0:v0 + len(rot)] = acc
    return out.numpy().astype(np.float32)
