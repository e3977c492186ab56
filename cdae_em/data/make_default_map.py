"""Build the embedded default map from an atomic model (run once by a developer, not at run time).

    python -m cdae_em.data.make_default_map --pdb PATH/4JSV.pdb --o cdae_em/data/default_map.mrc.gz

The structure is read with ``read_atoms``, centred on its centre of scattering, and sampled as
Gaussian atoms (``atoms_to_map``) in a 64-voxel box at a pixel size chosen so the particle's largest
diameter fills about 62% of the box, at a resolution of 2.5 pixels. A name ending in ``.gz`` is
written gzipped (with a zero timestamp, so a rebuild gives identical bytes). The metadata go to a
JSON file next to the map (``default_map.json`` for ``default_map.mrc.gz``).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import re
import shlex
import sys
import tempfile
from pathlib import Path

import mrcfile
import numpy as np

from cdae_em import __version__
from cdae_em.simulate.structure import atoms_to_map, centre, read_atoms

log = logging.getLogger(__name__)

BOX = 64
FILL = 0.625  # target fraction of the box taken by the largest diameter
RESOLUTION_PIXELS = 2.5


def pick_pixel_size(diameter: float, box: int = BOX, fill: float = FILL) -> float:
    """Pixel size (Angstrom, rounded to 0.1) putting ``diameter`` across ``fill`` of the box."""
    return max(0.1, round(diameter / (fill * box), 1))


def pdb_header(path: Path) -> dict:
    """PDB id, title and molecule names from a PDB file's HEADER/TITLE/COMPND records (for an
    mmCIF file, only the id, from ``_entry.id``)."""
    pdb_id, title, compnd = None, [], []
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8", "replace")
    entry = re.search(r"^_entry\.id\s+(\S+)", text, re.MULTILINE)
    if entry:
        return {"pdb_id": entry.group(1).strip("'\""), "title": None, "molecules": []}
    for line in text.splitlines():
        rec = line[:6]
        if rec == "HEADER":
            pdb_id = line[62:66].strip() or None
        elif rec == "TITLE ":
            title.append(line[10:80].strip())
        elif rec == "COMPND":
            compnd.append(line[10:80].strip())
        elif rec in ("ATOM  ", "HETATM"):
            break
    molecules = [m.strip() for m in re.findall(r"MOLECULE:\s*([^;]+);?", " ".join(compnd))]
    return {"pdb_id": pdb_id, "title": " ".join(title) or None, "molecules": molecules}


def source_package(path: Path) -> dict | None:
    """Name, version and member path when ``path`` lies in an unpacked sdist (has PKG-INFO)."""
    for parent in path.resolve().parents:
        info = parent / "PKG-INFO"
        if info.is_file():
            meta = dict(re.findall(r"^(Name|Version): (.+)$", info.read_text(), re.MULTILINE))
            return {"package": meta.get("Name"), "version": meta.get("Version"),
                    "path_in_archive": f"{parent.name}/{path.resolve().relative_to(parent)}"}
    return None


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_map(data: np.ndarray, path: Path, pixel_size: float, label: str) -> None:
    """Write a float32 MRC with the voxel size set; gzipped (zero mtime) if ``path`` ends in .gz."""
    gz = path.suffix == ".gz"
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "map.mrc" if gz else path
        with mrcfile.new(plain, overwrite=True) as mrc:
            mrc.set_data(data.astype(np.float32))
            mrc.voxel_size = pixel_size
            mrc.header.label[0] = label[:80].encode("ascii", "replace")
            mrc.header.nlabl = 1
        if gz:
            path.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=9, mtime=0))


def main(argv: list[str] | None = None) -> int:
    """Build the map and its metadata from a PDB/mmCIF file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--pdb", required=True, type=Path, help="atomic model (PDB or mmCIF)")
    parser.add_argument("--o", required=True, type=Path, help="output map (.mrc or .mrc.gz)")
    parser.add_argument("--box", type=int, default=BOX)
    parser.add_argument("--fill", type=float, default=FILL,
                        help="fraction of the box taken by the largest diameter")
    parser.add_argument("--resolution_pixels", type=float, default=RESOLUTION_PIXELS)
    parser.add_argument("--sdist", type=Path, help="source archive the model came from (hashed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    atoms = centre(read_atoms(args.pdb))
    diameter = atoms.diameter()
    pixel_size = pick_pixel_size(diameter, args.box, args.fill)
    resolution = round(args.resolution_pixels * pixel_size, 2)
    vol = atoms_to_map(atoms, args.box, pixel_size, resolution)
    header = pdb_header(args.pdb)
    label = f"cdae-em default map: PDB {header.get('pdb_id')} Gaussian atoms {resolution} A"
    args.o.parent.mkdir(parents=True, exist_ok=True)
    write_map(vol, args.o, pixel_size, label)

    source = source_package(args.pdb) or {}
    if args.sdist is not None:
        source.update(archive=args.sdist.name, archive_sha256=sha256(args.sdist))
    source["file_sha256"] = sha256(args.pdb)
    given = sys.argv[1:] if argv is None else argv
    info = {
        "description": "Gaussian-atom density of an atomic model (cdae_em.simulate.structure.atoms_to_map)",
        "source": source,
        "pdb_id": header.get("pdb_id"),
        "title": header.get("title"),
        "molecules": header.get("molecules"),
        "n_atoms": len(atoms),
        "total_weight": float(atoms.weight.sum()),
        "diameter_A": round(diameter, 2),
        "box": args.box,
        "pixel_size": pixel_size,
        "resolution": resolution,
        "sigma_A": round(0.225 * resolution, 4),
        "fill": round(diameter / (args.box * pixel_size), 3),
        "units": "sum of atomic numbers (Z) per voxel",
        "map_file": args.o.name,
        "map_bytes": args.o.stat().st_size,
        "data_sha256": hashlib.sha256(vol.astype("<f4").tobytes()).hexdigest(),
        "stats": {"min": float(vol.min()), "max": float(vol.max()), "mean": float(vol.mean())},
        "cdae_em_version": __version__,
        "command": "python -m cdae_em.data.make_default_map " + shlex.join(given),
    }
    name = args.o.name
    for suffix in (".gz", ".mrc", ".map"):
        name = name.removesuffix(suffix)
    json_path = args.o.with_name(name + ".json")
    json_path.write_text(json.dumps(info, indent=2) + "\n")
    log.info("%s: %d atoms, diameter %.1f A, %.1f A/pixel, resolution %.2f A, %d bytes; %s",
             args.o, len(atoms), diameter, pixel_size, resolution, info["map_bytes"], json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
