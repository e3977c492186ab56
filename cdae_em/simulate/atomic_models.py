"""Atomic models from PDB and mmCIF files (optionally gzipped): the heavy atoms of the first
model, as positions in Angstrom and scattering weights (atomic numbers), for ``cdae_em.simulate.structure``
to turn into maps and projections."""

from __future__ import annotations

import gzip
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdae_em.errors import InputError

log = logging.getLogger(__name__)

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
